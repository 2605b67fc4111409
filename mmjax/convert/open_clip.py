"""open_clip / OpenAI CLIP weights (a state dict or OpenAI's TorchScript `.pt`): the vision
tower (`visual.*`) alone, or the whole dual encoder as a `TwoTowers`, renamed to the
Hugging Face CLIP layout that `clip.vit_params` and `clip.clip_params` read.

open_clip stores no config: the shapes give it, with 64-wide attention heads (every
open_clip ViT and text tower) and LayerNorm epsilon 1e-5. The activation is not in the
weights: "quick_gelu" for OpenAI's weights (and open_clip's `-quickgelu` models), "gelu"
for the others (LAION's).
"""

import math
import pathlib

import numpy as np

from mmjax.convert import clip, common
from mmjax.models.lm import LMConfig
from mmjax.models.two_towers import TwoTowers, TwoTowersConfig
from mmjax.models.vit import ViTConfig

IGNORED_TENSORS = {
    r"visual\.proj": "projects the pooled embedding; the vision tower's users (Flamingo) "
                     "read patch tokens",
}
MODEL_IGNORED_TENSORS = {
    r"input_resolution|context_length|vocab_size": "sizes stored as tensors in OpenAI's "
                                                   "TorchScript archives; the shapes say them",
}
ACTIVATIONS = ("quick_gelu", "gelu")
HEAD_WIDTH = 64
# open_clip's module names -> Hugging Face CLIP's.
_RENAMES = {"conv1": "embeddings.patch_embedding", "ln_pre": "pre_layrnorm",
            "ln_post": "post_layernorm", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
            "attn.out_proj": "self_attn.out_proj", "token_embedding": "embeddings.token_embedding",
            "ln_final": "final_layer_norm"}


def _hf_names(tower: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One tower's `<module>.<weight|bias>` tensors (`transformer.resblocks.<i>.*` and its
  LayerNorms, embeddings) under Hugging Face CLIP's names; `attn.in_proj_*` split into
  q, k and v. A name this does not know is kept, and so refused unconsumed by the reader."""
  hf = {}
  for key, value in tower.items():
    block, _, name = key.rpartition(".")  # `name` is weight or bias
    prefix = ""
    if block.startswith("transformer.resblocks."):
      i, block = block.split(".", 3)[2:]
      prefix = f"encoder.layers.{i}."
    if block == "attn" and name.startswith("in_proj_"):
      hf.update(clip.split_in_proj(f"{prefix}self_attn.{name}", value))
    else:
      hf[f"{prefix}{_RENAMES.get(block, block)}.{name}"] = value
  return hf


def _check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise common.ConversionError(f"activation={activation!r} is not an open_clip tower's; "
                                 "supported: 'quick_gelu' (OpenAI), 'gelu' (LAION).")


def _depth(tower: dict[str, np.ndarray]) -> int:
  return len({k.split(".")[2] for k in tower if k.startswith("transformer.resblocks.")})


def open_clip_vision(state: dict[str, np.ndarray], activation: str = "quick_gelu",
                     projection: bool = False) -> tuple[ViTConfig, dict[str, np.ndarray]]:
  """The ViT config and an HF-layout (`CLIPVisionModel`) state dict of an open_clip (or
  OpenAI CLIP) state dict's `visual.*` tower. Patch tokens are returned before `ln_post`
  (`token_norm=False`): open_clip <= 2.22 did so, and OpenFlamingo was trained with it.

  Without `projection`, `visual.proj` is dropped (`IGNORED_TENSORS`) and the pooled
  embedding is not projected; with it, it is the result's top-level
  `visual_projection.weight` and the config's `output_dim`. Every other `visual.*` tensor
  is renamed; one this does not know keeps its name and is refused, unconsumed, by the
  reader of the result.
  """
  visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
  if "conv1.weight" not in visual:
    raise common.ConversionError("No open_clip vision tower (visual.conv1.weight) in the "
                                 "state dict.")
  _check_activation(activation)
  width, channels, patch, _ = visual["conv1.weight"].shape
  grid = math.isqrt(visual["positional_embedding"].shape[0] - 1)
  proj = visual.pop("proj", None)
  if projection and proj is None:
    raise common.ConversionError("The open_clip vision tower has no projection "
                                 "(visual.proj), which the whole model needs.")
  cfg = ViTConfig(image_size=grid * patch, patch_size=patch, width=width,
                  depth=_depth(visual), num_heads=width // HEAD_WIDTH, activation=activation,
                  channels=channels,
                  mlp_dim=visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  output_dim=proj.shape[1] if projection else None, token_norm=False)
  hf = {"embeddings.class_embedding": visual.pop("class_embedding"),
        "embeddings.position_embedding.weight": visual.pop("positional_embedding"),
        **_hf_names(visual)}
  if projection:
    hf["visual_projection.weight"] = proj.T  # open_clip: x @ proj; torch Linear: x @ W.T
  return cfg, hf


def open_clip_model(state: dict[str, np.ndarray], activation: str = "gelu"
                    ) -> tuple[TwoTowersConfig, dict]:
  """`(TwoTowersConfig, parameters)` of an open_clip `CLIP` (or OpenAI CLIP) state dict:
  `visual.*`, the text tower's `token_embedding`, `positional_embedding`,
  `transformer.resblocks.*`, `ln_final`, `text_projection`, and `logit_scale` (and
  `logit_bias`, SigLIP-trained models: the config then has the sigmoid loss).

  The text tower is causal and pooled at the highest token id (open_clip's
  `pool_type="argmax"`: the EOT of OpenAI's tokenizer is its largest id), as open_clip
  builds it by default; configs that change that (`CustomTextCLIP`'s `text.*` towers, a
  text projection with a bias, layer scales) are refused as unknown tensors."""
  import jax.numpy as jnp
  _check_activation(activation)
  if "token_embedding.weight" not in state:
    raise common.ConversionError(
        "No open_clip CLIP text tower (token_embedding.weight) in the state dict; "
        "CustomTextCLIP models (text.*: Hugging Face or timm towers) are not supported.")
  vision, hf_vision = open_clip_vision(state, activation, projection=True)
  rest = {k: v for k, v in state.items() if not k.startswith("visual.")}
  positions = rest.pop("positional_embedding")
  projection = rest.pop("text_projection", None)
  if projection is None:
    raise common.ConversionError(
        "The open_clip text tower has no text_projection matrix; towers without one "
        "(proj_type='none') or with a Linear one (proj_bias=True: text_projection.weight, "
        ".bias) are not supported.")
  text_tower = {k: rest.pop(k) for k in list(rest)
                if k.startswith(("token_embedding.", "transformer.", "ln_final."))}
  vocab, width = text_tower["token_embedding.weight"].shape
  text = LMConfig(vocab_size=vocab, width=width, depth=_depth(text_tower),
                  num_heads=width // HEAD_WIDTH, activation=activation,
                  mlp_dim=text_tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  norm_eps=1e-5, max_len=positions.shape[0])
  sigmoid = dict(loss="sigmoid", init_bias=-10.0, init_temperature=0.1)
  cfg = TwoTowersConfig(vision=vision, text=text, embed_dim=projection.shape[1],
                        text_pool="argmax", **(sigmoid if "logit_bias" in rest else {}))
  projected = "visual_projection.weight"
  hf = {**{"vision_model." + k: v for k, v in hf_vision.items() if k != projected},
        projected: hf_vision[projected],
        **{"text_model." + k: v for k, v in _hf_names(text_tower).items()},
        "text_model.embeddings.position_embedding.weight": positions,
        "text_projection.weight": projection.T,  # x @ projection, as a torch Linear's
        **rest}  # logit_scale, logit_bias; anything else is refused unconsumed
  params = clip.clip_params(hf, cfg, ignored=MODEL_IGNORED_TENSORS)
  size, channels = vision.image_size, vision.channels
  common.check_tree(params, TwoTowers(cfg), jnp.zeros((1, size, size, channels)),
                    jnp.zeros((1, 1), jnp.int32))
  return cfg, params


def convert_open_clip(path: str | pathlib.Path, activation: str = "gelu"
                      ) -> tuple[TwoTowersConfig, dict]:
  """`open_clip_model` of a weights file: an open_clip checkpoint (its `state_dict`, with
  DDP's `module.` prefix or not) or OpenAI's TorchScript `.pt`."""
  state = common.read_state_file(path)
  if isinstance(state.get("state_dict"), dict):  # open_clip's training checkpoints
    state = state["state_dict"]
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return clip.checked(*open_clip_model(state, activation))
