"""Evaluation tasks: what is asked, and how the answers are scored.

A task turns the protocol (`protocol.Protocol`) into cells, one per (trial, shots), each
holding every test example's whole prompt, and scores a cell's answers. Two kinds:

  FewShotTask  a benchmark's test examples, each with its own demonstrations drawn from
               the training examples (at random or by RICES): captioning (CIDEr,
               BLEU), VQA (VQA accuracy) and classification by ranking class names
               (top-1/top-5 accuracy; ROC AUC for two classes).
  an episodic task (`mmjax.evaluate.shapes.NamingTask`) whose demonstrations belong to
               each test example (the in-context naming of the embedded default).

A new benchmark is a reader that gives `Item`s (`mmjax.evaluate.benchmarks`) and a
`FewShotTask` made from them.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmjax.evaluate import metrics
from mmjax.evaluate import protocol as protocol_lib
from mmjax.evaluate.prompts import IMG, PromptFormat, few_shot_text
from mmjax.evaluate.scoring import Prompt

KINDS = ("captioning", "vqa", "classification")


@dataclasses.dataclass(frozen=True)
class Item:
  """One example: `image()` gives its `"h w 3"` uint8 image (read when it is needed);
  `fields` fill the prompt format's template except `answer`; `answer` is what a
  demonstration shows; `target` is what a prediction is scored against (a caption's
  references, VQA's ground-truth answers, a class index)."""

  id: str
  image: Callable[[], np.ndarray]
  fields: dict[str, str]
  answer: str
  target: Any
  image_key: str = ""  # names the image where several items share one (default: `id`)


@dataclasses.dataclass(frozen=True)
class Cell:
  """The prompts of one (trial, shots) and what each is scored against."""

  seed: int
  shots: int
  ids: list[str]
  prompts: list[Prompt]
  targets: list[Any]


@dataclasses.dataclass(frozen=True)
class LazyPrompt:
  """A prompt whose images are read when a batch needs them (`scoring.Prompt`'s
  interface)."""

  text: str
  items: tuple[Item, ...]

  @property
  def images(self) -> np.ndarray:
    return np.stack([item.image() for item in self.items])


@dataclasses.dataclass
class FewShotTask:
  """A benchmark's few-shot evaluation.

  kind: "captioning", "vqa" or "classification".
  support: the examples demonstrations are drawn from (a training split).
  test: the examples evaluated.
  format: how an example is written (`prompts.FORMATS`).
  classes: class names, ranked after the query (classification); `positive`: the class
    whose probability gives ROC AUC when there are two.
  postprocess: applied to generated text before scoring (e.g.
    `metrics.postprocess_vqa_generation`).
  demo_fn: selects demonstrations (`protocol.random_demo_fn`, or a `rices.Rices`'s).
  """

  name: str
  kind: str
  support: Sequence[Item]
  test: Sequence[Item]
  format: PromptFormat
  classes: Sequence[str] = ()
  positive: int | None = None
  max_new_tokens: int = 20
  postprocess: Callable[[str], str] = str.strip
  demo_fn: protocol_lib.DemoFn = protocol_lib.random_demo_fn
  tokenizer: str = ""  # captioning: the tokenizer CIDEr and BLEU were computed with

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Unknown task kind {self.kind!r}; expected one of {KINDS}.")
    if self.kind == "classification" and not self.classes:
      raise ValueError(f"Classification task {self.name!r} needs class names.")
    if not self.support or not self.test:
      raise ValueError(f"Task {self.name!r} needs training and test examples; it has "
                       f"{len(self.support)} and {len(self.test)}.")

  @property
  def mode(self) -> str:
    return "rank" if self.kind == "classification" else "generate"

  @property
  def rank_prefix(self) -> str:
    """The text class names follow (what each prompt ends with)."""
    return self.format.query(**{k: "" for k in self.test[0].fields})

  def prompt(self, query: Item, demos: Sequence[Item], text_only: bool) -> Prompt:
    text = few_shot_text([self.format.solved(**d.fields, answer=d.answer) for d in demos],
                         self.format.query(**query.fields), self.format.separator, text_only)
    return LazyPrompt(text, (*([] if text_only else demos), query))

  def cells(self, protocol: protocol_lib.Protocol) -> list[Cell]:
    cells = []
    for seed in protocol.seeds():
      rng = np.random.default_rng(seed)
      query_set = protocol_lib.subsample(len(self.support), protocol.query_set_size, rng)
      tests = protocol_lib.subsample(len(self.test), protocol.num_samples, rng)
      for shots in protocol.shots:
        k, text_only = protocol_lib.effective_shots(shots)
        demo_fn = protocol_lib.random_demo_fn if text_only else self.demo_fn
        demos = demo_fn(query_set, tests, k, rng)
        queries = [self.test[i] for i in tests]
        cells.append(Cell(seed, shots, [q.id for q in queries],
                          [self.prompt(q, [self.support[j] for j in d], text_only)
                           for q, d in zip(queries, demos, strict=True)],
                          [q.target for q in queries]))
    return cells

  def score(self, cell: Cell, outputs) -> tuple[dict[str, float], dict[str, list]]:
    """`(scores, per_example)`: the cell's metrics, and per-example values (predictions
    and the per-example metrics whose standard errors are reported)."""
    if self.kind == "captioning":
      predictions = [self.postprocess(o) for o in outputs]
      # As papers report them: 100x the COCO toolkit's units.
      scores = metrics.caption_scores(dict(zip(cell.ids, predictions, strict=True)),
                                      dict(zip(cell.ids, cell.targets, strict=True)))
      values = {k: 100 * v for k, v in scores.as_dict().items() if k != "tokenizer"}
      self.tokenizer = scores.tokenizer
      return values, {"prediction": predictions,
                      "CIDEr": [100 * scores.cider_per_item[i] for i in cell.ids]}
    if self.kind == "vqa":
      predictions = [self.postprocess(o) for o in outputs]
      accuracy = [metrics.vqa_accuracy(p, t) for p, t in zip(predictions, cell.targets,
                                                            strict=True)]
      return {"accuracy": float(np.mean(accuracy))}, {"prediction": predictions,
                                                      "accuracy": accuracy}
    scores = np.asarray(outputs)  # "b c" log-likelihoods
    labels = np.asarray(cell.targets)
    top1 = (scores.argmax(-1) == labels).astype(np.float64)
    out = {"top1": float(top1.mean())}
    if len(self.classes) > 5:
      out["top5"] = metrics.top_k_accuracy(scores, labels, 5)
    if len(self.classes) == 2 and self.positive is not None:
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs = probs[:, self.positive] / probs.sum(-1)
      out["roc_auc"] = metrics.roc_auc(probs, labels == self.positive)
    return out, {"prediction": [self.classes[i] for i in scores.argmax(-1)], "top1": top1}


def max_prompt_images(cells: Sequence[Cell]) -> int:
  """The most `<image>`s of any prompt of the cells: the image count batches pad to."""
  return max(p.text.count(IMG) for c in cells for p in c.prompts)

