"""Contrastive image-text pretraining: CLIP's symmetric InfoNCE or SigLIP's sigmoid loss
(`config.model.loss`), learned temperature (and bias), over the global batch."""

import math

import jax.numpy as jnp

from mmjax import losses
from mmjax.models.two_towers import TwoTowers, TwoTowersConfig
from mmjax.tasks import data_fits_model, model_config

MODEL_CONFIG = TwoTowersConfig
MODEL = TwoTowers


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
  """The loss of the whole batch: inside the trainer's one `jit` over the global batch,
  every device's examples are negatives of every other's, and the gradient is that of
  the global loss (no gather whose backward drops other devices' share)."""
  del rng  # deterministic
  image, text, scale, bias = model.apply({"params": params}, batch["image"], batch["tokens"])
  batch_size = jnp.float32(image.shape[0])
  if model.config.loss == "sigmoid":
    loss = losses.sigmoid_loss(image, text, scale, bias)
  else:
    loss = losses.contrastive_loss(image, text, scale)
  # As a (sum, count) pair so that the trainer's mean is the loss itself.
  return loss * batch_size, batch_size, {}


MAX_LOG_SCALE = math.log(100.0)


def project_params(config, params):
  """With `config.clamp_logit_scale`, the log logit scale clamped to [0, ln 100] after
  every optimizer step, as CLIP and open_clip do (the bias is left free)."""
  if not config.get("clamp_logit_scale") or "log_scale" not in params:
    return params
  return dict(params, log_scale=jnp.clip(params["log_scale"], 0.0, MAX_LOG_SCALE))
