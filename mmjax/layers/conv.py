"""Strided and transposed convolutions as stride-1 convolutions: the same arithmetic as
`lax.conv_general_dilated` with strides and `lax.conv_transpose`, channels-last, in any
number of spatial dimensions.

XLA:CPU convolves a stride-dilated input (a transposed convolution's forward pass, a
strided convolution's input gradient) tens of times slower than a plain one. Here a
stride-`s` convolution is a stride-1 convolution of the space-to-depth input (its kernel
regrouped into `s`-blocks), and a transposed convolution is `prod(s)` stride-1
convolutions, one per output phase, interleaved (fused into one convolution over the
union of their taps when the output is narrow, where one narrow convolution per phase is
slow). Neither has a dilated input, forward or backward; GPU and TPU compilers handle
either form.
"""

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Padding = Sequence[tuple[int, int]]


def _plain(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A stride-1, unpadded convolution: `"b *spatial c"`, kernel `"*k c f"`."""
  n = kernel.ndim - 2
  spec = "".join("DHW"[3 - n:]) if n <= 3 else None
  if spec is None:
    raise ValueError(f"Convolutions of {n} spatial dimensions are not supported.")
  return jax.lax.conv_general_dilated(x, kernel, (1,) * n, "VALID",
                                      dimension_numbers=(f"N{spec}C", f"{spec}IO", f"N{spec}C"))


def _pad_to(x: jax.Array, axis: int, start: int, length: int) -> jax.Array:
  """`x[start:start + length]` along `axis`, zeros where that reaches outside `x`."""
  before, after = max(-start, 0), max(start + length - x.shape[axis], 0)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (before, after)
  x = jnp.pad(x, pad)
  return jax.lax.slice_in_dim(x, start + before, start + before + length, axis=axis)


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
         ) -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, strides, padding)` for `x "b *spatial c"` and
  `kernel "*k c f"`, as a stride-1 convolution of the space-to-depth input."""
  n = kernel.ndim - 2
  x = jnp.pad(x, [(0, 0), *padding, (0, 0)])
  if all(s == 1 for s in strides):
    return _plain(x, kernel)
  k, c, f = kernel.shape[:n], kernel.shape[-2], kernel.shape[-1]
  blocks = [-(-kk // s) for kk, s in zip(k, strides)]  # the kernel in s-blocks, rounded up
  outs = [(size - kk) // s + 1 for size, kk, s in zip(x.shape[1:-1], k, strides)]
  for axis, (o, a, s) in enumerate(zip(outs, blocks, strides)):  # whole s-blocks of input
    x = _pad_to(x, axis + 1, 0, (o + a - 1) * s)
  kernel = jnp.pad(kernel, [(0, a * s - kk) for kk, a, s in zip(k, blocks, strides)]
                   + [(0, 0), (0, 0)])
  b = x.shape[0]
  # "b (m1 s1) (m2 s2) .. c" -> "b m1 m2 .. (s1 s2 .. c)"; the kernel likewise
  x = x.reshape(b, *itertools.chain.from_iterable(
      (size // s, s) for size, s in zip(x.shape[1:-1], strides)), c)
  x = x.transpose(0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1)
  x = x.reshape(b, *x.shape[1:n + 1], -1)
  kernel = kernel.reshape(*itertools.chain.from_iterable(zip(blocks, strides)), c, f)
  kernel = kernel.transpose(*range(0, 2 * n, 2), *range(1, 2 * n, 2), 2 * n, 2 * n + 1)
  kernel = kernel.reshape(*blocks, -1, f)
  return _plain(x, kernel)


def _phase_taps(k: int, s: int, lo: int, p: int) -> tuple[list[int], int]:
  """Output phase `p` of a transposed convolution (kernel `k`, stride `s`, padding `lo`
  before the dilated input): the kernel indices `j` it reads, in order, and the input
  offset of the first (input `q + offset + t` for output `s*q + p` and tap `t`)."""
  first = (lo - p) % s
  taps = list(range(first, k, s))
  return taps, (p + first - lo) // s


def conv_transpose(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding,
                   *, transpose_kernel: bool = False, fused_max: int = 64) -> jax.Array:
  """`lax.conv_transpose(x, kernel, strides, padding, transpose_kernel=...)` for
  `x "b *spatial c"` and `kernel "*k c f"` (`"*k f c"` with `transpose_kernel`, flipped as
  lax flips it), whose output length `(L - 1) s + 1 + lo + hi - k + 1` must be a multiple
  of `s` on every axis: one stride-1 convolution per output phase on the taps it reads,
  or, with at most `fused_max` output channels over all phases, one over their union."""
  n = kernel.ndim - 2
  if transpose_kernel:
    kernel = jnp.flip(jnp.swapaxes(kernel, -1, -2), axis=tuple(range(n)))
  k, f, sizes = kernel.shape[:n], kernel.shape[-1], x.shape[1:-1]
  outs = [(size - 1) * s + 1 + lo + hi - kk + 1
          for size, s, (lo, hi), kk in zip(sizes, strides, padding, k)]
  if any(o % s for o, s in zip(outs, strides)):
    raise ValueError(f"conv_transpose: output sizes {outs} are not multiples of the strides "
                     f"{strides}; use lax.conv_transpose.")
  q = [o // s for o, s in zip(outs, strides)]
  phases = list(itertools.product(*(range(s) for s in strides)))
  taps = [[_phase_taps(kk, s, lo, p) for p in range(s)]
          for kk, s, (lo, _) in zip(k, strides, padding)]
  if len(phases) * f <= fused_max:
    # Each axis: the input window every phase's taps fall in, and per (window tap, phase)
    # the kernel index (-1: none).
    windows, index = [], []
    for axis_taps in taps:
      start = min(off for _, off in axis_taps)
      stop = max(off + len(js) for js, off in axis_taps)
      table = np.full((stop - start, len(axis_taps)), -1)
      for p, (js, off) in enumerate(axis_taps):
        table[off - start:off - start + len(js), p] = js
      windows.append(start)
      index.append(table)
    w = kernel
    for axis, table in enumerate(index):  # "*k c f" -> "d1 p1 d2 p2 .. c f", masked
      w = jnp.take(w, np.maximum(table, 0).reshape(-1), axis=2 * axis)
      w = w.reshape(*w.shape[:2 * axis], *table.shape, *w.shape[2 * axis + 1:])
      w = w * (table >= 0).reshape(*table.shape, *(1,) * (w.ndim - 2 * axis - 2))
    w = w.transpose(*range(0, 2 * n, 2), 2 * n, *range(1, 2 * n, 2), 2 * n + 1)
    w = w.reshape(*(len(t) for t in index), kernel.shape[-2], -1)
    for axis, (start, table, length) in enumerate(zip(windows, index, q)):
      x = _pad_to(x, axis + 1, start, length + len(table) - 1)
    y = _plain(x, w)  # "b *q (p1 p2 .. f)"
  else:
    outputs = []
    for phase in phases:
      picked = [taps[axis][p] for axis, p in enumerate(phase)]
      w = kernel[np.ix_(*(js for js, _ in picked))]
      window = x
      for axis, ((js, off), length) in enumerate(zip(picked, q)):
        window = _pad_to(window, axis + 1, off, length + len(js) - 1)
      outputs.append(_plain(window, w))
    y = jnp.stack(outputs, axis=-2)
  b = x.shape[0]
  y = y.reshape(b, *q, *strides, f)  # interleave: "b q1 .. p1 .. f" -> "b (q1 p1) .. f"
  y = y.transpose(0, *itertools.chain.from_iterable((1 + i, 1 + n + i) for i in range(n)),
                  2 * n + 1)
  return y.reshape(b, *outs, f)


def transpose_padding(k: int, s: int, mode: str) -> tuple[int, int]:
  """`lax.conv_transpose`'s padding of the dilated input for "SAME" (output `s` times the
  input) or "VALID"."""
  if mode == "SAME":
    total = k + s - 2
    before = k - 1 if s > k - 1 else -(-total // 2)
  elif mode == "VALID":
    total, before = k + s - 2 + max(k - s, 0), k - 1
  else:
    raise ValueError(f"Unknown padding {mode!r}; expected 'SAME', 'VALID' or pairs.")
  return before, total - before


class Conv(nn.Module):
  """A convolution, or with `transpose` a transposed convolution, channels-last, in the
  stride-1 forms of `conv` and `conv_transpose`: `"b *spatial c -> b *spatial' features"`.
  Params `kernel "*k c features"` (`"*k features c"` with `transpose_kernel`, lax's
  flipped convention: torch's transposed weight permuted) and `bias "features"`, as
  `flax.linen.Conv` / `ConvTranspose` name and shape them. `padding` is "SAME" or one
  `(before, after)` per spatial axis (of the dilated input when transposed, as lax's), or
  "VALID"."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: str | Padding = "SAME"
  transpose: bool = False
  transpose_kernel: bool = False
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = tuple(self.kernel_size)
    strides = tuple(self.strides or (1,) * len(k))
    c = x.shape[-1]
    shape = (*k, self.features, c) if self.transpose_kernel else (*k, c, self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    padding = self.padding
    if self.transpose:
      if isinstance(padding, str):
        padding = [transpose_padding(kk, s, padding) for kk, s in zip(k, strides)]
      y = conv_transpose(x, kernel, strides, padding, transpose_kernel=self.transpose_kernel)
    else:
      if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], k, strides, padding)
      y = conv(x, kernel, strides, padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype
                         ).astype(dtype)
    return y
