"""The few-shot protocol: trials, query sets, demonstrations per test example, aggregates.

As OpenFlamingo evaluates (open_flamingo/eval/evaluate.py): for each trial, with its own
seed, a query set of `query_set_size` training examples is drawn without replacement and
`num_samples` test examples are drawn from the test split; every test example then gets
its own `shots` demonstrations, drawn at random from the query set or retrieved by RICES
(most similar last). Zero shots means two demonstrations with their images removed
(Flamingo's zero-shot prompting), so that the model sees the answer format. Scores are the
mean and standard deviation over trials, and the standard error over all test examples.
"""

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

ZERO_SHOT_TEXT_DEMOS = 2


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Settings of one evaluation (`config.evaluate`).

  shots: demonstrations per test example, e.g. (0, 4, 8, 16, 32).
  trials: repetitions with different seeds (`seed + trial`).
  num_samples: test examples per trial (-1: all).
  query_set_size: training examples demonstrations are drawn from (-1: all).
  demos: "random", or "rices" (the most similar images; `mmjax.evaluate.rices`).
  """

  shots: tuple[int, ...] = (0, 4, 8)
  trials: int = 1
  seed: int = 0
  num_samples: int = -1
  query_set_size: int = 2048
  demos: str = "random"

  def __post_init__(self):
    if not self.shots or any(k < 0 for k in self.shots):
      raise ValueError(f"shots must be non-negative integers, got {self.shots}.")
    if self.trials < 1:
      raise ValueError(f"trials must be >= 1, got {self.trials}.")
    if self.demos not in ("random", "rices"):
      raise ValueError(f"demos must be 'random' or 'rices', got {self.demos!r}.")

  def seeds(self) -> list[int]:
    return [self.seed + t for t in range(self.trials)]


def effective_shots(shots: int) -> tuple[int, bool]:
  """`(demonstrations, text_only)`: zero shots are two text-only demonstrations."""
  return (ZERO_SHOT_TEXT_DEMOS, True) if shots == 0 else (shots, False)


def subsample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """`size` of `range(n)` without replacement, in drawn order (all of them if `size` is
  -1 or at least `n`)."""
  if size < 0 or size >= n:
    return rng.permutation(n)
  return rng.choice(n, size, replace=False)


def random_demos(query_set: np.ndarray, num_tests: int, k: int,
                 rng: np.random.Generator) -> np.ndarray:
  """`"num_tests k"` indices: each test example's own `k` distinct draws from the query
  set."""
  if k > len(query_set):
    raise ValueError(f"Cannot draw {k} demonstrations from a query set of "
                     f"{len(query_set)}; lower the shots or raise query_set_size.")
  return np.stack([query_set[rng.choice(len(query_set), k, replace=False)]
                   for _ in range(num_tests)]) if k else np.zeros((num_tests, 0), np.int64)


DemoFn = Callable[[np.ndarray, np.ndarray, int, np.random.Generator], np.ndarray]
"""`(query_set, test_indices, k, rng) -> "num_tests k"` demonstration indices."""


def random_demo_fn(query_set, tests, k, rng):
  return random_demos(query_set, len(tests), k, rng)


def aggregate(per_trial: Sequence[dict[str, float]],
              per_example: dict[str, Sequence[float]] | None = None) -> dict[str, float]:
  """`{metric: mean over trials}`, with `<metric>_std` over trials when there are several,
  and `<metric>_se` (the standard error of the mean over all test examples) for the
  metrics scored per example."""
  out = {}
  for name in per_trial[0]:
    values = np.array([t[name] for t in per_trial], np.float64)
    out[name] = float(values.mean())
    if len(values) > 1:
      out[f"{name}_std"] = float(values.std(ddof=1))
  for name, values in (per_example or {}).items():
    values = np.asarray(values, np.float64)
    if len(values) > 1:
      out[f"{name}_se"] = float(values.std(ddof=1) / np.sqrt(len(values)))
  return out
