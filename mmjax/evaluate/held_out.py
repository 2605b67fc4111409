"""What the held-out evaluations of one task (classify, reconstruct, segment) share: the
split's source, how many of its records are read, and running a jitted function over
examples in batches of one compiled shape."""

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from mmjax.cli import UserError
from mmjax.data.pipeline import dataset_from_config
from mmjax.data.sequences import CorruptRecord


def source(config, name: str, what: str):
  """The source of `config.data.eval_datasets.<name>`; `what` it holds names it in the
  error when the config has no such split."""
  datasets = config.data.get("eval_datasets") or {}
  if name not in datasets:
    raise UserError(f"The evaluation needs config.data.eval_datasets.{name} ({what}); the "
                    f"config has {sorted(datasets)}.")
  return dataset_from_config({"name": name, **datasets[name]}).source


def limit(config, records) -> int:
  """How many of `records` are read: all, or the first `config.evaluate.episodes` unless it
  is -1."""
  episodes = config.evaluate.get("episodes", -1)
  return len(records) if episodes < 0 else min(episodes, len(records))


def built(config, records, build: Callable[[dict, int], dict], skipped: dict[str, int]
          ) -> Iterator[tuple[int, dict, dict]]:
  """`(index, document, example)` of each of the first `limit(config, records)` records
  that `build(document, index)` makes an example of; a record it refuses (`CorruptRecord`)
  is counted in `skipped` by reason."""
  for index in range(limit(config, records)):
    try:
      document = records[index]
      example = build(document, index)
    except CorruptRecord as error:
      skipped[error.reason] = skipped.get(error.reason, 0) + 1
      continue
    yield index, document, example


def batched(fn: Callable[[dict[str, np.ndarray]], Any], examples: Iterable[dict],
            batch_size: int, *, step: Callable[[int], None] = lambda n: None) -> list[Any]:
  """`fn` on the `examples` stacked in batches of `batch_size` (the last one padded by
  repeating its last example, so `fn` compiles once); every array leaf of each output is
  cut back to its real rows. One output per batch; `step(n)` after each."""
  outputs, rows = [], []

  def flush():
    padded = rows + [rows[-1]] * (batch_size - len(rows))
    out = fn({k: np.stack([r[k] for r in padded]) for k in padded[0]})
    n = len(rows)
    outputs.append(_cut(out, n))
    step(n)
    rows.clear()

  for example in examples:
    rows.append(example)
    if len(rows) == batch_size:
      flush()
  if rows:
    flush()
  return outputs


def _cut(out, n: int):
  if isinstance(out, dict):
    return {k: _cut(v, n) for k, v in out.items()}
  if isinstance(out, tuple | list):
    return type(out)(_cut(v, n) for v in out)
  return None if out is None else np.asarray(out)[:n]
