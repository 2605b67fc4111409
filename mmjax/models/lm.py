"""Decoder-only language model: the GPT-2/OPT and LLaMA families by config.

GPT-2/OPT: learned positions, LayerNorm, GELU/ReLU MLP, biases (OPT's bias-free
projections keep their LayerNorm biases: `norm_bias`), tied or untied embeddings, GPT-2's
attention scales (`attn_scale`, `attn_scale_by_layer`).
LLaMA: rotary positions, RMSNorm, SwiGLU, grouped-query attention, untied output.
MPT: ALiBi biases instead of positions, bias-free LayerNorm and GELU MLP, tied embeddings.
`causal=False` makes it a bidirectional encoder (SigLIP's text tower, read through
`return_hidden`); it then cannot decode.
With an `XAttnConfig`, Flamingo's gated cross-attention blocks sit in front of the
chosen layers and read resampled visual tokens.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import decoding
from mmjax.layers import (Attention, Dense, LearnedPositions, Mlp, Norm, RopeScaling,
                          padding_mask, remat, scan)
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
  use_bias: bool = True  # on every projection (and every LayerNorm, unless norm_bias says)
  norm_bias: bool | None = None  # LayerNorm biases; None: as use_bias (OPT keeps them alone)
  # Attention logits are q.k times attn_scale (None: 1/sqrt(head_dim)), and in layer i
  # divided by i + 1 when attn_scale_by_layer (GPT-2's scale_attn_by_inverse_layer_idx).
  attn_scale: float | None = None
  attn_scale_by_layer: bool = False
  sliding_window: int | None = None  # each query sees this many positions back (Mistral)
  position: Literal["learned", "rope", "alibi"] = "learned"
  alibi_bias_max: float = 8.0  # sets ALiBi's slopes: mmjax.layers.embeddings.alibi_slopes
  max_len: int = 1024
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None  # long-context RoPE (LLaMA 3.1, ...)
  tie_embeddings: bool = True
  qk_norm: Literal["layernorm", "rmsnorm"] | None = None
  causal: bool = True  # False: every token sees every other (an encoder; no decoding)
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: Literal["xla", "cudnn"] | None = None
  remat: str = "none"  # policy for each layer and gated block: mmjax.layers.stack
  # One scanned layer (or, with gated blocks, one scanned group of `xattn.every` layers
  # and its block), parameters stacked under "layers" (or "groups").
  scan_layers: bool = False

  def __post_init__(self):
    if self.head_dim is None and self.width % self.num_heads:
      raise ValueError(f"LMConfig: width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}; set head_dim explicitly.")
    if self.num_heads % (self.num_kv_heads or self.num_heads):
      raise ValueError(f"LMConfig: num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")
    if self.attn_scale_by_layer and self.scan_layers:
      raise ValueError("LMConfig: attn_scale_by_layer needs each layer's index, which scanned "
                       "layers do not have; set scan_layers=False.")
    if self.position not in ("learned", "rope", "alibi"):
      raise ValueError("LMConfig: position must be 'learned', 'rope' or 'alibi', got "
                       f"{self.position!r}.")
    if not self.causal and (self.position == "alibi" or self.sliding_window is not None):
      raise ValueError("LMConfig: causal=False is not defined with ALiBi or a sliding window "
                       "(both are causal); use position='learned' or 'rope' and "
                       "sliding_window=None.")

  @property
  def dims_per_head(self) -> int:
    return self.head_dim or self.width // self.num_heads

  def attention_scale(self, layer: int | None) -> float | None:
    """The factor on layer `layer`'s attention logits; None: 1/sqrt(head_dim)."""
    if not self.attn_scale_by_layer:
      return self.attn_scale
    scale = self.dims_per_head ** -0.5 if self.attn_scale is None else self.attn_scale
    return scale / (layer + 1)


class DecoderLayer(nn.Module):
  """Pre-norm block: `x + attn(norm(x))`, then `+ mlp(norm(.))`; `"b t d -> b t d"`.
  `index` is the layer's place in the stack (None in a scan), for per-layer settings."""

  config: LMConfig
  index: int | None = None

  @nn.compact
  def __call__(self, x, mask=None, positions=None, decode=False):
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, use_bias=_norm_bias(cfg), name=name, **kw)
    h = Attention(
        num_heads=cfg.num_heads, head_dim=cfg.dims_per_head, num_kv_heads=cfg.num_kv_heads,
        causal=cfg.causal, use_bias=cfg.use_bias, qk_norm=cfg.qk_norm,
        rope_theta=cfg.rope_theta if cfg.position == "rope" else None,
        rope_scaling=cfg.rope_scaling,
        alibi_bias_max=cfg.alibi_bias_max if cfg.position == "alibi" else None,
        scale=cfg.attention_scale(self.index), sliding_window=cfg.sliding_window,
        implementation=cfg.attention_impl, name="attn",
        **kw,
    )(norm("attn_norm")(x), mask=mask, positions=positions, decode=decode)
    x = x + h
    h = Mlp(cfg.mlp_dim or 4 * cfg.width, cfg.activation, gated=cfg.gated_mlp,
            use_bias=cfg.use_bias, name="mlp", **kw)(norm("mlp_norm")(x))
    x = x + h
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _norm_bias(cfg: LMConfig) -> bool:
  return cfg.use_bias if cfg.norm_bias is None else cfg.norm_bias


def _remat(module: type[nn.Module], cfg: LMConfig, decode: bool) -> type[nn.Module]:
  """A decoder layer or gated block (`decode` is their 4th argument) under the LM's remat
  policy; none when decoding, where there is nothing to save memory for."""
  return remat(module, "none" if decode else cfg.remat, static_argnums=(4,))


def _layer_and_block(x, cfg: LMConfig, xattn: XAttnConfig | None, layer_name: str,
                     block_name: str, media, media_mask, mask, positions, decode,
                     index: int | None = None):
  """One decoder layer (the `index`th of the LM, None in a scan), preceded by a gated
  cross-attention block when `xattn` is given; called inside a compact method, whose
  submodules they become."""
  kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
  if xattn is not None:
    x = _remat(GatedCrossAttentionBlock, cfg, decode)(
        xattn, implementation=cfg.attention_impl, name=block_name, **kw)(
            x, media, media_mask, decode)
  return _remat(DecoderLayer, cfg, decode)(cfg, index, name=layer_name)(x, mask, positions,
                                                                         decode)


class DecoderGroup(nn.Module):
  """`xattn.every` consecutive layers with their gated block: what a scanned Flamingo LM
  repeats. Names are in-group indices: `layers_<j>`, and `xattn_<j>` before layer j, so
  group k's `layers_<j>` is the LM's layer `k * every + j`."""

  config: LMConfig
  xattn: XAttnConfig

  @nn.compact
  def __call__(self, x, media, media_mask, mask, positions, decode):
    blocks = self.xattn.layer_indices(self.xattn.every)
    for j in range(self.xattn.every):
      x = _layer_and_block(x, self.config, self.xattn if j in blocks else None,
                           f"layers_{j}", f"xattn_{j}", media, media_mask, mask, positions,
                           decode)
    return x


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
               media_mask: jax.Array | None = None, prefix: jax.Array | None = None,
               decode: bool = False, return_hidden: bool = False,
               embeddings: jax.Array | None = None,
               embedding_mask: jax.Array | None = None) -> jax.Array:
    """Runs the LM.

    Args:
      tokens: `"b t"` token ids.
      positions: `"b t"` absolute positions; default `0..t-1`. Required when decoding.
        With a `prefix`, `"b (p + t)"`: the prefix's, then the tokens'.
      token_mask: `"b t"` True for real tokens (`"b (p + t)"` with a prefix); padding keys
        are hidden from every query.
        Right padding needs no mask when causal (causality already hides it).
      media: `"b s e"` visual tokens for the cross-attention blocks (s = images x
        latents). In decode mode, pass it on the first (prefill) call only.
      media_mask: `"b t s"` which visual tokens each text token may attend to.
      prefix: `"b p d"` embeddings read before the tokens (a soft prompt: BLIP-2's
        projected queries); the outputs are the tokens' only. When decoding, pass it on
        the first call only.
      decode: incremental decoding with the KV cache (see `Attention`).
      return_hidden: return the final normalised hidden states `"b t d"` instead.
      embeddings: `"b t d"` input embeddings read instead of the tokens' own where
        `embedding_mask` (`"b t"`) is True, everywhere when it is None: vectors inside
        the sequence (CoOp's learned context); `tokens` still give the shape.
    """
    cfg = self.config
    if decode and not cfg.causal:
      raise ValueError("LanguageModel: a bidirectional LM (causal=False) cannot decode "
                       "incrementally; run it on whole sequences.")
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    embed = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), name="embed", **kw)
    x = embed(tokens)
    if embeddings is not None:
      replace = True if embedding_mask is None else embedding_mask[..., None]
      x = jnp.where(replace, embeddings.astype(x.dtype), x)
    if prefix is not None:
      if prefix.shape[-1] != cfg.width:
        raise ValueError(f"LanguageModel: the prefix is {prefix.shape[-1]} wide, the LM "
                         f"{cfg.width}.")
      x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    b, t = x.shape[:2]
    if positions is None:
      if decode:
        raise ValueError("LanguageModel: decoding needs explicit `positions`.")
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
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
    inputs = (media, media_mask, mask, positions, decode)
    group = self.xattn.every if xattn_layers else 1
    scanned = cfg.depth // group if cfg.scan_layers else 0
    if scanned and xattn_layers:
      x = scan(DecoderGroup(cfg, self.xattn, name="groups"), scanned, x,
               lambda module, x: module(x, *inputs))
    elif scanned:
      x = scan(_remat(DecoderLayer, cfg, decode)(cfg, name="layers"), scanned, x,
               lambda module, x: module(x, mask, positions, decode))
    for i in range(scanned * group, cfg.depth):  # all layers, or those after the scan
      x = _layer_and_block(x, cfg, self.xattn if i in xattn_layers else None, f"layers_{i}",
                           f"xattn_{i}", *inputs, index=i)
    x = Norm(cfg.norm, cfg.norm_eps, use_bias=_norm_bias(cfg), name="final_norm", **kw)(x)
    if prefix is not None:
      x = x[:, prefix.shape[1]:]
    if return_hidden:
      return x
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), name="lm_head", **kw)(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "stop_ids", "pad_id",
                                             "sampling", "beams"))
def generate(model: LanguageModel, params: Any, prompt: jax.Array, prompt_lengths: jax.Array,
             rng: jax.Array, *, max_new_tokens: int, stop_ids: Sequence[int] = (),
             pad_id: int = 0, sampling: decoding.SamplingConfig = decoding.GREEDY,
             beams: decoding.BeamConfig | None = None) -> decoding.Generated:
  """Continues right-padded text prompts `"b t"` (real lengths `"b"`) with the KV cache;
  `decoding.Generated` holds `"b max_new_tokens"` tokens and per-row lengths.

  Greedy or sampled by `sampling`, or, given `beams`, each row's best beam search
  hypothesis (`decoding.beam_search`; `sampling` must then stay greedy)."""
  t = prompt.shape[1]
  max_len = t + max_new_tokens
  if model.config.position == "learned" and max_len > model.config.max_len:
    raise ValueError(f"Prompt length {t} + max_new_tokens {max_new_tokens} exceeds the LM's "
                     f"learned positions (max_len={model.config.max_len}).")

  def step(cache, tokens, positions):
    logits, state = model.apply({"params": params, "cache": cache}, tokens,
                                positions=positions, decode=True, mutable=["cache"])
    return logits, state["cache"]

  def cache_for(n):
    return decoding.init_cache(model.apply, {"params": params},
                               jnp.zeros((n, max_len), jnp.int32),
                               positions=jnp.broadcast_to(jnp.arange(max_len), (n, max_len)),
                               decode=True, mutable=["cache"])

  return decoding.decode(step, cache_for, prompt, prompt_lengths, rng,
                         max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids), pad_id=pad_id,
                         sampling=sampling, beams=beams)
