"""Contrastive image-text pretraining (CLIP): symmetric InfoNCE, learned temperature."""

import jax.numpy as jnp

from mmjax import losses
from mmjax.models.two_towers import TwoTowers, TwoTowersConfig
from mmjax.tasks import model_config

MODEL_CONFIG = TwoTowersConfig


def check_config(config) -> list[str]:
  """Problems of a CLIP recipe's config beyond its fields' own (`mmjax.config`)."""
  found, data, model = [], config.data, config.model
  if config.optim.accum_steps != 1:
    found.append(f"config.optim.accum_steps={config.optim.accum_steps}: the contrastive "
                 "loss needs every negative in one batch; set it to 1 and choose "
                 "config.data.batch_size directly")
  if data.get("mode", "pair") != "pair":
    found.append(f"config.data.mode={data.mode!r}: CLIP trains on 'pair' sequences")
  if data.get("image_size") != model.vision.image_size:
    found.append(f"config.data.image_size={data.get('image_size')} differs from "
                 f"config.model.vision.image_size={model.vision.image_size}")
  if (model.text.get("position", "learned") == "learned"
      and data.seq_len > model.text.get("max_len", 1024)):
    found.append(f"config.data.seq_len={data.seq_len} exceeds the learned positions' "
                 f"config.model.text.max_len={model.text.get('max_len', 1024)}")
  return found


def build_model(config) -> TwoTowers:
  return TwoTowers(model_config(TwoTowersConfig, config))


def init_inputs(config):
  size = config.model.vision["image_size"]
  return (jnp.zeros((1, size, size, 3), jnp.uint8),
          jnp.ones((1, config.data.seq_len), jnp.int32)), {}


def loss_terms(model, params, batch):
  image, text, scale = model.apply({"params": params}, batch["image"], batch["tokens"])
  batch_size = jnp.float32(image.shape[0])
  # As a (sum, count) pair so that the trainer's mean is the loss itself.
  return losses.contrastive_loss(image, text, scale) * batch_size, batch_size, {}
