"""MMBCD's whole-model checkpoint (the reference's `torch.save(model.state_dict())`, a
`.pt` / `.pth`, its keys prefixed `module.` when saved from `DataParallel`) as an `MMBCD`:
parameters and BatchNorm statistics (`{"batch_stats": ...}`).

Its keys (the reference's `code/model.py`):
  `image_encoder.*`   DINO's ViT-S/8 in the original layout (read by `convert.vit`);
  `img_fc_layer.0.*`  BatchNorm1d(384) -> `vision_bn` (running statistics: batch_stats);
  `img_fc1.*`         Linear(384, e) -> `vision_proj`, saved twice: `img_fc_layer.1.*` is the
                      same module inside the `nn.Sequential` (the two must be equal);
  `text_encoder.roberta.*`  RobertaForSequenceClassification's encoder (`convert.bert`),
                      whose `classifier.*` MMBCD never uses (it reads the last hidden
                      state's `<s>`);
  `txt_fc_layer.0.*`, `txt_fc1.*` (and `txt_fc_layer.1.*`)  the same for the text;
  `attention.*`       MultiheadAttention(e, 1 head): `in_proj_*` (queries, keys, values
                      packed) and `out_proj` -> `attn`;
  `model_fc2.*`       Linear(3e, classes) -> `head`.
The weights hold no RoBERTa config (number of heads, activation, epsilon): it comes from
the text model's Hugging Face config (roberta-base's config.json). DINO's heads are 64 wide
(ViT-S: 6), unless `num_heads` says otherwise.
"""

import dataclasses
import pathlib
import re
from typing import Any

import numpy as np

from mmjax.convert import bert, common, resnet, vit
from mmjax.models.bert import BertConfig
from mmjax.models.mmbcd import MMBCD, MMBCDConfig
from mmjax.models.vit import ViTConfig

MODULE = "module."  # DataParallel's prefix
VISION, TEXT = "image_encoder.", "text_encoder."
# Besides the towers' own (`vit.DINO_IGNORED_TENSORS`, `bert.IGNORED_TENSORS`, which ignores
# the sequence classifier).
IGNORED_TENSORS = {
    r"(img|txt)_fc_layer\.0\.num_batches_tracked": "BatchNorm's step counter, used only with "
                                                   "momentum=None; the reference's is 0.1",
}
# (the Linear's own name, its alias inside the nn.Sequential)
PROJECTIONS = {"vision_proj": ("img_fc1", "img_fc_layer.1"),
               "text_proj": ("txt_fc1", "txt_fc_layer.1")}


def text_config(text: str | pathlib.Path | dict[str, Any] | BertConfig) -> BertConfig:
  """The RoBERTa tower's `BertConfig`: from a Hugging Face directory (its config.json), that
  config as a dict, or a `BertConfig`; without the pooler, which
  RobertaForSequenceClassification does not have."""
  if not isinstance(text, BertConfig):
    text = bert.bert_config(text if isinstance(text, dict) else common.read_hf_config(text))
  return dataclasses.replace(text, pooler=False)


def unwrap(state: dict[str, Any], path: Any = "the state dict") -> dict[str, np.ndarray]:
  """The state dict without `DataParallel`'s `module.` prefix (on every key, or none)."""
  if any(isinstance(v, dict) for v in state.values()):
    raise common.ConversionError(f"{path} holds a dict of state dicts ({sorted(state)[:6]}), "
                                 "not MMBCD's state dict (torch.save(model.state_dict())).")
  if state and all(k.startswith(MODULE) for k in state):
    return {k[len(MODULE):]: v for k, v in state.items()}
  return state


def mmbcd_shapes(state: dict[str, np.ndarray], text: BertConfig,
                 num_heads: int | None = None) -> dict[str, Any]:
  """The fields of the `MMBCDConfig` the state dict (unwrapped) holds: `vision` (from
  `image_encoder.*`), `text`, `embed_dim` and `num_classes` (from the shapes of `img_fc1` and
  `model_fc2`)."""
  for name in ("model_fc2.weight", "attention.in_proj_weight"):
    if name not in state:
      raise common.ConversionError(
          f"Not an MMBCD state dict: no {name} (its keys start with "
          f"{sorted({k.split('.')[0] for k in state})[:8]}).")
  return {"vision": vit.dino_config(state, VISION, num_heads), "text": text,
          "embed_dim": int(state["attention.in_proj_weight"].shape[1]),
          "num_classes": int(state["model_fc2.weight"].shape[0])}


def _projection(read: common.Reader, names: tuple[str, str], width: int, e: int) -> dict:
  """The Linear saved under both `names` (whichever is present read, the other consumed
  only if it equals it)."""
  first, alias = names if names[0] + ".weight" in read else names[::-1]
  out = common.linear(read, first, (width,), (e,), bias=True)
  for kind, value in (("weight", out["kernel"].T), ("bias", out["bias"])):
    read.tied(f"{alias}.{kind}", value, f"{first}.{kind}, the same Linear")
  return out


def mmbcd_params(state: dict[str, np.ndarray], vision: ViTConfig, text: BertConfig,
                 embed_dim: int, num_classes: int) -> tuple[dict, dict]:
  """`(params, {"batch_stats": ...})` of MMBCD's state dict (unwrapped), every tensor
  consumed or ignored on purpose; the shapes as `mmbcd_shapes` says."""
  e = embed_dim
  text_state = {k[len(TEXT):]: v for k, v in state.items() if k.startswith(TEXT)}
  if not text_state:
    raise common.ConversionError(f"Not an MMBCD state dict: no {TEXT}* tensors.")
  params = {"text": bert.bert_params(text_state, text)}  # its classifier ignored there

  read = common.Reader({k: v for k, v in state.items() if not k.startswith(TEXT)})
  read.prefix = VISION
  params["vision"] = vit.dino_params(read, vision)
  read.prefix = ""
  stats = {}
  for tower, bn, width in (("vision", "img_fc_layer.0", vision.width),
                           ("text", "txt_fc_layer.0", text.width)):
    resnet.batch_norm(read, bn, width, params, stats, f"{tower}_bn")
    params[f"{tower}_proj"] = _projection(read, PROJECTIONS[f"{tower}_proj"], width, e)
  params["attn"] = common.packed_qkv(read, "attention.in_proj_weight",
                                     "attention.in_proj_bias", e, 1) | {
      "out": common.linear(read, "attention.out_proj", (1, e), (e,), bias=True)}
  params["head"] = common.linear(read, "model_fc2", (3 * e,), (num_classes,), bias=True)
  read.finish(IGNORED_TENSORS | {re.escape(VISION) + k: why
                                 for k, why in vit.DINO_IGNORED_TENSORS.items()},
              hint="Check that this is MMBCD's checkpoint and the text config roberta-base's "
                   "(or the one it was trained from).")
  return params, {"batch_stats": stats}


def mmbcd_config(state: dict[str, np.ndarray], text: BertConfig,
                 num_heads: int | None = None) -> MMBCDConfig:
  """The `MMBCDConfig` of MMBCD's state dict (unwrapped): its shapes (`mmbcd_shapes`), the
  code's single linear head, and the text's pad id (RoBERTa's: position offset - 1)."""
  pad = {"pad_id": text.position_offset - 1} if text.position_offset else {}
  return MMBCDConfig(**mmbcd_shapes(state, text, num_heads), fusion="attention",
                     head="linear", **pad)


def check_mmbcd(cfg: MMBCDConfig, params: dict, model_state: dict) -> None:
  """Refuses parameters or statistics that are not the trees `MMBCD(cfg).init` builds."""
  import jax.numpy as jnp
  size = cfg.vision.image_size
  args = MMBCD(cfg), jnp.zeros((1, 1, size, size, 3)), jnp.ones((1, 4), jnp.int32)
  common.check_tree(params, *args)
  common.check_tree(model_state["batch_stats"], *args, collection="batch_stats")


def convert_mmbcd(path: str | pathlib.Path,
                  text: str | pathlib.Path | dict[str, Any] | BertConfig,
                  num_heads: int | None = None) -> tuple[MMBCDConfig, dict, dict]:
  """`(MMBCDConfig, params, {"batch_stats": ...})` of MMBCD's checkpoint (`torch.save`'d
  state dict, or a safetensors file of it). `text`: the RoBERTa tower's config (see
  `text_config`); `num_heads`: the ViT's, if its heads are not 64 wide."""
  state = unwrap(common.read_state_file(path), path)
  cfg = mmbcd_config(state, text_config(text), num_heads)
  params, model_state = mmbcd_params(state, cfg.vision, cfg.text, cfg.embed_dim,
                                     cfg.num_classes)
  check_mmbcd(cfg, params, model_state)
  return cfg, params, model_state
