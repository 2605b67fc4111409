"""LLaVA, as mmjax's `Llava` (`task: "llava"`), from either layout:

Hugging Face's (`model_type: llava`, LlavaForConditionalGeneration, the llava-hf/*
checkpoints): `vision_config` (a CLIP vision tower), `text_config` (LLaMA or Mistral), the
two-layer GELU projector `multi_modal_projector.linear_{1,2}` (mmjax's "mlp2x_gelu") and
`image_token_index`, the id whose positions read image features (the `config.image_tokens`
copies LlavaProcessor expands each `<image>` to). Tensors are read under transformers 4's
names (`vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.weight`; transformers 5's `save_pretrained` writes these too, its
vision tower without `vision_model.`) and transformers 5's in-memory ones (`model.`-prefixed,
`model.language_model.*`, `lm_head.weight`). Fields that transformers 4 left out of the
configs it wrote (those at their defaults) take its config classes' defaults.

The original layout (haotian-liu/LLaVA's `llava-v1.5-*`, `model_type: llava`, `llava_llama`
or `llava_mistral`): a LLaMA (or Mistral) causal-LM directory whose config adds `mm_*`
fields and whose weights add `model.mm_projector.*` (`.weight`/`.bias` for "linear",
`.0`, `.2`, ... for "mlp<N>x_gelu"); its CLIP vision tower (`mm_vision_tower`) is a
separate Hugging Face CLIP directory (a CLIPModel's or a CLIPVisionModel's), given as
`vision` (a tower the checkpoint holds, `model.vision_tower.vision_tower.*`, is used where
original LLaVA's loader keeps it: `unfreeze_mm_vision_tower`). Original LLaVA marks an
image in `input_ids` with -200, which its model replaces by the image's features; mmjax's
prompts hold `image_tokens` copies of a real id instead. Give that id (`image_token_id`:
a token of the tokenizer that the text never uses), or leave it out and one is appended to
the vocabulary (id = the LM's `vocab_size`): its embedding row and its output row are the
mean of the others, so that the logits of the original vocabulary are unchanged and greedy
decoding never picks it (its logit is the mean of the others). The converted config
records the id as `image_token_id`.

Both layouts: the vision tower reads hidden state `vision_feature_layer`
(`mm_vision_select_layer`; one int, negative counting from the end, as transformers'
`hidden_states`) before CLIP's `post_layernorm`, dropping the class token ("default";
original: "patch") or keeping it ("full"; "cls_patch"). The vision layers after it, and
`post_layernorm` (unless the feature layer is the last, whose pooled output mmjax's ViT
builds), compute nothing LLaVA reads: they are left out of the converted tree, which is
exactly the one `Llava.init` builds. A list of feature layers (features concatenated
across layers) is refused. Pixel statistics come from `preprocessor_config.json`
(`image_mean`, `image_std`) where the directory has one.
"""

import dataclasses
import json
import pathlib
import re
from typing import Any

import numpy as np

from mmjax.convert import clip, common, llama
from mmjax.models.llava import Llava, LlavaConfig, projector_depth
from mmjax.models.vit import ViTConfig

# The model_types of LLaVA configs: Hugging Face's, and the original layout's.
LLAVA_TYPES = ("llava", "llava_llama", "llava_mistral")
HINT = "Check that config.json belongs to these weights."
# Hugging Face layout: where each part's tensors are (transformers 4's names, then 5's).
VISION_PREFIXES = ("vision_tower.vision_model.", "model.vision_tower.vision_model.",
                   "vision_tower.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
# A LlavaForConditionalGeneration's LM tensors -> a LlamaForCausalLM's names.
LM_NAMES = (("language_model.model.", "model."), ("model.language_model.", "model."),
            ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
# Defaults of the fields transformers 4 left out of the configs it wrote (the hub's
# llava-hf/* list only what differs): CLIPVisionConfig's, LlavaConfig's tower when
# `vision_config` is missing altogether, and the text model's config class's.
CLIP_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "image_size": 224, "patch_size": 32}
LLAVA_VISION_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096,
                         "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                         "patch_size": 14}
TEXT_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32,
              "max_position_embeddings": 2048},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "sliding_window": 4096}}
VISION_FIELDS = {
    "vision_config.projection_dim": "the pooled embedding's projection, which LLaVA does "
                                    "not use (it reads a hidden state)",
    "vision_config.dropout": common.DROPOUT, "vision_config.attention_dropout": common.DROPOUT,
    "vision_config.vocab_size": "written into the tower's config by transformers 4's LLaVA "
                                "configs; a vision tower has no vocabulary",
}
IGNORED_FIELDS = {
    "ignore_index": "the label the training loss skips",
    "image_seq_length": "LlavaProcessor's count of image tokens per image; the model's "
                        "follows from the vision config (LlavaConfig.image_tokens)",
    **VISION_FIELDS,
    **{f"text_config.{k}": v for k, v in llama.IGNORED_FIELDS.items()},
}
# Original layout: fields of LLaVA's training and prompt building, none of which changes
# what the weights compute.
_TRAINING = "a training setting of LLaVA's; the weights compute the same function"
_PROMPT = ("how LLaVA's scripts build prompts (mmjax's prompts arrive with the image tokens "
           "already in place); the weights compute the same function")
ORIGINAL_IGNORED_FIELDS = {
    **llama.IGNORED_FIELDS,
    "mm_vision_tower": "names the CLIP the tower came from: the tower is read from the "
                       "directory given as its vision tower (--vision)",
    "use_mm_proj": "always true for a checkpoint with a projector (its tensors are read)",
    "mm_use_im_start_end": _PROMPT, "mm_use_im_patch_token": _PROMPT,
    "tokenizer_model_max_length": _PROMPT, "tokenizer_padding_side": _PROMPT,
    "image_aspect_ratio": "how LLaVA's scripts pad or resize images before the processor "
                          "(read: 'anyres' is refused)",
    **{name: _TRAINING for name in (
        "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "tune_mm_vision_resampler",
        "mm_projector_lr", "mm_vision_tower_lr", "freeze_backbone",
        "mm_resampler_type", "tune_entire_model")},
}
# Fields of a CLIP directory's config (a CLIPModel's or a CLIPVisionModel's) that the
# vision tower does not use.
CLIP_IGNORED_FIELDS = {
    "projection_dim": VISION_FIELDS["vision_config.projection_dim"],
    "logit_scale_init_value": "CLIPModel's contrastive temperature, which LLaVA does not use",
    "text_config": "the text tower, which LLaVA does not use",
    "text_config_dict": "the text tower, which LLaVA does not use",
    "dropout": common.DROPOUT, "attention_dropout": common.DROPOUT, **VISION_FIELDS,
}
CLIP_IGNORED_TENSORS = {
    r"text_model\..*|text_projection\.weight|visual_projection\.weight|logit_scale":
        "a CLIPModel's text tower and projections: LLaVA reads the vision tower's hidden "
        "states only",
}
# The original layout's mm_vision_select_feature -> LlavaConfig.vision_feature_select.
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}


def _config(make, where: str) -> LlavaConfig:
  """`make()`, a `LlavaConfig`, whose refusals become `ConversionError`s naming `where`."""
  try:
    return make()
  except ValueError as e:
    raise common.ConversionError(f"{where}: {e}") from None


def _feature_layer(f: common.Fields, name: str, default: int) -> int:
  value = f.get(name, default)
  if isinstance(value, (list, tuple)):
    raise common.ConversionError(
        f"LLaVA with {f.path}{name}={value!r} (features of several layers, concatenated) is "
        "not supported; mmjax's Llava reads one hidden state: one int.")
  if not isinstance(value, int):
    raise common.ConversionError(f"LLaVA with {f.path}{name}={value!r} is not supported; "
                                 "supported: one int.")
  return value


def _pixel_stats(directory: str | pathlib.Path) -> dict[str, tuple[float, ...]]:
  """`ViTConfig` pixel statistics from a directory's preprocessor_config.json, if any."""
  path = pathlib.Path(directory) / "preprocessor_config.json"
  if not path.is_file():
    return {}
  processor = json.loads(path.read_text())
  if "image_mean" not in processor or "image_std" not in processor:
    return {}
  return {"pixel_mean": tuple(processor["image_mean"]),
          "pixel_std": tuple(processor["image_std"])}


# ---------------------------------------------------------------------------------------
# Parts.
# ---------------------------------------------------------------------------------------
def vision_params(read: common.Reader, cfg: ViTConfig, feature_layer: int
                  ) -> tuple[dict, dict[str, str]]:
  """`(ViT parameters, ignored tensors)` of a CLIP vision tower read relative to
  `read.prefix`: its layers up to `feature_layer` (`post_layernorm` only when that is the
  last). The ignored tensors (regular expressions, for `Reader.finish`) are the layers
  after it, which LLaVA does not run."""
  used = feature_layer % (cfg.depth + 1)
  params = clip.vit_params(read, dataclasses.replace(cfg, depth=used), None)
  if used < cfg.depth:  # (read, so a missing or mis-shaped one is still named)
    del params["post_norm"]
  ignored = {re.escape(read.prefix) + r"embeddings\.position_ids":
             "a buffer of arange(positions)"}
  if used < cfg.depth:
    layers = "|".join(str(i) for i in range(used, cfg.depth))
    ignored[re.escape(read.prefix) + rf"encoder\.layers\.({layers})\..*"] = (
        f"vision layers after the feature layer ({feature_layer}), which LLaVA does not run")
  return params, ignored


def projector_params(read: common.Reader, names: list[str], in_width: int, width: int,
                     bias: bool) -> dict:
  """`Projector` parameters from the torch Linears `names` (in order)."""
  return {f"linear_{i}": common.linear(read, name, (in_width if i == 0 else width,),
                                       (width,), bias=bias)
          for i, name in enumerate(names)}


def check_llava(params: dict, cfg: LlavaConfig) -> None:
  """Refuses `params` unless they are the tree `Llava(cfg).init` builds."""
  import jax.numpy as jnp
  size, channels = cfg.vision.image_size, cfg.vision.channels
  common.check_tree(params, Llava(cfg), jnp.zeros((1, 1, size, size, channels)),
                    jnp.zeros((1, 1), jnp.int32))


# ---------------------------------------------------------------------------------------
# Hugging Face's layout.
# ---------------------------------------------------------------------------------------
def llava_config(hf: dict[str, Any], pixel_stats: dict | None = None) -> LlavaConfig:
  """The `LlavaConfig` of a Hugging Face LlavaConfig, every field read or ignored on
  purpose (`IGNORED_FIELDS`); `pixel_stats`: `ViTConfig.pixel_mean`/`pixel_std`."""
  vision, text = hf.get("vision_config"), hf.get("text_config") or {}
  if isinstance(vision, dict) or vision is None:
    hf = hf | {"vision_config": CLIP_VISION_DEFAULTS | (vision or LLAVA_VISION_DEFAULTS)}
  if isinstance(text, dict):
    hf = hf | {"text_config": TEXT_DEFAULTS.get(text.get("model_type", "llama"), {}) | text}
  f = common.Fields(hf, "LLaVA")
  f.require("model_type", ("llava",))
  v = f.sub("vision_config")
  v.require("model_type", ("clip_vision_model",), "clip_vision_model",
            "the vision tower converts as CLIP's")
  vision = dataclasses.replace(clip.vit_config(v, None), **(pixel_stats or {}))
  t = f.sub("text_config")
  t.require("model_type", ("llama", "mistral"), "llama")
  lm = llama.config(t)
  tie = bool(f.get("tie_word_embeddings", False)) or lm.tie_embeddings  # as transformers
  f.require("vocab_size", (lm.vocab_size,), lm.vocab_size,
            "older transformers wrote text_config.vocab_size here too")
  lm = dataclasses.replace(lm, tie_embeddings=tie)
  f.require("projector_hidden_act", ("gelu",), "gelu",
            "mmjax's projector has erf GELU between its layers")
  pad = f.get("pad_token_id", t.get("pad_token_id", 0))
  image_token_id = f.get("image_token_index", 32000)  # (transformers' default)
  cfg = _config(lambda: LlavaConfig(
      vision=vision, lm=lm, image_token_id=image_token_id, projector="mlp2x_gelu",
      projector_bias=bool(f.get("multimodal_projector_bias", True)),
      vision_feature_layer=_feature_layer(f, "vision_feature_layer", -2),
      vision_feature_select=f.require("vision_feature_select_strategy", ("default", "full"),
                                      "default"),
      pad_token_id=pad), "LLaVA config")
  f.finish(IGNORED_FIELDS)
  return cfg


def llava_params(state: dict[str, np.ndarray], cfg: LlavaConfig) -> dict:
  """mmjax `Llava` parameters from a LlavaForConditionalGeneration's state dict, every
  tensor consumed or ignored on purpose."""
  lm_state, rest = {}, {}
  for key, value in state.items():
    new = next((new + key[len(old):] for old, new in LM_NAMES if key.startswith(old)), None)
    (rest if new is None else lm_state)[new or key] = value
  read = common.Reader(rest)
  read.prefix = next((p for p in VISION_PREFIXES if any(k.startswith(p) for k in rest)),
                     VISION_PREFIXES[0])
  vision, ignored = vision_params(read, cfg.vision, cfg.vision_feature_layer)
  read.prefix = next((p for p in PROJECTOR_PREFIXES if any(k.startswith(p) for k in rest)),
                     PROJECTOR_PREFIXES[0])
  projector = projector_params(read, ["linear_1", "linear_2"], cfg.vision.width, cfg.lm.width,
                               cfg.projector_bias)
  read.finish(ignored, hint=HINT)
  return {"vision": vision, "projector": projector, "lm": llama.params(lm_state, cfg.lm)}


# ---------------------------------------------------------------------------------------
# The original layout.
# ---------------------------------------------------------------------------------------
def clip_vision(directory: str | pathlib.Path) -> tuple[ViTConfig, dict[str, np.ndarray]]:
  """`(ViTConfig, state dict)` of a Hugging Face CLIP directory (a CLIPModel's or a
  CLIPVisionModel's), its config fields read or ignored on purpose."""
  f = common.Fields(common.read_hf_config(directory), "CLIP vision tower")
  f.require("model_type", ("clip", "clip_vision_model"))
  sub = clip.sub_config(f, "vision_config") if "vision_config" in f else f
  cfg = dataclasses.replace(clip.vit_config(sub, None), **_pixel_stats(directory))
  f.finish(CLIP_IGNORED_FIELDS)
  return cfg, common.read_hf_weights(directory)


def original_config(hf: dict[str, Any], vision: ViTConfig, image_token_id: int | None
                    ) -> tuple[LlavaConfig, dict[str, bool]]:
  """`(LlavaConfig, facts)` of an original LLaVA config (its LLaMA or Mistral fields and
  `mm_*`), every field read or ignored on purpose (`ORIGINAL_IGNORED_FIELDS`), with the
  CLIP tower `vision`. `facts`: "appended", the image token is a new last row of the
  vocabulary (no `image_token_id` given); "own_tower", LLaVA's loader keeps a vision tower
  saved in the checkpoint (`unfreeze_mm_vision_tower`) rather than reloading
  `mm_vision_tower`'s."""
  f = common.Fields(hf, "LLaVA (original)")
  f.require("model_type", LLAVA_TYPES)
  lm = llama.config(f)
  f.require("image_aspect_ratio", ("pad", "square", "resize", ""), "square",
            "'anyres' (LLaVA-1.6) adds image crops and newline embeddings mmjax's Llava "
            "does not have")
  f.require("mm_patch_merge_type", ("flat",), "flat",
            "LLaVA-1.6's spatial merging is not")
  f.require("mm_hidden_size", (vision.width,), vision.width,
            "the projector reads the vision tower's hidden states (its width)")
  projector = f.get("mm_projector_type", "linear")  # LLaVA's own default
  try:
    projector_depth(projector)
  except ValueError as e:
    raise common.ConversionError(f"LLaVA with mm_projector_type={projector!r}: {e}") from None
  appended = image_token_id is None
  if appended:
    image_token_id = lm.vocab_size
    lm = dataclasses.replace(lm, vocab_size=lm.vocab_size + 1)
  cfg = _config(lambda: LlavaConfig(
      vision=vision, lm=lm, image_token_id=image_token_id, projector=projector,
      projector_bias=True, vision_feature_layer=_feature_layer(f, "mm_vision_select_layer", -2),
      vision_feature_select=f.choice("mm_vision_select_feature", SELECT_FEATURES, "patch"),
      pad_token_id=f.get("pad_token_id", 0)), "LLaVA (original)")
  facts = {"appended": appended, "own_tower": bool(f.get("unfreeze_mm_vision_tower", False))}
  f.finish(ORIGINAL_IGNORED_FIELDS)
  return cfg, facts


def original_params(state: dict[str, np.ndarray], vision_state: dict[str, np.ndarray],
                    cfg: LlavaConfig, facts: dict[str, bool]) -> dict:
  """mmjax `Llava` parameters from an original LLaVA's state dict (its LM,
  `model.mm_projector.*` and perhaps its vision tower) and its CLIP tower's; `facts` as
  `original_config` gives them. With "appended", the image token's rows (the mean of the
  others) are added to the LM's embedding and output layer.

  A vision tower saved in the checkpoint (`model.vision_tower.vision_tower.*`, from a run
  that trained it) is what the model computes with where LLaVA's loader keeps it ("own_tower":
  `unfreeze_mm_vision_tower`); otherwise its loader replaces it with `mm_vision_tower`'s
  weights, and so does the conversion (the given tower's)."""
  tower = "model.vision_tower.vision_tower."
  saved = {k[len(tower):]: v for k, v in state.items() if k.startswith(tower)}
  state = {k: v for k, v in state.items() if not k.startswith(tower)}
  own = facts["own_tower"] and bool(saved)
  read = common.Reader(saved if own else vision_state, ("vision_model.",))
  vision, ignored = vision_params(read, cfg.vision, cfg.vision_feature_layer)
  read.finish(ignored | CLIP_IGNORED_TENSORS,
              hint=f"Check that {'the checkpoint' if own else 'the vision directory'}'s "
                   "tower is the Hugging Face CLIP of the vision directory's config.")
  prefix = "model.mm_projector"
  read = common.Reader({k: v for k, v in state.items() if k.startswith(prefix + ".")})
  # A Sequential of Linear, GELU, Linear, ...: its Linears are 0, 2, 4, ...
  names = [prefix] if cfg.projector == "linear" else [
      f"{prefix}.{2 * i}" for i in range(projector_depth(cfg.projector))]
  projector = projector_params(read, names, cfg.vision.width, cfg.lm.width, bias=True)
  read.finish(hint=f"Check that mm_projector_type={cfg.projector!r} is its projector.")
  lm_state = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
  lm_cfg, appended = cfg.lm, facts["appended"]
  if appended:
    from mmjax.checkpoints import extend_with_mean
    lm_cfg = dataclasses.replace(lm_cfg, vocab_size=lm_cfg.vocab_size - 1)
  lm = llama.params(lm_state, lm_cfg)
  if appended:
    lm["embed"]["embedding"] = extend_with_mean(lm["embed"]["embedding"], cfg.lm.vocab_size)
    if "lm_head" in lm:
      lm["lm_head"]["kernel"] = extend_with_mean(lm["lm_head"]["kernel"], cfg.lm.vocab_size,
                                                 axis=1)
  return {"vision": vision, "projector": projector, "lm": lm}


# ---------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------
def is_original(hf: dict[str, Any]) -> bool:
  """Whether a config is original LLaVA's (its LM's fields and `mm_*`), not Hugging
  Face's (`vision_config`, `text_config`)."""
  return "text_config" not in hf and any(k.startswith("mm_") for k in hf)


def convert_llava(hf_dir: str | pathlib.Path, vision: str | pathlib.Path | None = None,
                  image_token_id: int | None = None) -> tuple[LlavaConfig, dict]:
  """`(LlavaConfig, parameters)` of a LLaVA directory: Hugging Face's layout, or the
  original layout with its CLIP tower's directory `vision` and the image token
  `image_token_id` (default: appended to the vocabulary; see the module docstring)."""
  hf = common.read_hf_config(hf_dir)
  if is_original(hf):
    if vision is None:
      raise common.ConversionError(
          f"{hf_dir} is an original LLaVA checkpoint (mm_vision_tower="
          f"{hf.get('mm_vision_tower')!r}): give its CLIP vision tower's Hugging Face "
          "directory (--vision).")
    vision_cfg, vision_state = clip_vision(vision)
    cfg, facts = original_config(hf, vision_cfg, image_token_id)
    params = original_params(common.read_hf_weights(hf_dir), vision_state, cfg, facts)
  else:
    if vision is not None or image_token_id is not None:
      raise common.ConversionError(
          f"{hf_dir} is a Hugging Face LLaVA checkpoint: its vision tower and image token "
          "(image_token_index) are its own; give neither a vision tower nor an image token.")
    cfg = llava_config(hf, _pixel_stats(hf_dir))
    params = llava_params(common.read_hf_weights(hf_dir), cfg)
  check_llava(params, cfg)
  return cfg, params
