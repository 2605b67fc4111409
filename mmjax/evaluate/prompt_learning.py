"""CoOp's base-to-new evaluation of prompt learners and of zero-shot CLIP.

The classes are sorted and split at `ceil(n / 2)` (`mmjax.data.pipeline.base_new_split`):
a prompt learner trains on K shots of each base class (`few_shot_indices`, drawn per seed)
and is tested on held-out images of the base classes and, with the new classes' names in
its prompts, of the new ones, each set relabelled from 0; H is the harmonic mean of the
two accuracies. Zero-shot CLIP is tested the same way with hand-written prompts
(`mmjax.evaluate.zeroshot`).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import peft
from mmjax.data.pipeline import ShapesWorldClasses, base_new_split, few_shot_indices
from mmjax.data.tokenizer import make_tokenizer
from mmjax.evaluate import zeroshot
from mmjax.models.prompt_learning import PromptLearner, class_prompts
from mmjax.tasks import coop

__all__ = ["base_new_split", "base_to_new", "few_shot_indices", "harmonic_mean",
           "prompt_accuracy", "test_set", "zero_shot_accuracy"]


def harmonic_mean(base: float, new: float) -> float:
  """CoCoOp's H = 2BN / (B + N) (0 when both are 0)."""
  return 2 * base * new / (base + new) if base + new > 0 else 0.0


def test_set(classes: str, size: int, image_size: int = 64, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """(uint8 images `"n h w 3"`, labels `"n"`, class names): the first `size` images of
  the shapes world's "eval" classification stream whose class is in `classes` ("base",
  "new" or "all"), relabelled from 0."""
  source = ShapesWorldClasses(split="eval", classes=classes, size=size, seed=seed,
                              image_size=image_size)
  items = [source[i] for i in range(len(source))]
  return (np.stack([item["images"][0] for item in items]),
          np.array([item["label"] for item in items], np.int32), source.class_names())


def _accuracy(logits_of, images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
  correct = 0
  for start in range(0, len(images), batch_size):
    logits = np.asarray(logits_of(jnp.asarray(images[start:start + batch_size])))
    correct += int(np.sum(logits.argmax(-1) == labels[start:start + batch_size]))
  return correct / len(images)


def prompt_accuracy(model: PromptLearner, params, tokenizer, class_names: Sequence[str],
                    images: np.ndarray, labels: np.ndarray, seq_len: int,
                    batch_size: int = 64) -> float:
  """Top-1 accuracy of a prompt learner whose prompts name `class_names` (label order)."""
  tokens, slots = class_prompts(tokenizer, class_names, model.n_ctx,
                                model.config.class_position, seq_len)
  apply = _jitted_apply(model)
  return _accuracy(lambda x: apply({"params": params}, x, tokens, slots), images, labels,
                   batch_size)


@functools.cache
def _jitted_apply(model: PromptLearner):
  return jax.jit(model.apply)


def zero_shot_accuracy(encoder: zeroshot.DualEncoder, class_names: Sequence[str],
                       templates: Sequence[str], images: np.ndarray,
                       labels: np.ndarray) -> float:
  """Top-1 accuracy of CLIP's zero-shot classifier from `templates` (one: a single hand
  prompt; several: the prompt ensemble)."""
  classes = zeroshot.class_embeddings(encoder.encode_texts, class_names, templates)
  return float(np.mean(np.argmax(zeroshot.logits(encoder.encode_images(images), classes),
                                 axis=-1) == labels))


def base_to_new(model: PromptLearner, params, tokenizer, seq_len: int, size: int = 600,
                image_size: int = 64, seed: int = 0) -> dict[str, float]:
  """`{"base", "new", "h"}` of a prompt learner trained on the shapes world's base
  classes, on `size` held-out images of each half. A class-specific context does not
  transfer: its "new" and "h" are NaN."""
  scores = {}
  for half in ("base", "new"):
    images, labels, names = test_set(half, size, image_size, seed)
    if half == "new" and model.config.class_specific and not model.init_ids:
      scores[half] = float("nan")
      continue
    scores[half] = prompt_accuracy(model, params, tokenizer, names, images, labels, seq_len)
  scores["h"] = harmonic_mean(scores["base"], scores["new"])
  return scores


def evaluate_run(config, params) -> dict[str, float]:
  """The base-to-new scores of a prompt-learning (`task: "coop"`) run's `params` with the
  settings of its `config.evaluate` (`episodes`: held-out images per half; `seed`)."""
  e = config.evaluate
  model = peft.from_config(config, coop.build_model(config))
  return base_to_new(model, params, make_tokenizer(config),
                     config.data.seq_len, size=e.episodes, image_size=config.data.image_size,
                     seed=e.seed)
