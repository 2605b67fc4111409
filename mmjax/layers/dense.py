"""Linear projection whose kernel and bias carry logical axis names."""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def contract(x: jax.Array, kernel: jax.Array, axis: Sequence[int]) -> jax.Array:
  """`x`'s `axis` (in order) contracted with `kernel`'s leading axes: `[*rest, *features]`.

  When the contracted axes are trailing, the leading ones are folded into one before the
  product and unfolded after (free reshapes of contiguous arrays). The value is the same as
  one `dot_general`, but the weight gradient then contracts a single token axis: XLA:CPU
  otherwise forms it by writing the output gradient transposed, fused into the elementwise
  backward that produces it (e.g. GELU's), which measured up to half of a gated
  cross-attention block's backward (BENCHMARKS.md). Folding a leading axis sharded over
  the batch keeps the sharding: it is the major one.
  """
  axis = tuple(axis)
  n = len(axis)
  dims = ((axis, tuple(range(n))), ((), ()))
  rest = x.shape[:x.ndim - n]
  if len(rest) < 2 or axis != tuple(range(x.ndim - n, x.ndim)):
    return jax.lax.dot_general(x, kernel, dims)
  flat = jax.lax.dot_general(x.reshape((-1,) + x.shape[len(rest):]), kernel,
                             ((tuple(range(1, n + 1)), tuple(range(n))), ((), ())))
  return flat.reshape(rest + flat.shape[1:])


class Dense(nn.Module):
  """A linear map over one or more input axes to one or more output axes.

  `x[..., *in] -> y[..., *features]` with kernel `[*in, *features]`, e.g. a query
  projection `"b t d -> b t h k"` has `features=(heads, head_dim)` and
  `axes=("embed", "heads", "head_dim")`; an output projection `"b t h k -> b t d"` has
  `axis=(-2, -1)`. The initializer sees the flattened `[prod(in), prod(features)]` kernel,
  so fan-in/fan-out are the true ones whatever the factorisation.

  Attributes:
    features: output feature shape.
    axes: logical names of the kernel axes: contracted input axes, then output axes.
    axis: input axes to contract.
  """

  features: int | Sequence[int]
  axes: Sequence[str | None]
  axis: int | Sequence[int] = -1
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    in_shape = tuple(x.shape[a] for a in axis)
    if len(self.axes) != len(in_shape) + len(features):
      raise ValueError(
          f"{self.name}: `axes` {tuple(self.axes)} must name {len(in_shape)} input and "
          f"{len(features)} output axes of a kernel of shape {in_shape + features}.")

    def init(key, shape, dtype):
      flat = (math.prod(in_shape), math.prod(features))
      return jnp.reshape(self.kernel_init(key, flat, dtype), shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                        in_shape + features, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), tuple(self.axes[len(in_shape):])),
                        features, self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = contract(x, kernel, axis)  # the remaining x axes first, then the features
    if bias is not None:
      y = y + bias
    return y
