"""Losses, written as (sum, count) pairs so that accumulated micro-batches average exactly
as one large batch would."""

import dataclasses

import jax
import jax.numpy as jnp
import optax


def next_token_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                    loss_weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Masked next-token cross-entropy.

  Args:
    logits: `"b t v"`; targets: `"b t"`; loss_mask: `"b t"` (1 where trained);
    loss_weight: `"b"` per-example weight (a dataset's loss weight in a mixture).
  Returns:
    `(sum of weighted token losses, number of trained tokens)`, both float32 scalars.
    The mean is `sum / max(count, 1)`: a batch whose labels are all masked gives 0, not NaN.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  weights = mask if loss_weight is None else mask * loss_weight[:, None].astype(jnp.float32)
  # where(), not a product: a masked position must not leak inf/NaN into the sum.
  return jnp.sum(jnp.where(weights > 0, ce * weights, 0.0)), jnp.sum(mask)


def safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  return total / jnp.maximum(count, 1.0)


def contrastive_loss(image: jax.Array, text: jax.Array,
                     logit_scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE (CLIP): `image, text "b e"` normalised, row i matches column i.

  The mean of the image->text and text->image cross-entropies over the batch.
  """
  logits = logit_scale * image @ text.T
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return (jnp.mean(image_to_text) + jnp.mean(text_to_image)) / 2


def sigmoid_loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array,
                 logit_bias: jax.Array) -> jax.Array:
  """SigLIP's pairwise sigmoid loss: `image, text "b e"` normalised, row i matches column i.

  Every (image, text) pair is a binary classification, positive on the diagonal:
  `-sum(log_sigmoid(label * (logit_scale * image @ text.T + logit_bias))) / b` with
  labels +1 on the diagonal and -1 elsewhere, a sum over the b^2 pairs divided by the
  batch (not a mean over pairs), as SigLIP and open_clip's `SigLipLoss` define it. Under
  one `jit` over the global batch this is the loss of the whole batch, every negative
  included, whatever the number of devices.
  """
  logits = (logit_scale * image.astype(jnp.float32) @ text.astype(jnp.float32).T
            + logit_bias)
  labels = 2 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def label_similarity(image_labels: jax.Array, text_labels: jax.Array,
                     kind: str = "dot") -> jax.Array:
  """`image_labels "b l"`, `text_labels "c l"` (1 positive, 0 negative, -1 uncertain,
  NaN missing) -> `"b c"` how alike each image's findings are to each text's.

  "dot": MedCLIP's code, the raw dot product of the label vectors with missing entries
  as 0 (not clamped, whatever its docstring says); "cosine": the paper's, the same
  vectors' cosine (0 for an all-zero vector).
  """
  image = jnp.nan_to_num(image_labels.astype(jnp.float32), nan=0.0)
  text = jnp.nan_to_num(text_labels.astype(jnp.float32), nan=0.0)
  if kind == "cosine":
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    image, text = unit(image), unit(text)
  elif kind != "dot":
    raise ValueError(f"label_similarity: kind must be 'dot' or 'cosine', got {kind!r}.")
  return image @ text.T


def semantic_matching_loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array,
                           image_labels: jax.Array, text_labels: jax.Array,
                           similarity: str = "dot") -> jax.Array:
  """MedCLIP's semantic matching loss: `image, text "b e"` normalised, their label vectors
  `"b l"` (`label_similarity`'s convention).

  The targets are soft: image i's over the texts are `softmax(label_similarity[i])`, text
  j's over the images `softmax(label_similarity[:, j])` (temperature 1), so an unpaired
  text that reports the same findings is a positive too, not a false negative. The loss
  is the mean of both directions' cross-entropies against these targets, each summed over
  the batch's columns and averaged over its rows. A row whose image (or text) has no
  label at all (all NaN) falls back to the paired target, its own column: without any
  labels this is exactly `contrastive_loss`.
  """
  logits = logit_scale * image.astype(jnp.float32) @ text.astype(jnp.float32).T
  sim = label_similarity(image_labels, text_labels, similarity)
  diagonal = jnp.eye(logits.shape[0], dtype=jnp.float32)

  def soft_targets(sim, own_labels, other_labels):
    # A pair whose either side is unlabelled has no similarity: such a row keeps its own
    # pair only; a labelled row sees only labelled columns (others get no mass).
    own = jnp.any(~jnp.isnan(own_labels), axis=-1)
    other = jnp.any(~jnp.isnan(other_labels), axis=-1)
    targets = jax.nn.softmax(jnp.where(other[None, :], sim, -jnp.inf), axis=1)
    return jnp.where(own[:, None] & jnp.any(other), targets, diagonal)

  image_targets = soft_targets(sim, image_labels, text_labels)
  text_targets = soft_targets(sim.T, text_labels, image_labels)
  image_to_text = optax.softmax_cross_entropy(logits, image_targets)
  text_to_image = optax.softmax_cross_entropy(logits.T, text_targets)
  return (jnp.mean(image_to_text) + jnp.mean(text_to_image)) / 2


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """`logits "... k"`, integer `labels "..."` -> `"..."` cross-entropies against the
  one-hot labels smoothed as torch's `label_smoothing` does:
  `(1 - label_smoothing) * one_hot + label_smoothing / k`."""
  logits = logits.astype(jnp.float32)
  k = logits.shape[-1]
  targets = jax.nn.one_hot(labels, k) * (1 - label_smoothing) + label_smoothing / k
  return optax.softmax_cross_entropy(logits, targets)


def query_text_similarity(image: jax.Array, text: jax.Array) -> jax.Array:
  """BLIP-2's image-text similarity: `image "b q k"` (one embedding per query), `text
  "c k"` -> `"b c"`, the largest query-text dot product for each image and text."""
  return jnp.max(jnp.einsum("bqk,ck->bcq", image, text), axis=-1)


# Binary segmentation: mask logits `"b h w"` against masks `"b h w"` in [0, 1]. Each loss is
# one value per image (`"b"`), summed over the batch with a count of images, so that
# micro-batches accumulate exactly as one batch would.
SEGMENT_LOSSES = ("dice", "bce", "jaccard")


@dataclasses.dataclass(frozen=True)
class SegmentLoss:
  """A segmentation recipe's loss (`config.loss`): `kind` one of `SEGMENT_LOSSES`,
  `pos_weight` the weight of the positive pixels' term in "bce", `smooth` the additive
  smoothing of the soft Dice and Jaccard ratios (an empty mask predicted empty scores 0)."""

  kind: str = "dice"
  pos_weight: float = 1.0
  smooth: float = 1.0

  def __post_init__(self):
    if self.kind not in SEGMENT_LOSSES:
      raise ValueError(f"SegmentLoss: kind={self.kind!r} is not one of {SEGMENT_LOSSES}.")
    if self.pos_weight < 0 or self.smooth < 0:
      raise ValueError(f"SegmentLoss: pos_weight={self.pos_weight} and smooth={self.smooth} "
                       "must be >= 0.")


def _per_image_sum(per_image: jax.Array, loss_weight: jax.Array | None
                   ) -> tuple[jax.Array, jax.Array]:
  if loss_weight is None:
    return jnp.sum(per_image), jnp.float32(per_image.shape[0])
  weight = loss_weight.astype(jnp.float32)
  return jnp.sum(per_image * weight), jnp.sum(weight)


def _overlaps(logits, masks):
  """Per image: `(sum p y, sum p, sum y)` with `p = sigmoid(logits)`, each `"b"`."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  y = masks.astype(jnp.float32)
  axes = tuple(range(1, p.ndim))
  return jnp.sum(p * y, axes), jnp.sum(p, axes), jnp.sum(y, axes)


def soft_dice_loss(logits: jax.Array, masks: jax.Array, loss_weight: jax.Array | None = None,
                   smooth: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Soft Dice: per image `1 - (2 sum(p y) + smooth) / (sum p + sum y + smooth)`, `p` the
  sigmoid of the logits. `(sum over images (weighted by `loss_weight "b"`), image count)`."""
  inter, p, y = _overlaps(logits, masks)
  return _per_image_sum(1 - (2 * inter + smooth) / (p + y + smooth), loss_weight)


def soft_jaccard_loss(logits: jax.Array, masks: jax.Array,
                      loss_weight: jax.Array | None = None,
                      smooth: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Soft Jaccard (IoU): per image `1 - (sum(p y) + smooth) / (sum p + sum y - sum(p y) +
  smooth)`. `(sum over images, image count)` as `soft_dice_loss`."""
  inter, p, y = _overlaps(logits, masks)
  return _per_image_sum(1 - (inter + smooth) / (p + y - inter + smooth), loss_weight)


def weighted_bce_loss(logits: jax.Array, masks: jax.Array,
                      loss_weight: jax.Array | None = None,
                      pos_weight: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Positive-weighted binary cross-entropy (torch's `BCEWithLogitsLoss(pos_weight=)`):
  per pixel `-(pos_weight y log sigmoid(x) + (1 - y) log sigmoid(-x))`, averaged over each
  image's pixels. `(sum over images, image count)` as `soft_dice_loss`."""
  x = logits.astype(jnp.float32)
  y = masks.astype(jnp.float32)
  per_pixel = -(pos_weight * y * jax.nn.log_sigmoid(x) + (1 - y) * jax.nn.log_sigmoid(-x))
  return _per_image_sum(jnp.mean(per_pixel, axis=tuple(range(1, x.ndim))), loss_weight)


def segment_loss(logits: jax.Array, masks: jax.Array, spec: SegmentLoss,
                 loss_weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The loss `spec` names, as `(sum over images, image count)`."""
  if spec.kind == "dice":
    return soft_dice_loss(logits, masks, loss_weight, spec.smooth)
  if spec.kind == "jaccard":
    return soft_jaccard_loss(logits, masks, loss_weight, spec.smooth)
  return weighted_bce_loss(logits, masks, loss_weight, spec.pos_weight)
