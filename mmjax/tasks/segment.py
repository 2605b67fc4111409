"""Foreground segmentation of single frames (`mmjax.models.segment`): a head on a video
VQ-VAE's latents, or the UNet from pixels, trained with a soft Dice, positive-weighted BCE
or soft Jaccard loss (`config.loss`: `mmjax.losses.SegmentLoss`'s fields; Dice by
default).

Batches come from the pipeline's "segment" mode: `image` uint8 `"b h w 3"` and `mask`
float32 `"b h w"` (1 = foreground), with `loss_weight` where a mixture sets it. The
encoder's BatchNorm statistics are the model's state, carried by the trainer (a frozen
encoder leaves them as they are; the UNet has none). The IoU of the batch's masks
thresholded at logit 0 is logged as a term; held-out images are scored by
`mmjax.evaluate.segment`.
"""

import jax
import jax.numpy as jnp

from mmjax import losses
from mmjax.models.segment import Segmenter, SegmenterConfig
from mmjax.tasks import model_config

MODEL_CONFIG = SegmenterConfig
MODEL = Segmenter


def loss_spec(config) -> losses.SegmentLoss:
  """`config.loss` (absent: the soft Dice) as a `SegmentLoss`."""
  loss = config.get("loss") or {}
  return losses.SegmentLoss(**(loss.to_dict() if hasattr(loss, "to_dict") else dict(loss)))


def check_config(config) -> list[str]:
  """Problems of a segmentation recipe's config beyond its fields' own (`mmjax.config`)."""
  found = []
  data = config.data
  if data.get("mode", "segment") != "segment":
    found.append(f"config.data.mode={data.mode!r}: the segment task trains on 'segment' "
                 "examples (image and mask)")
  try:
    size = model_config(SegmenterConfig, config).resolution
  except ValueError as error:
    return [*found, f"config.model: {error}"]
  resolution = (data.get("video") or {}).get("resolution", size)
  if resolution != size:
    found.append(f"config.data.video.resolution={resolution} differs from the model's image "
                 f"size {size} (config.model.encoder.resolution, or config.model.image_size "
                 "without an encoder)")
  if data.get("image_size", size) != size:
    found.append(f"config.data.image_size={data.image_size} differs from the model's image "
                 f"size {size}")
  try:
    loss_spec(config)
  except (TypeError, ValueError) as error:
    found.append(f"config.loss={config.get('loss')!r}: {error} (fields: kind, pos_weight, "
                 "smooth)")
  return found


def build_model(config) -> Segmenter:
  return Segmenter(model_config(SegmenterConfig, config), loss=loss_spec(config))


def init_inputs(config):
  size = model_config(SegmenterConfig, config).resolution
  return (jnp.zeros((1, size, size, 3), jnp.uint8),), {}


def forward(model: Segmenter, variables: dict, image: jax.Array, *, train: bool = False
            ) -> tuple[jax.Array, dict]:
  """`(logits "b h w", updated state)`: the state (BatchNorm statistics) is returned
  unchanged unless `train` with an unfrozen encoder."""
  state = {k: v for k, v in variables.items() if k != "params"}
  if train and state:
    logits, state = model.apply(variables, image, train=True, mutable=list(state))
    return logits, dict(state)
  return model.apply(variables, image, train=train), state


def batch_iou(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """The batch's IoU of the masks thresholded at logit 0: summed intersections over summed
  unions (1 when both are empty everywhere)."""
  predicted, target = logits > 0, masks > 0.5
  inter = jnp.sum(predicted & target).astype(jnp.float32)
  union = jnp.sum(predicted | target).astype(jnp.float32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def loss_terms(model, params, batch, rng, *, model_state=None, train=True):
  """The segmentation loss over the batch's images (`loss_weight` where given) and its IoU
  as a term; with `model_state` (an encoder's BatchNorm statistics) also the updated state
  (unchanged unless `train` with an unfrozen encoder). The UNet, which has no state, is
  called without it and returns no state."""
  del rng  # deterministic
  logits, state = forward(model, {"params": params, **(model_state or {})}, batch["image"],
                          train=train)
  total, count = losses.segment_loss(logits, batch["mask"], model.loss or losses.SegmentLoss(),
                                     batch.get("loss_weight"))
  terms = {"iou": batch_iou(logits, batch["mask"])}
  if model_state is None:
    return total, count, terms
  return total, count, terms, state
