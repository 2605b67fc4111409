"""Losses, written as (sum, count) pairs so that accumulated micro-batches average exactly
as one large batch would."""

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
