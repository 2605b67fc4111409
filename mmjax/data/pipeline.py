"""Grain pipelines: sources -> sequences -> mixture -> per-process batches.

Every dataset is read in a shuffled, repeated order that depends only on the seed (or,
with `balance`, drawn class-balanced with replacement, each position from the seed and
the position alone); the mixture picks datasets in fixed proportions; each process takes
every `process_count`-th element. The iterator's state (`get_state`/`set_state`) is small
and goes into every checkpoint, so a resumed run sees exactly the data an uninterrupted
run would.

Records that cannot become sequences are skipped, counted per (dataset, reason) when
training consumes them (`DataHealth`; the counts are part of the iterator's state, so
checkpoints carry them) and the first ones logged with their dataset and record index:
never a crash, never silent. A dataset that yields nothing usable for a long window
(`skip_window` records in a row) stops the iterator with `UnusableSource`, naming the
dataset and its skip reasons, instead of filtering an endless stream.
"""

import dataclasses
import functools
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np
from absl import logging

from mmjax import cli
from mmjax.data import conversation, findings_world, mammo_world, shapes_world, video
from mmjax.data.keywords import KeywordMask
from mmjax.data.regions import build_regions
from mmjax.data.sequences import CorruptRecord, SequenceSpec, build_sequence
from mmjax.data.sources import (ArrayRecordConversations, ArrayRecordDocuments,
                                ArrayRecordPairs, DecoupledPairs, LabelledClasses,
                                LabelledDecoupled, LlavaJson, MammoFolder, TfdsPairs,
                                WebDatasetDocuments, WebDatasetPairs)
from mmjax.data.tokenizer import Tokenizer


class Source(Protocol):
  """Random access to documents `{"images": uint8 "n h w c", "text": str}`.

  Classification sources add `"label"` (int). Labelled sources (MedCLIP's) declare
  `label_names` (the columns of their label vectors) and add `"image_labels"` and
  `"text_labels"` (float32 `"l"`: 1, 0, -1, NaN unknown); a document without one of them
  gets all NaN. MMBCD's sources give `{"image", "boxes", "text", "label", "id"}`
  (`mmjax.data.regions`) and add `labels` (every record's label, for class-balanced
  sampling) and `texts()` (every record's text, to fit the masked keywords). Video sources
  give clips `{"video", "masks", "id"}` or labelled frames `{"image", "mask", "id"}`
  (`mmjax.data.video`).
  """

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
  max_ways: int = 4

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    world = shapes_world.ShapesWorld(self.seed, self.image_size)
    return world.document(self.split, index, self.max_images, self.naming_fraction,
                          self.max_ways)


@dataclasses.dataclass(frozen=True)
class ShapesWorldConversations:
  """Shapes-world instruction data (LLaVA's format): conversations, detailed descriptions
  and short reasoning about one image each (`ShapesWorld.conversation`); "eval" holds the
  held-out (shape, colour) pairs. `captions=True` gives LLaVA's stage-1 data instead:
  each image's caption as the answer to a request for a brief description."""

  split: str = "train"
  size: int = 1_000_000
  seed: int = 0
  image_size: int = 64
  captions: bool = False

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    world = shapes_world.ShapesWorld(self.seed, self.image_size)
    if not self.captions:
      return world.conversation(self.split, index)
    example = world.example(self.split, index)
    return {"id": f"shapes-{self.split}-{index}", "images": example.image[None],
            "conversations": [
                {"from": "human", "value": f"{shapes_world.MEDIA_TOKEN}\nbriefly describe the "
                                           "image."},
                {"from": "gpt", "value": example.caption}]}


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


def base_new_split(labels: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """CoOp's base-to-new protocol: the labels sorted, the first `ceil(n / 2)` the base
  classes, the rest the new ones; each set is relabelled from 0 in this order."""
  ordered = sorted({int(label) for label in labels})
  m = math.ceil(len(ordered) / 2)
  return tuple(ordered[:m]), tuple(ordered[m:])


def few_shot_indices(labels: Sequence[int], classes: Sequence[int], shots: int,
                     seed: int) -> list[int]:
  """`shots` positions of `labels` per class of `classes` (in that order), drawn without
  replacement by a generator seeded with `seed` alone: the same draw for the same seed."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  picked = []
  for label in classes:
    candidates = np.flatnonzero(labels == label)
    if len(candidates) < shots:
      raise ValueError(f"Class {label} has {len(candidates)} examples in the pool, fewer "
                       f"than shots={shots}; enlarge the pool.")
    picked += candidates[np.sort(rng.choice(len(candidates), shots, replace=False))].tolist()
  return picked


def shapes_world_classes(subset: str) -> tuple[int, ...]:
  """The `shapes_world.CLASSES` indices of "all" classes, or of CoOp's "base" or "new"
  half (`base_new_split`), in the order they are relabelled from 0."""
  everything = range(len(shapes_world.CLASSES))
  choices = dict(zip(("base", "new"), base_new_split(everything), strict=True))
  choices["all"] = tuple(everything)
  if subset not in choices:
    raise ValueError(f"classes={subset!r}; expected 'all', 'base' or 'new'.")
  return choices[subset]


@functools.cache
def _stream_labels(seed: int, split: str, image_size: int, count: int) -> tuple[int, ...]:
  world = shapes_world.ShapesWorld(seed, image_size)
  return tuple(world.classification(split, i)[1] for i in range(count))


@dataclasses.dataclass(frozen=True)
class ShapesWorldClasses:
  """Shapes-world classification (`shapes_world.CLASSES`) as image-label pairs: one-chunk
  documents whose text is the class name and whose `label` the pipeline passes on.

  Attributes:
    split: the stream of `ShapesWorld.classification`.
    classes: "all", or CoOp's "base" or "new" half (`base_new_split`), relabelled from 0.
    shots: K examples per class drawn with `shots_seed` from the split's first `pool`
      items (`few_shot_indices`); 0: the split's first `size` items of those classes.
    seed: the world's seed.
  """

  split: str = "train"
  classes: str = "all"
  shots: int = 0
  shots_seed: int = 1
  pool: int = 3000
  size: int = 1000
  seed: int = 0
  image_size: int = 64
  _items: tuple[tuple[int, int], ...] = dataclasses.field(init=False, repr=False,
                                                          compare=False)

  def __post_init__(self):
    labels = self.labels()
    if self.shots > 0:
      stream = _stream_labels(self.seed, self.split, self.image_size, self.pool)
      picked = few_shot_indices(stream, labels, self.shots, self.shots_seed)
    else:  # the stream read in doubling spans until `size` items of these classes
      wanted, count = set(labels), self.size
      while True:
        count *= 2
        stream = _stream_labels(self.seed, self.split, self.image_size, count)
        picked = [i for i, label in enumerate(stream) if label in wanted][:self.size]
        if len(picked) == self.size:
          break
    relabel = {label: i for i, label in enumerate(labels)}
    object.__setattr__(self, "_items", tuple((i, relabel[stream[i]]) for i in picked))

  def labels(self) -> tuple[int, ...]:
    """The `shapes_world.CLASSES` indices of this source's classes, in new-label order."""
    return shapes_world_classes(self.classes)

  def class_names(self) -> tuple[str, ...]:
    """The names of this source's classes, in label order."""
    return tuple(shapes_world.CLASSES[i] for i in self.labels())

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    item, label = self._items[index]
    image, _ = shapes_world.ShapesWorld(self.seed, self.image_size).classification(
        self.split, item)
    name = shapes_world.CLASSES[self.labels()[label]]
    text = f"{shapes_world.MEDIA_TOKEN}a {name}.{shapes_world.ENDOFCHUNK_TOKEN}"
    return {"images": image[None], "text": text, "label": label}


FINDINGS_WORLD_PARTS = ("paired", "decoupled", "classification", "retrieval")
_FINDINGS_WORLD_FIELDS = {  # the parts that use a field; the others use every part's
    "fraction": ("paired",), "text": ("paired", "retrieval"),
    "image_pool": ("decoupled",), "text_pool": ("decoupled",),
    "prompt_fraction": ("decoupled",), "classes": ("classification",)}


@dataclasses.dataclass(frozen=True)
class FindingsWorldPairs:
  """Findings-world (`mmjax.data.findings_world`) image-text pairs with CheXpert-style
  label vectors over `findings_world.LABELS`: documents `{"images": uint8 "1 s s 3",
  "text", "image_labels": float32 "l", "text_labels": float32 "l"}`.

  Parts:
    "paired": the first `round(fraction * size)` studies of the paired set (`size`
      default 2000), so a smaller fraction is a prefix of a larger one; the text is the
      report (`text="report"`) or one of its sentences (`"sentence"`, drawn by index).
    "decoupled": MedCLIP's sampling (`sources.DecoupledPairs`) of the first `image_pool`
      images and `text_pool` sentences: `size` examples (default `image_pool`), each an
      image and an independent sentence, or, with probability `prompt_fraction`, a prompt
      sentence drawn by the image's labels.
    "classification": held out, each image positive for exactly one of `classes`
      (balanced, `label = index % len(classes)`), the others negative; `label` is the
      class index and the text the class name (`size` default 1000, CheXpert 5x200).
    "retrieval": held out studies and their reports (`size` default 1000).
  """

  part: str = "paired"
  size: int = 0
  fraction: float = 1.0
  text: str = "report"
  image_pool: int = 20_000
  text_pool: int = 50_000
  prompt_fraction: float = 0.0
  classes: tuple[str, ...] = findings_world.ZERO_SHOT_CLASSES
  seed: int = 0
  image_size: int = 64
  _pairs: DecoupledPairs | None = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "classes", tuple(self.classes))
    if self.part not in FINDINGS_WORLD_PARTS:
      raise ValueError(f"Unknown findings-world part {self.part!r}; expected one of "
                       f"{FINDINGS_WORLD_PARTS}.")
    unused = [f.name for f in dataclasses.fields(self) if f.init
              and self.part not in _FINDINGS_WORLD_FIELDS.get(f.name, FINDINGS_WORLD_PARTS)
              and getattr(self, f.name) != f.default]
    if unused:
      raise ValueError(f"Findings-world part {self.part!r} does not use {unused}; leave them "
                       "out (they belong to parts "
                       f"{ {n: _FINDINGS_WORLD_FIELDS[n] for n in unused} }).")
    if not 0 < self.fraction <= 1:
      raise ValueError(f"fraction must be in (0, 1], got {self.fraction}.")
    if self.text not in ("report", "sentence"):
      raise ValueError(f"text must be 'report' or 'sentence', got {self.text!r}.")
    if self.part == "classification":
      findings_world.FindingsWorld().classification(0, self.classes)  # checks the names
    pairs = None
    if self.part == "decoupled":
      world = self.world()
      pairs = DecoupledPairs(findings_world.ImagePool(world, self.image_pool),
                             findings_world.SentencePool(world, self.text_pool),
                             self.size, self.seed, self.prompt_fraction)
    object.__setattr__(self, "_pairs", pairs)

  def world(self) -> findings_world.FindingsWorld:
    return findings_world.FindingsWorld(self.seed, self.image_size)

  @property
  def label_names(self) -> tuple[str, ...]:
    return findings_world.LABELS

  def class_names(self) -> tuple[str, ...]:
    """The classification part's classes, in label order."""
    return self.classes

  def draw(self, index: int) -> tuple[int, int | None]:
    """The decoupled part's `(image pool index, text pool index or None for a prompt
    sentence)` of example `index` (`sources.DecoupledPairs.draw`)."""
    if self._pairs is None:
      raise ValueError(f"Only the 'decoupled' part draws pairs, not {self.part!r}.")
    return self._pairs.draw(index)[:2]

  def __len__(self) -> int:
    if self._pairs is not None:
      return len(self._pairs)
    if self.part == "paired":
      return max(1, round(self.fraction * (self.size or 2000)))
    return self.size or 1000

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._pairs is not None:
      return self._pairs[index]
    world = self.world()
    if self.part == "classification":
      example, label = world.classification(index, self.classes)
      name = self.classes[label]
      text_labels = findings_world.sentence_labels({name: findings_world.POSITIVE})
      return {"images": example.image[None], "text": name, "label": label,
              "image_labels": example.labels, "text_labels": text_labels}
    example = world.example("paired" if self.part == "paired" else "retrieval", index)
    if self.text == "report":
      text, text_labels = example.study.report, example.labels
    else:
      sentences = example.study.sentences
      pick = np.random.default_rng([self.seed, 0x73656e74, index]).integers(len(sentences))
      text, text_labels = sentences[pick].text, sentences[pick].labels
    return {"images": example.image[None], "text": text, "image_labels": example.labels,
            "text_labels": text_labels}


@functools.lru_cache(maxsize=16)
def _mammo_texts(world: mammo_world.MammoWorld, split: str, size: int) -> tuple[str, ...]:
  return tuple(world.texts(split, size))


@dataclasses.dataclass(frozen=True)
class MammoWorldDocuments:
  """Mammography-world (`mmjax.data.mammo_world`) cases 0 to `size - 1` of `split` as MMBCD
  documents `{"image": uint8 "h w", "boxes": float32 "n 5", "text", "label", "id"}`: the
  full image, the simulated detector's raw rows and the history. The other fields are
  `mammo_world.MammoWorld`'s."""

  split: str = "train"
  size: int = 2000
  image_size: int = mammo_world.REFERENCE_SIZE
  seed: int = 0
  malignant_fraction: float = 0.28
  recall: float = 0.85
  tissue_boxes: float = 4.0
  broken_rate: float = 0.0
  leak: tuple[float, float] = (0.6, 0.06)
  leak_benign: float = 0.04
  missing_text: float = 0.03

  def __post_init__(self):
    object.__setattr__(self, "leak", tuple(self.leak))
    mammo_world.split_id(self.split)
    if self.size < 1:
      raise ValueError(f"size must be at least 1, got {self.size}.")
    self.world()  # checks the world's settings now, not at the first record

  def world(self) -> mammo_world.MammoWorld:
    return mammo_world.MammoWorld(**{f.name: getattr(self, f.name)
                                     for f in dataclasses.fields(mammo_world.MammoWorld)})

  @property
  def labels(self) -> tuple[int, ...]:
    return self.world().labels(self.split, self.size)

  def texts(self) -> list[str]:
    return list(_mammo_texts(self.world(), self.split, self.size))

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.size:
      raise IndexError(f"Case {index} of a {self.size}-case mammography-world source.")
    document = self.world().example(self.split, index)
    del document["lesion_box"]  # the world's truth, not what a real source knows
    return document


SKIP_WINDOW = 1000


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One entry of a mixture: a source, its sampling weight and its loss weight.

  `balance` (True, or class weights indexed by label) reads the source class-balanced,
  with replacement, instead of in shuffled passes (`balanced_order`).
  """

  name: str
  source: Source
  weight: float = 1.0
  loss_weight: float = 1.0
  balance: bool | tuple[float, ...] = False

  def __post_init__(self):
    if self.balance is None:
      object.__setattr__(self, "balance", False)
    elif not isinstance(self.balance, bool):
      object.__setattr__(self, "balance", tuple(float(w) for w in self.balance))


def class_weights(balance: bool | Sequence[float], labels: Sequence[int]) -> np.ndarray:
  """float64 `"c"`: the weight of each class (label 0 .. c - 1) in the balanced stream.
  True: equal weights (MMBCD's `[1 - p, p]` with p = 0.5); a sequence: those."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not len(labels) or not np.issubdtype(labels.dtype, np.integer) \
     or labels.min() < 0:
    raise ValueError(f"Class-balanced sampling needs one int label >= 0 per record, got "
                     f"{labels.dtype} {labels.shape}.")
  num_classes = int(labels.max()) + 1
  weights = np.full(num_classes, 1.0) if balance is True else np.asarray(balance, np.float64)
  if weights.ndim != 1 or len(weights) < num_classes or weights.min() < 0 \
     or not weights.sum() > 0:
    raise ValueError(f"Class weights {balance} must be >= 0, not all 0, one per class; "
                     f"the labels run from 0 to {num_classes - 1}.")
  counts = np.bincount(labels, minlength=len(weights))
  empty = [c for c in range(len(weights)) if weights[c] > 0 and not counts[c]]
  if empty:
    raise ValueError(f"Class-balanced sampling gives weight to classes {empty}, which have "
                     "no records; give them weight 0 or add records.")
  return weights


def balanced_order(labels: Sequence[int], weights: Sequence[float], seed: int
                   ) -> grain.MapDataset:
  """An endless MapDataset of record indices drawn with replacement, record r with
  probability proportional to `weights[labels[r]] / count(labels[r])` (PyTorch's
  `WeightedRandomSampler` as MMBCD weights it). Position i draws from a generator seeded
  by (seed, i) alone, so a saved position resumes exactly."""
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=len(weights))
  per_record = np.asarray(weights, np.float64)[labels] / counts[labels]
  cdf = np.cumsum(per_record)
  cdf /= cdf[-1]
  last = len(labels) - 1

  def draw(position: int, _) -> int:
    u = np.random.default_rng([seed, _BALANCE_TAG, position]).random()
    return min(int(np.searchsorted(cdf, u, side="right")), last)

  return grain.MapDataset.range(len(labels)).repeat().map_with_index(draw)


_BALANCE_TAG, _REGIONS_TAG = 0x62616c, 0x726567  # separate the pipeline's random streams


class UnusableSource(cli.UserError):
  """A dataset whose records have all been skipped for a long window: the run stops rather
  than filter an endless stream of unusable records."""


HEALTH_KEY = "data_health"  # where the counts live in the data iterator's state


@dataclasses.dataclass(frozen=True)
class _Built:
  """What reading one record gives the last stage: a sequence, or why there is none.

  `counts` are the per-reason counts the record adds (its skip reason, or the images cut
  from a kept record); they are tallied when training consumes the record, not when
  Grain's read-ahead builds it.
  """

  dataset: str
  example: dict[str, np.ndarray] | None
  counts: tuple[tuple[str, int], ...] = ()
  detail: str | None = None


class DataHealth:
  """What training consumed: records read and skipped per dataset, per reason.

  The counts are kept by the last stage of the pipeline (`make_dataset`) as part of the
  data iterator's state (`iterator.get_state()[HEALTH_KEY]`), so they are saved with the
  iterator in every checkpoint and a resumed run continues the totals. Records Grain read
  ahead but training has not consumed yet are not counted. A `DataHealth` shows the counts
  of the iterator most recently made (`iter(dataset)`) from the dataset it was given to.
  """

  def __init__(self, max_logged: int = 10):
    self._lock = threading.Lock()
    self._max_logged = max_logged
    self._logged = 0
    self._tally: _Tally | None = None

  def _attach(self, tally: "_Tally"):
    with self._lock:
      self._tally = tally

  def _log(self, dataset: str, detail: str):
    with self._lock:
      if self._logged >= self._max_logged:
        return
      self._logged += 1
      last = self._logged == self._max_logged
    logging.warning("Skipping record of dataset %r: %s%s", dataset, detail,
                    " (further ones are only counted)" if last else "")

  def counts(self) -> dict[str, int]:
    """`{"<dataset>/<reason>": count}` over the records training consumed: skipped records
    per reason (`bad_image`, `empty_text`, `no_image_left`, `unreadable`, ...) and images
    cut from kept records (`images_over_limit`, `images_truncated`), pairs' texts cut to
    the sequence length (`text_truncated`)."""
    with self._lock:
      return {} if self._tally is None else self._tally.as_counts()

  def records_read(self) -> dict[str, int]:
    """`{dataset: records consumed}`, skipped ones included."""
    with self._lock:
      return {} if self._tally is None else dict(sorted(self._tally.read.items()))


@dataclasses.dataclass
class _Tally:
  """The counting stage's state; plain dicts of ints, so it is JSON in checkpoints."""

  counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  read: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped_in_a_row: dict[str, int] = dataclasses.field(default_factory=dict)

  def add(self, dataset: str, reason: str, count: int):
    per_reason = self.counts.setdefault(dataset, {})
    per_reason[reason] = per_reason.get(reason, 0) + count

  def as_counts(self) -> dict[str, int]:
    return {f"{d}/{r}": c for d, per_reason in sorted(self.counts.items())
            for r, c in sorted(per_reason.items())}

  def state(self) -> dict[str, Any]:
    return {"counts": {d: dict(c) for d, c in self.counts.items()}, "read": dict(self.read),
            "skipped_in_a_row": dict(self.skipped_in_a_row)}

  @classmethod
  def from_state(cls, state: Mapping[str, Any] | None) -> "_Tally":
    state = state or {}  # iterator states saved before counts were kept: start at zero
    return cls({d: {r: int(c) for r, c in per.items()}
                for d, per in state.get("counts", {}).items()},
               {d: int(n) for d, n in state.get("read", {}).items()},
               {d: int(n) for d, n in state.get("skipped_in_a_row", {}).items()})


class _CountingIterator(grain.DatasetIterator):
  """Passes on usable examples; counts skipped records and stops on an unusable source."""

  def __init__(self, parent: grain.DatasetIterator, health: DataHealth,
               skip_limits: Mapping[str, int], skip_window: int):
    super().__init__(parent)
    self._health = health
    self._skip_limits = skip_limits
    self._skip_window = skip_window
    self._tally = _Tally()
    self._last_detail: dict[str, str] = {}  # for the error message only, not state
    health._attach(self._tally)

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      built: _Built = next(self._parent)
      tally, name = self._tally, built.dataset
      with self._health._lock:  # counts() may be read from another thread
        tally.read[name] = tally.read.get(name, 0) + 1
        for reason, count in built.counts:
          tally.add(name, reason, count)
        if built.example is not None:
          tally.skipped_in_a_row[name] = 0
          return built.example
        tally.skipped_in_a_row[name] = tally.skipped_in_a_row.get(name, 0) + 1
        in_a_row = tally.skipped_in_a_row[name]
      if built.detail is not None:
        self._last_detail[name] = built.detail
        self._health._log(name, built.detail)
      if in_a_row >= self._skip_limits[name]:
        raise self._unusable(name, in_a_row)

  def _unusable(self, name: str, in_a_row: int) -> UnusableSource:
    reasons = ", ".join(f"{reason} {count}" for reason, count in
                        sorted(self._tally.counts.get(name, {}).items(), key=lambda x: -x[1]))
    window = (f"the last {in_a_row} records read (two full passes over its "
              f"{in_a_row // 2} records)" if in_a_row < self._skip_window
              else f"the last {in_a_row} records read")
    example = f" Last one: {self._last_detail[name]}." if name in self._last_detail else ""
    return UnusableSource(
        f"Dataset {name!r} yields nothing usable: {window} were all skipped "
        f"({self._tally.read[name]} read in all; skipped per reason: {reasons}).{example} "
        "Check the source's paths and format, and that the sequence settings (seq_len, "
        "max_images, image_size) leave room for its records.")

  def get_state(self) -> dict[str, Any]:
    with self._health._lock:
      return {**self._parent.get_state(), HEALTH_KEY: self._tally.state()}

  def set_state(self, state: dict[str, Any]):
    self._parent.set_state({k: v for k, v in state.items() if k != HEALTH_KEY})
    with self._health._lock:
      self._tally = _Tally.from_state(state.get(HEALTH_KEY))
    self._health._attach(self._tally)

  def __str__(self) -> str:
    return "CountingDatasetIterator"


class _CountingDataset(grain.IterDataset):
  """The pipeline's last record-level stage (see `_CountingIterator`)."""

  def __init__(self, parent: grain.IterDataset, health: DataHealth,
               skip_limits: Mapping[str, int], skip_window: int):
    super().__init__(parent)
    self._health = health
    self._skip_limits = dict(skip_limits)
    self._skip_window = skip_window

  def __iter__(self) -> _CountingIterator:
    return _CountingIterator(self._parent.__iter__(), self._health, self._skip_limits,
                             self._skip_window)

  def __str__(self) -> str:
    return "CountingIterDataset"


LABEL_KEYS = ("image_labels", "text_labels")


def label_names(source: Source) -> tuple[str, ...] | None:
  """The label columns of a labelled source (its `label_names`), None for others."""
  names = getattr(source, "label_names", None)
  return None if names is None else tuple(names)


def _label_vector(value: Any, width: int, key: str) -> np.ndarray:
  """A document's label vector, or all NaN (no label) where it has none."""
  if value is None:
    return np.full(width, np.nan, np.float32)
  vector = np.asarray(value, np.float32)
  if vector.shape != (width,):
    raise CorruptRecord("bad_labels", f"{key} has shape {vector.shape}, expected ({width},)")
  if not np.all(np.isnan(vector) | np.isin(vector, (1.0, 0.0, -1.0))):
    raise CorruptRecord("bad_labels", f"{key} holds {sorted(set(vector[~np.isnan(vector)]))}; "
                        "labels are 1, 0, -1 or NaN")
  return vector


def _sequences(dataset: Dataset, dataset_id: int, tokenizer: Tokenizer | None,
               spec: SequenceSpec,
               seed: int, num_labels: int = 0,
               keyword_mask: KeywordMask | None = None) -> grain.MapDataset:
  """An endless, shuffled (or class-balanced) MapDataset of `_Built` records; with
  `num_labels`, every example has `image_labels` and `text_labels` float32 `"num_labels"`
  (NaN where unknown). `keyword_mask` deletes keywords from each document's text, drawn
  by record and pass (`epoch = position // len(source)`), as do region duplicates."""
  source = dataset.source
  if len(source) == 0:
    raise ValueError(f"Dataset {dataset.name!r} is empty.")
  name = dataset.name
  if dataset.balance is not False:
    if not hasattr(source, "labels"):
      raise ValueError(f"Dataset {name!r}: balance needs a source with `labels` (one class "
                       f"per record); {type(source).__name__} has none.")
    labels = source.labels
    try:
      weights = class_weights(dataset.balance, labels)
    except ValueError as e:
      raise ValueError(f"Dataset {name!r}: {e}") from e
    order = balanced_order(labels, weights, seed)
  else:
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()

  def build(position: int, index: int) -> _Built:
    epoch = position // len(source)
    try:
      document = source[index]
      if keyword_mask is not None:
        document = {**document, "text": keyword_mask.apply(document.get("text") or "",
                                                           index, epoch)}
      if spec.mode in video.MODES:
        example, stats = video.build_video(document, spec.video, spec.mode, seed, index)
      elif spec.mode == "regions":
        rng = np.random.default_rng([seed, _REGIONS_TAG, index, epoch])
        example, stats = build_regions(document, tokenizer, spec.regions, spec.seq_len, rng)
      elif spec.mode == "conversation":
        example, stats = conversation.build_conversation(
            document, tokenizer, spec.conversation, spec.seq_len, max(spec.max_images, 1),
            (spec.image_size, spec.image_size, spec.channels))
      else:
        example, stats = build_sequence(document, tokenizer, spec)
      for key in LABEL_KEYS if num_labels else ():
        example[key] = _label_vector(document.get(key), num_labels, key)
    except CorruptRecord as error:
      return _Built(name, None, ((error.reason, 1),), f"record {index}: {error}")
    except Exception as error:  # an unreadable record must not end the run
      return _Built(name, None, (("unreadable", 1),),
                    f"record {index}: {type(error).__name__}: {error}")
    if "label" in document:  # classification sources
      example["label"] = np.int32(document["label"])
    example["loss_weight"] = np.float32(dataset.loss_weight)
    example["dataset_id"] = np.int32(dataset_id)
    return _Built(name, example, tuple((r, c) for r, c in stats.items() if c))

  return order.map_with_index(build)


def make_dataset(datasets: Sequence[Dataset], tokenizer: Tokenizer | None, spec: SequenceSpec,
                 *,
                 batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, health: DataHealth | None = None,
                 skip_window: int = SKIP_WINDOW,
                 keyword_mask: KeywordMask | None = None) -> grain.IterDataset:
  """Batches of `build_sequence` outputs (`build_regions`' in mode "regions",
  `video.build_video`'s in modes "video" and "segment") plus
  `loss_weight` and `dataset_id`, `"b ..."`; classification sources add `label` (int32),
  and where any dataset is labelled (has `label_names`, all of the same length `l`) every
  example has `image_labels` and `text_labels` (float32 `"l"`: 1, 0, -1, NaN unknown; all
  NaN from unlabelled sources).

  Args:
    datasets: the mixture; sampled in proportion to their `weight`.
    tokenizer: None where `spec.needs_tokenizer` is false (the video modes).
    batch_size: per-process batch size.
    seed: fixes every dataset's order and the mixture.
    process_index, process_count: this process's slice of the global stream.
    health: shows what the iterator consumed (see `DataHealth`).
    skip_window: a dataset whose last `skip_window` records read were all skipped stops
      the iterator with `UnusableSource` (so does, in a one-process run, a dataset with
      every record of two full passes skipped, which proves none is usable). A partly bad
      dataset keeps going, its skips counted.
    keyword_mask: deletes keywords from every document's text (training data only:
      `mmjax.data.keywords`).
  """
  if not datasets:
    raise ValueError("make_dataset needs at least one dataset.")
  if tokenizer is None and spec.needs_tokenizer:
    raise ValueError(f"Sequence mode {spec.mode!r} needs a tokenizer; only the video modes "
                     f"{video.MODES} are built without one.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  if skip_window < 1:
    raise ValueError(f"skip_window must be at least 1, got {skip_window}.")
  names = [d.name for d in datasets]
  if len(set(names)) != len(names):
    raise ValueError(f"Dataset names must be unique, got {names}.")
  health = health if health is not None else DataHealth()
  widths = {d.name: len(label_names(d.source)) for d in datasets
            if label_names(d.source) is not None}
  if len(set(widths.values())) > 1:
    raise ValueError(f"The labelled datasets of a mixture must share one label vocabulary; "
                     f"their label counts differ: {widths}.")
  num_labels = next(iter(widths.values()), 0)
  parts = [_sequences(d, i, tokenizer, spec, seed + 1000 * i, num_labels, keyword_mask)
           for i, d in enumerate(datasets)]
  weights = [d.weight for d in datasets]
  if min(weights) <= 0:
    raise ValueError(f"Mixture weights must be positive, got "
                     f"{dict(zip(names, weights, strict=True))}.")
  mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  mixed = mixed[process_index::process_count]
  # Each pass over a dataset is a permutation of all its records, so with one process
  # (which reads every dataset's stream contiguously) 2 * len consecutive skips cover a
  # whole pass: no record is usable, and waiting for the full window is pointless. A
  # balanced dataset draws with replacement: it has no passes, only the window.
  limits = {d.name: min(skip_window, 2 * len(d.source))
            if process_count == 1 and d.balance is False else skip_window for d in datasets}
  counted = _CountingDataset(mixed.to_iter_dataset(), health, limits, skip_window)
  return counted.batch(batch_size, drop_remainder=True)


def resplit_position(states: Sequence[Mapping[str, Any]], process_index: int,
                     process_count: int) -> dict[str, Any]:
  """This process's iterator state, from the states another number of processes saved.

  Process p of P reads the global stream's examples p, p + P, p + 2P, ... (`make_dataset`),
  and its state counts those it has read. Reading resumes at the first example some
  process had not read yet, so no example is skipped; with equal counts (no skipped
  records) that is exactly where the saved run stood, and every later global batch holds
  the same examples as if the process count had never changed.

  The data-health counts of all saved processes go to process 0, so the totals over the
  processes continue; the other processes start theirs at zero.
  """
  positions = [{k: v for k, v in s.items() if k != HEALTH_KEY} for s in states]
  if not states or any(set(s) != {"next_index"} for s in positions):
    raise ValueError(f"Cannot re-split data iterator states {list(states)[:2]} over "
                     f"{process_count} processes: expected one {{'next_index': n}} per "
                     "saved process. Resume with the process count that saved them.")
  first_unread = min(p + len(states) * s["next_index"] for p, s in enumerate(positions))
  state: dict[str, Any] = {
      "next_index": max(0, -(-(first_unread - process_index) // process_count))}
  if any(HEALTH_KEY in s for s in states):
    total = _Tally()
    if process_index == 0:
      for saved in states:
        tally = _Tally.from_state(saved.get(HEALTH_KEY))
        for name, per_reason in tally.counts.items():
          for reason, count in per_reason.items():
            total.add(name, reason, count)
        for name, count in tally.read.items():
          total.read[name] = total.read.get(name, 0) + count
    state[HEALTH_KEY] = total.state()
  return state


def dataset_from_config(config: Mapping[str, Any]) -> Dataset:
  """`{"name", "source": {"kind", ...}, "weight", "loss_weight", "balance"}` -> `Dataset`.

  E.g. `{"name": "cc", "source": {"kind": "arrayrecord_pairs", "paths":
  "/data/cc-*.array_record", "image_size": 224}}`; the other keys of `source` are the
  arguments of the kind's class.
  """
  kinds = {"shapes_world_documents": ShapesWorldDocuments,
           "shapes_world_pairs": ShapesWorldPairs,
           "shapes_world_conversations": ShapesWorldConversations,
           "shapes_world_classes": ShapesWorldClasses,
           "findings_world": FindingsWorldPairs,
           "mammo_world": MammoWorldDocuments,
           "mammo_folder": MammoFolder,
           "video_world": video.VideoWorldClips,
           "video_world_frames": video.VideoWorldFrames,
           "bair_folder": video.BairFolder,
           "labelled_decoupled": LabelledDecoupled,
           "labelled_classes": LabelledClasses,
           "arrayrecord_documents": ArrayRecordDocuments,
           "arrayrecord_pairs": ArrayRecordPairs,
           "arrayrecord_conversations": ArrayRecordConversations,
           "llava_json": LlavaJson,
           "tfds": TfdsPairs,
           "webdataset_documents": WebDatasetDocuments,
           "webdataset_pairs": WebDatasetPairs}
  source = dict(config["source"])
  kind = source.pop("kind")
  if kind not in kinds:
    raise ValueError(f"Dataset {config['name']!r}: unknown source kind {kind!r}; "
                     f"expected one of {sorted(kinds)}.")
  return Dataset(config["name"], kinds[kind](**source), config.get("weight", 1.0),
                 config.get("loss_weight", 1.0), config.get("balance", False))
