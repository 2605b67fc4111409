"""Flamingo training: next-token prediction on interleaved image-text sequences."""

import jax.numpy as jnp

from mmjax import losses
from mmjax.models.flamingo import Flamingo, FlamingoConfig
from mmjax.tasks import model_config


def build_model(config) -> Flamingo:
  return Flamingo(model_config(FlamingoConfig, config))


def init_inputs(config):
  size = config.model.vision["image_size"]
  images = jnp.zeros((1, config.data.max_images, 1, size, size, 3), jnp.uint8)
  return (jnp.zeros((1, config.data.seq_len), jnp.int32), images,
          jnp.ones((1,), jnp.int32)), {}


def loss_terms(model, params, batch):
  logits = model.apply({"params": params}, batch["tokens"], batch["images"],
                       batch["num_images"])
  total, count = losses.next_token_loss(logits, batch["targets"], batch["loss_mask"],
                                        batch.get("loss_weight"))
  return total, count, {}
