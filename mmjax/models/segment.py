"""Foreground segmentation from a video VQ-VAE's latents (or from pixels: the UNet baseline).

One frame conditions the video encoder: the image is repeated over `frames` time steps,
encoded by the VQ-VAE's `Encoder` (`mmjax.models.vqvae`), and a head
(`mmjax.models.seg_heads`) maps the chosen latent, `"b t' h' w' n"` with its time axis
folded into the channels, to one mask logit per pixel:

  image uint8 "b h w 3" -> repeat "b frames h w 3" -> encoder -> latent -> head -> "b h w"

`latent` picks the encoder's point: "resnet" (after the 3D ResNet's last convolution) or
"attention" (after the axial-attention residual stack). `freeze_encoder` stops the
gradient at the latent and keeps the encoder's BatchNorm in inference mode (its running
statistics used and never updated); unfrozen, the encoder fine-tunes with BatchNorm in
train mode (apply with `mutable=["batch_stats"]`). With `encoder=None` the head is the
UNet from pixels.

Parameters: "encoder" (the VQ-VAE `Encoder`'s subtree, the names of a VQ-VAE run's
`params["encoder"]`, so a pretraining run grafts in with `source="encoder"`) and "head".
"""

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import seg_heads
from mmjax.models.common import dtype as to_dtype
from mmjax.models.vqvae import Encoder, VQVAEConfig, preprocess

HEADS = ("linear", "conv", "heavy", "attention", "unet")


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
  """A segmentation model.

  Attributes:
    encoder: the VQ-VAE whose `Encoder` reads the frame; None for the UNet from pixels.
    latent: "resnet" or "attention" (see the module docstring).
    head: "linear" (linear probe), "conv" (light conv decoder), "heavy" (FC, a UNet at the
      latent's resolution, the light decoder's upsampling), "attention" (self-attention,
      then the light decoder) or "unet" (pixels; needs `encoder=None`).
    freeze_encoder: latents stop_gradient'ed, the encoder's BatchNorm in inference mode.
    frames: the frame is repeated over this many time steps (a multiple of the encoder's
      time downsampling; the encoder's own clip length by default in recipes).
    image_size: the images' (and masks') size; None: the encoder's `resolution` (the UNet,
      without an encoder, needs it).
    fc_width: the "conv" and "heavy" heads' per-position fully connected layer's width;
      None: the folded latent's channels (`t' * n_hiddens`).
    decoder_widths: the light decoder's transposed convolutions' widths, level by level
      (the last repeated for further levels).
    unet_width, unet_levels: the UNet's first level's width (doubling per level) and its
      levels ("unet" at the image's resolution, "heavy" at the latent's).
    num_heads, positions: the "attention" head's heads and positions ("learned" or
      "sinusoidal").
    normalize_latents: each latent position's channels standardised (a LayerNorm
      without parameters) before the head: the conv stack's raw outputs are unnormalised
      and can saturate a freshly initialised head (its sigmoid, then zero gradients).
  """

  encoder: VQVAEConfig | None = None
  latent: Literal["resnet", "attention"] = "resnet"
  head: Literal["linear", "conv", "heavy", "attention", "unet"] = "attention"
  freeze_encoder: bool = True
  frames: int = 16
  image_size: int | None = None
  fc_width: int | None = None
  decoder_widths: tuple[int, ...] = (128, 32)
  unet_width: int = 64
  unet_levels: int = 4
  num_heads: int = 8
  positions: Literal["learned", "sinusoidal"] = "learned"
  normalize_latents: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.head not in HEADS:
      raise ValueError(f"SegmenterConfig: head={self.head!r} is not one of {HEADS}.")
    if self.latent not in ("resnet", "attention"):
      raise ValueError(f"SegmenterConfig: latent={self.latent!r} must be 'resnet' or "
                       "'attention'.")
    if (self.head == "unet") != (self.encoder is None):
      raise ValueError(f"SegmenterConfig: head={self.head!r} with "
                       f"encoder={'None' if self.encoder is None else 'set'}: the 'unet' "
                       "head reads pixels and takes no encoder; every other head reads "
                       "an encoder's latents.")
    if self.encoder is None:
      if self.image_size is None:
        raise ValueError("SegmenterConfig: image_size is needed without an encoder.")
    else:
      if self.image_size not in (None, self.encoder.resolution):
        raise ValueError(f"SegmenterConfig: image_size={self.image_size} differs from "
                         f"encoder.resolution={self.encoder.resolution}; leave it None.")
      if self.frames % self.encoder.downsample[0]:
        raise ValueError(f"SegmenterConfig: frames={self.frames} is not divisible by the "
                         f"encoder's time downsampling {self.encoder.downsample[0]}.")
    if not self.decoder_widths:
      raise ValueError("SegmenterConfig: decoder_widths needs at least one width.")
    object.__setattr__(self, "decoder_widths", tuple(self.decoder_widths))

  @property
  def resolution(self) -> int:
    """The images' (and masks') height and width."""
    return self.image_size if self.encoder is None else self.encoder.resolution

  @property
  def unet_widths(self) -> tuple[int, ...]:
    return tuple(self.unet_width * 2 ** i for i in range(self.unet_levels))


def make_head(cfg: SegmenterConfig, name: str = "head") -> nn.Module:
  """The head `cfg.head` names, with its widths from `cfg`."""
  kw = {"dtype": to_dtype(cfg.dtype), "param_dtype": to_dtype(cfg.param_dtype), "name": name}
  size = cfg.resolution
  if cfg.head == "linear":
    return seg_heads.LinearHead(size, **kw)
  if cfg.head == "conv":
    return seg_heads.ConvHead(size, cfg.fc_width, cfg.decoder_widths, **kw)
  if cfg.head == "heavy":
    return seg_heads.ConvHead(size, cfg.fc_width, cfg.decoder_widths, cfg.unet_widths, **kw)
  if cfg.head == "attention":
    return seg_heads.AttentionHead(size, cfg.num_heads, cfg.positions, cfg.decoder_widths,
                                   **kw)
  return seg_heads.UNet(cfg.unet_widths, **kw)


class Segmenter(nn.Module):
  """`image "b h w 3"` -> mask logits `"b h w"` (float32).

  `loss` carries the task's loss settings (`mmjax.losses.SegmentLoss`); the model itself
  does not read it.
  """

  config: SegmenterConfig
  loss: Any = None

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False) -> jax.Array:
    """Segments images.

    Args:
      image: `"b h w 3"` uint8 pixels, or float pixels already in [-0.5, 0.5].
      train: an unfrozen encoder's BatchNorm uses the batch's statistics and updates its
        running ones (apply with `mutable=["batch_stats"]`).
    """
    cfg = self.config
    size = cfg.resolution
    if image.ndim != 4 or image.shape[1:] != (size, size, 3):
      raise ValueError(f"Segmenter expects images 'b {size} {size} 3', got shape "
                       f"{image.shape}; resize them to the model's resolution.")
    if cfg.encoder is None:
      logits = make_head(cfg)(preprocess(image).astype(to_dtype(cfg.dtype)))
      return logits.astype(jnp.float32)
    video = jnp.repeat(image[:, None], cfg.frames, axis=1)  # "b frames h w 3"
    latents = Encoder(cfg.encoder, name="encoder")(
        video, train=train and not cfg.freeze_encoder)[cfg.latent]
    if cfg.freeze_encoder:
      latents = jax.lax.stop_gradient(latents)
    if cfg.normalize_latents:
      latents = nn.LayerNorm(use_bias=False, use_scale=False, name="latent_norm")(
          latents.astype(jnp.float32)).astype(latents.dtype)
    return make_head(cfg)(latents).astype(jnp.float32)
