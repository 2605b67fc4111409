"""Trainer: learning, exact resume after a kill, SIGTERM, freezing, accumulation, NaNs."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.configs import flamingo as flamingo_recipe
from mmjax.configs import lm as lm_recipe
import orbax.checkpoint as ocp

from mmjax import checkpoints, sharding, train
from mmjax.cli import UserError
from mmjax.tasks import get_task

ROOT = pathlib.Path(__file__).parent.parent
TINY_LM = {"model.width": 32, "model.depth": 2, "model.num_heads": 2, "model.max_len": 64,
           "data.seq_len": 32, "data.batch_size": 4, "train.log_every": 1,
           "train.eval_every": 0, "train.checkpoint_every": 3, "optim.warmup_steps": 2}


def run(config, workdir):
  """Trains on one device, as the command-line runs these tests compare with do."""
  return train.run(config, workdir, devices=jax.devices()[:1])


def lm_config(few_shot: bool = False, **overrides):
  """The LM recipe at toy size; its few-shot evaluation is left out unless `few_shot`."""
  config = lm_recipe.get_config()
  if not few_shot:
    with config.unlocked():
      del config["evaluate"]
  for key, value in {**TINY_LM, **overrides}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def flamingo_config(**overrides):
  """The LM recipe's training sections around a small Flamingo; vision and LM frozen."""
  config = lm_config(**overrides)
  model = flamingo_recipe.get_config().model.to_dict()
  model["vision"].update(image_size=32, patch_size=8, width=32, depth=1, num_heads=2)
  model["resampler"].update(depth=1, num_heads=2, head_dim=16, num_latents=4)
  model["lm"].update(width=32, depth=2, num_heads=2, max_len=64)
  model["xattn"].update(every=2, num_heads=2, head_dim=16)
  source = dict(kind="shapes_world_documents", image_size=32, max_images=2)
  with config.unlocked():
    config.task = "flamingo"
    config.model = model
    config.trainable = flamingo_recipe.get_config().trainable
    config.data = dict(seq_len=48, batch_size=4, max_images=2, image_size=32,
                       datasets=dict(docs=dict(source=source)), eval_datasets={})
  return config


def losses_by_step(workdir):
  """{step: loss}, checking that a step logged twice (replayed after a kill) agreed."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      assert out.setdefault(record["step"], record["loss"]) == record["loss"], record
  return out


def cli(workdir, steps):
  overrides = {**TINY_LM, "train.steps": steps, "evaluate.episodes": 2}
  args = [f"--config.{k}={v}" for k, v in overrides.items()]
  return [sys.executable, "-m", "mmjax.train", f"--config={ROOT / 'configs/lm.py'}",
          f"--workdir={workdir}", *args]


def wait_for_step(workdir, step, process, timeout=240):
  metrics = pathlib.Path(workdir) / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    if metrics.exists() and len(losses_by_step(workdir)) >= step:
      return
    assert process.poll() is None, "training ended before it could be interrupted"
    time.sleep(0.05)
  raise TimeoutError(f"no step {step} within {timeout}s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run(lm_config(**{"train.steps": 40}), workdir)
  return losses_by_step(workdir)


def test_short_run_learns_and_writes_its_config(uninterrupted, tmp_path):
  assert len(uninterrupted) == 40
  first, last = np.mean([uninterrupted[s] for s in (1, 2, 3)]), uninterrupted[40]
  assert last < first - 0.5, (first, last)


@pytest.mark.parametrize("kill_after", [5])
def test_killed_run_resumes_on_the_same_loss_curve(uninterrupted, tmp_path, kill_after):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.Popen(cli(tmp_path, 40), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    wait_for_step(tmp_path, kill_after, process)
  finally:
    process.kill()
    process.wait()
  assert len(losses_by_step(tmp_path)) < 40
  run(lm_config(**{"train.steps": 40}), tmp_path)  # the same command, re-run
  assert losses_by_step(tmp_path) == uninterrupted


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(uninterrupted, tmp_path):
  process = subprocess.Popen(cli(tmp_path, 40), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  wait_for_step(tmp_path, 4, process)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 0 and "SIGTERM: saved the checkpoint at step" in out
  stopped = int(out.split("saved the checkpoint at step ")[1].split(";")[0])
  assert stopped in {int(p.name) for p in (tmp_path / "checkpoints").iterdir()}
  run(lm_config(**{"train.steps": 40}), tmp_path)
  assert losses_by_step(tmp_path) == uninterrupted


def test_frozen_parameters_are_bit_identical_and_have_no_optimizer_state(tmp_path):
  config = flamingo_config(**{"train.steps": 3})
  task = get_task("flamingo")
  model = task.build_model(config)
  args, _ = task.init_inputs(config)
  import flax.linen as nn
  init = nn.unbox(jax.jit(model.init)(jax.random.key(config.seed), *args)["params"])
  run(config, tmp_path)

  trainable0, frozen0 = train.partition_params(init, config.trainable)
  state = {"step": jnp.int32(0), "params": trainable0, "frozen": frozen0,
           "opt_state": train.make_optimizer(config, trainable0)[0].init(trainable0)}
  manager = checkpoints.manager(tmp_path)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored = manager.restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  assert set(restored["frozen"]) == {"vision", "lm"} and set(restored["params"]) == {
      "resampler", "lm"}
  assert all(k.startswith("xattn_") for k in restored["params"]["lm"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored["frozen"], frozen0)
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), restored["params"],
                                   trainable0)
  assert all(jax.tree_util.tree_leaves(changed))
  n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable0))
  n_opt = sum(x.size for x in jax.tree_util.tree_leaves(restored["opt_state"]))
  assert n_opt < 2 * n_trainable + 10  # Adam's two moments of the trainable params only


def test_trainable_token_rows_train_only_those_embedding_rows_on_a_sharded_mesh():
  from mmjax.data.tokenizer import ENDOFCHUNK_ID, MEDIA_ID
  rows = [MEDIA_ID, ENDOFCHUNK_ID]
  # Weight decay on the embedding, which would move every row if only gradients were masked.
  config = flamingo_config(**{"optim.decay_pattern": r"kernel$|embedding$",
                              "optim.warmup_steps": 0, "mesh.data": 2, "mesh.fsdp": 2,
                              "mesh.tensor": 2, "sharding": "fsdp_tensor"})
  with config.unlocked():
    config.trainable_token_rows = tuple(rows)
  with pytest.raises(ValueError, match="leaves frozen"):
    train.build(config, jax.devices())
  config.trainable = f"(?:{config.trainable})|^lm/embed/embedding$"
  parts = train.build(config, jax.devices())
  state = train.init_state(config, parts, pretrained=False)
  before = np.asarray(state["params"]["lm"]["embed"]["embedding"])
  step = train.make_train_step(config, parts)
  batch = sharding.global_batch(_lm_batch(config),
                                sharding.batch_sharding(parts.mesh, parts.rules))
  for _ in range(2):
    state, _, _ = step(state, batch)
  after = np.asarray(state["params"]["lm"]["embed"]["embedding"])
  np.testing.assert_array_equal(np.delete(after, rows, 0), np.delete(before, rows, 0))
  assert np.all(np.any(after[rows] != before[rows], axis=1))


def _init_params(config):
  import flax.linen as nn
  task = get_task(config.task)
  args, kwargs = task.init_inputs(config)
  return nn.unbox(task.build_model(config).init(jax.random.key(0), *args, **kwargs)["params"])


def _one_step(config, batch, devices=None):
  """One train step from the initial parameters, at the peak learning rate (no warmup:
  the first update of a warmup starting at 0 would be zero)."""
  config = config.copy_and_resolve_references()
  config.optim.warmup_steps = 0
  parts = train.build(config, devices or jax.devices()[:1])
  state = train.init_state(config, parts, pretrained=False)
  step = train.make_train_step(config, parts)
  return step(state, sharding.global_batch(batch, sharding.batch_sharding(parts.mesh,
                                                                          parts.rules)))


def _lm_batch(config, seed=0):
  data = train.make_data(config, seed=seed, health=train.DataHealth())
  return next(iter(data))


def test_gradient_accumulation_equals_one_large_batch():
  config = lm_config(**{"data.batch_size": 8})
  batch = _lm_batch(config)
  batch["loss_mask"][:4, 10:] = 0  # micro-batches with different token counts
  big, big_metrics, _ = _one_step(config, batch)
  accumulated, acc_metrics, _ = _one_step(lm_config(**{"data.batch_size": 8,
                                                       "optim.accum_steps": 4}), batch)
  np.testing.assert_allclose(acc_metrics["loss"], big_metrics["loss"], rtol=1e-6)
  assert float(big_metrics["update_norm"]) > 0
  # Adam's first update is about lr * g / |g|: float32 summation-order differences show
  # where |g| is tiny, so the updates agree to 2% of the learning rate (1e-3; measured
  # worst case 9.1e-6, one of 4096 elements; tests/test_sharding.py explains the bound).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-5),
                         accumulated["params"], big["params"])


def test_bf16_compute_keeps_float32_master_weights_and_tracks_the_float32_step():
  config, mixed_config = lm_config(), lm_config(compute_dtype="bfloat16")
  batch = _lm_batch(config)
  full, full_metrics, _ = _one_step(config, batch)
  mixed, mixed_metrics, _ = _one_step(mixed_config, batch)
  logits = get_task("lm").build_model(mixed_config).apply({"params": mixed["params"]},
                                                          jnp.asarray(batch["tokens"]))
  assert logits.dtype == jnp.bfloat16
  dtypes = lambda tree: {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)}
  assert dtypes(mixed["params"]) == {"float32"}
  assert dtypes(mixed["opt_state"]) <= {"float32", "int32"}
  np.testing.assert_allclose(mixed_metrics["loss"], full_metrics["loss"], rtol=2e-2)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
  start = flat(_init_params(config))
  full_update, mixed_update = flat(full["params"]) - start, flat(mixed["params"]) - start
  cosine = full_update @ mixed_update / np.linalg.norm(full_update) / np.linalg.norm(mixed_update)
  assert cosine > 0.9, cosine


def test_a_batch_with_every_label_masked_gives_zero_loss_not_nan():
  config = lm_config()
  batch = _lm_batch(config)
  batch["loss_mask"][:] = 0
  state, metrics, _ = _one_step(config, batch)
  assert float(metrics["loss"]) == 0.0 and bool(metrics["finite"])


def test_nonfinite_updates_abort_with_the_step_or_are_skipped(tmp_path):
  # A finite learning rate whose updates' norm overflows float32 (a NaN one is refused by
  # the config's validation).
  config = lm_config(**{"optim.lr": 1e38, "optim.warmup_steps": 0, "train.steps": 3})
  with pytest.raises(train.NonFiniteError, match=r"step 1: .*update is not .*optim.lr"):
    run(config, tmp_path / "abort")
  skip = lm_config(**{"optim.lr": float("nan"), "train.nonfinite": "skip"})
  batch = _lm_batch(skip)
  state, metrics, _ = _one_step(skip, batch)
  assert not bool(metrics["finite"])
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))


def test_nonfinite_gradients_are_named_by_parameter():
  config = lm_config(**{"optim.warmup_steps": 0})
  parts = train.build(config, jax.devices()[:1])
  state = train.init_state(config, parts, pretrained=False)
  step = train.make_train_step(config, parts)
  batch = sharding.global_batch(_lm_batch(config), sharding.batch_sharding(parts.mesh,
                                                                           parts.rules))
  state, metrics, nonfinite = step(state, batch)
  assert bool(metrics["finite"]) and not any(bool(v) for v in nonfinite.values())
  # A NaN in one parameter makes the loss NaN, and the gradients it flows into: named.
  flat = checkpoints.flat_params(state["params"])
  name = next(k for k in flat if "final_norm" in k)
  flat[name] = flat[name].at[0].set(jnp.nan)
  state["params"] = checkpoints.tree_params(flat)
  _, metrics, nonfinite = step(state, batch)
  assert not bool(metrics["finite"])
  assert bool(nonfinite[name]) and sum(bool(v) for v in nonfinite.values()) > 1
  with pytest.raises(train.NonFiniteError, match=r"non-finite gradients in \d+ parameter"):
    train.check_finite(2, metrics, nonfinite)


def test_contrastive_loss_matches_naive_infonce():
  from mmjax import losses
  rng = np.random.default_rng(0)
  image, text = (rng.normal(size=(5, 8)) for _ in range(2))
  image /= np.linalg.norm(image, axis=1, keepdims=True)
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  logits = 10.0 * image @ text.T
  log_softmax = lambda z: z - np.log(np.exp(z).sum(1, keepdims=True))
  naive = -(np.mean(np.diag(log_softmax(logits))) + np.mean(np.diag(log_softmax(logits.T)))) / 2
  np.testing.assert_allclose(losses.contrastive_loss(jnp.asarray(image, jnp.float32),
                                                     jnp.asarray(text, jnp.float32), 10.0),
                             naive, rtol=1e-5)


def clip_config(vision_depth: int, embed_dim: int, batch_size: int):
  """The CLIP recipe with 32px images and 32-wide towers, without its final zero-shot
  evaluation (tests/test_zeroshot.py runs that)."""
  from mmjax.configs import clip as clip_recipe
  config = clip_recipe.get_config()
  with config.unlocked():
    del config["evaluate"]
  config.model.vision.update(image_size=32, patch_size=8, width=32, depth=vision_depth,
                             num_heads=2, output_dim=embed_dim)
  config.model.text.update(width=32, depth=1, num_heads=2)
  config.model.embed_dim = embed_dim
  config.data.update(image_size=32, batch_size=batch_size)
  config.data.datasets.pairs.source.image_size = 32
  return config


def test_clip_recipe_learns_to_match_pairs(tmp_path):
  config = clip_config(vision_depth=2, embed_dim=32, batch_size=16)
  config.train.update(steps=80, log_every=1, eval_every=0, checkpoint_every=80)
  config.optim.update(warmup_steps=5, lr=3e-3)
  run(config, tmp_path)
  losses = losses_by_step(tmp_path)
  chance = np.log(16)  # uniform over the batch
  assert np.mean([losses[s] for s in (1, 2)]) > chance - 0.1
  assert np.mean([losses[s] for s in range(71, 81)]) < chance - 1.0


def test_graft_names_what_does_not_fit():
  params = {"vision": {"w": np.zeros((2, 3)), "b": np.zeros(3)}, "lm": {"xattn_1": {"g": np.zeros(1)}}}
  grafted = checkpoints.graft(params, "vision", {"w": np.ones((2, 3)), "b": np.ones(3)})
  np.testing.assert_array_equal(grafted["vision"]["w"], 1.0)
  with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
    checkpoints.graft(params, "vision", {"w": np.ones((2, 3)), "b": np.ones(3), "extra": 1})
  with pytest.raises(ValueError, match=r"missing keys \['b'\]"):
    checkpoints.graft(params, "vision", {"w": np.ones((2, 3))})
  with pytest.raises(ValueError, match=r"w: \(3, 2\) in checkpoint, \(2, 3\) in the model"):
    checkpoints.graft(params, "vision", {"w": np.ones((3, 2)), "b": np.ones(3)})
  # New (trainable) parameters may stay as initialised; frozen ones may not.
  checkpoints.graft(params, "lm", {}, may_stay_new=r"^lm/xattn_")


@pytest.fixture(scope="module")
def flamingo_lm_run(tmp_path_factory):
  """A 2-step run of the LM recipe with the LM of `flamingo_config` (never modified)."""
  workdir = tmp_path_factory.mktemp("lm")
  lm_run = lm_config(**{"train.steps": 2})
  with lm_run.unlocked():
    lm_run.model = flamingo_config().model["lm"]
  run(lm_run, workdir)
  return workdir


def test_flamingo_starts_from_a_pretrained_lm_run(flamingo_lm_run):
  config = flamingo_config(**{"train.steps": 1})
  with config.unlocked():
    config.init = dict(lm=dict(workdir=str(flamingo_lm_run)))
  task = get_task("flamingo")
  model = task.build_model(config)
  args, _ = task.init_inputs(config)
  import flax.linen as nn
  initial = nn.unbox(jax.jit(model.init)(jax.random.key(0), *args)["params"])
  params = train.load_pretrained(initial, config)
  pretrained = checkpoints.load_params(flamingo_lm_run)
  for key in pretrained:
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["lm"][key], pretrained[key])
  assert any(k.startswith("xattn_") for k in params["lm"]) and not any(
      k.startswith("xattn_") for k in pretrained)


def test_a_scanned_rematerialised_flamingo_trains_from_a_per_layer_lm_run(flamingo_lm_run,
                                                                        tmp_path):
  config = flamingo_config(**{"train.steps": 2, "scan_layers": True, "remat": "full"})
  with config.unlocked():
    config.init = dict(lm=dict(workdir=str(flamingo_lm_run)))
  run(config, tmp_path / "flamingo")
  trained = checkpoints.load_params(tmp_path / "flamingo")
  assert "groups" in trained["lm"] and "layers" in trained["vision"]
  layers = lambda tree: checkpoints.per_layer(checkpoints.flat_params(tree))
  pretrained, lm = layers(checkpoints.load_params(flamingo_lm_run)), layers(trained["lm"])
  for key, value in pretrained.items():  # grafted across layouts and kept frozen
    np.testing.assert_array_equal(lm[key], value)
  assert losses_by_step(tmp_path / "flamingo").keys() == {1, 2}


def read_scalars(event_dir) -> dict[str, dict[int, float]]:
  """Scalars of TensorBoard event files, read from their TFRecord framing."""
  import struct

  from tensorboardX.proto import event_pb2
  scalars: dict[str, dict[int, float]] = {}
  for path in pathlib.Path(event_dir).glob("events.out.tfevents.*"):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
  """A 4-step run logging every 2 steps, with a few-shot evaluation every 2 steps and at the
  end: its workdir and its last metrics."""
  workdir = tmp_path_factory.mktemp("logged")
  config = lm_config(few_shot=True, **{"train.steps": 4, "train.log_every": 2,
                                       "train.few_shot_every": 2, "evaluate.episodes": 4,
                                       "evaluate.shots": (0, 2)})
  return workdir, run(config, workdir)


def test_metrics_go_to_tensorboard_events(logged_run):
  workdir, _ = logged_run
  scalars = read_scalars(workdir / "tensorboard")
  assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(scalars)
  logged = losses_by_step(workdir)
  assert set(scalars["loss"]) == {2, 4}
  for step, loss in scalars["loss"].items():
    assert abs(loss - logged[step]) < 1e-6


def test_few_shot_evaluation_is_logged_periodically_and_reported_at_the_end(logged_run):
  workdir, last = logged_run
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = {r["step"]: r for r in records if "few_shot/naming/accuracy/2shot" in r}
  assert set(logged) == {2, 4}
  assert set(last["few_shot"]["naming"]) == {0, 2}
  assert last["few_shot"]["naming"][0]["chance"] == 0.0
  report = json.loads((workdir / "eval.json").read_text())
  assert report["scores"]["naming"]["2"]["accuracy"] == logged[4][
      "few_shot/naming/accuracy/2shot"]
  assert len(report["predictions"]["naming"]["2"]) == 4  # one per test example
  scalars = read_scalars(workdir / "tensorboard")
  assert set(scalars["few_shot/naming/accuracy/0shot"]) == {2, 4}


def test_graft_gives_a_larger_vocabulary_the_checkpoint_rows_and_their_mean():
  """A pretrained LM loaded into a model with added tokens (Flamingo's `<image>`, ...)."""
  params = {"lm": {"embed": {"embedding": np.zeros((5, 2))},
                   "lm_head": {"kernel": np.zeros((2, 5))}, "norm": {"scale": np.zeros(2)}}}
  embedding = np.arange(6.0).reshape(3, 2)
  grafted = checkpoints.graft(params, "lm", {"embed": {"embedding": embedding},
                                             "lm_head": {"kernel": embedding.T},
                                             "norm": {"scale": np.ones(2)}})
  np.testing.assert_array_equal(grafted["lm"]["embed"]["embedding"],
                                [[0, 1], [2, 3], [4, 5], [2, 3], [2, 3]])
  np.testing.assert_array_equal(grafted["lm"]["lm_head"]["kernel"],
                                grafted["lm"]["embed"]["embedding"].T)
  with pytest.raises(ValueError, match="shape mismatches"):  # only the vocabulary may grow
    checkpoints.graft(params, "lm", {"embed": {"embedding": np.zeros((3, 4))},
                                     "lm_head": {"kernel": np.zeros((2, 5))},
                                     "norm": {"scale": np.ones(2)}})


def _lm_eval_cli(workdir, shots):
  """The LM recipe at toy size, 2 steps, then a few-shot evaluation of `shots`."""
  overrides = {**TINY_LM, "train.steps": 2, "evaluate.episodes": 256}
  return [*cli(workdir, 2)[:5], *[f"--config.{k}={v}" for k, v in overrides.items()],
          f"--config.evaluate.shots={shots}"]


def test_sigterm_stops_the_final_evaluation_which_the_next_run_redoes_then_it_is_finished(
    tmp_path):
  shots = tuple(range(8))  # 8 cells: well over the time to answer a SIGTERM
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.Popen(_lm_eval_cli(tmp_path, shots), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  wait_for_step(tmp_path, 2, process)  # trained and saved; evaluating
  sent = time.time()
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 0, out
  assert "SIGTERM: stopped the final evaluation; the checkpoint at step 2 is saved" in out
  assert time.time() - sent < 60
  assert not (tmp_path / "eval.json").exists() and not (tmp_path / train.FINISHED).exists()

  config = lm_config(few_shot=True, **{"train.steps": 2, "evaluate.episodes": 4,
                                       "evaluate.shots": (0, 2)})
  last = run(config, tmp_path)  # resumes at the last step: only the evaluation is left
  assert set(last["few_shot"]["naming"]) == {0, 2}
  assert len(losses_by_step(tmp_path)) == 2
  recorded = json.loads((tmp_path / train.FINISHED).read_text())
  assert recorded["step"] == 2 and (tmp_path / "eval.json").exists()

  eval_json = (tmp_path / "eval.json").read_text()
  again = run(config, tmp_path)  # finished: neither trained nor evaluated again
  assert again == recorded["metrics"]
  assert len(losses_by_step(tmp_path)) == 2
  assert (tmp_path / "eval.json").read_text() == eval_json

  from mmjax import evaluate
  evaluate.evaluate_workdir(tmp_path, shots=["0"], episodes=2)  # kept beside eval.json
  written = list(tmp_path.glob("eval-2-*.json"))
  assert len(written) == 1
  assert set(json.loads(written[0].read_text())["scores"]["naming"]) == {"0"}
  assert (tmp_path / "eval.json").read_text() == eval_json
  # A run asked for more steps than it finished with goes on training.
  longer = lm_config(few_shot=True, **{"train.steps": 3, "evaluate.episodes": 4,
                                        "evaluate.shots": (0,)})
  run(longer, tmp_path)
  assert len(losses_by_step(tmp_path)) == 3


def test_sigterm_during_backbone_pretraining_saves_it_and_exits_and_the_next_run_resumes_it(
    tmp_path):
  """configs/flamingo.py with the LM pretrained for 12 steps (the tiny LM recipe) and the
  vision tower left random: a SIGTERM during the LM's pretraining saves the LM's run and
  exits without training Flamingo; the same command resumes the LM, then trains."""
  cache, workdir = tmp_path / "cache", tmp_path / "flamingo"
  flags = {"init.lm.steps": 12, "init.vision.steps": 0, "train.steps": 1,
           "train.log_every": 1, "data.batch_size": 2, "evaluate.episodes": 2,
           "evaluate.shots": "(0,)"}
  command = [sys.executable, "-m", "mmjax.train", f"--config={ROOT / 'configs/flamingo.py'}",
             f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in flags.items()]]
  env = dict(os.environ, JAX_PLATFORMS="cpu", MMJAX_CACHE=str(cache))
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  lines = []
  while not lines or not lines[-1].startswith("lm: "):  # the LM's run has started
    lines.append(process.stdout.readline())
    assert lines[-1], "the LM's pretraining did not start"
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=240)
  out = "".join(lines) + out
  assert process.returncode == 0, out
  assert "SIGTERM: The pretraining of 'lm' was stopped and is saved in" in out, out
  lm_run = next(cache.glob("backbones/lm-*"))
  # Stopped in its training or, if that was done, in its final evaluation.
  stopped = int(re.search(r"checkpoint at step (\d+)", out)[1])
  assert stopped <= 12 and not (lm_run / train.FINISHED).exists()
  assert not list(workdir.glob("checkpoints/*"))  # Flamingo never trained on it

  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  if stopped:
    assert f"Resumed from the checkpoint at step {stopped}." in result.stdout
  assert sorted(losses_by_step(lm_run)) == [12]  # the LM recipe logs every 50 steps
  assert json.loads((lm_run / train.FINISHED).read_text())["step"] == 12
  assert "Left 'vision' as initialised (config.init.vision.steps=0)." in result.stdout
  assert f"Initialised 'lm' from {lm_run}." in result.stdout
  assert losses_by_step(workdir).keys() == {1} and (workdir / train.FINISHED).exists()


def test_a_backbone_run_is_used_only_once_recorded_finished(tmp_path, monkeypatch):
  monkeypatch.setenv("MMJAX_CACHE", str(tmp_path))
  init = {"recipe": "lm", "variant": "tiny", "steps": 5}
  calls = []

  def interrupted_run(config, workdir):  # what a run stopped by SIGTERM leaves: no record
    calls.append(config.train.steps)
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)

  monkeypatch.setattr(train, "run", interrupted_run)
  with pytest.raises(train.Interrupted, match="pretraining of 'lm' was stopped"):
    train.pretrained_workdir("lm", init)
  workdir = next(tmp_path.glob("backbones/lm-*"))
  (workdir / "checkpoints" / "4").mkdir(parents=True)
  (workdir / "checkpoints" / "5").mkdir()
  (workdir / train.FINISHED).write_text(json.dumps({"step": 4, "time": "", "metrics": {}}))
  with pytest.raises(train.Interrupted):  # recorded at fewer steps than asked for
    train.pretrained_workdir("lm", init)
  (workdir / train.FINISHED).write_text(json.dumps({"step": 5, "time": "", "metrics": {}}))
  assert train.pretrained_workdir("lm", init) == workdir
  # The steps are part of the cached run's identity: the recipe's own 400 are another run.
  with pytest.raises(train.Interrupted):
    train.pretrained_workdir("lm", {**init, "steps": -1})
  assert calls == [5, 5, 400] and len(list(tmp_path.glob("backbones/lm-*"))) == 2


def test_datasets_are_keyed_by_name_and_weight_0_leaves_one_out():
  config = flamingo_recipe.get_config()
  assert [d.name for d in train.datasets(config)] == ["documents", "pairs"]
  assert [d.loss_weight for d in train.datasets(config)] == [1.0, 0.5]
  config.data.datasets.pairs.weight = 0.0
  assert [d.name for d in train.datasets(config)] == ["documents"]
  assert [d.name for d in train.datasets(config, "eval_datasets")] == ["documents_eval"]
  config.data.datasets.documents.source.pathz = "/data/*.array_record"
  with pytest.raises(UserError, match=r"config.data.datasets.documents: .*pathz"):
    train.datasets(config)
  config.data.datasets = {"cc": {"source": {"kind": "arrayrecord_pairs", "image_size": 64,
                                            "paths": "/no/such/cc-*.array_record"}}}
  with pytest.raises(UserError, match=r"config.data.datasets.cc: .*/no/such/cc-"):
    train.datasets(config)
