"""Feed-forward block: plain (GELU/ReLU) or gated (SwiGLU/GeGLU)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.dense import Dense

Dtype = Any

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),     # torch nn.GELU(); OpenFlamingo
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2 "gelu_new"
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),    # OpenAI CLIP
    "relu": jax.nn.relu,                                      # OPT, IDEFICS resampler
    "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),     # Flamingo (paper)
    "silu": jax.nn.silu,                                      # LLaMA (gated)
}


def activation_fn(name: str):
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.") from None


class Mlp(nn.Module):
  """`"b t d -> b t d"`: `down(act(up(x)))`, or `down(act(gate(x)) * up(x))` when gated.

  `gated=True, activation="silu"` is SwiGLU (LLaMA); `gated=False, activation="gelu"` is
  the GPT-2/CLIP/OpenFlamingo feed-forward.
  """

  hidden_dim: int
  activation: str = "gelu"
  gated: bool = False
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = activation_fn(self.activation)
    dense = lambda features, axes, name: Dense(
        features, axes, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    h = act(dense(self.hidden_dim, ("embed", "mlp"), "up" if not self.gated else "gate")(x))
    if self.gated:
      h = h * dense(self.hidden_dim, ("embed", "mlp"), "up")(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), "down")(h)
