"""Position information: a learned table, rotary embeddings (RoPE) and ALiBi biases."""

import dataclasses
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class LearnedPositions(nn.Module):
  """Learned absolute positions: `positions "b t" -> "b t d"`."""

  max_len: int
  features: int
  param_dtype: Dtype = jnp.float32
  init_stddev: float = 0.02

  @nn.compact
  def __call__(self, positions: jax.Array) -> jax.Array:
    table = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(self.init_stddev), ("length", "embed")),
                       (self.max_len, self.features), self.param_dtype)
    return jnp.take(table, positions, axis=0)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Slows RoPE's rotations so that a model reaches past its pretraining context (the
  rope types of the same names in transformers).

  `"linear"`: every frequency divided by `factor` (positions interpolated).
  `"llama3"`: frequencies whose wavelength exceeds `original_max_len / low_freq_factor`
  are divided by `factor`, those below `original_max_len / high_freq_factor` are kept
  (they already turn many times within the original context), and the band between
  blends the two.
  """

  kind: Literal["linear", "llama3"]
  factor: float
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_len: int | None = None

  def __post_init__(self):
    if self.kind not in ("linear", "llama3"):
      raise ValueError(f"RopeScaling: kind must be 'linear' or 'llama3', got {self.kind!r}.")
    if self.factor <= 0:
      raise ValueError(f"RopeScaling: factor must be positive, got {self.factor}.")
    llama3 = (self.low_freq_factor, self.high_freq_factor, self.original_max_len)
    if self.kind == "llama3" and None in llama3:
      raise ValueError("RopeScaling('llama3') needs low_freq_factor, high_freq_factor and "
                       "original_max_len.")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError("RopeScaling('llama3'): high_freq_factor must exceed low_freq_factor.")


def rope_frequencies(head_dim: int, theta: float = 10000.0,
                     scaling: RopeScaling | None = None) -> jax.Array:
  """`"k/2"` float32 angular frequencies (radians per position) of RoPE's feature pairs."""
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  # Evaluated in float32 in the reference's order, so converted models match it.
  wavelen = 2 * math.pi / inv_freq
  smooth = ((scaling.original_max_len / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  long_wavelen = scaling.original_max_len / scaling.low_freq_factor
  short_wavelen = scaling.original_max_len / scaling.high_freq_factor
  return jnp.where(wavelen > long_wavelen, inv_freq / scaling.factor,
                   jnp.where(wavelen < short_wavelen, inv_freq, blended))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
               scaling: RopeScaling | None = None) -> jax.Array:
  """Rotates query/key features by their positions (rotate-half layout, as LLaMA in HF).

  Args:
    x: `"b t h k"` queries or keys, `k` even.
    positions: `"b t"` integer positions.
    theta: base of the geometric frequency ladder.
    scaling: optional stretching of the frequencies for long contexts.
  Returns:
    `"b t h k"` in the dtype of `x`; the rotation itself is computed in float32.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
  inv_freq = rope_frequencies(head_dim, theta, scaling)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # b t k/2
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # b t 1 k
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> jax.Array:
  """`"h"` float32 ALiBi slopes, as MPT defines them.

  For `n` heads, `n` a power of two, head `i` (from 1) gets `2^(-bias_max * i / n)`.
  Otherwise, with `m` the next power of two, the first `m/2` heads get the slopes of
  `m/2` heads and the others the slopes of `m` heads that lie between them, in order.
  """
  m = 1 << (num_heads - 1).bit_length()
  ladder = [2.0 ** (-bias_max * i / m) for i in range(1, m + 1)]
  return jnp.asarray((ladder[1::2] + ladder[::2])[:num_heads] if m != num_heads else ladder,
                     jnp.float32)


def alibi_bias(q_positions: jax.Array, k_positions: jax.Array, slopes: jax.Array) -> jax.Array:
  """ALiBi's bias on attention logits, `-slope_h * (q_pos - k_pos)`: float32 `"b h t s"`.

  Args:
    q_positions: `"b t"` the queries' positions.
    k_positions: `"b s"` the keys' positions (`b` may be 1 for either).
    slopes: `"h"` per-head slopes (`alibi_slopes`).
  """
  distance = q_positions[:, None, :, None] - k_positions[:, None, None, :]  # b 1 t s
  return -slopes[:, None, None] * distance.astype(jnp.float32)


def sinusoidal_positions_2d(height: int, width: int, features: int,
                            theta: float = 10000.0) -> jax.Array:
  """Fixed 2D sine-cosine positions of a `height x width` grid, float32 `"(h w) d"`.

  The first half of the channels encodes the row, the second the column, each as
  `[sin(p * f), cos(p * f)]` with frequencies `f_i = theta^(-i / q)`, `q = features // 4`
  (MAE's and ViT-22B's fixed positions); `features` must be a multiple of 4.
  """
  if features % 4:
    raise ValueError(f"sinusoidal_positions_2d: features={features} must be a multiple of 4 "
                     "(sin and cos of the row and of the column).")
  q = features // 4
  freqs = theta ** (-jnp.arange(q, dtype=jnp.float32) / q)

  def encode(p):  # "n" -> "n 2q"
    angles = p.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  return jnp.concatenate([encode(rows.reshape(-1)), encode(cols.reshape(-1))], axis=-1)
