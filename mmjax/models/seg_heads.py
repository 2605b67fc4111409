"""Segmentation heads: a binary mask's logits from a video encoder's latents, or from pixels.

The heads of the VQ-VAE segmentation study (paper section 2.1), adapted to any latent
stride `s = resolution / latent size` (a power of two). Each takes latents
`"b t h w c"` (one clip's worth of a frame repeated over time), folds their time axis
into the channels (`"b t h w c -> b h w (t c)"`) and returns logits `"b (h s) (w s)"`:

  LinearHead     a linear probe: each latent cell maps linearly to its `s x s` block of
                 logits (a 1x1 convolution to `s * s` channels, then depth-to-space).
  ConvHead       the light decoder: a per-position fully connected layer and ReLU, then
                 `ConvDecoder`; with `unet_widths` the heavy one: a `UNetBody` (conv
                 encoder and decoder with skip connections) at the latent's resolution
                 before `ConvDecoder`.
  AttentionHead  multi-head self-attention over the latent positions (learned or
                 sinusoidal positions added first), ReLU, then `ConvDecoder`.
  UNet           the baseline from pixels, no encoder: a `UNetBody` on the image and a
                 1x1 convolution to one logit.

`ConvDecoder` is `log2(s)` stride-2 3x3 transposed convolutions, each with ReLU, then a 3x3
convolution to one logit. No head has BatchNorm: their only state is their parameters.
"""

import math
from collections.abc import Sequence
from typing import Any, Literal

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Attention, Dense, LearnedPositions
from mmjax.layers.conv import Conv
from mmjax.layers.embeddings import sinusoidal_positions_2d
from mmjax.models.resnet import CONV_AXES

Dtype = Any
# Kaiming normal (fan in) for the ReLU convolutions.
CONV_INIT = nn.with_logical_partitioning(nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                                         CONV_AXES)


def fold_time(latents: jax.Array) -> jax.Array:
  """`"b t h w c -> b h w (t c)"`: a clip's latents as one image's channels."""
  if latents.ndim != 5:
    raise ValueError(f"Segmentation heads take latents 'b t h w c', got shape {latents.shape}.")
  return einops.rearrange(latents, "b t h w c -> b h w (t c)")


def upsampling_levels(latent_size: int, size: int) -> int:
  """`log2` of the stride from latents `latent_size` wide to masks `size` wide."""
  stride = size // latent_size
  if stride * latent_size != size or stride & (stride - 1):
    raise ValueError(f"Masks of size {size} are not a power-of-two multiple of latents of "
                     f"size {latent_size}; choose an image size (or the encoder's "
                     "downsampling) so that resolution / latent size is 1, 2, 4, 8, ...")
  return stride.bit_length() - 1


def conv(features: int, kernel: int, name: str, dtype: Dtype | None, param_dtype: Dtype,
           transpose: bool = False, stride: int = 1) -> nn.Module:
  """A same-padded 2D (transposed) convolution with bias, `"b h w c -> b h' w' features"`
  (`flax.linen.Conv`'s / `ConvTranspose`'s arithmetic and parameters, in the stride-1
  forms of `mmjax.layers.conv`)."""
  return Conv(features, (kernel, kernel), (stride, stride), "SAME", transpose=transpose,
              kernel_init=CONV_INIT, dtype=dtype, param_dtype=param_dtype, name=name)


class ConvDecoder(nn.Module):
  """`"b h w c -> b (h 2^levels) (w 2^levels)"` logits: `levels` stride-2 3x3 transposed
  convolutions (`up_{i}`, widths `widths[i]`, the last repeated), each followed by ReLU,
  then a 3x3 convolution to one logit (`out`)."""

  levels: int
  widths: Sequence[int] = (128, 32)
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.levels):
      width = self.widths[min(i, len(self.widths) - 1)]
      x = nn.relu(conv(width, 3, f"up_{i}", self.dtype, self.param_dtype, transpose=True,
                       stride=2)(x))
    return conv(1, 3, "out", self.dtype, self.param_dtype)(x)[..., 0]


class UNetBody(nn.Module):
  """Ronneberger et al.'s UNet without its output layer, `"b h w c -> b h w widths[0]"`
  (h and w divisible by `2^(len(widths) - 1)`): at each level two 3x3 convolutions with
  ReLU (`down_{i}_{0,1}`), then a 2x2 max pool; back up, a stride-2 2x2 transposed
  convolution (`up_{i}`), the skip connection of the same level concatenated, and two 3x3
  convolutions with ReLU (`up_{i}_{0,1}`)."""

  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def _block(self, x, width, name):
    for j in range(2):
      x = nn.relu(conv(width, 3, f"{name}_{j}", self.dtype, self.param_dtype)(x))
    return x

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    levels = len(self.widths)
    factor = 2 ** (levels - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"{self.name}: a {levels}-level UNet needs a height and width "
                       f"divisible by {factor}, got {x.shape[1]}x{x.shape[2]}; use fewer "
                       "levels or a larger input.")
    skips = []
    for i, width in enumerate(self.widths):
      x = self._block(x, width, f"down_{i}")
      if i < levels - 1:
        skips.append(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
    for i in reversed(range(levels - 1)):
      x = conv(self.widths[i], 2, f"up_{i}", self.dtype, self.param_dtype, transpose=True,
               stride=2)(x)
      x = self._block(jnp.concatenate([skips[i], x], axis=-1), self.widths[i], f"up_{i}")
    return x


class LinearHead(nn.Module):
  """The linear probe: `latents "b t h w c"` -> logits `"b (h s) (w s)"`, each latent cell's
  `s x s` block a linear map of its channels (`linear`: a 1x1 convolution to `s * s`
  channels, then depth-to-space)."""

  size: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    x = fold_time(latents)
    s = 2 ** upsampling_levels(x.shape[1], self.size)
    x = Dense(s * s, ("embed", None), use_bias=True, dtype=self.dtype,
              param_dtype=self.param_dtype, name="linear")(x)
    return einops.rearrange(x, "b h w (s1 s2) -> b (h s1) (w s2)", s1=s, s2=s)


class ConvHead(nn.Module):
  """The light decoder: `latents "b t h w c"` -> logits `"b H W"`: a per-position fully
  connected layer (`fc`, to `width` channels; None: the folded latent's) and ReLU, then
  `ConvDecoder` (`decoder`) up to `size`. With `unet_widths` the heavy decoder: a
  `UNetBody` (`unet`, those widths per level) at the latent's resolution between them."""

  size: int
  width: int | None = None
  decoder_widths: Sequence[int] = (128, 32)
  unet_widths: Sequence[int] = ()
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    x = fold_time(latents)
    levels = upsampling_levels(x.shape[1], self.size)
    x = nn.relu(Dense(self.width or x.shape[-1], ("embed", "mlp"), use_bias=True,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x))
    if self.unet_widths:
      x = UNetBody(tuple(self.unet_widths), self.dtype, self.param_dtype, name="unet")(x)
    return ConvDecoder(levels, tuple(self.decoder_widths), self.dtype, self.param_dtype,
                       name="decoder")(x)


class AttentionHead(nn.Module):
  """Self-attention then the light decoder: `latents "b t h w c"` -> logits `"b H W"`.

  The latent positions (`h * w` tokens of the folded channels `d = t c`) get positions
  added (`positions`: "learned", a table `"(h w) d"`, or "sinusoidal",
  `sinusoidal_positions_2d`), then `num_heads`-head self-attention (`attention`, q/k/v
  and output projections with bias, head width `ceil(d / num_heads)`, output width `d`),
  ReLU, and `ConvDecoder` (`decoder`) up to `size`. As in the paper, the attention has no
  residual connection around it.
  """

  size: int
  num_heads: int = 8
  positions: Literal["learned", "sinusoidal"] = "learned"
  decoder_widths: Sequence[int] = (128, 32)
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    x = fold_time(latents)
    _, h, w, d = x.shape
    levels = upsampling_levels(h, self.size)
    tokens = einops.rearrange(x, "b h w d -> b (h w) d")
    if self.positions == "learned":
      pos = LearnedPositions(h * w, d, self.param_dtype, name="positions")(
          jnp.arange(h * w)[None])
    elif self.positions == "sinusoidal":
      usable = d - d % 4  # the channels past a multiple of 4 get no position
      pos = jnp.pad(sinusoidal_positions_2d(h, w, usable), ((0, 0), (0, d - usable)))[None]
    else:
      raise ValueError(f"{self.name}: positions must be 'learned' or 'sinusoidal', got "
                       f"{self.positions!r}.")
    tokens = tokens + pos.astype(tokens.dtype)
    tokens = Attention(self.num_heads, math.ceil(d / self.num_heads), out_features=d,
                       use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="attention")(tokens)
    x = nn.relu(einops.rearrange(tokens, "b (h w) d -> b h w d", h=h, w=w))
    return ConvDecoder(levels, tuple(self.decoder_widths), self.dtype, self.param_dtype,
                       name="decoder")(x)


class UNet(nn.Module):
  """The baseline from pixels: `images "b h w c"` (float) -> logits `"b h w"`: a
  `UNetBody` (`unet`) and a 1x1 convolution to one logit (`out`)."""

  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = UNetBody(tuple(self.widths), self.dtype, self.param_dtype, name="unet")(images)
    return conv(1, 1, "out", self.dtype, self.param_dtype)(x)[..., 0]
