"""Vision Transformers in Hugging Face's ViTModel layout (`model_type: vit`: DINO's
facebook/dino-vit*, google/vit-*) and in the original DINO / timm state-dict layout, as
mmjax `ViT`s (`task: "vit"`) in the layout `mmjax.models.vit.DINO_VIT_S8` names: a patch
bias, no `ln_pre`, the final LayerNorm on all tokens, no projection; "tokens" is
ViTModel's `last_hidden_state`, "pooled" its class token.

Hugging Face: a ViTModel, or a ViTForImageClassification whose encoder is under `vit.`
(its classifier is not part of the tower). ViTModel's optional pooler (a dense layer and
tanh on the class token) is left out on purpose: DINO's features, and MMBCD's, are the
normed class token itself. Images are normalised with the directory's
preprocessor_config.json's `image_mean` / `image_std` where it has one (google/vit-*: 0.5),
ImageNet's statistics otherwise (DINO's).

DINO / timm (`convert_dino(state, prefix)`): `cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}` (queries, keys and values
packed in `qkv`), `norm`; LayerNorm epsilon 1e-6, exact GELU, 64-wide heads (every DINO
ViT's). The shapes come from the tensors; the number of heads, which they do not hold,
from that convention unless given. `prefix` selects a tower inside a larger state dict
(MMBCD's `image_encoder.`, DINO's training checkpoints' `teacher` dict's `backbone.`).
"""

import dataclasses
import json
import math
import pathlib
import re
from typing import Any

import numpy as np

from mmjax.convert import bert, clip, common
from mmjax.models.vit import DINO_VIT_S8, IMAGENET_MEAN, IMAGENET_STD, ViT, ViTConfig

IGNORED_FIELDS = {
    "hidden_dropout_prob": common.DROPOUT, "attention_probs_dropout_prob": common.DROPOUT,
    "encoder_stride": "ViTForMaskedImageModeling's decoder: not part of the encoder",
    "pooler_output_size": "ViTModel's pooler, which is not converted",
    "pooler_act": "ViTModel's pooler, which is not converted",
}
IGNORED_TENSORS = {
    r"(vit\.)?pooler\..*": "ViTModel's pooler (dense and tanh on the class token): DINO's "
                           "features are the normed class token itself, mmjax's \"pooled\"",
    r"classifier\..*": "ViTForImageClassification's head: not part of the encoder",
    r"(vit\.)?embeddings\.mask_token": "replaces masked patches only in masked image "
                                       "modelling (bool_masked_pos)",
}
# Relative to the tower's prefix.
DINO_IGNORED_TENSORS = {
    r"head\..*": "a classifier (timm's) or DINO's training head: not part of the encoder",
}
# The ViTConfig fields that say where the layout differs from CLIP's (besides no projection).
LAYOUT = {k: DINO_VIT_S8[k] for k in ("token_norm", "keep_class_token", "patch_bias",
                                       "pre_norm")}
DINO_HEAD_DIM = 64


def vit_config(hf: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> ViTConfig:
  """The `ViTConfig` of a Hugging Face ViT config, every field read or ignored on purpose
  (`IGNORED_FIELDS`); `preprocessor`: its preprocessor_config.json, whose `image_mean` and
  `image_std` (default ImageNet's) normalise the images."""
  f = common.Fields(hf, "ViT")
  f.require("model_type", ("vit",))
  f.require("qkv_bias", (True,), True, "the attention's queries, keys and values have biases")
  preprocessor = preprocessor or {}
  mean = tuple(preprocessor.get("image_mean") or IMAGENET_MEAN)
  std = tuple(preprocessor.get("image_std") or IMAGENET_STD)
  cfg = clip.vit_config(f, None, activation="gelu", norm_eps=1e-12, pixel_mean=mean,
                        pixel_std=std, **LAYOUT)
  f.finish(IGNORED_FIELDS)
  return cfg


def checked(cfg: ViTConfig, params: dict) -> tuple[ViTConfig, dict]:
  """`(cfg, params)` once `params` is exactly the tree `ViT(cfg).init` builds."""
  import jax.numpy as jnp
  common.check_tree(params, ViT(cfg), jnp.zeros((1, cfg.image_size, cfg.image_size,
                                                 cfg.channels)))
  return cfg, params


def _embeddings(read: common.Reader, cfg: ViTConfig, patch: str, cls: str, pos: str
                ) -> dict:
  """The patch embedding (a torch Conv2d `patch`), class token `cls` `[1, 1, d]` and
  positions `pos` `[1, 1 + patches, d]`."""
  d, n = cfg.width, cfg.num_patches + 1
  return {"patch_embed": clip.patch_embed(read, patch, cfg),
          "cls_token": read(cls, (1, 1, cfg.width)).reshape(d),
          "positions": read(pos, (1, n, d)).reshape(n, d)}


def hf_vit_params(read: common.Reader, cfg: ViTConfig) -> dict:
  """`ViT` parameters from a ViTModel state dict (read relative to `read.prefix`)."""
  d, h, m = cfg.width, cfg.num_heads, cfg.mlp_dim or 4 * cfg.width
  params = _embeddings(read, cfg, "embeddings.patch_embeddings.projection",
                       "embeddings.cls_token", "embeddings.position_embeddings")
  params["post_norm"] = common.norm(read, "layernorm", d)
  for i in range(cfg.depth):
    p = f"encoder.layer.{i}."
    params[f"layers_{i}"] = {
        "attn_norm": common.norm(read, p + "layernorm_before", d),
        "attn": bert.attention(read, p + "attention", d, h, inner="attention"),
        "mlp_norm": common.norm(read, p + "layernorm_after", d),
        "mlp": bert.feed_forward(read, p + "intermediate", p + "output", d, m)}
  return params


def convert_vit(hf_dir: str | pathlib.Path) -> tuple[ViTConfig, dict]:
  """`(ViTConfig, parameters)` of a Hugging Face ViTModel or ViTForImageClassification
  directory."""
  hf_dir = pathlib.Path(hf_dir)
  preprocessor = hf_dir / "preprocessor_config.json"
  cfg = vit_config(common.read_hf_config(hf_dir),
                   json.loads(preprocessor.read_text()) if preprocessor.is_file() else None)
  read = common.Reader(common.read_hf_weights(hf_dir), ("vit.",))
  params = hf_vit_params(read, cfg)
  read.finish(IGNORED_TENSORS)
  return checked(cfg, params)


def dino_config(state: dict[str, np.ndarray], prefix: str = "", num_heads: int | None = None
                ) -> ViTConfig:
  """The `ViTConfig` of a DINO / timm ViT state dict's tower under `prefix`, its shapes read
  from the tensors; `num_heads` default: 64-wide heads (DINO's ViT-S/8: 6)."""
  def shape(name: str) -> tuple[int, ...]:
    if prefix + name not in state:
      heads = sorted({k.split(".")[0] for k in state})[:8]
      raise common.ConversionError(
          f"No {prefix}{name}: not a DINO / timm ViT state dict under prefix {prefix!r} (its "
          f"keys start with {heads}).")
    return np.shape(state[prefix + name])
  d, c, p, q = shape("patch_embed.proj.weight")
  tokens = shape("pos_embed")[1]
  side = math.isqrt(tokens - 1)
  if p != q or side * side != tokens - 1:
    raise common.ConversionError(
        f"{prefix}patch_embed.proj.weight {(d, c, p, q)} and {prefix}pos_embed with {tokens} "
        "positions: only square patches and images (a class token and side**2 patches) are "
        "supported.")
  blocks = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
  depth = len({m.group(1) for m in map(blocks.match, state) if m})
  heads = num_heads or d // DINO_HEAD_DIM
  if not heads or d % heads:
    raise common.ConversionError(
        f"A ViT {d} wide cannot have {heads} heads" + (
            "" if num_heads else f" (DINO's {DINO_HEAD_DIM}-wide heads)") + "; give num_heads.")
  return ViTConfig(**DINO_VIT_S8 | dict(
      image_size=side * p, patch_size=p, width=d, depth=depth, num_heads=heads, channels=c,
      mlp_dim=shape("blocks.0.mlp.fc1.weight")[0] if depth else None))


def dino_params(read: common.Reader, cfg: ViTConfig) -> dict:
  """`ViT` parameters from a DINO / timm state dict (read relative to `read.prefix`)."""
  d, h, m = cfg.width, cfg.num_heads, cfg.mlp_dim or 4 * cfg.width
  params = _embeddings(read, cfg, "patch_embed.proj", "cls_token", "pos_embed")
  params["post_norm"] = common.norm(read, "norm", d)
  lin = lambda name, in_shape, out_shape: common.linear(read, name, in_shape, out_shape, True)
  for i in range(cfg.depth):
    p = f"blocks.{i}."
    params[f"layers_{i}"] = {
        "attn_norm": common.norm(read, p + "norm1", d),
        "attn": common.packed_qkv(read, p + "attn.qkv.weight", p + "attn.qkv.bias", d, h)
                | {"out": lin(p + "attn.proj", (h, d // h), (d,))},
        "mlp_norm": common.norm(read, p + "norm2", d),
        "mlp": {"up": lin(p + "mlp.fc1", (d,), (m,)), "down": lin(p + "mlp.fc2", (m,), (d,))}}
  return params


def convert_dino(state: dict[str, np.ndarray], prefix: str = "",
                 num_heads: int | None = None, **options) -> tuple[ViTConfig, dict]:
  """`(ViTConfig, parameters)` of the DINO / timm ViT under `prefix` of a state dict (a
  DINO `.pth`'s, or a larger model's): every tensor under `prefix` consumed or in
  `DINO_IGNORED_TENSORS`. `options`: further `ViTConfig` fields (e.g. `norm_eps`)."""
  cfg = dataclasses.replace(dino_config(state, prefix, num_heads), **options)
  read = common.Reader({k: v for k, v in state.items() if k.startswith(prefix)}, (prefix,))
  params = dino_params(read, cfg)
  read.finish({re.escape(prefix) + k: why for k, why in DINO_IGNORED_TENSORS.items()},
              hint="Check that the state dict holds a DINO / timm ViT under this prefix.")
  return checked(cfg, params)
