"""Flamingo training: next-token prediction on interleaved image-text sequences."""

import jax.numpy as jnp

from mmjax import losses
from mmjax.models.flamingo import Flamingo, FlamingoConfig
from mmjax.tasks import data_fits_model, model_config

MODEL_CONFIG = FlamingoConfig


def check_config(config) -> list[str]:
  """Problems of a Flamingo recipe's config beyond its fields' own (`mmjax.config`)."""
  found, data, model = [], config.data, config.model
  found += data_fits_model(config, "interleaved", text="lm", vision="vision")
  if data.get("max_images", 0) < 1:
    found.append(f"config.data.max_images={data.get('max_images')}: Flamingo's sequences "
                 "hold at least one image; set it to 1 or more")
  for name in ("media_token_id", "endofchunk_token_id"):
    if not 0 <= model[name] < model.lm.vocab_size:
      found.append(f"config.model.{name}={model[name]} is not a token id of the "
                   f"config.model.lm.vocab_size={model.lm.vocab_size} vocabulary")
  if "evaluate" in config and "max_new_tokens" not in config.evaluate:
    found.append("config.evaluate has no 'max_new_tokens' (the answer length of the "
                 "few-shot evaluation)")
  return found


def build_model(config) -> Flamingo:
  return Flamingo(model_config(FlamingoConfig, config))


def init_inputs(config):
  size = config.model.vision["image_size"]
  images = jnp.zeros((1, config.data.max_images, 1, size, size, 3), jnp.uint8)
  return (jnp.zeros((1, config.data.seq_len), jnp.int32), images,
          jnp.ones((1,), jnp.int32)), {}


def loss_terms(model, params, batch, rng):
  del rng  # deterministic
  logits = model.apply({"params": params}, batch["tokens"], batch["images"],
                       batch["num_images"])
  total, count = losses.next_token_loss(logits, batch["targets"], batch["loss_mask"],
                                        batch.get("loss_weight"))
  return total, count, {}
