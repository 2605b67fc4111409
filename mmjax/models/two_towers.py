"""CLIP-style dual encoder: a ViT image tower and a text transformer, projected into one
space where matching pairs have high cosine similarity.

CLIP: a class-token ViT with a projection, a causal text tower pooled at its EOS token, a
bias-free text projection. SigLIP, by options of the same modules: an attention-pooled ViT
without class token or projection (`ViTConfig(class_token=False, pooling="map",
output_dim=None)`), a bidirectional text tower (`LMConfig(causal=False)`) pooled at the
last position of its fixed-length rows (`text_pool="final"`), a text head with a bias
(`text_head_bias=True`), and a learned logit bias.
"""

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Dense
from mmjax.models.lm import LanguageModel, LMConfig
from mmjax.models.vit import ViT, ViTConfig


@dataclasses.dataclass(frozen=True)
class TwoTowersConfig:
  """The vision tower's pooled width (`vision.output_dim`, or its width without a
  projection) must equal `embed_dim`; the text tower is an `LMConfig` whose final hidden
  state at one token of each row is projected to `embed_dim`.

  Attributes:
    text_pool: which token: "last" is the last one that is not `pad_id` (rows right-padded
      with `pad_id`, an EOS last); "eos" the first `eos_id` (transformers' CLIP, whose
      tokenizer pads with the EOS id itself; position 0 in a row without one); "argmax" the
      highest token id (OpenAI's CLIP, whose EOS is the largest id; transformers' CLIP for
      configs with the legacy `eos_token_id=2`); "final" the last position whatever the
      token (SigLIP, whose rows are padded to a fixed length).
    text_head_bias: the text projection has a bias (SigLIP's `head`; CLIP's has none).
    init_temperature: the learned temperature's start; the logit scale is its inverse,
      learned as its log (`log_scale`). CLIP: 0.07; SigLIP's training recipe: 0.1 (a
      scale of 10; open_clip's model class alone would start at 1/0.07).
    loss: the contrastive loss that trains it (`mmjax.tasks.clip`): "softmax", CLIP's
      symmetric InfoNCE; "sigmoid", SigLIP's pairwise loss, which needs `init_bias`.
    init_bias: the start of a learned logit bias (`logit_bias`, SigLIP's sigmoid loss;
      -10 in SigLIP's recipe, or about -log(batch size)); None: no bias (CLIP).
  """

  vision: ViTConfig
  text: LMConfig
  embed_dim: int
  pad_id: int = 0
  init_temperature: float = 0.07
  init_bias: float | None = None
  loss: Literal["softmax", "sigmoid"] = "softmax"
  text_pool: Literal["last", "eos", "argmax", "final"] = "last"
  eos_id: int | None = None
  text_head_bias: bool = False

  def __post_init__(self):
    if self.text_pool not in ("last", "eos", "argmax", "final"):
      raise ValueError(f"TwoTowersConfig: text_pool must be 'last', 'eos', 'argmax' or "
                       f"'final', got {self.text_pool!r}.")
    if self.loss not in ("softmax", "sigmoid"):
      raise ValueError(f"TwoTowersConfig: loss must be 'softmax' or 'sigmoid', got "
                       f"{self.loss!r}.")
    if self.loss == "sigmoid" and self.init_bias is None:
      raise ValueError("TwoTowersConfig: the sigmoid loss learns a logit bias; set init_bias "
                       "(SigLIP's recipe: -10).")
    if self.text_pool == "eos" and self.eos_id is None:
      raise ValueError("TwoTowersConfig: text_pool='eos' needs eos_id.")
    if self.vision.pooled_dim != self.embed_dim:
      raise ValueError(f"TwoTowersConfig: the vision tower's pooled width "
                       f"{self.vision.pooled_dim} (output_dim={self.vision.output_dim}, "
                       f"width={self.vision.width}) must equal embed_dim={self.embed_dim}.")


class TwoTowers(nn.Module):
  """`images "b h w c", tokens "b t" -> (image "b e", text "b e", logit_scale,
  logit_bias)`; embeddings are L2-normalised, `logit_scale` is `1 / temperature`."""

  config: TwoTowersConfig

  def setup(self):
    cfg = self.config
    self.image = ViT(cfg.vision)
    self.text = LanguageModel(cfg.text)
    self.text_head = Dense(cfg.embed_dim, ("embed", None), use_bias=cfg.text_head_bias,
                           name="text_head")
    self.log_scale = self.param("log_scale", nn.with_logical_partitioning(
        nn.initializers.constant(math.log(1 / cfg.init_temperature)), ()), ())
    if cfg.init_bias is not None:
      self.logit_bias = self.param("logit_bias", nn.with_logical_partitioning(
          nn.initializers.constant(cfg.init_bias), ()), ())

  def encode_image(self, images: jax.Array) -> jax.Array:
    return _l2_normalise(self.image(images)["pooled"])

  def encode_text(self, tokens: jax.Array, **text_inputs) -> jax.Array:
    """Pools each row at the token `config.text_pool` names; `text_inputs` go to the
    text tower (`embeddings`, `embedding_mask`: CoOp's context in place of tokens)."""
    cfg = self.config
    hidden = self.text(tokens, return_hidden=True, **text_inputs)
    if cfg.text_pool == "eos":
      index = jnp.argmax(tokens == cfg.eos_id, axis=1)  # the first; 0 if there is none
    elif cfg.text_pool == "argmax":
      index = jnp.argmax(tokens, axis=1)
    elif cfg.text_pool == "final":
      index = jnp.full(tokens.shape[:1], tokens.shape[1] - 1)
    else:
      index = jnp.sum(tokens != cfg.pad_id, axis=1) - 1
    pooled = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
    return _l2_normalise(self.text_head(pooled))

  def logits_scale_and_bias(self) -> tuple[jax.Array, jax.Array]:
    """The logit scale `exp(log_scale)` and the logit bias (0 without one)."""
    bias = self.logit_bias if self.config.init_bias is not None else jnp.zeros((), jnp.float32)
    return jnp.exp(self.log_scale), bias

  def __call__(self, images: jax.Array, tokens: jax.Array):
    """-> `(image "b e", text "b e", logit_scale, logit_bias)`."""
    return (self.encode_image(images), self.encode_text(tokens),
            *self.logits_scale_and_bias())


def _l2_normalise(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
