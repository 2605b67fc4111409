"""Linear projection whose kernel and bias carry logical axis names."""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


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
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    # dot_general puts the remaining x axes first; contracted axes need not be trailing.
    if bias is not None:
      y = y + bias
    return y
