"""T5: an encoder-decoder transformer with relative position biases (T5 v1.0, v1.1, FLAN-T5).

The encoder is a stack of pre-norm bidirectional layers (`x + attn(norm(x))`, then
`x + mlp(norm(.))`); each decoder layer adds a cross-attention to the encoder's output
between its causal self-attention and its feed-forward. Norms are RMS norms without bias
(`norm="rmsnorm"`); no projection has a bias; attention logits are `q . k` unscaled (T5
folds the `1/sqrt(head_dim)` into its query weights), plus a learned bias per head and
bucketed relative distance (`relative_position_bucket`: bidirectional in the encoder,
causal in the decoder), one table per stack, computed once and added in every layer of the
stack; the cross-attention has none. Encoder and decoder share the input embedding. The
output layer is the embedding (v1.0) or its own `lm_head` (v1.1, FLAN-T5); T5 v1.0 scales
the decoder's output by `width ** -0.5` before it (`scale_output`).

`T5.encode` takes an optional `prefix` of embeddings put in front of the token
embeddings (BLIP-2 feeds its projected queries this way); `T5.decode` runs the decoder
over the encoder's output, with a KV cache when decoding (the cross-attention's keys and
values, and the encoder mask, are cached on the first call); `generate` encodes once and
decodes from `decoder_start_id` until `eos_id`, greedy, sampled or by beam search.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import decoding
from mmjax.layers import Attention, Dense, Mlp, Norm, padding_mask, remat, stack
from mmjax.models.common import dtype as to_dtype


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shape and flavour of a T5. `head_dim` defaults to width / heads, `mlp_dim` to
  4 x width, `decoder_depth` to `depth`.

  Attributes:
    activation: of the feed-forward: "relu" (T5 v1.0), "gelu_tanh" (v1.1 and FLAN-T5's
      gated-gelu), "gelu" (erf; BLIP-2 runs FLAN-T5 with it), any `mmjax.layers.Mlp`'s.
    gated_mlp: `down(act(gate(x)) * up(x))` (v1.1, FLAN-T5) rather than `down(act(up(x)))`.
    relative_buckets: buckets of relative distance, each with its bias per head.
    relative_max_distance: distances from this on share the last buckets.
    tie_embeddings: the output layer is the input embedding (v1.0); else an `lm_head`.
    scale_output: multiply the decoder's output by `width ** -0.5` before the output
      layer; None: as `tie_embeddings` (v1.0 does, v1.1 and FLAN-T5 do not).
    pad_id, decoder_start_id, eos_id: padding, the decoder's first input, the end of an
      output.
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  decoder_depth: int | None = None
  head_dim: int | None = None
  mlp_dim: int | None = None
  activation: str = "relu"
  gated_mlp: bool = False
  relative_buckets: int = 32
  relative_max_distance: int = 128
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  scale_output: bool | None = None
  pad_id: int = 0
  decoder_start_id: int = 0
  eos_id: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: Literal["xla", "cudnn"] | None = None
  remat: str = "none"  # policy for each layer: mmjax.layers.stack
  scan_layers: bool = False  # one scanned layer per stack, parameters stacked under "layers"

  def __post_init__(self):
    if self.head_dim is None and self.width % self.num_heads:
      raise ValueError(f"T5Config: width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}; set head_dim explicitly.")
    # The decoder's buckets (all of them on one side) have relative_buckets // 2 exact ones,
    # the encoder's half as many; the logarithmic ones need room above them.
    if self.relative_buckets < 4 or self.relative_max_distance <= self.relative_buckets // 2:
      raise ValueError(f"T5Config: relative_buckets={self.relative_buckets} must be >= 4 and "
                       f"relative_max_distance={self.relative_max_distance} above half of "
                       "it, or the logarithmic buckets are undefined.")

  @property
  def dims_per_head(self) -> int:
    return self.head_dim or self.width // self.num_heads

  @property
  def decoder_layers(self) -> int:
    return self.depth if self.decoder_depth is None else self.decoder_depth

  @property
  def scales_output(self) -> bool:
    return self.tie_embeddings if self.scale_output is None else self.scale_output


def relative_position_bucket(relative: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's bucket (int32, in `[0, num_buckets)`) of each `key position - query position`.

  Bidirectional: half of the buckets for keys after the query, half for the others;
  causal: all of them for keys at or before the query (later keys share bucket 0). Of a
  side's `n` buckets, the first `n / 2` hold the distances `0 .. n/2 - 1` one each, the
  others logarithmically wider ranges up to `max_distance`, beyond which all distances
  share the last one.
  """
  relative = relative.astype(jnp.int32)
  bucket = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    bucket = jnp.where(relative > 0, num_buckets, 0)
    distance = jnp.abs(relative)
  else:
    distance = jnp.maximum(-relative, 0)
  exact = num_buckets // 2
  # In float32, as the reference computes it (the exact distances skip the logarithm).
  scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact)
            / math.log(max_distance / exact) * (num_buckets - exact))
  wide = jnp.minimum(exact + scaled.astype(jnp.int32), num_buckets - 1)
  return bucket + jnp.where(distance < exact, distance, wide)


class RelativePositionBias(nn.Module):
  """`q_positions "b t", k_positions "b s" -> "b h t s"` float32 biases: a learned value
  per head and `relative_position_bucket` of `k - q`."""

  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool
  init_std: float = 1.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    table = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(self.init_std), (None, "heads")),
                       (self.num_buckets, self.num_heads), self.param_dtype)
    buckets = relative_position_bucket(
        k_positions[:, None, :] - q_positions[:, :, None], bidirectional=self.bidirectional,
        num_buckets=self.num_buckets, max_distance=self.max_distance)  # b t s
    return jnp.moveaxis(table.astype(jnp.float32)[buckets], -1, 1)


def _kw(cfg: T5Config) -> dict:
  return {"dtype": to_dtype(cfg.dtype), "param_dtype": to_dtype(cfg.param_dtype)}


def _attention(cfg: T5Config, name: str, **kwargs) -> Attention:
  return Attention(num_heads=cfg.num_heads, head_dim=cfg.dims_per_head, scale=1.0,
                   implementation=cfg.attention_impl, name=name, **kwargs, **_kw(cfg))


def _norm(cfg: T5Config, name: str) -> Norm:
  return Norm("rmsnorm", cfg.norm_eps, name=name, **_kw(cfg))


def _mlp(cfg: T5Config) -> Mlp:
  return Mlp(cfg.mlp_dim or 4 * cfg.width, cfg.activation, gated=cfg.gated_mlp, name="mlp",
             **_kw(cfg))


def _relative_bias(cfg: T5Config, bidirectional: bool) -> RelativePositionBias:
  return RelativePositionBias(cfg.num_heads, cfg.relative_buckets, cfg.relative_max_distance,
                              bidirectional, init_std=cfg.width ** -0.5,
                              param_dtype=to_dtype(cfg.param_dtype), name="relative_bias")


class EncoderLayer(nn.Module):
  """`x "b t d" -> "b t d"`: `x + attn(norm(x))`, then `+ mlp(norm(.))`; the attention's
  `mask` is boolean `"b h t s"` (h may be 1) or None, `bias` its `"b h t t"` logit bias."""

  config: T5Config

  @nn.compact
  def __call__(self, x, mask=None, bias=None):
    cfg = self.config
    x = x + _attention(cfg, "attn")(_norm(cfg, "attn_norm")(x), mask=mask, bias=bias)
    x = x + _mlp(cfg)(_norm(cfg, "mlp_norm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """`x "b t d" -> "b t d"`: causal self-attention (logit bias `bias "b h t s"`), then
  cross-attention to `encoded "b s e"` (keys hidden by `cross_mask`), then the
  feed-forward, each pre-norm with a residual. In decode mode `encoded` may be None
  after the first call (its keys and values are cached)."""

  config: T5Config

  @nn.compact
  def __call__(self, x, encoded, bias, cross_mask, positions, decode):
    cfg = self.config
    x = x + _attention(cfg, "self_attn", causal=True)(
        _norm(cfg, "self_attn_norm")(x), positions=positions, bias=bias, decode=decode)
    x = x + _attention(cfg, "cross_attn", cross=True)(
        _norm(cfg, "cross_attn_norm")(x), encoded, mask=cross_mask, decode=decode)
    x = x + _mlp(cfg)(_norm(cfg, "mlp_norm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Encoder(nn.Module):
  """`x "b t d"` embeddings, `mask "b t"` (True for real tokens; None: all) -> `"b t d"`."""

  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    positions = jnp.arange(x.shape[1], dtype=jnp.int32)[None]
    bias = _relative_bias(cfg, bidirectional=True)(positions, positions)  # 1 h t t
    attn_mask = None if mask is None else padding_mask(mask.astype(bool))
    layer = remat(EncoderLayer, cfg.remat)
    x = stack(lambda name: layer(cfg, name=name), cfg.depth, x, scanned=cfg.scan_layers,
              call=lambda module, x: module(x, attn_mask, bias))
    return _norm(cfg, "final_norm")(x)


class Decoder(nn.Module):
  """`x "b t d"` embeddings of the decoder's tokens at `positions "b t"`, over `encoded
  "b s e"` with `encoder_mask "b s"` -> `"b t d"` (final-normed)."""

  config: T5Config

  @nn.compact
  def __call__(self, x, encoded, encoder_mask, positions, decode):
    cfg = self.config
    b, t = x.shape[:2]
    if positions is None:
      if decode:
        raise ValueError("T5 decoder: decoding needs explicit `positions`.")
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = positions.astype(jnp.int32)
    key_positions = positions
    if decode:
      # The self-attention's keys are its cache slots: which position each one holds is
      # cached beside them, written as they are (the first call, at the cache's length,
      # creates it).
      slots = self.variable("cache", "cached_positions", jnp.zeros, positions.shape,
                            jnp.int32)
      slots.value = slots.value.at[jnp.arange(b)[:, None], positions].set(positions)
      key_positions = slots.value
      if encoded is not None:
        mask = (jnp.ones(encoded.shape[:2], bool) if encoder_mask is None
                else encoder_mask.astype(bool))
        self.put_variable("cache", "encoder_mask", mask)
      elif encoder_mask is not None:
        raise ValueError("T5 decoder: pass `encoder_mask` with `encoded`, on the first "
                         "decode call; later calls use the cached ones.")
      encoder_mask = self.get_variable("cache", "encoder_mask")
      if encoder_mask is None:
        raise ValueError("T5 decoder: no cached encoder output; pass `encoded` on the first "
                         "decode call.")
    elif encoded is None:
      raise ValueError("T5 decoder: `encoded` is needed outside decode mode.")
    bias = _relative_bias(cfg, bidirectional=False)(positions, key_positions)  # b h t s
    cross_mask = None if encoder_mask is None else padding_mask(encoder_mask.astype(bool))
    layer = remat(DecoderLayer, "none" if decode else cfg.remat, static_argnums=(6,))
    x = stack(lambda name: layer(cfg, name=name), cfg.decoder_layers, x,
              scanned=cfg.scan_layers,
              call=lambda module, x: module(x, encoded, bias, cross_mask, positions, decode))
    return _norm(cfg, "final_norm")(x)


def encoded_mask(token_mask: jax.Array | None, tokens: jax.Array,
                 prefix: jax.Array | None = None) -> jax.Array:
  """`"b (p t)"` the keys `T5.encode(tokens, token_mask, prefix=prefix)`'s output offers
  the decoder: the prefix's all, then the tokens' `token_mask` (None: all)."""
  b, t = tokens.shape
  mask = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
  if prefix is not None:
    mask = jnp.concatenate([jnp.ones(prefix.shape[:2], bool), mask], axis=1)
  return mask


class T5(nn.Module):
  """`tokens "b t", decoder_tokens "b s" -> logits "b s v"`; `encode` and `decode` run
  the two halves."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")), **_kw(cfg))
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = Dense(cfg.vocab_size, ("embed", "vocab"), **_kw(cfg))

  def encode(self, tokens: jax.Array, token_mask: jax.Array | None = None, *,
             prefix: jax.Array | None = None) -> jax.Array:
    """The encoder's output `"b (p t) d"`.

    Args:
      tokens: `"b t"` token ids.
      token_mask: `"b t"` True for real tokens (None: all); padding keys are hidden from
        every query (padding positions still get outputs, which mean nothing).
      prefix: `"b p d"` embeddings put in front of the tokens' (always attended to).
        `encoded_mask(token_mask, tokens, prefix)` is the mask of the output.
    """
    x = self.embed(tokens)
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
    mask = None if token_mask is None else encoded_mask(token_mask, tokens, prefix)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return self.encoder(x, mask)

  def decode(self, decoder_tokens: jax.Array, encoded: jax.Array | None = None,
             encoder_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
             decode: bool = False, return_hidden: bool = False) -> jax.Array:
    """Logits `"b t v"` of the decoder's next tokens.

    Args:
      decoder_tokens: `"b t"`, starting with `decoder_start_id` (the targets shifted
        right).
      encoded: `"b s d"` the encoder's output; in decode mode, on the first call only.
      encoder_mask: `"b s"` True for the keys of `encoded` to attend to (None: all); in
        decode mode, with `encoded` only.
      positions: `"b t"` the tokens' positions; default `0..t-1`. Required when decoding.
      decode: incremental decoding with the KV cache (see `mmjax.layers.Attention`); the
        cache is created by a first call with tokens of the maximum length.
      return_hidden: return the final normalised hidden states `"b t d"` instead.
    """
    cfg = self.config
    x = nn.with_logical_constraint(self.embed(decoder_tokens), ("batch", "length", "embed"))
    x = self.decoder(x, encoded, encoder_mask, positions, decode)
    if return_hidden:
      return x
    if cfg.scales_output:
      x = x * jnp.asarray(cfg.width ** -0.5, x.dtype)
    logits = self.embed.attend(x) if cfg.tie_embeddings else self.lm_head(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def __call__(self, tokens: jax.Array, decoder_tokens: jax.Array, *,
               token_mask: jax.Array | None = None, prefix: jax.Array | None = None,
               decoder_positions: jax.Array | None = None) -> jax.Array:
    """`encode(tokens, token_mask, prefix=prefix)`, then `decode(decoder_tokens, ...)`
    over it: logits `"b s v"`."""
    encoded = self.encode(tokens, token_mask, prefix=prefix)
    return self.decode(decoder_tokens, encoded, encoded_mask(token_mask, tokens, prefix),
                       positions=decoder_positions)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "stop_ids", "pad_id",
                                             "sampling", "beams"))
def generate(model: T5, params: Any, tokens: jax.Array, token_mask: jax.Array | None,
             rng: jax.Array, *, max_new_tokens: int, prefix: jax.Array | None = None,
             stop_ids: Sequence[int] | None = None, pad_id: int | None = None,
             sampling: decoding.SamplingConfig = decoding.GREEDY,
             beams: decoding.BeamConfig | None = None) -> decoding.Generated:
  """Outputs for the inputs `tokens "b t"` (`token_mask`, `prefix` as `T5.encode` takes
  them): encoded once, then decoded with the KV cache from `decoder_start_id`;
  `decoding.Generated` holds `"b max_new_tokens"` tokens (the start token left out) and
  per-row lengths.

  Rows stop at `stop_ids` (default: `eos_id`, which is emitted) and are padded with
  `pad_id` (default: the config's). Greedy or sampled by `sampling`, or, given `beams`,
  each row's best beam search hypothesis (`sampling` must then stay greedy)."""
  cfg = model.config
  stop_ids = (cfg.eos_id,) if stop_ids is None else tuple(stop_ids)
  pad_id = cfg.pad_id if pad_id is None else pad_id
  encoded = model.apply({"params": params}, tokens, token_mask, prefix=prefix,
                        method=T5.encode)
  mask = encoded_mask(token_mask, tokens, prefix)
  b = tokens.shape[0]
  max_len = 1 + max_new_tokens  # the start token, then the outputs

  def run(cache, decoder_tokens, positions, encoded=None, mask=None):
    logits, state = model.apply({"params": params, "cache": cache}, decoder_tokens, encoded,
                                mask, positions=positions, decode=True, method=T5.decode,
                                mutable=["cache"])
    return logits, state["cache"]

  def cache_for(n):
    return decoding.init_cache(
        model.apply, {"params": params}, jnp.zeros((n, max_len), jnp.int32),
        jnp.zeros((n,) + encoded.shape[1:], encoded.dtype), jnp.ones((n, mask.shape[1]), bool),
        positions=jnp.broadcast_to(jnp.arange(max_len), (n, max_len)), decode=True,
        method=T5.decode, mutable=["cache"])

  start = jnp.full((b, 1), cfg.decoder_start_id, jnp.int32)
  return decoding.decode(run, cache_for, start, jnp.ones((b,), jnp.int32), rng,
                         max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                         sampling=sampling, beams=beams,
                         prefill_fn=lambda cache, t, p: run(cache, t, p, encoded, mask))
