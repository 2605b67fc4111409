"""BLIP-2 (`model_type: blip-2`), from Hugging Face's Blip2 classes.

The vision tower (`vision_model.*`, or a `Blip2VisionModel` directory) is EVA's ViT-g in
mmjax's `ViT` with EVA's options (`mmjax.models.vit.EVA_VIT_G`): a patch bias, no
`ln_pre`, no key bias, and `post_layernorm` (LAVIS's `ln_vision`) on all tokens, class
token first. Hugging Face fuses q, k and v into one `qkv` Linear whose bias is laid out
`[q_bias, k_bias, v_bias]`; LAVIS has no key bias (it is fixed at zero), and neither has
the ViT, so a checkpoint whose key bias is not zero is refused by name.

Hugging Face computes `post_layernorm` with the blocks' `layer_norm_eps` (1e-6), which the
conversion keeps, so that the converted tower computes what transformers computes; LAVIS's
`ln_vision` used torch's default 1e-5 (set `ViTConfig.post_norm_eps` to follow LAVIS).
"""

import pathlib
from typing import Any

import numpy as np

from mmjax.convert import clip, common
from mmjax.models.vit import ViT, ViTConfig

# transformers' Blip2VisionConfig defaults: transformers 4.x wrote only the fields that
# differ from them (the hub's Salesforce/blip2-* configs list almost none).
VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                       num_attention_heads=16, image_size=224, patch_size=14,
                       hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)


def _vision_ignored(prefix: str) -> dict[str, str]:
  return {f"{prefix}attention_dropout": common.DROPOUT, f"{prefix}dropout": common.DROPOUT,
          f"{prefix}projection_dim": "written by older transformers; no vision projection "
                                     "exists in BLIP-2 (the Q-Former reads the tokens)"}


VISION_IGNORED_FIELDS = _vision_ignored("")


def _square(f: common.Fields, name: str) -> int:
  """An int, or a square `[n, n]`, field; refused by name otherwise."""
  value = f.get(name, VISION_DEFAULTS[name])
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise common.ConversionError(f"{f.family} with {f.path}{name}={value!r} is not "
                                   "supported: the ViT takes square images and patches.")
    value = value[0]
  return int(value)


def vision_config(f: common.Fields) -> ViTConfig:
  """The `ViTConfig` of a Hugging Face `Blip2VisionConfig` (`vision_config`): EVA's layout,
  returning all tokens, class token first, after `post_layernorm`, without projection."""
  def d(name):
    return f.get(name, VISION_DEFAULTS[name])

  f.require("num_channels", (3,), 3, "Blip2VisionModel embeds 3-channel images")
  f.get("qkv_bias")  # read by `vision_params`: without it, q and v biases are zeros
  return ViTConfig(
      image_size=_square(f, "image_size"), patch_size=_square(f, "patch_size"),
      width=d("hidden_size"), depth=d("num_hidden_layers"),
      num_heads=d("num_attention_heads"), mlp_dim=d("intermediate_size"),
      activation=common.activation(f, "hidden_act", VISION_DEFAULTS["hidden_act"]),
      norm_eps=d("layer_norm_eps"), output_dim=None, token_norm=True, keep_class_token=True,
      patch_bias=True, pre_norm=False, key_bias=False)


def vision_params(read: common.Reader, cfg: ViTConfig, qkv_bias: bool = True) -> dict:
  """`ViT` parameters from a `Blip2VisionModel`'s tensors (read relative to its prefix,
  e.g. `vision_model.`). `qkv_bias=False` (the config's `qkv_bias`): the checkpoint has
  no q and v biases, and the ViT gets zero ones, which compute the same."""
  d, h, n = cfg.width, cfg.num_heads, cfg.num_patches + 1
  k, m = d // h, cfg.mlp_dim or 4 * d
  params = {
      "patch_embed": clip.patch_embed(read, "embeddings.patch_embedding", cfg),
      "cls_token": read("embeddings.class_embedding", (1, 1, d)).reshape(d),
      "positions": read("embeddings.position_embedding", (1, n, d)).reshape(n, d),
      "post_norm": common.norm(read, "post_layernorm", d)}
  key_biases = []
  for i in range(cfg.depth):
    p = f"encoder.layers.{i}."
    weight = read(p + "self_attn.qkv.weight", (3 * d, d))  # torch Linear: q, k, v rows
    bias = read(p + "self_attn.qkv.bias", (3 * d,)) if qkv_bias else np.zeros(3 * d, np.float32)
    if np.any(bias[d:2 * d]):
      key_biases.append(f"{read.prefix}{p}self_attn.qkv.bias")
    query, _, value = (common.dense(weight[j * d:(j + 1) * d].T, bias[j * d:(j + 1) * d],
                                    (d,), (h, k)) for j in range(3))

    def lin(name, in_shape, out_shape, p=p):
      return common.linear(read, p + name, in_shape, out_shape, bias=True)

    params[f"layers_{i}"] = {
        "attn_norm": common.norm(read, p + "layer_norm1", d),
        "attn": {"query": query, "key": common.dense(weight[d:2 * d].T, None, (d,), (h, k)),
                 "value": value, "out": lin("self_attn.projection", (h, k), (d,))},
        "mlp_norm": common.norm(read, p + "layer_norm2", d),
        "mlp": {"up": lin("mlp.fc1", (d,), (m,)), "down": lin("mlp.fc2", (m,), (d,))}}
  if key_biases:
    raise common.ConversionError(
        f"The key part (elements {d}:{2 * d}) of {key_biases} is not zero: BLIP-2's ViT (EVA) "
        "has no key bias, and neither has mmjax's (ViTConfig.key_bias=False), so these "
        "weights cannot be converted exactly.")
  return params


def check_vision(params: dict, cfg: ViTConfig) -> None:
  """Refuses `params` unless they are the tree `ViT(cfg).init` builds."""
  import jax.numpy as jnp
  common.check_tree(params, ViT(cfg), jnp.zeros((1, cfg.image_size, cfg.image_size,
                                                 cfg.channels)))


def convert_blip2_vision(hf_dir: str | pathlib.Path) -> tuple[ViTConfig, dict[str, Any]]:
  """`(ViTConfig, parameters)` of a Hugging Face `Blip2VisionModel` directory
  (`model_type: blip_2_vision_model`)."""
  hf = common.read_hf_config(hf_dir)
  f = common.Fields(hf, "BLIP-2 vision tower")
  f.require("model_type", ("blip_2_vision_model",))
  cfg = vision_config(f)
  f.finish(VISION_IGNORED_FIELDS)
  read = common.Reader(common.read_hf_weights(hf_dir), ("vision_model.", ""))
  params = vision_params(read, cfg, f.get("qkv_bias", VISION_DEFAULTS["qkv_bias"]))
  read.finish()
  check_vision(params, cfg)
  return cfg, params
