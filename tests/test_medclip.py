"""MedCLIP: the semantic matching loss against a written-out reference of MedCLIP's
(`ImageTextContrastiveLoss`: raw dot-product label similarity, softmax soft targets,
soft cross-entropy both ways), uncertain and missing labels, and the InfoNCE fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _softmax(x):
  return np.exp(_log_softmax(x))


def reference_loss(image, text, scale, image_labels, text_labels, cosine=False):
  """MedCLIP's loss, written out in numpy with its convention: missing labels are 0."""
  image_labels = np.nan_to_num(image_labels, nan=0.0)
  text_labels = np.nan_to_num(text_labels, nan=0.0)
  if cosine:
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    image_labels, text_labels = unit(image_labels), unit(text_labels)
  logits = scale * image @ text.T
  sim = image_labels @ text_labels.T
  soft_xent = lambda x, t: -(t * _log_softmax(x)).sum() / x.shape[0]
  return (soft_xent(logits, _softmax(sim)) + soft_xent(logits.T, _softmax(sim.T))) / 2


def _embeddings(rng, b, e=8):
  x = rng.normal(size=(2, b, e))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_semantic_matching_loss_equals_medclips(similarity):
  rng = np.random.default_rng(0)
  b, num_labels = 6, 5
  image, text = _embeddings(rng, b)
  # Positive, negative, uncertain (-1) and missing (NaN) entries, rows without any label
  # information left out (they have their own rule, tested below).
  image_labels = rng.choice([1.0, 0.0, -1.0, np.nan], size=(b, num_labels))
  text_labels = rng.choice([1.0, 0.0, -1.0, np.nan], size=(b, num_labels))
  image_labels[:, 0] = text_labels[:, 0] = 1.0
  got = losses.semantic_matching_loss(jnp.asarray(image), jnp.asarray(text), 14.3,
                                      jnp.asarray(image_labels), jnp.asarray(text_labels),
                                      similarity)
  want = reference_loss(image, text, 14.3, image_labels, text_labels,
                        cosine=similarity == "cosine")
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_same_findings_are_positives_not_negatives():
  """Images 0 and 1 have the same findings: matching each to the other's text costs the
  semantic loss nothing, while InfoNCE counts the swap as two false negatives."""
  labels = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  sim = losses.label_similarity(jnp.asarray(labels), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(sim), labels @ labels.T)
  image, paired = np.eye(3), np.eye(3)
  swapped = np.eye(3)[[1, 0, 2]]
  semantic = lambda text: float(losses.semantic_matching_loss(image, text, 10.0, labels,
                                                              labels))
  infonce = lambda text: float(losses.contrastive_loss(jnp.asarray(image), jnp.asarray(text),
                                                       10.0))
  np.testing.assert_allclose(semantic(swapped), semantic(paired), rtol=1e-6)
  assert infonce(swapped) > infonce(paired) + 5


def test_without_labels_it_is_infonce():
  rng = np.random.default_rng(1)
  image, text = _embeddings(rng, 5)
  missing = np.full((5, 4), np.nan)
  got = losses.semantic_matching_loss(image, text, 7.0, missing, missing)
  want = losses.contrastive_loss(jnp.asarray(image), jnp.asarray(text), 7.0)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_unlabelled_rows_keep_their_pair():
  """Image 2 has no labels: its target is its own text; the labelled rows spread theirs
  over the labelled texts only."""
  rng = np.random.default_rng(2)
  image, text = _embeddings(rng, 3)
  image_labels = np.array([[1.0, 0.0], [1.0, -1.0], [np.nan, np.nan]])
  text_labels = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, np.nan]])
  logits = 5.0 * image @ text.T
  sim = np.nan_to_num(image_labels) @ np.nan_to_num(text_labels).T
  image_targets = np.zeros((3, 3))
  image_targets[:2, :2] = _softmax(sim[:2, :2])
  image_targets[2, 2] = 1.0
  text_targets = np.zeros((3, 3))
  text_targets[:2, :2] = _softmax(sim.T[:2, :2])
  text_targets[2, 2] = 1.0
  soft_xent = lambda x, t: -(t * _log_softmax(x)).sum() / x.shape[0]
  want = (soft_xent(logits, image_targets) + soft_xent(logits.T, text_targets)) / 2
  got = losses.semantic_matching_loss(image, text, 5.0, image_labels, text_labels)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  grads = jax.grad(lambda i: losses.semantic_matching_loss(i, text, 5.0, image_labels,
                                                           text_labels))(jnp.asarray(image))
  assert np.all(np.isfinite(np.asarray(grads)))
