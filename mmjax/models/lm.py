"""Decoder-only language model: the GPT-2/OPT and LLaMA families by config.

GPT-2/OPT: learned positions, LayerNorm, GELU/ReLU MLP, biases, tied embeddings.
LLaMA: rotary positions, RMSNorm, SwiGLU, grouped-query attention, untied output.
With an `XAttnConfig`, Flamingo's gated cross-attention blocks sit in front of the
chosen layers and read resampled visual tokens.
"""

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Attention, Dense, LearnedPositions, Mlp, Norm, padding_mask, remat
from mmjax.models.common import dtype as to_dtype
from mmjax.models.xattn import GatedCrossAttentionBlock, XAttnConfig


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Shape and flavour of a decoder-only LM. `head_dim` defaults to width / heads."""

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int | None = None
  activation: str = "gelu_tanh"
  gated_mlp: bool = False
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  norm_eps: float = 1e-5
  use_bias: bool = True
  position: Literal["learned", "rope"] = "learned"
  max_len: int = 1024
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  qk_norm: Literal["layernorm", "rmsnorm"] | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: Literal["xla", "cudnn"] | None = None
  remat: str = "none"  # policy for each layer and gated block: mmjax.layers.remat

  def __post_init__(self):
    if self.head_dim is None and self.width % self.num_heads:
      raise ValueError(f"LMConfig: width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}; set head_dim explicitly.")
    if self.num_heads % (self.num_kv_heads or self.num_heads):
      raise ValueError(f"LMConfig: num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")
    if self.position not in ("learned", "rope"):
      raise ValueError(f"LMConfig: position must be 'learned' or 'rope', got {self.position!r}.")

  @property
  def dims_per_head(self) -> int:
    return self.head_dim or self.width // self.num_heads


class DecoderLayer(nn.Module):
  """Pre-norm block: `x + attn(norm(x))`, then `+ mlp(norm(.))`; `"b t d -> b t d"`."""

  config: LMConfig

  @nn.compact
  def __call__(self, x, mask=None, positions=None, decode=False):
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, use_bias=cfg.use_bias, name=name, **kw)
    h = Attention(
        num_heads=cfg.num_heads, head_dim=cfg.dims_per_head, num_kv_heads=cfg.num_kv_heads,
        causal=True, use_bias=cfg.use_bias, qk_norm=cfg.qk_norm,
        rope_theta=cfg.rope_theta if cfg.position == "rope" else None,
        implementation=cfg.attention_impl, name="attn", **kw,
    )(norm("attn_norm")(x), mask=mask, positions=positions, decode=decode)
    x = x + h
    h = Mlp(cfg.mlp_dim or 4 * cfg.width, cfg.activation, gated=cfg.gated_mlp,
            use_bias=cfg.use_bias, name="mlp", **kw)(norm("mlp_norm")(x))
    x = x + h
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class LanguageModel(nn.Module):
  """`tokens "b t" -> logits "b t v"`.

  Attributes:
    config: the LM's shape.
    xattn: when set, gated cross-attention blocks (`xattn_<i>`) sit in front of the
      layers `xattn.layer_indices(depth)`; they then need `media` and `media_mask`.
  """

  config: LMConfig
  xattn: XAttnConfig | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               token_mask: jax.Array | None = None, media: jax.Array | None = None,
               media_mask: jax.Array | None = None, decode: bool = False,
               return_hidden: bool = False) -> jax.Array:
    """Runs the LM.

    Args:
      tokens: `"b t"` token ids.
      positions: `"b t"` absolute positions; default `0..t-1`. Required when decoding.
      token_mask: `"b t"` True for real tokens; padding keys are hidden from every query.
        Right padding needs no mask (causality already hides it).
      media: `"b s e"` visual tokens for the cross-attention blocks (s = images x
        latents). In decode mode, pass it on the first (prefill) call only.
      media_mask: `"b t s"` which visual tokens each text token may attend to.
      decode: incremental decoding with the KV cache (see `Attention`).
      return_hidden: return the final normalised hidden states `"b t d"` instead.
    """
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    b, t = tokens.shape
    if positions is None:
      if decode:
        raise ValueError("LanguageModel: decoding needs explicit `positions`.")
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    embed = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), name="embed", **kw)
    x = embed(tokens)
    if cfg.position == "learned":
      x = x + LearnedPositions(cfg.max_len, cfg.width, kw["param_dtype"],
                               name="positions")(positions).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    mask = None
    if token_mask is not None:
      if decode:
        raise ValueError("LanguageModel: token_mask is not supported when decoding; "
                         "right-pad prompts and pass their positions instead.")
      mask = padding_mask(token_mask)

    xattn_layers = self.xattn.layer_indices(cfg.depth) if self.xattn is not None else ()
    if xattn_layers and media_mask is None:
      raise ValueError("LanguageModel: gated cross-attention blocks need `media_mask` (and "
                       "`media`, except in decode mode after the first call).")
    policy = "none" if decode else cfg.remat  # nothing to save memory for when decoding
    xattn_block = remat(GatedCrossAttentionBlock, policy, static_argnums=(4,))
    layer = remat(DecoderLayer, policy, static_argnums=(4,))
    for i in range(cfg.depth):
      if i in xattn_layers:
        x = xattn_block(self.xattn, implementation=cfg.attention_impl, name=f"xattn_{i}",
                        **kw)(x, media, media_mask, decode)
      x = layer(cfg, name=f"layers_{i}")(x, mask, positions, decode)
    x = Norm(cfg.norm, cfg.norm_eps, use_bias=cfg.use_bias, name="final_norm", **kw)(x)
    if return_hidden:
      return x
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), name="lm_head", **kw)(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
