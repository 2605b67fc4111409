"""Grain pipeline: determinism, resumable iterators, process sharding, mixing, bad records."""

import json

import numpy as np
import pytest

from mmjax.data.pipeline import (DataHealth, Dataset, ShapesWorldDocuments, ShapesWorldPairs,
                                 dataset_from_config, make_dataset)
from mmjax.data.sequences import SequenceSpec
from mmjax.data.tokenizer import Tokenizer

TOK = Tokenizer()
SPEC = SequenceSpec(seq_len=64, max_images=4, image_size=64)
MIXTURE = [Dataset("docs", ShapesWorldDocuments(size=500)),
           Dataset("pairs", ShapesWorldPairs(size=500), weight=1.0, loss_weight=0.5)]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_batches_have_fixed_shapes_and_are_a_function_of_the_seed():
  batches = take(iter(make_dataset(MIXTURE, TOK, SPEC, batch_size=4, seed=0)), 3)
  again = take(iter(make_dataset(MIXTURE, TOK, SPEC, batch_size=4, seed=0)), 3)
  other = take(iter(make_dataset(MIXTURE, TOK, SPEC, batch_size=4, seed=1)), 3)
  assert_batches_equal(batches, again)
  assert not np.array_equal(batches[0]["tokens"], other[0]["tokens"])
  b = batches[0]
  assert b["tokens"].shape == (4, 64) and b["targets"].shape == (4, 64)
  assert b["images"].shape == (4, 4, 1, 64, 64, 3) and b["images"].dtype == np.uint8
  assert b["num_images"].shape == (4,) and b["loss_weight"].shape == (4,)
  np.testing.assert_array_equal(b["loss_weight"], np.where(b["dataset_id"] == 1, 0.5, 1.0))


def test_iterator_resumes_exactly_from_saved_state():
  dataset = make_dataset(MIXTURE, TOK, SPEC, batch_size=2, seed=3)
  iterator = iter(dataset)
  take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))  # survives serialisation
  expected = take(iterator, 2)
  resumed = iter(dataset)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 2), expected)


def test_processes_split_the_global_stream():
  global_stream = take(iter(make_dataset(MIXTURE, TOK, SPEC, batch_size=1, seed=0)), 6)
  for process in range(2):
    local = take(iter(make_dataset(MIXTURE, TOK, SPEC, batch_size=1, seed=0,
                                   process_index=process, process_count=2)), 3)
    assert_batches_equal(local, global_stream[process::2])


def test_mixture_follows_its_weights():
  mixture = [Dataset("a", ShapesWorldPairs(size=400), weight=3.0),
             Dataset("b", ShapesWorldPairs(size=400, seed=5), weight=1.0)]
  ids = np.concatenate([b["dataset_id"] for b in take(
      iter(make_dataset(mixture, TOK, SPEC, batch_size=20, seed=0)), 10)])
  assert abs(np.mean(ids == 0) - 0.75) < 0.03


class FlakySource:
  """Shapes-world documents where every 4th record is broken in one of three ways."""

  def __init__(self):
    self.docs = ShapesWorldDocuments(size=200)

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, index):
    doc = dict(self.docs[index])
    kind = index % 12
    if kind == 0:
      doc["text"] = ""
    elif kind == 4:
      doc["images"] = doc["images"][:, :10]
    elif kind == 8:
      raise OSError(f"disk read failed at {index}")
    return doc


def test_bad_records_are_counted_reported_and_skipped(caplog):
  health = DataHealth()
  dataset = make_dataset([Dataset("flaky", FlakySource())], TOK, SPEC, batch_size=5, seed=0,
                         health=health)
  batches = take(iter(dataset), 12)  # 60 good records: at least 80 read
  counts = health.counts()
  # Grain reads ahead, so records prefetched but not yet consumed are counted too.
  assert all(counts.get(f"flaky/{r}", 0) >= 4 for r in ("empty_text", "bad_image",
                                                          "unreadable")), counts
  assert all(np.all(b["num_images"] >= 1) for b in batches)
  assert "Skipping record of dataset 'flaky'" in caplog.text and "record " in caplog.text


def test_config_errors_are_explained():
  with pytest.raises(ValueError, match="unknown source kind 'webdataset'"):
    dataset_from_config({"name": "x", "source": {"kind": "webdataset"}})
  with pytest.raises(ValueError, match="weights must be positive"):
    make_dataset([Dataset("a", ShapesWorldPairs(), weight=0.0),
                  Dataset("b", ShapesWorldPairs())], TOK, SPEC, batch_size=1, seed=0)
  with pytest.raises(ValueError, match="names must be unique"):
    make_dataset([Dataset("a", ShapesWorldPairs())] * 2, TOK, SPEC, batch_size=1, seed=0)
  config = {"name": "d", "source": {"kind": "shapes_world_documents", "size": 10},
            "loss_weight": 2.0}
  assert dataset_from_config(config).source == ShapesWorldDocuments(size=10)
