"""Grain pipeline: determinism, resumable iterators, process sharding, mixing, bad records."""

import collections
import json
import threading

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax.data.pipeline import (HEALTH_KEY, DataHealth, Dataset, ShapesWorldDocuments,
                                 ShapesWorldPairs, UnusableSource, dataset_from_config,
                                 make_dataset, resplit_position)
from mmjax.data.sequences import CorruptRecord, SequenceSpec
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

  def __init__(self, size: int = 200):
    self.docs = ShapesWorldDocuments(size=size)

  def __len__(self):
    return len(self.docs)

  @staticmethod
  def flaw(index):
    return {0: "empty_text", 4: "bad_image", 8: "unreadable"}.get(index % 12)

  def __getitem__(self, index):
    doc = dict(self.docs[index])
    flaw = self.flaw(index)
    if flaw == "empty_text":
      doc["text"] = ""
    elif flaw == "bad_image":
      doc["images"] = doc["images"][:, :10]
    elif flaw == "unreadable":
      raise OSError(f"disk read failed at {index}")
    return doc


def consumed_flaws(size, seed, num_good):
  """The flaws among the records a one-dataset pipeline reads to yield `num_good`."""
  order = grain.MapDataset.range(size).shuffle(seed=seed).repeat()
  counts, good, position = collections.Counter(), 0, 0
  while good < num_good:
    flaw = FlakySource.flaw(order[position])
    position += 1
    if flaw:
      counts[f"flaky/{flaw}"] += 1
    else:
      good += 1
  return dict(counts), position


def test_bad_records_are_counted_as_consumed_reported_and_skipped(caplog):
  health = DataHealth()
  dataset = make_dataset([Dataset("flaky", FlakySource(20))], TOK, SPEC, batch_size=5,
                         seed=0, health=health)
  for steps in (1, 6):
    batches = take(iter(dataset), steps)
    counts, read = consumed_flaws(20, 0, 5 * steps)
    # Exactly what training consumed, not what Grain's read-ahead built.
    assert {k: v for k, v in health.counts().items() if "images_" not in k} == counts
    assert health.records_read() == {"flaky": read}
    assert all(np.all(b["num_images"] >= 1) for b in batches)
  assert sum(counts.values()) == read - 30 and read < 45
  assert "Skipping record of dataset 'flaky'" in caplog.text and "record " in caplog.text


def test_counts_continue_across_a_saved_and_restored_iterator(tmp_path):
  dataset = make_dataset([Dataset("flaky", FlakySource(20))], TOK, SPEC, batch_size=5, seed=0,
                         health=(health := DataHealth()))
  iterator = iter(dataset)
  take(iterator, 3)
  with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = take(iterator, 3)
    expected_counts, expected_read = health.counts(), health.records_read()

    resumed_health = DataHealth()
    resumed = iter(make_dataset([Dataset("flaky", FlakySource(20))], TOK, SPEC, batch_size=5,
                                seed=0, health=resumed_health))
    manager.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(resumed)))
  assert resumed_health.counts() == consumed_flaws(20, 0, 15)[0] | {
      k: v for k, v in resumed_health.counts().items() if "images_" in k}
  assert_batches_equal(take(resumed, 3), expected)
  assert resumed_health.counts() == expected_counts
  assert resumed_health.records_read() == expected_read == {"flaky": consumed_flaws(20, 0, 30)[1]}


def test_resplit_states_keep_the_count_totals():
  saved = [{"next_index": 4, HEALTH_KEY: {"counts": {"a": {"bad_image": 2}}, "read": {"a": 6},
                                          "skipped_in_a_row": {"a": 1}}},
           {"next_index": 4, HEALTH_KEY: {"counts": {"a": {"bad_image": 1, "unreadable": 3}},
                                          "read": {"a": 8}, "skipped_in_a_row": {}}}]
  first, second = (resplit_position(saved, p, 2) for p in range(2))
  assert first["next_index"] == second["next_index"] == 4
  assert first[HEALTH_KEY]["counts"] == {"a": {"bad_image": 3, "unreadable": 3}}
  assert first[HEALTH_KEY]["read"] == {"a": 14}
  assert second[HEALTH_KEY]["counts"] == {} and second[HEALTH_KEY]["read"] == {}


def within(seconds, function):
  """`function()`'s result or exception; fails (instead of hanging the suite) if it takes
  longer than `seconds`."""
  outcome = {}

  def target():
    try:
      outcome["value"] = function()
    except BaseException as error:  # noqa: BLE001 - handed to the test
      outcome["error"] = error

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"still running after {seconds} s: the pipeline hangs"
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


class CorruptImages:
  """Documents whose every image is undecodable."""

  def __len__(self):
    return 20

  def __getitem__(self, index):
    raise CorruptRecord("bad_image", f"cannot decode image 0 of record {index}")


def test_a_source_with_no_usable_record_stops_naming_it_and_its_reasons():
  health = DataHealth()
  mixture = [Dataset("good", ShapesWorldPairs(size=50)), Dataset("corrupt", CorruptImages())]
  dataset = make_dataset(mixture, TOK, SPEC, batch_size=2, seed=0, health=health)
  with pytest.raises(UnusableSource, match=r"'corrupt' yields nothing usable: the last 40 records read \(two full passes over "
                     r"its 20 records\) were all skipped .*bad_image 40\)\. Last one: record \d+: "
                     "bad_image: cannot decode"):
    within(60, lambda: take(iter(dataset), 1000))
  # Every record truncated away (a document's image needs text after it): the small
  # source is known to be unusable after two passes over it.
  short = SequenceSpec(seq_len=1, max_images=4, image_size=64)
  dataset = make_dataset([Dataset("docs", ShapesWorldDocuments(size=30))], TOK, short,
                         batch_size=2, seed=0)
  with pytest.raises(UnusableSource, match=r"'docs' yields.*\(60 read in all; skipped per reason: no_image_left 60\)"):
    within(60, lambda: take(iter(dataset), 1))
  # A large source stops after the window.
  dataset = make_dataset([Dataset("docs", ShapesWorldDocuments(size=10**6))], TOK, short,
                         batch_size=2, seed=0, skip_window=50)
  with pytest.raises(UnusableSource, match=r"the last 50 records read were all skipped"):
    within(60, lambda: take(iter(dataset), 1))
  # max_images=0 with interleaved documents cannot yield anything: refused up front.
  with pytest.raises(ValueError, match="max_images >= 1"):
    within(60, lambda: make_dataset([Dataset("docs", ShapesWorldDocuments(size=30))], TOK,
                                    SequenceSpec(seq_len=64, max_images=0, image_size=64),
                                    batch_size=2, seed=0))


def test_a_mostly_bad_source_keeps_going():
  class MostlyBad(FlakySource):
    @staticmethod
    def flaw(index):
      return None if index % 10 == 3 else "bad_image"

  health = DataHealth()
  dataset = make_dataset([Dataset("flaky", MostlyBad(40))], TOK, SPEC, batch_size=4, seed=0,
                         health=health, skip_window=100)
  batches = within(120, lambda: take(iter(dataset), 5))  # 20 good of 200 read
  assert len(batches) == 5 and health.counts()["flaky/bad_image"] >= 150


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
