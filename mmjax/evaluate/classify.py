"""Held-out classification of an MMBCD run: the "classify" task.

Every case of `config.data.eval_datasets.test` is built as in training (the same regions,
crops and tokens; no keyword masking, no resampling) and scored: accuracy (with its
standard error), F1 of the malignant class, ROC AUC of its probability, the negative
log-likelihood and the expected calibration error of the predicted probabilities (Guo et
al., 2017). Temperature scaling is fitted on `config.data.eval_datasets.validation` (the
one temperature minimising its NLL, `metrics.fit_temperature`) and the test split's NLL
and ECE are reported again after it ("_scaled"); accuracy and AUC do not change with it.
Cases the pipeline cannot use (no valid box, an unreadable image) are skipped and counted
per reason ("skipped/<reason>"), never silently dropped.
"""

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from mmjax.cli import UserError
from mmjax.data import regions as regions_lib
from mmjax.data.tokenizer import make_tokenizer
from mmjax.evaluate import held_out, metrics

TASK = "classify"
SPLITS = ("validation", "test")


@dataclasses.dataclass
class Scored:
  """One split's model outputs: `logits "n c"`, `labels "n"`, `ids`, the attention over
  regions `"n k"` (None without it), and the skips by reason."""
  logits: np.ndarray
  labels: np.ndarray
  ids: list[str]
  attention: np.ndarray | None
  skipped: dict[str, int]


def _source(config, name: str):
  return held_out.source(config, name, "held-out cases")


def count(config) -> int:
  """How many cases `evaluate` reads: the test split's, and the validation split's when
  there is one (each capped at `config.evaluate.episodes` unless it is -1)."""
  datasets = config.data.get("eval_datasets") or {}
  return sum(held_out.limit(config, _source(config, name)) for name in SPLITS
             if name in datasets)


def run_split(config, params, model_state, name: str, *,
              step: Callable[[int, str], None] = lambda n, label: None) -> Scored:
  """The model's outputs on every case (or the first `config.evaluate.episodes`) of the
  evaluation dataset `name` of `config.data.eval_datasets`."""
  from mmjax.tasks import mmbcd as mmbcd_task  # noqa: PLC0415 (tasks import evaluate)

  source = _source(config, name)
  tokenizer = make_tokenizer(config)
  spec = regions_lib.spec_of(config)
  model = mmbcd_task.build_model(config)

  @jax.jit
  def forward(batch):
    out, _ = mmbcd_task.forward(model, {"params": params, **(model_state or {})}, batch)
    return out["logits"], out.get("attention")

  labels, ids, skipped = [], [], {}

  def examples():
    build = lambda document, index: regions_lib.build_regions(
        document, tokenizer, spec, config.data.seq_len, np.random.default_rng(index))[0]
    for index, document, example in held_out.built(config, source, build, skipped):
      labels.append(int(document["label"]))
      ids.append(str(document.get("id", index)))
      yield {k: v for k, v in example.items() if k != "label"}

  outputs = held_out.batched(forward, examples(), config.evaluate.get("batch_size", 64),
                             step=lambda n: step(n, name))
  if not labels:
    raise UserError(f"No case of config.data.eval_datasets.{name} could be built "
                    f"(skipped: {skipped}).")
  attention = [w for _, w in outputs if w is not None]
  return Scored(np.concatenate([logits for logits, _ in outputs]), np.asarray(labels), ids,
                np.concatenate(attention) if attention else None, skipped)


def scores_of(test: Scored, validation: Scored | None, bins: int = 10) -> dict[str, float]:
  """The test split's scores, and its calibration after the temperature fitted on
  `validation` (None: no temperature scaling)."""
  probabilities = np.exp(metrics.log_softmax(test.logits))
  predictions = probabilities.argmax(-1)
  correct = predictions == test.labels
  n = len(test.labels)
  scores = {
      "accuracy": float(correct.mean()),
      "accuracy_se": float(correct.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
      "f1": metrics.f1_score(predictions == 1, test.labels == 1),
      "nll": metrics.negative_log_likelihood(test.logits, test.labels),
      "ece": metrics.expected_calibration_error(probabilities, test.labels, bins),
      "cases": float(n), "malignant_fraction": float(np.mean(test.labels == 1))}
  if 0 < np.sum(test.labels == 1) < n:
    scores["roc_auc"] = metrics.roc_auc(probabilities[:, 1], test.labels == 1)
  if validation is not None:
    t = metrics.fit_temperature(validation.logits, validation.labels)
    scaled = np.exp(metrics.log_softmax(test.logits / t))
    scores.update(temperature=t,
                  nll_scaled=metrics.negative_log_likelihood(test.logits, test.labels, t),
                  ece_scaled=metrics.expected_calibration_error(scaled, test.labels, bins))
  for split, scored in (("test", test), ("validation", validation)):
    for reason, k in (scored.skipped if scored else {}).items():
      scores[f"skipped/{split}/{reason}"] = float(k)
  return scores


def evaluate(config, params, model_state=None, *,
             step: Callable[[int, str], None] = lambda n, label: None
             ) -> tuple[dict[str, float], list[dict]]:
  """`(scores, predictions)` of an MMBCD run's `params` (and BatchNorm statistics) on its
  held-out cases; each prediction has the case's id, label, malignant probability (before
  and after temperature scaling) and the attention over its regions."""
  datasets = config.data.get("eval_datasets") or {}
  validation = (run_split(config, params, model_state, "validation", step=step)
                if "validation" in datasets else None)
  test = run_split(config, params, model_state, "test", step=step)
  scores = scores_of(test, validation, config.evaluate.get("bins", 10))
  t = scores.get("temperature", 1.0)
  p = np.exp(metrics.log_softmax(test.logits))[:, 1]
  p_scaled = np.exp(metrics.log_softmax(test.logits / t))[:, 1]
  predictions = [
      {"id": test.ids[i], "label": int(test.labels[i]), "p_malignant": float(p[i]),
       "p_malignant_scaled": float(p_scaled[i]),
       **({"attention": [round(float(w), 4) for w in test.attention[i]]}
          if test.attention is not None else {})}
      for i in range(len(test.ids))]
  return scores, predictions
