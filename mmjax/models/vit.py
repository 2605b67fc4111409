"""Vision Transformer in the CLIP layout, and EVA's (BLIP-2's ViT-g) and SigLIP's as options.

Patch embedding (a strided projection without bias), class token, learned positions,
`ln_pre`, pre-norm blocks, and `ln_post` on the class token followed by a projection.
Patch tokens can be read from any layer: Flamingo uses the last, LLaVA the penultimate.

EVA's layout (`EVA_VIT_G`) differs only in options: a patch bias, no `ln_pre`, no key
bias (queries and values have theirs), and its final LayerNorm (BLIP-2's `ln_vision`) on
all tokens, class token included (`keep_class_token=True, token_norm=True`).

SigLIP's layout: no class token (`class_token=False`), a patch bias, no `ln_pre`, `ln_post`
on all tokens, and attention pooling (`pooling="map"`, big_vision's MAP head): a learned
probe query attends over the normed tokens, then a residual MLP after a LayerNorm; the
probe's output is the pooled embedding.

Hugging Face's ViTModel layout (DINO's ViTs, google/vit-*) and the original DINO / timm
one (`DINO_VIT_S8`): a patch bias, no `ln_pre`, exact GELU, and the final LayerNorm on all
tokens, class token included (`token_norm=True, keep_class_token=True`: "tokens" is
ViTModel's `last_hidden_state`), no projection (`output_dim=None`), so that "pooled" is
`last_hidden_state[:, 0]`, the normed class token: DINO's feature. ViTModel's optional
pooler (a dense layer and tanh on it) is not part of the tower. Images are normalised with
ImageNet's statistics.
"""

import dataclasses
from typing import Literal

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Attention, Dense, Mlp, Norm, remat, stack
from mmjax.models.common import dtype as to_dtype


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """CLIP-style ViT.

  Attributes:
    output_dim: width of the pooled, projected embedding; None for no projection.
    token_norm: apply `ln_post` to the returned patch tokens. open_clip >= 2.23 does;
      open_clip <= 2.22 (and so the OpenFlamingo checkpoints) returns them un-normed.
    keep_class_token: return the class token first among the tokens (IDEFICS's
      perceiver reads all of CLIP's last hidden state).
    patch_bias: a bias on the patch embedding (EVA).
    pre_norm: `ln_pre` after the positions are added (CLIP); EVA has none.
    key_bias: the attention's key projection has a bias; EVA's is absent (fixed at zero)
      while its queries and values have theirs.
    post_norm_eps: epsilon of `ln_post`; None: `norm_eps`. (BLIP-2's `ln_vision` has
      torch's default 1e-5 in LAVIS, while Hugging Face's conversion uses the blocks' 1e-6.)
    class_token: a learned class token before the patches (CLIP, EVA); SigLIP has none.
    pooling: what "pooled" is: "class", the class token after `ln_post`; "map", attention
      pooling of all tokens after `ln_post` (SigLIP; `MapHead`).
    pixel_mean, pixel_std: integer images are scaled to [0, 1] and normalised with these
      (CLIP's statistics by default); float images are taken as already normalised.
  """

  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int | None = None
  activation: str = "quick_gelu"
  norm_eps: float = 1e-5
  channels: int = 3
  output_dim: int | None = 768
  token_norm: bool = False
  keep_class_token: bool = False
  patch_bias: bool = False
  pre_norm: bool = True
  key_bias: bool = True
  post_norm_eps: float | None = None
  class_token: bool = True
  pooling: Literal["class", "map"] = "class"
  pixel_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
  pixel_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: Literal["xla", "cudnn"] | None = None
  remat: str = "none"  # policy for each block: mmjax.layers.stack
  scan_layers: bool = False  # one scanned block, parameters stacked under "layers"

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"ViTConfig: image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}.")
    if self.width % self.num_heads:
      raise ValueError(f"ViTConfig: width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if self.pooling not in ("class", "map"):
      raise ValueError(f"ViTConfig: pooling must be 'class' or 'map', got {self.pooling!r}.")
    if not self.class_token and self.pooling == "class":
      raise ValueError("ViTConfig: pooling='class' pools the class token; with "
                       "class_token=False set pooling='map'.")
    if not self.class_token and self.keep_class_token:
      raise ValueError("ViTConfig: keep_class_token=True needs class_token=True.")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    """Tokens returned per image: the patches, and the class token if kept."""
    return self.num_patches + self.keep_class_token

  @property
  def pooled_dim(self) -> int:
    """Width of "pooled": `output_dim`, or the tower's width without a projection."""
    return self.width if self.output_dim is None else self.output_dim


# BLIP-2's EVA ViT-g/14 (LAVIS `eva_vit.py:create_eva_vit_g`: 40 EVA blocks less the last).
EVA_VIT_G = dict(image_size=224, patch_size=14, width=1408, depth=39, num_heads=16,
                 mlp_dim=6144, activation="gelu", norm_eps=1e-6, patch_bias=True,
                 pre_norm=False, key_bias=False)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# DINO's ViT-S/8 (facebookresearch/dino `vit_small`, patch 8: `dino_vits8`; Hugging Face's
# facebook/dino-vits8), MMBCD's region encoder. Its LayerNorms' epsilon is the original's.
DINO_VIT_S8 = dict(image_size=224, patch_size=8, width=384, depth=12, num_heads=6,
                   mlp_dim=1536, activation="gelu", norm_eps=1e-6, output_dim=None,
                   token_norm=True, keep_class_token=True, patch_bias=True, pre_norm=False,
                   pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD)


def normalise_pixels(pixels: jax.Array, config: ViTConfig) -> jax.Array:
  """Pixels in [0, 255] (`"... c"`, integer or float) -> float32 scaled to [0, 1] and
  normalised with the tower's `pixel_mean` and `pixel_std`: what the ViT does to uint8
  images."""
  mean, std = jnp.asarray(config.pixel_mean), jnp.asarray(config.pixel_std)
  return (pixels.astype(jnp.float32) / 255.0 - mean) / std


class EncoderBlock(nn.Module):
  """Pre-norm bidirectional block, `"b n d -> b n d"`."""

  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    x = x + Attention(num_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads,
                      use_bias=True, key_bias=cfg.key_bias, implementation=cfg.attention_impl,
                      name="attn", **kw)(
                          Norm("layernorm", cfg.norm_eps, name="attn_norm", **kw)(x))
    x = x + Mlp(cfg.mlp_dim or 4 * cfg.width, cfg.activation, use_bias=True, name="mlp",
                **kw)(Norm("layernorm", cfg.norm_eps, name="mlp_norm", **kw)(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class MapHead(nn.Module):
  """Multi-head attention pooling, `"b n d -> b d"`: a learned probe attends over the
  tokens, then `x + mlp(norm(x))`."""

  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    probe = self.param("probe", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.width ** -0.5), ("embed",)), (cfg.width,), kw["param_dtype"])
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, cfg.width))
    h = Attention(num_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads, cross=True,
                  use_bias=True, implementation=cfg.attention_impl, name="attn", **kw)(probe, x)
    h = h + Mlp(cfg.mlp_dim or 4 * cfg.width, cfg.activation, use_bias=True, name="mlp",
                **kw)(Norm("layernorm", cfg.norm_eps, name="mlp_norm", **kw)(h))
    return h[:, 0]


class ViT(nn.Module):
  """`images "b h w c" -> {"tokens": "b n d", "pooled": "b e"}`."""

  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array, *, feature_layer: int = -1) -> dict[str, jax.Array]:
    """Encodes images.

    Args:
      images: `"b h w c"`: uint8 pixels, or float pixels already normalised.
      feature_layer: which hidden state the patch tokens come from, counted like Hugging
        Face's `hidden_states`: 0 is the input to the first block, `depth` (or -1) the
        output of the last, -2 the penultimate. Blocks after it are not run, and
        "pooled" is returned only when the last block runs.
    Returns:
      "tokens": `"b n d"` patch tokens (the class token first if `keep_class_token`);
      "pooled": `"b e"`.
    """
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
      raise ValueError(f"ViT expects images 'b h w c' of shape (*, {cfg.image_size}, "
                       f"{cfg.image_size}, {cfg.channels}), got {images.shape}.")
    if jnp.issubdtype(images.dtype, jnp.integer):
      images = normalise_pixels(images, cfg)
    layer = feature_layer % (cfg.depth + 1)
    p = cfg.patch_size
    patches = einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
    x = Dense(cfg.width, ("patch", "embed"), use_bias=cfg.patch_bias, name="patch_embed",
              **kw)(patches)
    if cfg.class_token:
      cls = self.param("cls_token", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.width ** -0.5), ("embed",)), (cfg.width,),
                       kw["param_dtype"])
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.width)), x], axis=1)
    pos = self.param("positions", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.width ** -0.5), ("length", "embed")),
                     (cfg.num_patches + cfg.class_token, cfg.width), kw["param_dtype"])
    x = x + pos.astype(x.dtype)
    if cfg.pre_norm:
      x = Norm("layernorm", cfg.norm_eps, name="pre_norm", **kw)(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    block = remat(EncoderBlock, cfg.remat)
    x = stack(lambda name: block(cfg, name=name), layer, x, scanned=cfg.scan_layers)

    post_eps = cfg.norm_eps if cfg.post_norm_eps is None else cfg.post_norm_eps
    post_norm = Norm("layernorm", post_eps, name="post_norm", **kw)
    tokens = x[:, 1:] if cfg.class_token and not cfg.keep_class_token else x
    out = {"tokens": post_norm(tokens) if cfg.token_norm else tokens}
    if layer == cfg.depth:
      if cfg.pooling == "map":
        pooled = MapHead(cfg, name="map_head")(post_norm(x))
      else:
        pooled = post_norm(x[:, 0])
      if cfg.output_dim is not None:
        pooled = Dense(cfg.output_dim, ("embed", None), name="head", **kw)(pooled)
      out["pooled"] = pooled
    return out
