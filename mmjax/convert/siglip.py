"""SigLIP (`model_type: siglip`): transformers' SiglipModel as a `TwoTowers` (`task:
"clip"`, trained with the sigmoid loss).

Its towers are options of CLIP's (`convert.clip` reads them): the vision tower has no
class token, a patch bias, no `ln_pre`, `post_layernorm` on all tokens and attention
pooling (`head`: a probe, torch's `MultiheadAttention`, a LayerNorm and an MLP) and no
projection; the text tower is bidirectional, pooled at the last position of its
fixed-length rows, and projected by `head`, a Linear with a bias. The logits are
`exp(logit_scale) * image . text + logit_bias` of the L2-normalised embeddings. Images are
normalised with mean 0.5 and std 0.5 per channel, SigLIP's preprocessing.
"""

import pathlib
from typing import Any

import numpy as np

from mmjax.convert import clip, common
from mmjax.models.two_towers import TwoTowersConfig

IGNORED_FIELDS = {f"{tower}_config.attention_dropout": common.DROPOUT
                  for tower in ("text", "vision")}
IGNORED_TENSORS = {
    r"(text|vision)_model\.embeddings\.position_ids": "a buffer of arange(positions)",
}
HEAD_IN_PROJ = "vision_model.head.attention.in_proj_"


def siglip_config(hf: dict[str, Any]) -> TwoTowersConfig:
  """The `TwoTowersConfig` of a Hugging Face SigLIP config, every field read or ignored on
  purpose (`IGNORED_FIELDS`)."""
  f = common.Fields(hf, "SigLIP")
  f.require("model_type", ("siglip",))
  v = f.sub("vision_config", {})
  v.require("vision_use_head", (True,), default=True,
            why="SiglipModel's image embedding is its attention-pooling head's output")
  vision = clip.vit_config(v, None, activation="gelu_tanh", norm_eps=1e-6, patch_bias=True,
                           pre_norm=False, class_token=False, pooling="map", token_norm=True,
                           pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5))
  t = f.sub("text_config", {})
  text = clip.text_config(t, activation="gelu_tanh", norm_eps=1e-6, causal=False)
  embed_dim = t.get("projection_size", text.width)
  if embed_dim != vision.width:
    raise common.ConversionError(
        f"SigLIP with text_config.projection_size={embed_dim} and vision_config.hidden_size="
        f"{vision.width} is not supported: the image embedding is the vision tower's "
        "pooled width, so the text head must project to it.")
  cfg = TwoTowersConfig(vision=vision, text=text, embed_dim=embed_dim,
                        pad_id=t.get("pad_token_id", 1), text_pool="final",
                        text_head_bias=True, loss="sigmoid", init_temperature=0.1,
                        init_bias=-10.0)
  f.finish(IGNORED_FIELDS)
  return cfg


def siglip_params(state: dict[str, np.ndarray], cfg: TwoTowersConfig) -> dict:
  """`TwoTowers` parameters of a SiglipModel state dict."""
  state = dict(state)
  for kind in ("weight", "bias"):  # the pooling head's torch MultiheadAttention
    if HEAD_IN_PROJ + kind in state:
      state.update(clip.split_in_proj(HEAD_IN_PROJ + kind, state.pop(HEAD_IN_PROJ + kind)))
  return clip.clip_params(state, cfg, text_head="text_model.head", ignored=IGNORED_TENSORS)


def convert_siglip(hf_dir: str | pathlib.Path) -> tuple[TwoTowersConfig, dict]:
  """`(TwoTowersConfig, parameters)` of a Hugging Face SiglipModel directory; the vision
  tower alone is `params["image"]` with `config.vision`."""
  cfg = siglip_config(common.read_hf_config(hf_dir))
  return clip.checked(cfg, siglip_params(common.read_hf_weights(hf_dir), cfg))

