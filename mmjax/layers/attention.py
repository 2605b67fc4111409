"""One attention for every model: self, causal and cross; MHA, GQA and MQA; KV cache.

The kernel is `jax.nn.dot_product_attention`, so XLA picks cuDNN's fused (flash)
attention on GPU when `implementation` allows it.

Mask convention: boolean, True where a query may attend to a key, shaped `"b t s"` or
`"b h t s"` (`h` may be 1). A query row with no True entry (e.g. a text token before the
first image in Flamingo) gets an output of exactly zero, not an average of the values.
"""

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmjax.layers.dense import Dense
from mmjax.layers.embeddings import RopeScaling, alibi_bias, alibi_slopes, apply_rope
from mmjax.layers.norms import Norm, NormKind

Dtype = Any


def causal_mask(length: int) -> jax.Array:
  """`"1 1 t t"`: query i may attend to keys 0..i."""
  return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding_mask(key_valid: jax.Array) -> jax.Array:
  """`key_valid "b s"` (True for real keys) -> `"b 1 1 s"`, hiding padding from every query.

  `Attention(causal=True)` combines it with the causal rule.
  """
  return key_valid[:, None, None, :]


class Attention(nn.Module):
  """Multi-head dot-product attention, `x "b t d" (, kv "b s e") -> "b t d_out"`.

  Attributes:
    num_heads: query heads `h`.
    head_dim: per-head width `k`.
    num_kv_heads: key/value heads; None means `num_heads` (MHA), 1 is MQA, anything
      dividing `num_heads` is grouped-query attention.
    out_features: output width; defaults to the input width `d`.
    causal: self-attention where token i sees tokens 0..i.
    cross: keys and values come from `kv`; in decode mode their projections are cached,
      so later steps may pass `kv=None`.
    use_bias: bias on the q/k/v/output projections (GPT-2, OPT, CLIP).
    key_bias: bias on the key projection; None: as `use_bias`. False with `use_bias`
      is EVA's ViT (BLIP-2), whose key bias is fixed at zero.
    qk_norm: normalise queries and keys over `head_dim` before the dot product.
    rope_theta: apply rotary position embeddings to q and k (self-attention only).
    rope_scaling: stretches the rotary frequencies (long-context checkpoints).
    alibi_bias_max: add ALiBi biases to the logits of causal self-attention, with the
      slopes `alibi_slopes(num_heads, alibi_bias_max)` (MPT).
    scale: factor on the logits `q . k`; None is `1 / sqrt(head_dim)`.
    sliding_window: causal self-attention sees only keys less than this many positions
      before the query (Mistral); None: all earlier ones.
    implementation: passed to `jax.nn.dot_product_attention` ("xla", "cudnn" or None).
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  out_features: int | None = None
  causal: bool = False
  cross: bool = False
  use_bias: bool = False
  key_bias: bool | None = None
  qk_norm: NormKind | None = None
  qk_norm_eps: float = 1e-6
  rope_theta: float | None = None
  rope_scaling: RopeScaling | None = None
  alibi_bias_max: float | None = None
  scale: float | None = None
  sliding_window: int | None = None
  implementation: Literal["xla", "cudnn"] | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def _dense(self, features, axes, name, axis=-1, use_bias=None):
    return Dense(features, axes, axis=axis,
                 use_bias=self.use_bias if use_bias is None else use_bias, dtype=self.dtype,
                 param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array | None = None, *,
               mask: jax.Array | None = None, positions: jax.Array | None = None,
               bias: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """Attends from `x` to itself (or to `kv` when `cross`).

    Args:
      x: `"b t d"` queries' inputs.
      kv: `"b s e"` keys' and values' inputs for cross-attention.
      mask: boolean `"b t s"` or `"b h t s"`; combined with the causal rule if `causal`.
        Must be None for causal self-attention in decode mode, where the mask follows
        from the positions.
      positions: `"b t"` absolute positions of `x`; needed for RoPE, ALiBi and decoding.
      bias: float `"b h t s"` added to the (scaled) logits, e.g. T5's relative position
        biases; `b` and `h` may be 1. In self-attention decode mode `s` is the cache's
        length (key slot i holds position i).
      decode: use and update the key/value cache (the "cache" collection). For
        self-attention, keys/values of `x` are written at `positions`, and each query sees
        the cache slots at or before its own position; the cache is created by a first
        call with inputs of the maximum length.
    """
    num_kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={num_kv_heads}.")
    if self.cross and self.rope_theta is not None:
      raise ValueError(f"{self.name}: RoPE is defined for self-attention only.")
    if self.sliding_window is not None and (self.cross or not self.causal):
      raise ValueError(f"{self.name}: a sliding window is defined for causal "
                       "self-attention only.")
    if self.alibi_bias_max is not None and (self.cross or not self.causal):
      raise ValueError(f"{self.name}: ALiBi is defined for causal self-attention only.")
    if not self.cross and kv is not None:
      raise ValueError(f"{self.name}: `kv` was passed to a self-attention; construct "
                       "Attention(cross=True) for cross-attention.")
    b, t, d = x.shape

    q = self._dense((self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), "query")(x)
    if self.cross and kv is None:
      if not decode:
        raise ValueError(f"{self.name}: cross-attention needs `kv` outside decode mode.")
      k = self.get_variable("cache", "cross_key")
      v = self.get_variable("cache", "cross_value")
      if k is None:
        raise ValueError(f"{self.name}: no cached cross-attention keys; pass `kv` on the "
                         "first decode call.")
    else:
      source = kv if self.cross else x
      kv_axes = ("embed", "kv_heads", "head_dim")
      k = self._dense((num_kv_heads, self.head_dim), kv_axes, "key", use_bias=self.key_bias)(
          source)
      v = self._dense((num_kv_heads, self.head_dim), kv_axes, "value")(source)
      if self.qk_norm is not None:
        k = Norm(self.qk_norm, self.qk_norm_eps, axis_name="head_dim", dtype=self.dtype,
                 param_dtype=self.param_dtype, name="key_norm")(k)
      if self.cross and decode:
        self.put_variable("cache", "cross_key", k)
        self.put_variable("cache", "cross_value", v)
    if self.qk_norm is not None:
      q = Norm(self.qk_norm, self.qk_norm_eps, axis_name="head_dim", dtype=self.dtype,
               param_dtype=self.param_dtype, name="query_norm")(q)

    if self.rope_theta is not None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
      k = apply_rope(k, positions, self.rope_theta, self.rope_scaling)

    is_causal = False
    if self.causal and decode:
      if mask is not None:
        raise ValueError(f"{self.name}: in decode mode the causal mask follows from "
                         "`positions`; pass mask=None.")
      if positions is None:
        raise ValueError(f"{self.name}: decoding needs the absolute `positions` of x.")
      k, v = self._update_cache(k, v, positions)
      slots = jnp.arange(k.shape[1])
      mask = slots[None, None, None, :] <= positions[:, None, :, None]  # b 1 t s
      if self.sliding_window is not None:
        mask &= slots[None, None, None, :] > positions[:, None, :, None] - self.sliding_window
    elif self.causal:
      if mask is None and self.sliding_window is None:
        is_causal = True  # lets cuDNN skip materialising the mask
      else:
        mask = causal_mask(t) if mask is None else _as_4d(mask) & causal_mask(t)
      if self.sliding_window is not None:
        if positions is None:
          positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        distance = positions[:, None, :, None] - positions[:, None, None, :]  # b 1 t t
        mask = mask & (distance < self.sliding_window)

    if self.alibi_bias_max is not None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      # When decoding, the keys are the cache, whose slots are their positions.
      key_positions = jnp.arange(k.shape[1])[None] if decode else positions
      alibi = alibi_bias(positions, key_positions,
                         alibi_slopes(self.num_heads, self.alibi_bias_max))
      bias = alibi if bias is None else bias + alibi

    # Named for the "save_qkv_proj" remat policy (mmjax.layers.stack).
    q = checkpoint_name(nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim")),
                        "query_proj")
    k = checkpoint_name(nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim")),
                        "key_proj")
    v = checkpoint_name(nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim")),
                        "value_proj")
    mask = None if mask is None else _as_4d(mask)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=self.scale,
                                       is_causal=is_causal, implementation=self.implementation)
    if mask is not None and not (self.causal and decode):
      # Rows with nothing to attend to return zero, not a uniform average of the values.
      has_key = jnp.any(mask, axis=-1)  # b h t
      out = out * jnp.swapaxes(has_key, 1, 2)[..., None].astype(out.dtype)
    return self._dense(self.out_features or d, ("heads", "head_dim", "embed"), "out",
                       axis=(-2, -1))(out)

  def _update_cache(self, k, v, positions):
    """Writes `k, v "b t g k"` at `positions "b t"`; returns the whole cache `"b s g k"`."""
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    rows = jnp.arange(k.shape[0])[:, None]
    cached_k.value = cached_k.value.at[rows, positions].set(k.astype(cached_k.value.dtype))
    cached_v.value = cached_v.value.at[rows, positions].set(v.astype(cached_v.value.dtype))
    return cached_k.value, cached_v.value


def _as_4d(mask: jax.Array) -> jax.Array:
  if mask.ndim == 3:
    return mask[:, None]
  if mask.ndim != 4:
    raise ValueError(f"Attention mask must be 'b t s' or 'b h t s', got shape {mask.shape}.")
  return mask
