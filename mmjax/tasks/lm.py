"""Language-model pretraining: next-token prediction on text."""

import jax.numpy as jnp

from mmjax import losses
from mmjax.models.lm import LanguageModel, LMConfig
from mmjax.tasks import model_config

MODEL_CONFIG = LMConfig


def check_config(config) -> list[str]:
  """Problems of an LM recipe's config beyond its fields' own (`mmjax.config`)."""
  found = []
  if config.data.get("mode", "text") != "text":
    found.append(f"config.data.mode={config.data.mode!r}: a language model trains on "
                 "'text' sequences")
  if (config.model.get("position", "learned") == "learned"
      and config.data.seq_len > config.model.get("max_len", 1024)):
    found.append(f"config.data.seq_len={config.data.seq_len} exceeds the learned positions' "
                 f"config.model.max_len={config.model.get('max_len', 1024)}")
  return found


def build_model(config) -> LanguageModel:
  return LanguageModel(model_config(LMConfig, config))


def init_inputs(config):
  return (jnp.zeros((1, config.data.seq_len), jnp.int32),), {}


def loss_terms(model, params, batch):
  logits = model.apply({"params": params}, batch["tokens"])
  total, count = losses.next_token_loss(logits, batch["targets"], batch["loss_mask"],
                                        batch.get("loss_weight"))
  return total, count, {}
