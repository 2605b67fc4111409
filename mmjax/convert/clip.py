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


def vit_config(f: common.Fields | dict[str, Any], projection_dim: int | None,
               activation: str = "quick_gelu", norm_eps: float = 1e-5, **options) -> ViTConfig:
  """The `ViTConfig` of a Hugging Face CLIP-style vision config (`vision_config`);
  `activation` and `norm_eps` are the family's defaults of `hidden_act` and
  `layer_norm_eps`, `options` further `ViTConfig` fields."""
  if not isinstance(f, common.Fields):
    f = common.Fields(f, "CLIP vision tower")
  for name in ("image_size", "patch_size"):
    if not isinstance(f[name], int):
      raise common.ConversionError(f"{f.family} with {f.path}{name}={f[name]!r} is not "
                                   "supported; supported: one int (square images and "
                                   "patches).")
  return ViTConfig(
      image_size=f["image_size"], patch_size=f["patch_size"], width=f["hidden_size"],
      depth=f["num_hidden_layers"], num_heads=f["num_attention_heads"],
      mlp_dim=f["intermediate_size"], activation=common.activation(f, "hidden_act",
                                                                    activation),
      norm_eps=f.get("layer_norm_eps", norm_eps), channels=f.get("num_channels", 3),
      output_dim=projection_dim, **options)


def text_config(t: common.Fields, activation: str = "quick_gelu", norm_eps: float = 1e-5,
                **options) -> LMConfig:
  """The `LMConfig` of a Hugging Face CLIP-style text config (`text_config`); defaults and
  `options` as in `vit_config`."""
  return LMConfig(
      vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
      num_heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
      activation=common.activation(t, "hidden_act", activation),
      norm_eps=t.get("layer_norm_eps", norm_eps), max_len=t["max_position_embeddings"],
      **options)


def split_in_proj(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
  """A torch `MultiheadAttention`'s `<p>in_proj_weight` (or `_bias`), queries, keys and
  values stacked on the output dim, as Hugging Face's `<p>{q,k,v}_proj.weight` (`.bias`)."""
  prefix, _, kind = name.rpartition("in_proj_")
  return {f"{prefix}{part}_proj.{kind}": chunk
          for part, chunk in zip("qkv", np.split(value, 3), strict=True)}


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
  """ViT parameters from `vision_model.*` (read relative to it) and `projection`. The
  class token, `ln_pre` and the attention-pooling `head` (its attention's `in_proj` split
  by `split_in_proj`) are read when `cfg` has them."""
  d, h, m = cfg.width, cfg.num_heads, cfg.mlp_dim or 4 * cfg.width
  params = {
      "patch_embed": patch_embed(read, "embeddings.patch_embedding", cfg),
      "positions": read("embeddings.position_embedding.weight",
                        (cfg.num_patches + cfg.class_token, d)),
      "post_norm": common.norm(read, "post_layernorm", d),
  }
  if cfg.class_token:
    params["cls_token"] = read("embeddings.class_embedding", (d,))
  if cfg.pre_norm:
    params["pre_norm"] = common.norm(read, "pre_layrnorm", d)
  for i in range(cfg.depth):
    params[f"layers_{i}"] = common.linear_layer(
        read, f"encoder.layers.{i}.", ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"), d,
        h, d // h, m)
  if cfg.pooling == "map":
    lin = lambda name, in_shape, out_shape: common.linear(read, "head." + name, in_shape,
                                                          out_shape, bias=True)
    params["map_head"] = {
        "probe": read("head.probe", (1, 1, d)).reshape(d),
        "attn": {name: lin(f"attention.{name[0]}_proj", (d,), (h, d // h))
                 for name in ("query", "key", "value")}
                | {"out": lin("attention.out_proj", (h, d // h), (d,))},
        "mlp_norm": common.norm(read, "head.layernorm", d),
        "mlp": {"up": lin("mlp.fc1", (d,), (m,)), "down": lin("mlp.fc2", (m,), (d,))}}
  if projection:
    prefix, read.prefix = read.prefix, ""
    params["head"] = {"kernel": read(projection, (cfg.output_dim, d)).T}
    read.prefix = prefix
  return params


def text_params(read: common.Reader, text: LMConfig) -> dict:
  """The text tower's `LanguageModel` parameters from `text_model.*` (read relative to
  it), without its projection."""
  d, h = text.width, text.num_heads
  params = {
      "embed": {"embedding": read("embeddings.token_embedding.weight", (text.vocab_size, d))},
      "positions": {"embedding": read("embeddings.position_embedding.weight",
                                      (text.max_len, d))},
      "final_norm": common.norm(read, "final_layer_norm", d)}
  for i in range(text.depth):
    params[f"layers_{i}"] = common.linear_layer(
        read, f"encoder.layers.{i}.", ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"), d,
        h, d // h, text.mlp_dim or 4 * d)
  return params


def clip_config(hf: dict[str, Any]) -> TwoTowersConfig:
  """The `TwoTowersConfig` of a Hugging Face CLIP config, every field read or ignored on
  purpose (`IGNORED_FIELDS`)."""
  f = common.Fields(hf, "CLIP")
  f.require("model_type", ("clip",))
  embed_dim = f.get("projection_dim", 512)
  vision = vit_config(sub_config(f, "vision_config"), embed_dim)
  t = sub_config(f, "text_config")
  text = text_config(t)
  eos = t["eos_token_id"]
  cfg = TwoTowersConfig(vision=vision, text=text, embed_dim=embed_dim,
                        pad_id=t.get("pad_token_id", 0),
                        text_pool="argmax" if eos == LEGACY_EOS_ID else "eos", eos_id=eos)
  f.finish(IGNORED_FIELDS)
  return cfg


def clip_params(state: dict[str, np.ndarray], cfg: TwoTowersConfig,
                text_head: str = "text_projection",
                ignored: dict[str, str] | None = None) -> dict:
  """`TwoTowers` parameters from a state dict in the layout of transformers' CLIPModel
  (`vision_model.*`, `visual_projection` if the vision tower projects, `text_model.*`, the
  text projection `text_head` (with a bias if `cfg.text_head_bias`), `logit_scale`, and
  `logit_bias` if `cfg.init_bias` is set); `ignored` as `IGNORED_TENSORS`."""
  read = common.Reader(state)
  read.prefix = "vision_model."
  image = vit_params(read, cfg.vision,
                     "visual_projection.weight" if cfg.vision.output_dim else None)
  read.prefix = "text_model."
  text = text_params(read, cfg.text)
  read.prefix = ""
  params = {"image": image, "text": text,
            "text_head": common.linear(read, text_head, (cfg.text.width,), (cfg.embed_dim,),
                                       bias=cfg.text_head_bias),
            "log_scale": read("logit_scale").reshape(())}
  if cfg.init_bias is not None:
    params["logit_bias"] = read("logit_bias").reshape(())
  read.finish(IGNORED_TENSORS if ignored is None else ignored)
  return params


def convert_clip(hf_dir: str | pathlib.Path) -> tuple[TwoTowersConfig, dict]:
  """`(TwoTowersConfig, parameters)` of a Hugging Face CLIPModel directory; the vision
  tower alone is `params["image"]` with `config.vision`."""
  cfg = clip_config(common.read_hf_config(hf_dir))
  return checked(cfg, clip_params(common.read_hf_weights(hf_dir), cfg))


def checked(cfg: TwoTowersConfig, params: dict) -> tuple[TwoTowersConfig, dict]:
  """`(cfg, params)` once `params` is exactly the tree `TwoTowers(cfg).init` builds."""
  import jax.numpy as jnp
  size, channels = cfg.vision.image_size, cfg.vision.channels
  common.check_tree(params, TwoTowers(cfg), jnp.zeros((1, size, size, channels)),
                    jnp.zeros((1, 1), jnp.int32))
  return cfg, params
