"""Checkpoints: a damaged newest step is skipped (named, with why) and the run resumes on
the uninterrupted run's curve from the newest good one; a flipped byte is caught by the
saved fingerprints; all steps damaged, or a changed model, is a clear error."""

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from test_train import ROOT, TINY_LM, lm_config, losses_by_step, run

from mmjax import checkpoints, sharding, train
from mmjax.cli import UserError

CONFIG = {"train.steps": 6, "train.checkpoint_every": 3}  # checkpoints at steps 3 and 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  """A tiny LM run with good checkpoints at steps 3 and 6 (never modified)."""
  workdir = tmp_path_factory.mktemp("trained")
  run(lm_config(**CONFIG), workdir)
  return workdir


def checksums(workdir, step) -> dict:
  return json.loads((workdir / "checkpoints" / str(step) / "checksums" / "metadata").read_text())


def copy(trained, tmp_path) -> pathlib.Path:
  """A copy of the run as if it had been killed right after its last save (before it
  recorded itself finished), so that re-running it resumes."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  (workdir / "finished.json").unlink()
  return workdir


# ---------------------------------------------------------------------------------------
# Ways to damage a step directory `d`.
# ---------------------------------------------------------------------------------------
def largest_array_file(d: pathlib.Path) -> pathlib.Path:
  return max((p for p in (d / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def truncate(path: pathlib.Path, keep: float = 0.5) -> None:
  path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def flip_byte(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def garbage(path: pathlib.Path) -> None:
  path.write_bytes(b"\x00garbage{[\xff")


def empty(path: pathlib.Path) -> None:
  path.write_bytes(b"")


def empty_directory(d: pathlib.Path) -> None:
  shutil.rmtree(d)
  d.mkdir()


def holding_step_3(d: pathlib.Path) -> None:
  shutil.rmtree(d)
  shutil.copytree(d.parent / "3", d)


def wrong_checksum(d: pathlib.Path, key: str = "opt_state/1/0/count") -> None:
  path = d / "checksums" / "metadata"
  record = json.loads(path.read_text())
  record["arrays"][key] = "0" * 16
  path.write_text(json.dumps(record))


def changed_meta(d: pathlib.Path) -> None:
  path = d / "meta" / "metadata"
  meta = json.loads(path.read_text())
  meta["config"]["seed"] = 1
  path.write_text(json.dumps(meta))


# name: (damage applied to the step directory, what the skip must say)
DAMAGES = {
    "truncated array file": (lambda d: truncate(largest_array_file(d)), "reading it failed"),
    "emptied array file": (lambda d: empty(largest_array_file(d)), "reading it failed"),
    "deleted array file": (lambda d: largest_array_file(d).unlink(), "reading it failed"),
    "flipped byte in the largest array file": (lambda d: flip_byte(largest_array_file(d)),
                                               "differ from the checksums"),
    "deleted array directory": (lambda d: shutil.rmtree(next((d / "state").glob("ocdbt.*"))),
                                "reading it failed"),
    "garbage array metadata": (lambda d: garbage(d / "state" / "_METADATA"),
                               "metadata of its arrays cannot be read"),
    "empty array metadata": (lambda d: empty(d / "state" / "_METADATA"),
                             "metadata of its arrays cannot be read"),
    "deleted array metadata": (lambda d: (d / "state" / "_METADATA").unlink(),
                               "metadata of its arrays cannot be read"),
    "deleted OCDBT manifest": (lambda d: (d / "state" / "manifest.ocdbt").unlink(),
                               "metadata of its arrays cannot be read"),
    "garbage OCDBT manifest": (lambda d: garbage(d / "state" / "manifest.ocdbt"),
                               "metadata of its arrays cannot be read"),
    "deleted state item": (lambda d: shutil.rmtree(d / "state"), "'state' item is missing"),
    "deleted data item": (lambda d: shutil.rmtree(d / "data"), "'data' item is missing"),
    "garbage data-iterator json": (lambda d: garbage(d / "data" / "process_0-of-1.json"),
                                   "reading it failed"),
    "empty data-iterator json": (lambda d: empty(d / "data" / "process_0-of-1.json"),
                                 "reading it failed"),
    "data-iterator json of another shape": (
        lambda d: (d / "data" / "process_0-of-1.json").write_text('{"epoch": "x"}'),
        "reading it failed"),
    "deleted data-iterator json": (lambda d: (d / "data" / "process_0-of-1.json").unlink(),
                                   "reading it failed"),
    "garbage _CHECKPOINT_METADATA": (lambda d: garbage(d / "_CHECKPOINT_METADATA"),
                                     "_CHECKPOINT_METADATA is not valid JSON"),
    "empty _CHECKPOINT_METADATA": (lambda d: empty(d / "_CHECKPOINT_METADATA"),
                                   "_CHECKPOINT_METADATA is not valid JSON"),
    "deleted _CHECKPOINT_METADATA": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
                                     "_CHECKPOINT_METADATA is missing"),
    "deleted meta item": (lambda d: shutil.rmtree(d / "meta"), "'meta' item is missing"),
    "garbage meta item": (lambda d: garbage(d / "meta" / "metadata"),
                          "'meta' item is not valid JSON"),
    "changed meta item": (changed_meta, "'meta' item differs from the checksum"),
    "deleted checksums item": (lambda d: shutil.rmtree(d / "checksums"),
                               "'checksums' item is missing"),
    "garbage checksums item": (lambda d: garbage(d / "checksums" / "metadata"),
                               "'checksums' item is not valid JSON"),
    "wrong checksum": (wrong_checksum, "differ from the checksums"),
    "emptied step directory": (empty_directory, "its directory is empty"),
    "step directory holding another step": (holding_step_3, "holds the checkpoint of step 3"),
}


@pytest.fixture(scope="module")
def resume(trained):
  """`workdir -> Resumed`: what a rerun of the `trained` run restores, as the trainer
  asks for it (its model's abstract state, a fresh data iterator, its config)."""
  config = lm_config(**CONFIG)
  parts = train.build(config, jax.devices()[:1])
  config_dict = json.loads(config.to_json_best_effort())

  def restore(workdir):
    manager = checkpoints.manager(workdir)
    iterator = iter(train.make_data(config, seed=config.seed, health=train.DataHealth()))
    try:
      return checkpoints.restore_latest(manager, parts.abstract, iterator, config=config_dict)
    finally:
      manager.close()
  return restore


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_is_skipped_named_and_moved_aside(
    trained, resume, tmp_path, damage, capsys, caplog):
  workdir = copy(trained, tmp_path)
  apply, why = DAMAGES[damage]
  apply(workdir / "checkpoints" / "6")
  with caplog.at_level(logging.WARNING):
    resumed = resume(workdir)
  out = capsys.readouterr().out
  moved = workdir / "checkpoints" / "damaged" / "6"
  assert re.search(rf"Resumed from step 3; skipped step 6: [^\n]*{re.escape(why)}[^\n]* "
                   rf"\(moved to {re.escape(str(moved))}\)", out), out
  assert f"step 6 ({workdir / 'checkpoints' / '6'})" in caplog.text
  assert resumed.step == 3
  assert checkpoints.fingerprints(resumed.state) == checksums(trained, 3)["arrays"]
  assert moved.is_dir() and not (workdir / "checkpoints" / "damaged" / "3").exists()


# One damage of each part of a step (arrays, data iterator, the step's identity): the
# rerun trains steps 4-6 again on the uninterrupted curve.
RESUMED_DAMAGES = ("flipped byte in the largest array file", "deleted data-iterator json",
                   "step directory holding another step")


@pytest.mark.parametrize("damage", RESUMED_DAMAGES)
def test_a_run_whose_newest_checkpoint_is_damaged_resumes_on_its_curve(trained, tmp_path,
                                                                       damage, capsys):
  workdir = copy(trained, tmp_path)
  DAMAGES[damage][0](workdir / "checkpoints" / "6")
  run(lm_config(**CONFIG), workdir)
  assert "Resumed from step 3; skipped step 6" in capsys.readouterr().out
  # Steps 4-6 were trained again (`losses_by_step` checks that each replayed loss equals
  # the logged one) and saved again as step 6, bit for bit the undamaged checkpoint.
  assert losses_by_step(workdir) == losses_by_step(trained)
  assert checksums(workdir, 6)["arrays"] == checksums(trained, 6)["arrays"]


def test_an_empty_newer_step_directory_neither_hides_the_good_one_nor_blocks_saving_it(
    trained, tmp_path, capsys):
  workdir = copy(trained, tmp_path)
  (workdir / "checkpoints" / "9").mkdir()  # what Orbax would list as the latest step
  config = lm_config(**{**CONFIG, "train.steps": 9})
  manager = checkpoints.manager(workdir)
  assert manager.latest_step() == 9
  parts = train.build(config, jax.devices()[:1])
  resumed = checkpoints.restore_latest(manager, parts.abstract)
  assert resumed.step == 6 and manager.latest_step() == 6
  assert "Resumed from step 6; skipped step 9: its directory is empty" in capsys.readouterr().out
  checkpoints.save(manager, 9, resumed.state)  # the step number the empty directory had
  manager.wait_until_finished()
  assert checkpoints.restore(manager, 9, parts.abstract).step == 9
  manager.close()


def test_every_checkpoint_damaged_is_a_clear_error_that_changes_nothing(trained, tmp_path):
  workdir = copy(trained, tmp_path)
  flip_byte(largest_array_file(workdir / "checkpoints" / "6"))
  garbage(workdir / "checkpoints" / "3" / "state" / "_METADATA")
  before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
  with pytest.raises(UserError) as error:
    run(lm_config(**CONFIG), workdir)
  message = str(error.value)
  assert re.search(r"step 6 \(.*\): .*differ from the checksums.*; step 3 \(.*\): "
                   r"the metadata of its arrays cannot be read", message), message
  assert "Starting from scratch would lose the run" in message
  assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before
  # The printed command sets them aside; the same run then starts from scratch.
  command = message.split("\n")[1].strip()
  assert command.startswith("mkdir -p ")
  subprocess.run(command, shell=True, check=True)
  assert sorted(p.name for p in (workdir / "checkpoints" / "damaged").iterdir()) == ["3", "6"]
  (workdir / "metrics.jsonl").unlink()
  run(lm_config(**CONFIG), workdir)
  assert losses_by_step(workdir) == losses_by_step(trained)


def test_only_empty_step_directories_start_from_scratch(tmp_path, capsys):
  manager = checkpoints.manager(tmp_path)
  (tmp_path / "checkpoints" / "3").mkdir()
  abstract = {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}
  assert checkpoints.restore_latest(manager, abstract) is None
  assert "Starting from scratch" in capsys.readouterr().out
  assert manager.all_steps() == [] and (tmp_path / "checkpoints" / "damaged" / "3").is_dir()
  assert checkpoints.restore_latest(manager, abstract) is None  # no checkpoint at all
  manager.close()


def test_resuming_a_changed_model_names_the_parameters_and_config_fields(trained, tmp_path):
  workdir = copy(trained, tmp_path)
  with pytest.raises(UserError) as error:
    run(lm_config(**{**CONFIG, "model.width": 48}), workdir)
  message = str(error.value)
  assert "step 6" in message and "does not fit this model" in message
  assert re.search(r"params/embed/embedding \(512, 32\) float32 in the checkpoint, "
                   r"\(512, 48\) float32 in the model", message), message
  assert "model.width (32 then, 48 now)" in message and "--config.model.width=32" in message
  assert "another --workdir" in message
  # Not damage: nothing was skipped or moved, and the old config was kept.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
  assert json.loads((workdir / "config.json").read_text())["model"]["width"] == 32


def test_a_changed_depth_names_the_missing_layers(trained, tmp_path):
  workdir = copy(trained, tmp_path)
  with pytest.raises(UserError, match=r"of the model are not in the checkpoint: "
                     r"params/layers_2/.*model.depth \(2 then, 3 now\)"):
    run(lm_config(**{**CONFIG, "model.depth": 3}), workdir)


def legacy(d: pathlib.Path) -> None:
  """The layout of a step saved before checkpoints carried meta and checksums."""
  shutil.rmtree(d / "meta")
  shutil.rmtree(d / "checksums")
  info = json.loads((d / "_CHECKPOINT_METADATA").read_text())
  info["item_handlers"] = {k: info["item_handlers"][k] for k in ("state", "data")}
  (d / "_CHECKPOINT_METADATA").write_text(json.dumps(info))


def test_checkpoints_without_meta_and_checksums_still_restore(trained, tmp_path, caplog):
  workdir = copy(trained, tmp_path)
  for step in (3, 6):
    legacy(workdir / "checkpoints" / str(step))
  config = lm_config(**CONFIG)
  parts = train.build(config, jax.devices()[:1])
  manager = checkpoints.manager(workdir)
  with caplog.at_level(logging.WARNING):
    resumed = checkpoints.restore_latest(manager, parts.abstract)
  manager.close()
  assert resumed.step == 6 and resumed.meta == {}
  assert "saved without checksums" in caplog.text
  assert checkpoints.fingerprints(resumed.state) == checksums(trained, 6)["arrays"]
  # A changed model is compared with the config.json the previous run wrote.
  with pytest.raises(UserError, match=r"config.json \(written by the last run.*"
                     r"model.num_heads \(2 then, 4 now\)"):
    run(lm_config(**{**CONFIG, "model.num_heads": 4}), workdir)


def test_meta_comes_back_and_must_be_json(tmp_path):
  manager = checkpoints.manager(tmp_path)
  state = {"w": jnp.arange(6.0).reshape(2, 3)}
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with pytest.raises(TypeError, match="JSON-serialisable"):
    checkpoints.save(manager, 1, state, meta={"bad": object()})
  checkpoints.save(manager, 1, state, meta={"config": {"a": 1}, "finished": True})
  manager.wait_until_finished()
  resumed = checkpoints.restore_latest(manager, abstract)
  assert resumed.meta == {"config": {"a": 1}, "finished": True}
  np.testing.assert_array_equal(resumed.state["w"], state["w"])
  manager.close()


# ---------------------------------------------------------------------------------------
# Fingerprints.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "uint16", "bool", "int32"])
def test_every_single_bit_flip_changes_the_fingerprint(dtype):
  rng = np.random.default_rng(0)
  x = np.asarray(rng.normal(size=(3, 5)) * 10).astype(jnp.dtype(dtype))
  raw = x.view(np.uint8).reshape(-1).copy()
  original = checkpoints.fingerprints({"x": x})["x"]
  seen = {original}
  bits = [0] if dtype == "bool" else range(8)  # a bool byte is 0 or 1
  for byte in range(raw.size):
    for bit in bits:
      flipped = raw.copy()
      flipped[byte] ^= np.uint8(1 << bit)
      seen.add(checkpoints.fingerprints({"x": flipped.view(x.dtype).reshape(x.shape)})["x"])
  assert len(seen) == 1 + raw.size * len(bits)  # all different, from each other too


def test_fingerprints_do_not_depend_on_the_sharding_and_are_cheap_to_keep():
  x = jax.random.normal(jax.random.key(0), (16, 24))
  on_one = checkpoints.fingerprints({"x": x, "step": jnp.int32(3)})
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4}, jax.devices())
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", "fsdp")))
  assert checkpoints.fingerprints({"x": sharded, "step": jnp.int32(3)}) == on_one
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # same words, other places
  assert checkpoints.fingerprints({"x": swapped})["x"] != on_one["x"]


# ---------------------------------------------------------------------------------------
# Grafting a finished run's parameters reads the same way.
# ---------------------------------------------------------------------------------------
def test_load_params_falls_back_past_a_damaged_step_and_names_it(trained, tmp_path, capsys):
  workdir = copy(trained, tmp_path)
  good = checkpoints.load(workdir)
  assert good.step == 6 and good.meta["config"]["model"]["width"] == 32
  # The largest array file holds optimizer state, which grafting does not read: damage a
  # parameter's checksum instead.
  wrong_checksum(workdir / "checkpoints" / "6", "params/embed/embedding")
  loaded = checkpoints.load(workdir)
  assert loaded.step == 3
  assert re.search(r"Loaded the parameters of step 3 of .*; skipped step 6: .*"
                   r"differ from the checksums", capsys.readouterr().out)
  with pytest.raises(UserError, match=r"step 6 .* cannot be used: .*differ from the checksums"):
    checkpoints.load_params(workdir, step=6)
  with pytest.raises(UserError, match=r"No checkpoint of step 5 .* steps \[3, 6\]"):
    checkpoints.load_params(workdir, step=5)
  with pytest.raises(UserError, match="No complete checkpoint under"):
    checkpoints.load_params(tmp_path / "nothing")


def test_two_processes_agree_on_the_step_to_resume_and_set_the_damaged_one_aside(tmp_path):
  """launch/local.sh: a two-process run whose newest step has a flipped byte resumes, in
  two processes, from the step before, on the same curve."""

  overrides = {**TINY_LM, "data.batch_size": 8, "train.steps": 6, "train.checkpoint_every": 4}
  command = [str(ROOT / "launch/local.sh"), "2", sys.executable, "-m", "mmjax.train",
             f"--config={ROOT / 'configs/lm.py'}", f"--workdir={tmp_path}",
             "--config.evaluate.episodes=2", *(f"--config.{k}={v}" for k, v in overrides.items())]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  launch = lambda: subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=300)
  done = launch()
  assert done.returncode == 0, done.stdout[-3000:]
  first = losses_by_step(tmp_path)
  flip_byte(largest_array_file(tmp_path / "checkpoints" / "6"))
  (tmp_path / "finished.json").unlink()  # as if killed right after its last save
  done = launch()
  assert done.returncode == 0, done.stdout[-3000:]
  for process in (0, 1):
    # The flipped byte lands in a compressed chunk: it either decodes to other values (the
    # checksums differ) or does not decode at all (the read fails), depending on the layout
    # the two processes wrote; either way the step is skipped.
    assert re.search(rf"\[{process}\] Resumed from step 4; skipped step 6: (.*differ from "
                     r"the checksums|reading it failed)", done.stdout), done.stdout[-3000:]
  assert losses_by_step(tmp_path) == first
  assert (tmp_path / "checkpoints" / "damaged" / "6").is_dir()
  assert checksums(tmp_path, 6)["arrays"] == json.loads(
      (tmp_path / "checkpoints" / "damaged" / "6" / "checksums" / "metadata").read_text())["arrays"]
