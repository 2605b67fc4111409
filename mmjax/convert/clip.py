"""CLIP (`model_type: clip`): the dual encoder as `TwoTowers` (`task: "clip"`), its vision
tower alone as a `ViT` (the `image` subtree). The text tower pools where transformers'
CLIPTextTransformer does: at the first `eos_token_id`, or, for the legacy
`eos_token_id=2` of the OpenAI checkpoints' configs, at the highest token id."""

import pathlib
from typing import Any

import numpy as np

from mmjax.convert import common
from mmjax.models.lm import LMConfig
from mmjax.models.two_towers import TwoTowers, TwoTowersConfig
from mmjax.models.vit import ViTConfig

_SUB = {"projection_dim": "the sub-model's own projection width, used by "
                          "CLIP*ModelWithProjection; CLIPModel projects to the top-level "
                          "projection_dim (read)",
        "dropout": common.DROPOUT, "attention_dropout": common.DROPOUT}
IGNORED_FIELDS = {
    "logit_scale_init_value": "initialisation only: the checkpoint's logit_scale is read",
    **{f"{tower}_config.{name}": why for tower in ("text", "vision") for name, why in _SUB.items()},
}
IGNORED_TENSORS = {
    r"(text|vision)_model\.embeddings\.position_ids": "a buffer of arange(positions)",
}
# The first EOS id of transformers' CLIP configs before it pooled at the first EOS.
LEGACY_EOS_ID = 2


def sub_config(f: common.Fields, name: str) -> common.Fields:
  """`text_config` or `vision_config`, with the values of an older config's
  `<name>_dict` taking precedence, as transformers merges them."""
  overrides = f.get(f"{name}_dict")
  if not overrides:
    return f.sub(name, {})
  merged = {**f.get(name, {}), **overrides}
  sub = common.Fields(merged, f.family, f"{name}.", f.root)
  f.root.opened.append(sub)
  return sub


def vit_config(f: common.Fields | dict[str, Any], projection_dim: int | None) -> ViTConfig:
  """The `ViTConfig` of a Hugging Face CLIP vision config (`vision_config`)."""
  if not isinstance(f, common.Fields):
    f = common.Fields(f, "CLIP vision tower")
  return ViTConfig(
      image_size=f["image_size"], patch_size=f["patch_size"], width=f["hidden_size"],
      depth=f["num_hidden_layers"], num_heads=f["num_attention_heads"],
      mlp_dim=f["intermediate_size"], activation=common.activation(f, "hidden_act",
                                                                    "quick_gelu"),
      norm_eps=f.get("layer_norm_eps", 1e-5), channels=f.get("num_channels", 3),
      output_dim=projection_dim)


def patch_embed(read: common.Reader, name: str, cfg: ViTConfig) -> dict:
  """The ViT's `patch_embed` from a torch `Conv2d` `name` (weight `[d, c, p, q]`; its bias
  if `cfg.patch_bias`)."""
  d, p, c = cfg.width, cfg.patch_size, cfg.channels
  # Conv weights [d, c, p, q] -> the (p q c) order of the ViT's flattened patches.
  conv = read(name + ".weight", (d, c, p, p))
  out = {"kernel": conv.transpose(2, 3, 1, 0).reshape(p * p * c, d)}
  if cfg.patch_bias:
    out["bias"] = read(name + ".bias", (d,))
  return out


def vit_params(read: common.Reader, cfg: ViTConfig, projection: str | None) -> dict:
  """ViT parameters from `vision_model.*` (read relative to it) and `projection`."""
  d = cfg.width
  params = {
      "patch_embed": patch_embed(read, "embeddings.patch_embedding", cfg),
      "cls_token": read("embeddings.class_embedding", (d,)),
      "positions": read("embeddings.position_embedding.weight", (cfg.num_patches + 1, d)),
      "pre_norm": common.norm(read, "pre_layrnorm", d),
      "post_norm": common.norm(read, "post_layernorm", d),
  }
  for i in range(cfg.depth):
    params[f"layers_{i}"] = common.linear_layer(
        read, f"encoder.layers.{i}.", ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"), d,
        cfg.num_heads, d // cfg.num_heads, cfg.mlp_dim or 4 * d)
  if projection:
    prefix, read.prefix = read.prefix, ""
    params["head"] = {"kernel": read(projection, (cfg.output_dim, d)).T}
    read.prefix = prefix
  return params


def clip_config(hf: dict[str, Any]) -> TwoTowersConfig:
  """The `TwoTowersConfig` of a Hugging Face CLIP config, every field read or ignored on
  purpose (`IGNORED_FIELDS`)."""
  f = common.Fields(hf, "CLIP")
  f.require("model_type", ("clip",))
  embed_dim = f.get("projection_dim", 512)
  vision = vit_config(sub_config(f, "vision_config"), embed_dim)
  t = sub_config(f, "text_config")
  text = LMConfig(
      vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
      num_heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
      activation=common.activation(t, "hidden_act", "quick_gelu"),
      norm_eps=t.get("layer_norm_eps", 1e-5), max_len=t["max_position_embeddings"])
  eos = t["eos_token_id"]
  cfg = TwoTowersConfig(vision=vision, text=text, embed_dim=embed_dim,
                        pad_id=t.get("pad_token_id", 0),
                        text_pool="argmax" if eos == LEGACY_EOS_ID else "eos", eos_id=eos)
  f.finish(IGNORED_FIELDS)
  return cfg


def clip_params(state: dict[str, np.ndarray], cfg: TwoTowersConfig) -> dict:
  read = common.Reader(state)
  read.prefix = "vision_model."
  image = vit_params(read, cfg.vision, "visual_projection.weight")
  read.prefix = "text_model."
  text, embed_dim = cfg.text, cfg.embed_dim
  d, h = text.width, text.num_heads
  text_params = {
      "embed": {"embedding": read("embeddings.token_embedding.weight", (text.vocab_size, d))},
      "positions": {"embedding": read("embeddings.position_embedding.weight",
                                      (text.max_len, d))},
      "final_norm": common.norm(read, "final_layer_norm", d)}
  for i in range(text.depth):
    text_params[f"layers_{i}"] = common.linear_layer(
        read, f"encoder.layers.{i}.", ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"), d,
        h, d // h, text.mlp_dim)
  read.prefix = ""
  params = {"image": image, "text": text_params,
            "text_head": {"kernel": read("text_projection.weight", (embed_dim, d)).T},
            "log_scale": read("logit_scale").reshape(())}
  read.finish(IGNORED_TENSORS)
  return params


def convert_clip(hf_dir: str | pathlib.Path) -> tuple[TwoTowersConfig, dict]:
  """`(TwoTowersConfig, parameters)` of a Hugging Face CLIPModel directory; the vision
  tower alone is `params["image"]` with `config.vision`."""
  import jax.numpy as jnp
  cfg = clip_config(common.read_hf_config(hf_dir))
  params = clip_params(common.read_hf_weights(hf_dir), cfg)
  size, channels = cfg.vision.image_size, cfg.vision.channels
  common.check_tree(params, TwoTowers(cfg), jnp.zeros((1, size, size, channels)),
                    jnp.zeros((1, 1), jnp.int32))
  return cfg, params
