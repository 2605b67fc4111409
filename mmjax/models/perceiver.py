"""Flamingo's Perceiver Resampler: a variable number of visual tokens -> `num_latents`."""

import dataclasses
from typing import Literal

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Attention, Mlp, Norm, remat, stack
from mmjax.models.common import dtype as to_dtype


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
  """Perceiver Resampler shape and variant.

  The OpenFlamingo layout is the default (GELU feed-forward, no q/k norm). IDEFICS uses
  `activation="relu"` and, optionally, `qk_norm="layernorm"`.

  Attributes:
    max_frames: enables learned per-frame (time) embeddings for video inputs.
  """

  depth: int = 6
  num_heads: int = 8
  head_dim: int = 64
  num_latents: int = 64
  ff_mult: int = 4
  activation: str = "gelu"
  qk_norm: Literal["layernorm", "rmsnorm"] | None = None
  norm_eps: float = 1e-5  # of every LayerNorm, q/k norms included
  max_frames: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: Literal["xla", "cudnn"] | None = None
  remat: str = "none"  # policy for each layer: mmjax.layers.stack
  scan_layers: bool = False  # one scanned layer, parameters stacked under "layers"


class ResamplerLayer(nn.Module):
  """Latents attend to `concat(media, latents)`, then a feed-forward.

  `media "b v d", latents "b n d" -> "b n d"`; media and latents have separate norms.
  """

  config: ResamplerConfig

  @nn.compact
  def __call__(self, media, latents):
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    norm = lambda name: Norm("layernorm", cfg.norm_eps, name=name, **kw)
    normed_latents = norm("latents_norm")(latents)
    context = jnp.concatenate([norm("media_norm")(media), normed_latents], axis=1)
    latents = latents + Attention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, cross=True, qk_norm=cfg.qk_norm,
        qk_norm_eps=cfg.norm_eps,
        implementation=cfg.attention_impl, name="attn", **kw)(normed_latents, context)
    latents = latents + Mlp(cfg.ff_mult * latents.shape[-1], cfg.activation, name="mlp",
                            **kw)(norm("mlp_norm")(latents))
    return nn.with_logical_constraint(latents, ("batch", "latents", "embed"))


class PerceiverResampler(nn.Module):
  """`media "b T F v d" -> "b T n d"`: each image (all its frames together) is resampled
  into `num_latents` tokens."""

  config: ResamplerConfig

  @nn.compact
  def __call__(self, media: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    b, num_media, frames, _, width = media.shape
    if cfg.max_frames is not None:
      if frames > cfg.max_frames:
        raise ValueError(f"PerceiverResampler: {frames} frames per image exceed "
                         f"max_frames={cfg.max_frames}.")
      frame_embed = self.param("frame_embed", nn.with_logical_partitioning(
          nn.initializers.normal(1.0), (None, "embed")), (cfg.max_frames, width),
                               kw["param_dtype"])
      media = media + frame_embed[:frames, None, :].astype(media.dtype)
    x = einops.rearrange(media, "b T F v d -> (b T) (F v) d")
    latents = self.param("latents", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("latents", "embed")), (cfg.num_latents, width),
                         kw["param_dtype"])
    latents = jnp.broadcast_to(latents.astype(x.dtype), (x.shape[0], *latents.shape))
    layer = remat(ResamplerLayer, cfg.remat)
    latents = stack(lambda name: layer(cfg, name=name), cfg.depth, latents,
                    scanned=cfg.scan_layers, call=lambda module, latents: module(x, latents))
    latents = Norm("layernorm", cfg.norm_eps, name="final_norm", **kw)(latents)
    return einops.rearrange(latents, "(b T) n d -> b T n d", b=b)
