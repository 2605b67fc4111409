"""Prompt learning (CoOp, CoCoOp) on a frozen CLIP: cross-entropy of the image-prompt
logits against the class labels of K-shot image-label pairs; only the context (and
CoCoOp's meta-network) trains (`config.trainable`)."""

import jax.numpy as jnp

from mmjax import losses
from mmjax.data.pipeline import shapes_world_classes
from mmjax.data.shapes_world import CLASSES
from mmjax.data.tokenizer import make_tokenizer
from mmjax.models import prompt_learning
from mmjax.models.prompt_learning import PromptLearner, PromptLearnerConfig
from mmjax.tasks import data_fits_model, model_config

MODEL_CONFIG = PromptLearnerConfig


def check_config(config) -> list[str]:
  """Problems of a prompt-learning recipe's config beyond its fields' own."""
  found = data_fits_model(config, "pair", text="clip.text", vision="clip.vision")
  data = config.data
  names = tuple(config.model.class_names)
  for field in ("datasets", "eval_datasets"):
    for name, entry in (data.get(field) or {}).items():
      source = entry.source
      if source.get("kind") != "shapes_world_classes":
        continue
      given = tuple(CLASSES[i] for i in shapes_world_classes(source.get("classes", "all")))
      if given != names:
        found.append(f"config.data.{field}.{name}.source.classes="
                     f"{source.get('classes', 'all')!r} labels {len(given)} classes "
                     f"({', '.join(given[:2])}, ...), config.model.class_names "
                     f"{len(names)} ({', '.join(names[:2])}, ...); they must name the same "
                     "classes in label order")
  return found


def build_model(config) -> PromptLearner:
  cfg = model_config(PromptLearnerConfig, config)
  return prompt_learning.build(cfg, make_tokenizer(config), config.data.seq_len)


def init_inputs(config):
  size = config.model.clip.vision.image_size
  return (jnp.zeros((1, size, size, 3), jnp.uint8),), {}


def loss_terms(model, params, batch, rng):
  """Summed cross-entropy over the batch's images and their count."""
  del rng  # deterministic
  logits = model.apply({"params": params}, batch["image"])
  ce = losses.cross_entropy(logits, batch["label"])
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
  return jnp.sum(ce), jnp.float32(ce.shape[0]), {"train_accuracy": accuracy}
