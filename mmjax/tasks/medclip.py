"""MedCLIP: a ResNet image tower and a BERT text tower trained contrastively with the
semantic matching loss (`mmjax.losses.semantic_matching_loss`: soft targets from the
similarity of the image's and the text's finding labels, so that unpaired images and
texts that report the same findings are positives), or with InfoNCE on pairs
(`config.model.loss`). The ResNet's BatchNorm statistics are the model's state: the
trainer carries, checkpoints and shards them beside the parameters."""

import jax.numpy as jnp

from mmjax import losses
from mmjax.models.medclip import MedCLIP, MedCLIPConfig
from mmjax.tasks import clip, model_config

MODEL_CONFIG = MedCLIPConfig
MODEL = MedCLIP


check_config = clip.check_config  # one batch of negatives; data fit the towers
init_inputs = clip.init_inputs  # an image of the tower's size and a row of tokens


def build_model(config) -> MedCLIP:
  return MedCLIP(model_config(MedCLIPConfig, config))


def loss_terms(model, params, batch, rng, *, model_state, train=True):
  """The loss of the whole batch (every other example a negative, or a soft positive by
  its labels) and the updated BatchNorm statistics (unchanged unless `train`). Without
  image and text labels in the batch the semantic loss is InfoNCE."""
  del rng  # deterministic
  cfg = model.config
  (image, text, scale), model_state = model.apply(
      {"params": params, **model_state}, batch["image"], batch["tokens"], train=train,
      mutable=list(model_state))
  batch_size = jnp.float32(image.shape[0])
  if cfg.loss == "semantic" and "image_labels" in batch:
    value = losses.semantic_matching_loss(image, text, scale, batch["image_labels"],
                                          batch["text_labels"], cfg.label_similarity)
  else:
    value = losses.contrastive_loss(image, text, scale)
  # As a (sum, count) pair so that the trainer's mean is the loss itself.
  return value * batch_size, batch_size, {}, dict(model_state)


project_params = clip.project_params
