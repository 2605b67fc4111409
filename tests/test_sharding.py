"""Sharded training on 8 simulated CPU devices agrees with one device; checkpoints move
between meshes of different sizes."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from test_blip2 import blip2_config
from test_train import (ROOT, TINY_LM, _lm_batch, _one_step, clip_config, flamingo_config,
                        lm_config, losses_by_step)

from mmjax import sharding, train
from mmjax.data.pipeline import resplit_position

# One train step, sharded vs on one device: the losses agree to float32 reduction-order
# noise (rtol 1e-5). Adam's first update is about lr * g / |g| per parameter, so where a
# gradient is tiny (|g| near Adam's eps / sqrt(1 - b2), ~7e-8) its reduction-order noise
# shows in the update: parameters agree to 2e-5 absolute, 2% of the learning rate (1e-3;
# measured worst case 1.2e-5, one of 1024 elements of the LM's embedding on the LM
# recipe's naming documents). A sharding mistake moves whole tensors by about lr.
LOSS_RTOL, PARAM_ATOL = 1e-5, 2e-5

MESHES = {
    "data_parallel": (dict(data=8), "data_parallel"),
    "fsdp": (dict(fsdp=8), "fsdp"),
    "tensor_parallel": (dict(data=4, tensor=2), "fsdp_tensor"),
    "fsdp_x_tensor": (dict(fsdp=4, tensor=2), "fsdp_tensor"),
    "data_x_fsdp_x_tensor": (dict(data=2, fsdp=2, tensor=2), "fsdp_tensor"),
}


def _sharded(config, mesh, preset, **overrides):
  config = config.copy_and_resolve_references()
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
  config.sharding = preset
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def flamingo_reference():
  """A small Flamingo (frozen ViT and LM, trainable resampler and gated blocks): one
  batch of 8 and one step on one device."""
  config = flamingo_config()
  config.data.batch_size = 8
  batch = _lm_batch(config)
  return config, batch, _one_step(config, batch)


@pytest.mark.parametrize("name", sorted(MESHES))
def test_a_sharded_step_equals_the_single_device_step(name, flamingo_reference):
  config, batch, (ref_state, ref_metrics, _) = flamingo_reference
  mesh, preset = MESHES[name]
  # Two micro-batches on the 3-D mesh also check that accumulation keeps rows local.
  accum = 2 if name == "data_x_fsdp_x_tensor" else 1
  sharded = _sharded(config, mesh, preset, **{"optim.accum_steps": accum})
  state, metrics, _ = _one_step(sharded, batch, jax.devices())

  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=LOSS_RTOL)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
  for part in ("params", "frozen"):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL),
        state[part], ref_state[part])
  # ...and the parameters really are split the way the preset says.
  query = state["frozen"]["lm"]["layers_0"]["attn"]["query"]["kernel"]  # embed heads k
  expected = {"data_parallel": PartitionSpec(None, None, None),
              "fsdp": PartitionSpec("fsdp", None, None),
              "tensor_parallel": PartitionSpec("fsdp", "tensor", None)}.get(
                  name, PartitionSpec("fsdp", "tensor", None))
  assert query.sharding.spec == expected
  assert len(query.sharding.device_set) == 8


def test_every_parameter_of_the_lm_shards_and_trains_like_one_device():
  config = lm_config(**{"data.batch_size": 8})
  batch = _lm_batch(config)
  ref_state, ref_metrics, _ = _one_step(config, batch)
  sharded = _sharded(config, dict(fsdp=4, tensor=2), "fsdp_tensor")
  state, metrics, _ = _one_step(sharded, batch, jax.devices())
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=LOSS_RTOL)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL),
                         state["params"], ref_state["params"])
  embed = state["params"]["embed"]["embedding"]  # vocab embed
  assert embed.sharding.spec == PartitionSpec("tensor", "fsdp")
  # Adam's moments are split like their parameters.
  moments = [s for s in jax.tree_util.tree_leaves(state["opt_state"])
             if getattr(s, "shape", None) == embed.shape]
  assert moments and all(m.sharding.spec == embed.sharding.spec for m in moments)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_the_contrastive_loss_over_a_sharded_batch_equals_one_device(loss):
  """CLIP's InfoNCE and SigLIP's sigmoid loss need every example's embedding as a
  negative: with the batch split over 8 devices the logits matrix still spans the global
  batch, and the step (loss, gradient, update) is the 1-device step."""
  config = clip_config(vision_depth=1, embed_dim=16, batch_size=8)
  if loss == "sigmoid":
    config.model.update(loss="sigmoid", init_bias=-2.0, init_temperature=0.1)
  batch = _lm_batch(config)
  ref_state, ref_metrics, _ = _one_step(config, batch)
  state, metrics, _ = _one_step(_sharded(config, dict(data=2, fsdp=2, tensor=2), "fsdp_tensor"),
                                batch, jax.devices())
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=LOSS_RTOL)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL),
                         state["params"], ref_state["params"])


def test_blip2_stage1_on_8_devices_takes_the_1_device_step():
  """ITC's negatives and ITM's hard negatives span the global batch inside the one jitted
  step (the draw is sharding-invariant), so a sharded step is the 1-device step."""
  config = blip2_config()
  # Adam's first step is lr * g / (|g| + eps): with eps=1e-8, entries whose gradient is
  # near 1e-8 move by reduction-order noise (measured: 2 of a 32-element tensor differed
  # by 2.5e-5, 5% of lr, while every loss term agreed to 1e-5); eps=1e-6 keeps the check
  # about sharding, not about that noise.
  config.optim.eps = 1e-6
  batch = _lm_batch(config)
  ref_state, ref_metrics, _ = _one_step(config, batch)
  state, metrics, _ = _one_step(_sharded(config, dict(data=4, fsdp=2), "fsdp"), batch,
                                jax.devices())
  for name in ("loss", "loss/itc", "loss/itm", "loss/itg"):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=LOSS_RTOL)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL),
                         state["params"], ref_state["params"])


def test_a_checkpoint_saved_on_8_devices_resumes_on_4_and_on_1(tmp_path):
  config = _sharded(lm_config(**{"data.batch_size": 8, "train.checkpoint_every": 3}),
                    dict(fsdp=-1), "fsdp")
  config.train.steps = 3
  train.run(config, tmp_path / "8", devices=jax.devices())
  for n in (4, 1):
    shutil.copytree(tmp_path / "8", tmp_path / str(n))
  config.train.steps = 6
  losses = {}
  for n in (8, 4, 1):
    train.run(config, tmp_path / str(n), devices=jax.devices()[:n])
    losses[n] = losses_by_step(tmp_path / str(n))
    assert sorted(losses[n]) == [1, 2, 3, 4, 5, 6]
  # Steps 4-6 ran on 8, 4 and 1 devices from the same restored state and data position.
  for n in (4, 1):
    np.testing.assert_allclose([losses[n][s] for s in (4, 5, 6)],
                               [losses[8][s] for s in (4, 5, 6)], rtol=LOSS_RTOL)


def test_mesh_sizes_fill_and_fail_clearly():
  assert sharding.mesh_shape(dict(data=-1, tensor=2), 8) == (4, 1, 2)
  with pytest.raises(ValueError, match="needs 4 devices, but 8"):
    sharding.mesh_shape(dict(data=2, fsdp=2), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape(dict(data=-1, fsdp=-1), 8)
  with pytest.raises(ValueError, match="unknown axes \\['model'\\]"):
    sharding.mesh_shape(dict(model=2), 8)
  with pytest.raises(ValueError, match="Unknown sharding preset"):
    sharding.rules("zero3")


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
  mesh = sharding.make_mesh(dict(data=8))
  with pytest.raises(ValueError, match="6 examples cannot be split over the 8 devices"):
    sharding.global_batch({"tokens": np.zeros((6, 4))},
                          sharding.batch_sharding(mesh, sharding.rules("fsdp")))


def test_data_positions_resplit_over_another_number_of_processes():
  # Two processes read examples 0, 2, 4, ... and 1, 3, 5, ...; each has read 16.
  even = [{"next_index": 16}, {"next_index": 16}]
  assert resplit_position(even, 0, 1) == {"next_index": 32}
  assert [resplit_position(even, q, 4)["next_index"] for q in range(4)] == [8, 8, 8, 8]
  # Unequal counts (skipped records): resume at the first example not read by all.
  assert resplit_position([{"next_index": 5}, {"next_index": 4}], 0, 1) == {"next_index": 9}
  with pytest.raises(ValueError, match="process count that saved them"):
    resplit_position([{"next_index": 3, "epoch": 1}], 0, 2)


def test_two_local_processes_train_like_one_and_their_checkpoint_resumes_in_one(tmp_path):
  """launch/local.sh: 2 processes (one CPU device each, jax.distributed over localhost),
  per-process data, an Orbax checkpoint written by both; then one process resumes it."""
  overrides = {**TINY_LM, "data.batch_size": 8, "train.steps": 6, "train.checkpoint_every": 4}
  command = [str(ROOT / "launch/local.sh"), "2", sys.executable, "-m", "mmjax.train",
             f"--config={ROOT / 'configs/lm.py'}", f"--workdir={tmp_path / 'two'}",
             "--config.evaluate.episodes=2", *(f"--config.{k}={v}" for k, v in overrides.items())]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:]
  assert "[1] lm:" in done.stdout and "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in done.stdout

  # One process resumes the two processes' checkpoint of step 4.
  shutil.copytree(tmp_path / "two", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
  (tmp_path / "resumed" / "metrics.jsonl").unlink()
  config = lm_config(**{"data.batch_size": 8, "train.steps": 6})
  train.run(config, tmp_path / "resumed", devices=jax.devices()[:1])
  train.run(config, tmp_path / "one", devices=jax.devices()[:1])
  two, one = losses_by_step(tmp_path / "two"), losses_by_step(tmp_path / "one")
  resumed = losses_by_step(tmp_path / "resumed")
  # Each global batch holds the same examples whether 1 or 2 processes read them, also
  # after resuming with another process count: only the summation order differs.
  assert sorted(two) == sorted(one) == list(range(1, 7)) and sorted(resumed) == [5, 6]
  np.testing.assert_allclose([two[s] for s in two], [one[s] for s in two], rtol=LOSS_RTOL)
  np.testing.assert_allclose([resumed[s] for s in (5, 6)], [one[s] for s in (5, 6)],
                             rtol=LOSS_RTOL)
