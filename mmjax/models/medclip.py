"""MedCLIP's dual encoder (RyanWangZf/MedCLIP, the ResNet variant): a ResNet-50 image tower
whose `fc` is a bias-free projection, a BERT text tower (Bio_ClinicalBERT) pooled over
layers, a bias-free text projection, and a learned temperature.

MedCLIP's text pooling ("medclip") averages the hidden states 1, 2 and the last (Hugging
Face's `hidden_states` indexing: 0 is the embeddings' output) over every position,
padding included (no mask), then over the three layers. BERT itself masks padding keys.
Grey images ("b h w 1") are repeated to three channels by the ResNet.

MedCLIP clamps its log scale into [0, ln 100] (`logit_scale.data.clamp_(0, 4.6052)`) each
time it computes logits. Here the logit scale is `exp(log_scale)` clipped into
`logit_scale_bounds` on the way out, the gradient passing straight through (as torch's
gradient does, which sees the clamped value); torch also writes the clamp back into the
parameter, which a trainer reproduces by clipping `log_scale` after each step.

Parameters: "image" (the `ResNet`, its projection under "image/fc"), "text" (the `Bert`),
"text_head" (`kernel` "d e"), "log_scale" (a scalar); the ResNet's BatchNorm statistics
are in the "batch_stats" collection under "image".
"""

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Dense
from mmjax.models.bert import Bert, BertConfig
from mmjax.models.resnet import TORCH_LINEAR_INIT, ResNet, ResNetConfig
from mmjax.models.two_towers import _l2_normalise

TEXT_POOLS = ("medclip", "cls", "mean")


@dataclasses.dataclass(frozen=True)
class MedCLIPConfig:
  """MedCLIP: `vision.output_dim` (the ResNet's bias-free `fc`) must be `embed_dim`.

  Attributes:
    text_pool: how the text tower's states become one vector before `text_head`:
      "medclip", the mean over all positions (padding included) of each hidden state
      `text_layers` names, then over those; "cls", the last layer's first token; "mean",
      the last layer's mean over the tokens that are not `pad_id`.
    text_layers: the hidden states "medclip" pools, counted like Hugging Face's
      `hidden_states` (0: the embeddings' output, -1: the last layer's).
    init_temperature: the learned temperature's start (`log_scale = log(1 / it)`).
    logit_scale_bounds: the bounds the logit scale's log is clipped into when used
      (MedCLIP: [0, 4.6052], a scale of at most 100); None: unbounded.
    pad_id: the padding token id, masked from BERT's attention.
    loss: what trains it (`mmjax.tasks.medclip`): "semantic", MedCLIP's semantic matching
      loss (`mmjax.losses.semantic_matching_loss`; InfoNCE on a batch without labels), or
      "infonce", CLIP's symmetric InfoNCE on pairs.
    label_similarity: the semantic loss's label similarity (`losses.label_similarity`):
      "dot", MedCLIP's code (a raw dot product), or "cosine", its paper.
  """

  vision: ResNetConfig
  text: BertConfig
  embed_dim: int = 512
  text_pool: Literal["medclip", "cls", "mean"] = "medclip"
  text_layers: tuple[int, ...] = (1, 2, -1)
  init_temperature: float = 0.07
  logit_scale_bounds: tuple[float, float] | None = (0.0, 4.6052)
  pad_id: int = 0
  loss: Literal["semantic", "infonce"] = "semantic"
  label_similarity: Literal["dot", "cosine"] = "dot"

  def __post_init__(self):
    if self.loss not in ("semantic", "infonce"):
      raise ValueError(f"MedCLIPConfig: loss must be 'semantic' or 'infonce', got "
                       f"{self.loss!r}.")
    if self.label_similarity not in ("dot", "cosine"):
      raise ValueError(f"MedCLIPConfig: label_similarity must be 'dot' or 'cosine', got "
                       f"{self.label_similarity!r}.")
    if self.text_pool not in TEXT_POOLS:
      raise ValueError(f"MedCLIPConfig: text_pool must be one of {TEXT_POOLS}, got "
                       f"{self.text_pool!r}.")
    if self.vision.output_dim != self.embed_dim:
      raise ValueError(f"MedCLIPConfig: the ResNet's projection vision.output_dim="
                       f"{self.vision.output_dim} must equal embed_dim={self.embed_dim} "
                       "(MedCLIP replaces its fc by a bias-free Linear to embed_dim).")
    if self.vision.num_classes is not None:
      raise ValueError("MedCLIPConfig: the ResNet must have no classifier "
                       f"(vision.num_classes={self.vision.num_classes}); its head is the "
                       "projection output_dim.")
    if self.text_pool == "medclip":
      depth = self.text.depth
      bad = [i for i in self.text_layers if not -depth - 1 <= i <= depth]
      if not self.text_layers or bad:
        raise ValueError(f"MedCLIPConfig: text_layers={self.text_layers} must name hidden "
                         f"states of the {depth}-layer text tower (0 to {depth}, or -1 "
                         f"to -{depth + 1}); out of range: {bad}.")
    if self.logit_scale_bounds is not None and not (
        len(self.logit_scale_bounds) == 2
        and self.logit_scale_bounds[0] <= self.logit_scale_bounds[1]):
      raise ValueError(f"MedCLIPConfig: logit_scale_bounds={self.logit_scale_bounds} must "
                       "be (low, high) with low <= high, or None.")
    if self.init_temperature <= 0:
      raise ValueError(f"MedCLIPConfig: init_temperature={self.init_temperature} must be "
                       "positive.")


class MedCLIP(nn.Module):
  """`images "b h w c", tokens "b t" -> (image "b e", text "b e", logit_scale)`; the
  embeddings are L2-normalised float32, `logit_scale` is `1 / temperature`."""

  config: MedCLIPConfig

  def setup(self):
    cfg = self.config
    self.image = ResNet(cfg.vision)
    self.text = Bert(cfg.text)
    self.text_head = Dense(cfg.embed_dim, ("embed", None), kernel_init=TORCH_LINEAR_INIT,
                           name="text_head")
    self.log_scale = self.param("log_scale", nn.with_logical_partitioning(
        nn.initializers.constant(math.log(1 / cfg.init_temperature)), ()), ())

  def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """`images "b h w c"` (c = 1 or 3; uint8, or float already normalised) -> `"b e"`.
    With `train` (and BatchNorm not frozen) apply with `mutable=["batch_stats"]`."""
    return _l2_normalise(self.image(images, train=train)["pooled"])

  def pool_text(self, tokens: jax.Array) -> jax.Array:
    """`tokens "b t"` -> `"b d"`, the text tower's states pooled by `config.text_pool`."""
    cfg = self.config
    mask = tokens != cfg.pad_id
    if cfg.text_pool == "medclip":
      states = self.text(tokens, token_mask=mask,
                         hidden_layers=cfg.text_layers)["hidden_layers"]
      return jnp.mean(states.astype(jnp.float32), axis=(2, 0))  # positions, then layers
    hidden = self.text(tokens, token_mask=mask)["hidden"].astype(jnp.float32)
    if cfg.text_pool == "cls":
      return hidden[:, 0]
    weights = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """`tokens "b t"` (right-padded with `pad_id`) -> `"b e"`."""
    return _l2_normalise(self.text_head(self.pool_text(tokens)))

  def logit_scale(self) -> jax.Array:
    """`exp(log_scale)`, the log clipped into `logit_scale_bounds` (gradient straight
    through)."""
    log_scale = self.log_scale.astype(jnp.float32)
    bounds = self.config.logit_scale_bounds
    if bounds is not None:
      log_scale = log_scale + jax.lax.stop_gradient(jnp.clip(log_scale, *bounds) - log_scale)
    return jnp.exp(log_scale)

  def __call__(self, images: jax.Array, tokens: jax.Array, *, train: bool = False):
    """-> `(image "b e", text "b e", logit_scale)`; MedCLIP's image-to-text logits are
    `logit_scale * image @ text.T`."""
    return (self.encode_image(images, train=train), self.encode_text(tokens),
            self.logit_scale())
