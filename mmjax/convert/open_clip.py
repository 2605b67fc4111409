"""open_clip / OpenAI CLIP weights (`visual.*`, a state dict or OpenAI's TorchScript `.pt`):
the vision tower, in the Hugging Face CLIP layout that `clip.vit_params` reads."""

import math

import numpy as np

from mmjax.convert import common
from mmjax.models.vit import ViTConfig

IGNORED_TENSORS = {
    r"visual\.proj": "projects the pooled embedding; the vision tower's users (Flamingo) "
                     "read patch tokens",
}


def open_clip_vision(state: dict[str, np.ndarray], activation: str = "quick_gelu"
                     ) -> tuple[ViTConfig, dict[str, np.ndarray]]:
  """The ViT config and an HF-layout (`CLIPVisionModel`) state dict of an open_clip (or
  OpenAI CLIP) state dict's `visual.*` tower; open_clip stores no config, so the shapes
  give it (heads are 64 wide, as in every open_clip ViT). `activation` is not in the
  weights: "quick_gelu" for OpenAI's weights (OpenFlamingo's ViT-L-14), "gelu" for
  LAION's. Patch tokens are returned before `ln_post` (`token_norm=False`): open_clip
  <= 2.22 did so, and OpenFlamingo was trained with it.

  Every `visual.*` tensor is renamed (or is `visual.proj`, `IGNORED_TENSORS`); one this
  does not know keeps its name and is refused, unconsumed, by the reader of the result.
  """
  visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
  if "conv1.weight" not in visual:
    raise common.ConversionError("No open_clip vision tower (visual.conv1.weight) in the "
                                 "state dict.")
  if activation not in ("quick_gelu", "gelu"):
    raise common.ConversionError(f"vision_activation={activation!r} is not an open_clip "
                                 "tower's; supported: 'quick_gelu' (OpenAI), 'gelu' (LAION).")
  width, channels, patch, _ = visual["conv1.weight"].shape
  grid = math.isqrt(visual["positional_embedding"].shape[0] - 1)
  depth = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
  cfg = ViTConfig(image_size=grid * patch, patch_size=patch, width=width, depth=depth,
                  num_heads=width // 64, activation=activation, channels=channels,
                  mlp_dim=visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  output_dim=None, token_norm=False)
  renames = {"conv1": "embeddings.patch_embedding", "ln_pre": "pre_layrnorm",
             "ln_post": "post_layernorm", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
  hf = {"embeddings.class_embedding": visual.pop("class_embedding"),
        "embeddings.position_embedding.weight": visual.pop("positional_embedding")}
  visual.pop("proj", None)  # IGNORED_TENSORS
  for key, value in visual.items():
    block, _, name = key.rpartition(".")  # `name` is weight or bias
    prefix = ""
    if block.startswith("transformer.resblocks."):
      i, block = block.split(".", 3)[2:]
      prefix = f"encoder.layers.{i}."
    if block == "attn" and name.startswith("in_proj_"):  # q, k, v stacked on the output dim
      for part, chunk in zip("qkv", np.split(value, 3), strict=True):
        hf[f"{prefix}self_attn.{part}_proj.{name[len('in_proj_'):]}"] = chunk
    else:
      hf[f"{prefix}{renames.get(block, block)}.{name}"] = value
  return cfg, hf
