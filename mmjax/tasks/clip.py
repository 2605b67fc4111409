"""Contrastive image-text pretraining (CLIP): symmetric InfoNCE, learned temperature."""

import jax.numpy as jnp

from mmjax import losses
from mmjax.models.two_towers import TwoTowers, TwoTowersConfig
from mmjax.tasks import data_fits_model, model_config

MODEL_CONFIG = TwoTowersConfig


def check_config(config) -> list[str]:
  """Problems of a CLIP recipe's config beyond its fields' own (`mmjax.config`)."""
  found = []
  if config.optim.accum_steps != 1:
    found.append(f"config.optim.accum_steps={config.optim.accum_steps}: the contrastive "
                 "loss needs every negative in one batch; set it to 1 and choose "
                 "config.data.batch_size directly")
  found += data_fits_model(config, "pair", text="text", vision="vision")
  return found


def build_model(config) -> TwoTowers:
  return TwoTowers(model_config(TwoTowersConfig, config))


def init_inputs(config):
  size = config.model.vision["image_size"]
  return (jnp.zeros((1, size, size, 3), jnp.uint8),
          jnp.ones((1, config.data.seq_len), jnp.int32)), {}


def loss_terms(model, params, batch, rng):
  del rng  # deterministic
  image, text, scale = model.apply({"params": params}, batch["image"], batch["tokens"])
  batch_size = jnp.float32(image.shape[0])
  # As a (sum, count) pair so that the trainer's mean is the loss itself.
  return losses.contrastive_loss(image, text, scale) * batch_size, batch_size, {}
