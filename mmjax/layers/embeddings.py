"""Position information: a learned table, and rotary embeddings (RoPE)."""

from typing import Any

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


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotates query/key features by their positions (rotate-half layout, as LLaMA in HF).

  Args:
    x: `"b t h k"` queries or keys, `k` even.
    positions: `"b t"` integer positions.
    theta: base of the geometric frequency ladder.
  Returns:
    `"b t h k"` in the dtype of `x`; the rotation itself is computed in float32.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # b t k/2
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # b t 1 k
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
