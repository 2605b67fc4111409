"""VideoGPT's 3D VQ-VAE (`mmjax.models.vqvae`) pretrained on clips: reconstruction
(mean squared error over the data variance) plus the commitment loss, the codebook
following the encoder by exponential moving averages.

Batches come from the pipeline's "video" mode: `video` uint8 `"b t h w 3"`. The codebook
(embeddings, EMA counts and sums, whether it was initialised from data) and BatchNorm's
running statistics are the model's state, carried by the trainer; the codebook's
data-dependent initialisation and dead-code restarts draw from the step's key. Under `jit`
with the batch split over the data axis the codebook's batch sums are global, as the
reference's all-reduce makes them. Held-out reconstruction, perplexity and the codes in
use are measured by `mmjax.evaluate.reconstruct`.
"""

import jax
import jax.numpy as jnp

from mmjax.models.vqvae import VQVAE, VQVAEConfig, preprocess
from mmjax.tasks import model_config

MODEL_CONFIG = VQVAEConfig
MODEL = VQVAE


def check_config(config) -> list[str]:
  """Problems of a VQ-VAE recipe's config beyond its fields' own (`mmjax.config`)."""
  found, data, model = [], config.data, config.model
  if data.get("mode", "video") != "video":
    found.append(f"config.data.mode={data.mode!r}: the vqvae task trains on 'video' clips")
  video = data.get("video") or {}
  for name in ("frames", "resolution"):
    if video.get(name, model[name]) != model[name]:
      found.append(f"config.data.video.{name}={video.get(name)} differs from "
                   f"config.model.{name}={model[name]}")
  for axis, (size, factor) in enumerate(zip(
      (model["frames"], model["resolution"], model["resolution"]), model["downsample"])):
    if factor < 1 or factor & (factor - 1) or size % factor:
      found.append(f"config.model.downsample={tuple(model['downsample'])}: each factor must "
                   f"be a power of two dividing the clip's size {size} on axis {axis} "
                   "(time, height, width)")
  if video.get("noise"):
    found.append("config.data.video.noise=True: noise clips are a segmentation control, "
                 "not pretraining data")
  return found


def build_model(config) -> VQVAE:
  return VQVAE(model_config(VQVAEConfig, config))


def init_inputs(config):
  model = config.model
  shape = (1, model["frames"], model["resolution"], model["resolution"], 3)
  return (jnp.zeros(shape, jnp.uint8),), {"train": False}


def forward(model: VQVAE, variables: dict, video: jax.Array, *, train: bool = False,
            rng: jax.Array | None = None) -> tuple[dict, dict]:
  """`(outputs, updated state)` of `model` on `video`; the state (BatchNorm statistics,
  the codebook) is returned unchanged unless `train`."""
  state = {k: v for k, v in variables.items() if k != "params"}
  if train:
    rngs = {"codebook": rng} if rng is not None else {}
    out, state = model.apply(variables, video, train=True, mutable=list(state), rngs=rngs)
    return out, dict(state)
  return model.apply(variables, video, train=False), state


def loss_terms(model, params, batch, rng, *, model_state, train=True):
  """VideoGPT's loss, `recon_loss + commitment_loss`, as a sum over the batch's clips
  (each clip's loss weighted by its `loss_weight`), the perplexity and codes in use as
  terms, and the updated state."""
  out, model_state = forward(model, {"params": params, **model_state}, batch["video"],
                             train=train, rng=rng)
  x = preprocess(batch["video"])
  per_clip = jnp.mean(jnp.square(out["recon"].astype(jnp.float32) - x), axis=(1, 2, 3, 4))
  per_clip = per_clip / model.config.data_variance
  weight = batch.get("loss_weight", jnp.ones_like(per_clip))
  count = jnp.sum(weight)
  # The commitment loss is the batch's mean (one scalar, as the reference's): it counts
  # once per clip so the total averages to recon + commitment.
  total = jnp.sum(per_clip * weight) + out["commitment_loss"] * count
  terms = {"recon": jnp.sum(per_clip * weight) / jnp.maximum(count, 1e-9),
           "commitment": out["commitment_loss"], "perplexity": out["perplexity"],
           "codes_used": out["codes_used"]}
  return total, count, terms, dict(model_state)
