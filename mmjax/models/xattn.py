"""Flamingo's gated cross-attention dense block and the text-to-media masking rule."""

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Attention, Mlp, Norm


@dataclasses.dataclass(frozen=True)
class XAttnConfig:
  """Gated cross-attention dense blocks inserted into a (frozen) language model.

  Attributes:
    every: insert a block every `every` LM layers.
    placement: "openflamingo" puts a block before layer i when (i + 1) % every == 0;
      "idefics" when i % every == 0.
    only_immediate: a text token attends to the most recent preceding image only
      (Flamingo); False lets it attend to all preceding images.
    num_heads, head_dim: of the cross-attention.
    ff_mult: feed-forward hidden width is `ff_mult * lm width`, unless `mlp_dim` is set
      (IDEFICS uses its LM's intermediate size, not a multiple of the width).
    activation, gated_ff: the feed-forward (`"gelu", False` for OpenFlamingo; `"silu",
      True` is SwiGLU as in IDEFICS).
    norm: pre-norm kind; qk_norm: optional q/k normalisation in the cross-attention;
      both use `norm_eps`.
    gate: "scalar" (one tanh gate per branch) or "vector" (one per channel).
  """

  every: int = 1
  placement: Literal["openflamingo", "idefics"] = "openflamingo"
  only_immediate: bool = True
  num_heads: int = 8
  head_dim: int = 64
  ff_mult: int = 4
  mlp_dim: int | None = None
  activation: str = "gelu"
  gated_ff: bool = False
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  norm_eps: float = 1e-5
  qk_norm: Literal["layernorm", "rmsnorm"] | None = None
  gate: Literal["scalar", "vector"] = "scalar"

  def ff_dim(self, width: int) -> int:
    return self.mlp_dim or self.ff_mult * width

  def layer_indices(self, depth: int) -> tuple[int, ...]:
    """LM layers that get a gated block in front of them."""
    if self.every < 1:
      raise ValueError(f"xattn.every must be >= 1, got {self.every}.")
    if self.placement == "openflamingo":
      return tuple(i for i in range(depth) if (i + 1) % self.every == 0)
    if self.placement == "idefics":
      return tuple(i for i in range(depth) if i % self.every == 0)
    raise ValueError(f"Unknown xattn.placement {self.placement!r}; expected "
                     "'openflamingo' or 'idefics'.")


def media_index(tokens: jax.Array, media_token_id: int,
                offset: jax.Array | None = None) -> jax.Array:
  """`"b t" -> "b t"`: 1-based index of the latest `<image>` at or before each token.

  0 means no image precedes the token. An `<image>` token itself belongs to its image.
  `offset "b"` counts images already seen (incremental decoding).
  """
  index = jnp.cumsum(tokens == media_token_id, axis=1, dtype=jnp.int32)
  return index if offset is None else index + offset[:, None]


def media_attention_mask(text_index: jax.Array, media_valid: jax.Array,
                         only_immediate: bool = True) -> jax.Array:
  """Which images each text token may see: `text_index "b t", media_valid "b T" -> "b t T"`.

  Immediate mode: only image `text_index` (the latest one); otherwise every image up to
  it. Padding images (`media_valid` False) are never visible, and a token with index 0
  (before the first image) sees nothing, so its cross-attention output is zero.
  """
  media_time = jnp.arange(1, media_valid.shape[1] + 1)
  if only_immediate:
    mask = text_index[..., None] == media_time
  else:
    mask = media_time <= text_index[..., None]
  return mask & media_valid[:, None, :]


class GatedCrossAttentionBlock(nn.Module):
  """`x "b t d", media "b s e", mask "b t s" -> "b t d"`.

  `x + tanh(attn_gate) * xattn(norm(x), media)`, then `+ tanh(ff_gate) * ff(norm(.))`.
  Both gates start at 0, so a new block is the identity and the frozen LM is unchanged.
  """

  config: XAttnConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, media: jax.Array | None, mask: jax.Array,
               decode: bool = False) -> jax.Array:
    cfg = self.config
    width = x.shape[-1]
    gate_shape, gate_axes = ((1,), (None,)) if cfg.gate == "scalar" else ((width,), ("embed",))
    gate = lambda name: jnp.tanh(self.param(
        name, nn.with_logical_partitioning(nn.initializers.zeros_init(), gate_axes),
        gate_shape, self.param_dtype)).astype(x.dtype)
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name)

    attn = Attention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, cross=True, qk_norm=cfg.qk_norm,
        qk_norm_eps=cfg.norm_eps,
        implementation=self.implementation, dtype=self.dtype, param_dtype=self.param_dtype,
        name="attn")(norm("attn_norm")(x), media, mask=mask, decode=decode)
    x = x + gate("attn_gate") * attn
    ff = Mlp(cfg.ff_dim(width), cfg.activation, gated=cfg.gated_ff, dtype=self.dtype,
             param_dtype=self.param_dtype, name="mlp")(norm("mlp_norm")(x))
    return x + gate("mlp_gate") * ff
