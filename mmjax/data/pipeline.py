"""Grain pipelines: sources -> sequences -> mixture -> per-process batches.

Every dataset is read in a shuffled, repeated order that depends only on the seed; the
mixture picks datasets in fixed proportions; each process takes every
`process_count`-th element. The iterator's state (`get_state`/`set_state`) is small
and goes into every checkpoint, so a resumed run sees exactly the data an uninterrupted
run would.

Records that cannot become sequences are counted per (dataset, reason) in `DataHealth`,
logged with their dataset and record index, and skipped: never a crash, never silent.
"""

import collections
import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np
from absl import logging

from mmjax.data import shapes_world
from mmjax.data.sequences import CorruptRecord, SequenceSpec, build_sequence
from mmjax.data.sources import ArrayRecordDocuments, ArrayRecordPairs, TfdsPairs
from mmjax.data.tokenizer import Tokenizer


class Source(Protocol):
  """Random access to documents `{"images": uint8 "n h w c", "text": str}`."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class ShapesWorldDocuments:
  """Interleaved shapes-world documents (captions, QA, naming episodes)."""

  split: str = "train"
  size: int = 1_000_000
  seed: int = 0
  image_size: int = 64
  max_images: int = 4
  naming_fraction: float = 1 / 3

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    world = shapes_world.ShapesWorld(self.seed, self.image_size)
    return world.document(self.split, index, self.max_images, self.naming_fraction)


@dataclasses.dataclass(frozen=True)
class ShapesWorldPairs:
  """Shapes-world image-caption pairs, as one-chunk documents."""

  split: str = "train"
  size: int = 1_000_000
  seed: int = 0
  image_size: int = 64

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = shapes_world.ShapesWorld(self.seed, self.image_size).example(self.split, index)
    text = f"{shapes_world.MEDIA_TOKEN}{example.caption}{shapes_world.ENDOFCHUNK_TOKEN}"
    return {"images": example.image[None], "text": text}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One entry of a mixture: a source, its sampling weight and its loss weight."""

  name: str
  source: Source
  weight: float = 1.0
  loss_weight: float = 1.0


class DataHealth:
  """Thread-safe counts of skipped records and of images cut from kept ones."""

  def __init__(self, max_logged: int = 10):
    self._lock = threading.Lock()
    self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
    self._logged = 0
    self._max_logged = max_logged

  def record(self, dataset: str, reason: str, count: int = 1, detail: str | None = None):
    with self._lock:
      self._counts[(dataset, reason)] += count
      if detail is not None and self._logged < self._max_logged:
        self._logged += 1
        logging.warning("Skipping record of dataset %r: %s%s", dataset, detail,
                        " (further ones are only counted)" if
                        self._logged == self._max_logged else "")

  def counts(self) -> dict[str, int]:
    """`{"<dataset>/<reason>": count}`."""
    with self._lock:
      return {f"{d}/{r}": c for (d, r), c in sorted(self._counts.items())}


def _sequences(dataset: Dataset, dataset_id: int, tokenizer: Tokenizer, spec: SequenceSpec,
               seed: int, health: DataHealth) -> grain.MapDataset:
  """An endless, shuffled MapDataset of built sequences (None for a skipped record)."""
  source = dataset.source
  if len(source) == 0:
    raise ValueError(f"Dataset {dataset.name!r} is empty.")

  def build(index: int):
    try:
      document = source[index]
      example, stats = build_sequence(document, tokenizer, spec)
    except CorruptRecord as error:
      health.record(dataset.name, error.reason, detail=f"record {index}: {error}")
      return None
    except Exception as error:  # an unreadable record must not end the run
      health.record(dataset.name, "unreadable",
                    detail=f"record {index}: {type(error).__name__}: {error}")
      return None
    for reason, count in stats.items():
      if count:
        health.record(dataset.name, reason, count)
    example["loss_weight"] = np.float32(dataset.loss_weight)
    example["dataset_id"] = np.int32(dataset_id)
    return example

  return (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat().map(build))


def make_dataset(datasets: Sequence[Dataset], tokenizer: Tokenizer, spec: SequenceSpec, *,
                 batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, health: DataHealth | None = None
                 ) -> grain.IterDataset:
  """Batches of `build_sequence` outputs plus `loss_weight` and `dataset_id`, `"b ..."`.

  Args:
    datasets: the mixture; sampled in proportion to their `weight`.
    batch_size: per-process batch size.
    seed: fixes every dataset's order and the mixture.
    process_index, process_count: this process's slice of the global stream.
    health: where skipped records are counted.
  """
  if not datasets:
    raise ValueError("make_dataset needs at least one dataset.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  names = [d.name for d in datasets]
  if len(set(names)) != len(names):
    raise ValueError(f"Dataset names must be unique, got {names}.")
  health = health if health is not None else DataHealth()
  parts = [_sequences(d, i, tokenizer, spec, seed + 1000 * i, health)
           for i, d in enumerate(datasets)]
  weights = [d.weight for d in datasets]
  if min(weights) <= 0:
    raise ValueError(f"Mixture weights must be positive, got {dict(zip(names, weights, strict=True))}.")
  mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  mixed = mixed[process_index::process_count]
  return (mixed.to_iter_dataset()
          .filter(lambda x: x is not None)
          .batch(batch_size, drop_remainder=True))


def resplit_position(states: Sequence[Mapping[str, Any]], process_index: int,
                     process_count: int) -> dict[str, int]:
  """This process's iterator state, from the states another number of processes saved.

  Process p of P reads the global stream's examples p, p + P, p + 2P, ... (`make_dataset`),
  and its state counts those it has read. Reading resumes at the first example some
  process had not read yet, so no example is skipped; with equal counts (no skipped
  records) that is exactly where the saved run stood, and every later global batch holds
  the same examples as if the process count had never changed.
  """
  if not states or any(set(s) != {"next_index"} for s in states):
    raise ValueError(f"Cannot re-split data iterator states {list(states)[:2]} over "
                     f"{process_count} processes: expected one {{'next_index': n}} per "
                     "saved process. Resume with the process count that saved them.")
  first_unread = min(p + len(states) * s["next_index"] for p, s in enumerate(states))
  return {"next_index": max(0, -(-(first_unread - process_index) // process_count))}


def dataset_from_config(config: Mapping[str, Any]) -> Dataset:
  """`{"name", "source": {"kind", ...}, "weight", "loss_weight"}` -> `Dataset`.

  E.g. `{"name": "cc", "source": {"kind": "arrayrecord_pairs", "paths":
  "/data/cc-*.array_record", "image_size": 224}}`; the other keys of `source` are the
  arguments of the kind's class.
  """
  kinds = {"shapes_world_documents": ShapesWorldDocuments,
           "shapes_world_pairs": ShapesWorldPairs,
           "arrayrecord_documents": ArrayRecordDocuments,
           "arrayrecord_pairs": ArrayRecordPairs,
           "tfds": TfdsPairs}
  source = dict(config["source"])
  kind = source.pop("kind")
  if kind not in kinds:
    raise ValueError(f"Dataset {config['name']!r}: unknown source kind {kind!r}; "
                     f"expected one of {sorted(kinds)}.")
  return Dataset(config["name"], kinds[kind](**source), config.get("weight", 1.0),
                 config.get("loss_weight", 1.0))
