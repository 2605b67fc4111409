"""A training run's data-health counts: exactly the records it consumed, carried by its
checkpoints so that a resumed run continues the totals."""

import collections
import io
import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from mmjax.configs import lm as lm_recipe
from mmjax import train
from mmjax.data import sources

SIZE = 8
TINY = {"model.width": 32, "model.depth": 2, "model.num_heads": 2, "model.max_len": 64,
        "data.seq_len": 32, "data.batch_size": 4, "train.steps": 6, "train.log_every": 1,
        "train.eval_every": 0, "train.checkpoint_every": 3, "optim.warmup_steps": 2}


def flaw(index: int) -> str | None:
  return {0: "empty_text", 1: "bad_image"}.get(index % 4)


def write_shard(path) -> str:
  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(buffer, format="PNG")
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for i in range(20):
    content = {"empty_text": [buffer.getvalue()],
               "bad_image": [b"\x89PNG broken", f"record {i}."]}.get(
                   flaw(i), [buffer.getvalue(), f"a grey square, record {i}."])
    writer.write(sources.encode_record(content))
  writer.close()
  return str(path)


def config_reading(paths: str):
  config = lm_recipe.get_config()
  with config.unlocked():
    del config["evaluate"]
    for key, value in TINY.items():
      section, leaf = key.split(".")
      config[section][leaf] = value
    entry = dict(weight=1.0, loss_weight=1.0, source=dict(
        kind="arrayrecord_documents", paths=paths, image_size=SIZE))
    config.data.datasets = {"shard": entry}
  return config


def consumed(seed: int, num_good: int) -> dict[str, int]:
  """`{"shard/<reason>": n}` over the records a one-dataset pipeline reads for `num_good`."""
  order = grain.MapDataset.range(20).shuffle(seed=seed).repeat()
  counts, good, position = collections.Counter(), 0, 0
  while good < num_good:
    reason = flaw(order[position])
    position += 1
    if reason:
      counts[f"shard/{reason}"] += 1
    else:
      good += 1
  return dict(counts)


def test_a_run_reports_what_it_consumed_and_its_checkpoints_carry_the_counts(tmp_path):
  config = config_reading(write_shard(tmp_path / "shard.array_record"))
  train.run(config, tmp_path / "run", devices=jax.devices()[:1])
  logged = {}
  for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      logged[record["step"]] = {k[len("data/"):]: v for k, v in record.items()
                                if k.startswith("data/")}
  # Grain reads ahead of training; the counts must not (a 6-step run once reported 80).
  for step in range(1, 7):
    assert logged[step] == consumed(config.seed, 4 * step), step
  assert set(logged[6]) == {"shard/empty_text", "shard/bad_image"}

  # The checkpoint of step 3 restores the counts with the data iterator, and reading on
  # from there reaches the uninterrupted run's totals.
  health = train.DataHealth()
  iterator = iter(train.make_data(config, seed=config.seed, health=health))
  with ocp.CheckpointManager(tmp_path / "run/checkpoints", item_names=("state", "data")) as m:
    m.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
  assert health.counts() == logged[3]
  for _ in range(3):
    next(iterator)
  assert health.counts() == logged[6]
