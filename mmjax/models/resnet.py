"""ResNet in torchvision's layout (channels last): ResNet-18/34 (basic blocks), ResNet-50/
101/152 (bottleneck blocks, the stride on the 3x3 convolution: torchvision's "v1.5").

A 7x7 stride-2 stem convolution, BatchNorm, ReLU and a 3x3 stride-2 max pool; four stages of
blocks (`depths`) of widths `width * (1, 2, 4, 8)` (times 4 after a bottleneck's expansion),
the first block of stages 2-4 halving the resolution, with a 1x1 projection (`downsample`)
where the shape changes; a global average pool. "pooled" is that pool, optionally projected
by a bias-free Linear (`output_dim`: MedCLIP's replacement of `fc`) or classified by
torchvision's `fc` (`num_classes`).

BatchNorm computes torch's function exactly: the batch's biased variance normalises, its
unbiased variance enters the running average, and the running statistics (collection
"batch_stats": `mean`, `var`) move by `bn_momentum` (torch's convention: the new batch's
weight). Under `jit` on a sharded batch the statistics are the global batch's (synchronised
BatchNorm), since the means reduce over the whole logical array.
"""

import dataclasses
from collections.abc import Callable
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Dense
from mmjax.models.common import dtype as to_dtype

# The stages' depths of torchvision's models, by name.
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
          152: (3, 8, 36, 3)}
# Conv kernels `"kh kw in out"`: input channels over `embed` (sharded by the fsdp presets;
# a dimension the mesh does not divide, like the stem's 3 channels, stays replicated).
CONV_AXES = (None, None, "embed", "mlp")
# A convolution's input `"b h w c"`: the batch split, the channels whole. Under
# `fsdp_tensor` the channels a BatchNorm (or a previous convolution) left split over `tensor`
# would otherwise meet kernel input channels split over `fsdp` while the batch is split over
# `data x fsdp`: XLA's SPMD partitioner (jax/jaxlib 0.10.2) then pairs the wrong batch rows
# in the input gradient and returns wrong gradients (tests/test_resnet.py checks). The
# forward pass gathers the channels for the convolution anyway, so this costs nothing.
CONV_INPUT_AXES = ("batch", None, None, None)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """torchvision's ResNet (defaults: ResNet-50 with no head).

  Attributes:
    depths: blocks per stage.
    width: the stem's channels, and the first stage's blocks' inner width.
    block: "bottleneck" (1x1, 3x3, 1x1, expansion 4: ResNet-50 and deeper) or "basic" (two
      3x3: ResNet-18/34).
    output_dim: a bias-free Linear from the pooled features to this width (MedCLIP's `fc`);
      None: no projection.
    num_classes: torchvision's classifier `fc` (with bias) to this many logits; None: none.
    frozen_bn: BatchNorm always uses (and never updates) its running statistics.
    bn_momentum, bn_eps: BatchNorm's, in torch's convention (the weight of a new batch).
    zero_init_residual: the last BatchNorm of each block starts with scale 0, so each block
      starts as the identity (torchvision's option).
    pixel_mean, pixel_std: integer images are scaled to [0, 1] and normalised with these
      (ImageNet's statistics by default); float images are taken as already normalised.
  """

  depths: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  block: Literal["bottleneck", "basic"] = "bottleneck"
  image_size: int = 224
  output_dim: int | None = None
  num_classes: int | None = None
  frozen_bn: bool = False
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  zero_init_residual: bool = False
  pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
  pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.block not in ("bottleneck", "basic"):
      raise ValueError(f"ResNetConfig: block must be 'bottleneck' or 'basic', got "
                       f"{self.block!r}.")
    if not self.depths or any(d < 1 for d in self.depths):
      raise ValueError(f"ResNetConfig: depths={self.depths} must be one or more positive "
                       "block counts.")
    if self.output_dim is not None and self.num_classes is not None:
      raise ValueError("ResNetConfig: set at most one of output_dim (a bias-free "
                       "projection) and num_classes (torchvision's classifier).")
    if not 0 <= self.bn_momentum <= 1:
      raise ValueError(f"ResNetConfig: bn_momentum={self.bn_momentum} must be in [0, 1] "
                       "(torch's convention: the weight of the new batch).")

  @property
  def expansion(self) -> int:
    return 4 if self.block == "bottleneck" else 1

  @property
  def feature_dim(self) -> int:
    """Channels of the last stage ("features"), before any head."""
    return self.width * 2 ** (len(self.depths) - 1) * self.expansion

  @property
  def pooled_dim(self) -> int:
    """Width of "pooled": `output_dim`, `num_classes`, or the features' without a head."""
    return self.output_dim or self.num_classes or self.feature_dim


class BatchNorm(nn.Module):
  """torch's BatchNorm over the last axis (BatchNorm2d of `"b h w c"`, BatchNorm1d of
  `"n c"`): the statistics reduce over every other axis. Parameters `scale`, `bias`;
  running statistics `mean`, `var` in "batch_stats" (updated when not
  `use_running_average` and not initialising).

  `mask` (the shape of `x` less its last axis, True for real rows) leaves padding rows out
  of the batch statistics (MMBCD's padded regions); without it every row counts, as in
  torch."""

  momentum: float = 0.1
  epsilon: float = 1e-5
  zero_scale: bool = False
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool,
               mask: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    init = nn.initializers.zeros_init() if self.zero_scale else nn.initializers.ones_init()
    scale = self.param("scale", nn.with_logical_partitioning(init, ("mlp",)), (c,),
                       self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("mlp",)), (c,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      if mask is None:
        n = x.size // c
        mean = jnp.mean(xf, axis=axes)
        var = jnp.mean(jnp.square(xf - mean), axis=axes)
      else:
        weight = mask.astype(jnp.float32)[..., None]
        n = jnp.maximum(jnp.sum(weight), 1.0)
        mean = jnp.sum(xf * weight, axis=axes) / n
        var = jnp.sum(jnp.square(xf - mean) * weight, axis=axes) / n
      if not self.is_initializing():
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
    y = x.astype(jnp.float32) * mul + (bias.astype(jnp.float32) - mean * mul)
    return y.astype(self.dtype or x.dtype)


class Block(nn.Module):
  """One residual block, `"b h w c -> b h/s w/s f"`: bottleneck (`conv1` 1x1, `conv2` 3x3
  with the stride, `conv3` 1x1 to `4 * planes`) or basic (`conv1` 3x3 with the stride,
  `conv2` 3x3), each followed by its `bn<i>`; `downsample` (`conv`, `bn`) projects the
  shortcut where the shape changes."""

  config: ResNetConfig
  planes: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    kw = {"dtype": to_dtype(cfg.dtype), "param_dtype": to_dtype(cfg.param_dtype)}
    frozen = not train or cfg.frozen_bn
    if cfg.block == "bottleneck":
      convs = ((1, 1, self.planes), (3, self.stride, self.planes),
               (1, 1, self.planes * cfg.expansion))
    else:
      convs = ((3, self.stride, self.planes), (3, 1, self.planes))
    out_channels = convs[-1][2]
    h = x
    for i, (k, s, f) in enumerate(convs, 1):
      h = conv(f, k, s, f"conv{i}", kw)(h)
      h = BatchNorm(cfg.bn_momentum, cfg.bn_eps, zero_scale=(
          cfg.zero_init_residual and i == len(convs)), name=f"bn{i}", **kw)(h, frozen)
      if i < len(convs):
        h = nn.relu(h)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_channels:
      shortcut = conv(out_channels, 1, self.stride, "downsample_conv", kw)(x)
      shortcut = BatchNorm(cfg.bn_momentum, cfg.bn_eps, name="downsample_bn", **kw)(
          shortcut, frozen)
    return nn.relu(h + shortcut)


def conv(features: int, kernel: int, stride: int, name: str,
         kw: dict) -> Callable[[jax.Array], jax.Array]:
  """A bias-free torch-padded (`kernel // 2`) convolution, initialised like torchvision's
  (Kaiming normal, fan out, for ReLU), of an input constrained to `CONV_INPUT_AXES`."""
  pad = kernel // 2
  layer = nn.Conv(features, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)),
                  use_bias=False, kernel_init=nn.with_logical_partitioning(
                      nn.initializers.variance_scaling(2.0, "fan_out", "normal"), CONV_AXES),
                  name=name, **kw)
  return lambda x: layer(nn.with_logical_constraint(x, CONV_INPUT_AXES))


# torch's default Linear initialisation: uniform within 1 / sqrt(fan_in).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class ResNet(nn.Module):
  """`images "b h w c" -> {"pooled": "b d", "features": "b h' w' f"}`."""

  config: ResNetConfig

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """Encodes images.

    Args:
      images: `"b h w c"` with 3 channels, or 1 (grey, repeated to 3: MedCLIP); uint8
        pixels, or float pixels already normalised.
      train: BatchNorm normalises with the batch's statistics and updates the running ones
        (apply with `mutable=["batch_stats"]`), unless `config.frozen_bn`.
    Returns:
      "pooled": `"b d"`, the globally average-pooled features, through the head if any;
      "features": `"b h' w' f"`, the last stage's (stride 32).
    """
    cfg = self.config
    kw = {"dtype": to_dtype(cfg.dtype), "param_dtype": to_dtype(cfg.param_dtype)}
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"ResNet expects images 'b h w c' with 1 or 3 channels, got shape "
                       f"{images.shape}.")
    if images.shape[-1] == 1:
      images = jnp.repeat(images, 3, axis=-1)
    if jnp.issubdtype(images.dtype, jnp.integer):
      mean, std = jnp.asarray(cfg.pixel_mean), jnp.asarray(cfg.pixel_std)
      images = (images.astype(jnp.float32) / 255.0 - mean) / std
    frozen = not train or cfg.frozen_bn
    x = conv(cfg.width, 7, 2, "conv1", kw)(images.astype(kw["dtype"]))
    x = nn.relu(BatchNorm(cfg.bn_momentum, cfg.bn_eps, name="bn1", **kw)(x, frozen))
    x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage, depth in enumerate(cfg.depths):
      for i in range(depth):
        x = Block(cfg, cfg.width * 2 ** stage, 2 if stage and not i else 1,
                  name=f"layer{stage + 1}_{i}")(x, train)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
    # The head splits its kernel's input over fsdp too: whole channels, as for the convs.
    pooled = nn.with_logical_constraint(pooled, ("batch", None))
    if cfg.output_dim is not None:
      pooled = Dense(cfg.output_dim, ("embed", None), kernel_init=TORCH_LINEAR_INIT,
                     name="fc", **kw)(pooled)
    elif cfg.num_classes is not None:
      pooled = Dense(cfg.num_classes, ("embed", None), use_bias=True,
                     kernel_init=TORCH_LINEAR_INIT, name="fc", **kw)(pooled)
    return {"pooled": pooled, "features": x}
