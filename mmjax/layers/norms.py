"""LayerNorm and RMSNorm behind one name, with logical axis names on their parameters."""

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NormKind = Literal["layernorm", "rmsnorm"]


class Norm(nn.Module):
  """Normalises the last axis, `"... d -> ... d"`, with statistics in float32.

  Attributes:
    kind: "layernorm" (subtract mean, divide by std, scale and bias; GPT-2, OPT, CLIP,
      OpenFlamingo) or "rmsnorm" (divide by root mean square, scale only; LLaMA).
    axis_name: logical name of the normalised axis: "embed", or "head_dim" for q/k norm.
    use_bias: LayerNorm only.
  """

  kind: NormKind = "layernorm"
  epsilon: float = 1e-5
  axis_name: str = "embed"
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind not in ("layernorm", "rmsnorm"):
      raise ValueError(f"Unknown norm kind {self.kind!r}; expected 'layernorm' or 'rmsnorm'.")
    dtype = self.dtype or x.dtype
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.ones_init(), (self.axis_name,)), (features,), self.param_dtype)
    y = x.astype(jnp.float32)
    if self.kind == "layernorm":
      y = y - jnp.mean(y, axis=-1, keepdims=True)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.epsilon)
    y = y * scale.astype(jnp.float32)
    if self.kind == "layernorm" and self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (self.axis_name,)), (features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(dtype)
