"""Language-model pretraining: next-token prediction on text."""

import jax.numpy as jnp

from mmjax import losses
from mmjax.models.lm import LanguageModel, LMConfig
from mmjax.tasks import data_fits_model, model_config

MODEL_CONFIG = LMConfig


def check_config(config) -> list[str]:
  """Problems of an LM recipe's config beyond its fields' own (`mmjax.config`)."""
  return data_fits_model(config, "text")


def build_model(config) -> LanguageModel:
  return LanguageModel(model_config(LMConfig, config))


def init_inputs(config):
  return (jnp.zeros((1, config.data.seq_len), jnp.int32),), {}


def loss_terms(model, params, batch, rng):
  del rng  # deterministic
  logits = model.apply({"params": params}, batch["tokens"])
  total, count = losses.next_token_loss(logits, batch["targets"], batch["loss_mask"],
                                        batch.get("loss_weight"))
  return total, count, {}
