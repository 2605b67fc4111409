"""Keyword masking of clinical histories (MMBCD's tf-idf word dropout, training only).

The keywords are the `top` words of the training corpus ranked by their tf-idf summed over
the records (`TfidfVectorizer(stop_words="english")`: lower-cased words of two or more
letters, English stop words left out). Masking deletes words of the text, matched exactly
and case-sensitively against whitespace-separated tokens, and joins what is left with one
space. Two modes:

  "fixed"   MMBCD's code: `int(top * rate)` keywords drawn once, with replacement and
            weighted by their tf-idf, from `seed`; every occurrence of those words is
            deleted in every record and every epoch.
  "random"  the paper's description: each occurrence of any keyword is deleted with
            probability `rate`, drawn from (seed, record, epoch), so the stream is
            deterministic and resumes exactly.

Only training data is masked; evaluation never is.
"""

import dataclasses
from collections.abc import Iterable
from typing import Literal

import numpy as np

MODES = ("none", "fixed", "random")
_TAG = 0x6b6579  # separates the masking's random streams from the pipeline's others


def top_keywords(texts: Iterable[str | None], top: int = 100
                 ) -> tuple[tuple[str, ...], tuple[float, ...]]:
  """The `top` words of `texts` by summed tf-idf, and their sums, highest first (ties in
  alphabetical order). Texts that are not strings (a CSV's missing values) are left out;
  a corpus without a word gives no keywords."""
  from sklearn.feature_extraction.text import TfidfVectorizer  # only where masking is on

  corpus = [t for t in texts if isinstance(t, str)]
  vectorizer = TfidfVectorizer(stop_words="english")
  try:
    matrix = vectorizer.fit_transform(corpus)
  except ValueError:  # an empty vocabulary: no text has a word outside the stop words
    return (), ()
  sums = np.asarray(matrix.sum(axis=0)).ravel()
  words = vectorizer.get_feature_names_out()  # alphabetical
  order = np.argsort(-sums, kind="stable")[:top]
  return tuple(str(w) for w in words[order]), tuple(float(s) for s in sums[order])


@dataclasses.dataclass(frozen=True)
class KeywordMask:
  """Deletes keywords from texts (module docstring); `apply` is a pure function of the
  text, its record index and the epoch.

  Attributes:
    mode: "fixed" or "random".
    words, weights: the keywords and their summed tf-idf (`top_keywords`).
    rate: "fixed": the fraction of the keywords drawn; "random": the probability of
      deleting each occurrence.
    seed: fixes the draws.
  """

  mode: Literal["fixed", "random"]
  words: tuple[str, ...]
  weights: tuple[float, ...]
  rate: float = 0.2
  seed: int = 0
  masked: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if self.mode not in ("fixed", "random"):
      raise ValueError(f"KeywordMask.mode={self.mode!r}; expected 'fixed' or 'random'.")
    if not 0 <= self.rate <= 1:
      raise ValueError(f"KeywordMask.rate must be in [0, 1], got {self.rate}.")
    if len(self.words) != len(self.weights):
      raise ValueError(f"{len(self.words)} keywords for {len(self.weights)} weights.")
    masked = frozenset(self.words)
    if self.mode == "fixed":
      masked = frozenset(self.drawn())
    object.__setattr__(self, "masked", masked)

  @classmethod
  def fit(cls, texts: Iterable[str | None], mode: str, top: int = 100, rate: float = 0.2,
          seed: int = 0) -> "KeywordMask":
    """The mask of `texts`' `top` keywords (fit on the training corpus)."""
    words, weights = top_keywords(texts, top)
    return cls(mode, words, weights, rate, seed)

  def drawn(self) -> list[str]:
    """"fixed" mode's draw: `int(len(words) * rate)` keywords, with replacement, weighted
    by tf-idf (duplicates kept, as drawn)."""
    count = int(len(self.words) * self.rate)
    if not count:
      return []
    p = np.asarray(self.weights, np.float64)
    picks = np.random.default_rng([self.seed, _TAG]).choice(len(self.words), count,
                                                            p=p / p.sum())
    return [self.words[i] for i in picks]

  def apply(self, text: str, index: int, epoch: int) -> str:
    """`text` with its masked keywords deleted, for record `index` in pass `epoch`."""
    tokens = text.split()
    if self.mode == "fixed":
      return " ".join(t for t in tokens if t not in self.masked)
    u = np.random.default_rng([self.seed, _TAG, index, epoch]).random(len(tokens))
    return " ".join(t for t, x in zip(tokens, u, strict=True)
                    if t not in self.masked or x >= self.rate)
