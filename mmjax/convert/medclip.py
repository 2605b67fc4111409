"""MedCLIP's released ResNet checkpoint (`pytorch_model.bin`, the state dict of
`MedCLIPModel(vision_cls=MedCLIPVisionModel)`) as a `MedCLIP`.

Its keys: `vision_model.model.*`, a torchvision ResNet-50 whose `fc` is a bias-free
Linear(2048, 512) (read by `convert.resnet`); `text_model.model.*`, a Hugging Face
BertModel (Bio_ClinicalBERT, read by `convert.bert`), whose pooler MedCLIP never uses;
`text_model.projection_head.weight`, a bias-free Linear(768, 512); `logit_scale`, the log of
the logit scale. The weights hold no BERT config (number of heads, activation, epsilon):
it comes from the text model's Hugging Face config (Bio_ClinicalBERT's config.json).

Images are normalised with MedCLIP's single-channel statistics (mean 0.5862785803, std
0.2795008897) for every channel, since MedCLIP repeats its grey images to three channels
after normalising them.
"""

import dataclasses
import pathlib
import re
from typing import Any

import numpy as np

from mmjax.convert import bert, common, resnet
from mmjax.models.bert import BertConfig
from mmjax.models.medclip import MedCLIP, MedCLIPConfig

VISION, TEXT = "vision_model.model.", "text_model.model."
# Besides the towers' own (`resnet.IGNORED_TENSORS`, `bert.IGNORED_TENSORS`).
IGNORED_TENSORS = {
    r"text_model\.model\.pooler\..*": "BertModel's pooler: MedCLIP pools hidden states 1, 2 "
                                      "and the last, never the pooler's output",
}
# MedCLIP's preprocessing (`constants.IMG_MEAN`, `constants.IMG_STD`), one grey channel.
PIXEL_MEAN, PIXEL_STD = 0.5862785803, 0.2795008897
IMAGE_SIZE = 224


def _bert_config(text: str | pathlib.Path | dict[str, Any] | BertConfig) -> BertConfig:
  if isinstance(text, BertConfig):
    config = text
  else:
    config = bert.bert_config(text if isinstance(text, dict) else common.read_hf_config(text))
  return dataclasses.replace(config, pooler=False)


def _strip(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def medclip_params(state: dict[str, np.ndarray], text: BertConfig
                   ) -> tuple[MedCLIPConfig, dict, dict]:
  """`(MedCLIPConfig, params, {"batch_stats": ...})` of MedCLIP's state dict, every tensor
  consumed or in `IGNORED_TENSORS`; `text`: the BERT tower's config."""
  vision_state = _strip(state, VISION)
  if not vision_state:
    raise common.ConversionError(
        f"Not a MedCLIP (ResNet) state dict: no {VISION}* tensors (its keys start with "
        f"{sorted({k.split('.')[0] for k in state})[:8]}). MedCLIP-ViT (Swin) checkpoints "
        "are not supported.")
  vision = resnet.resnet_config(vision_state, image_size=IMAGE_SIZE,
                                pixel_mean=(PIXEL_MEAN,) * 3, pixel_std=(PIXEL_STD,) * 3)
  if vision.output_dim is None:
    raise common.ConversionError(
        f"MedCLIP's ResNet projects with a bias-free {VISION}fc; this state dict has "
        + ("a classifier with a bias" if vision.num_classes else "no fc") + ".")
  cfg = MedCLIPConfig(vision=vision, text=text, embed_dim=vision.output_dim)

  read = common.Reader({k: v for k, v in state.items() if k.startswith(VISION)}, (VISION,))
  image, stats = resnet.resnet_params(read, vision)
  read.finish(resnet.IGNORED_TENSORS, hint="Check that the vision tower is a torchvision "
              "ResNet.")
  ignored = [re.compile(p) for p in IGNORED_TENSORS]
  text_state = _strip({k: v for k, v in state.items()
                       if not any(p.fullmatch(k) for p in ignored)}, TEXT)
  params = {"image": image, "text": bert.bert_params(text_state, text)}
  rest = {k: v for k, v in state.items()
          if not k.startswith((VISION, TEXT))}
  read = common.Reader(rest)
  params["text_head"] = common.linear(read, "text_model.projection_head", (text.width,),
                                      (cfg.embed_dim,))
  params["log_scale"] = np.asarray(read("logit_scale", ()), np.float32)
  read.finish(hint="Check that the text config belongs to these weights.")
  return cfg, params, {"batch_stats": {"image": stats}}


def check_medclip(cfg: MedCLIPConfig, params: dict, model_state: dict) -> None:
  """Refuses parameters or statistics that are not the trees `MedCLIP(cfg).init` builds."""
  import jax.numpy as jnp
  args = MedCLIP(cfg), jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 4), jnp.int32)
  common.check_tree(params, *args)
  common.check_tree(model_state["batch_stats"], *args, collection="batch_stats")


def convert_medclip(path: str | pathlib.Path,
                    text: str | pathlib.Path | dict[str, Any] | BertConfig
                    ) -> tuple[MedCLIPConfig, dict, dict]:
  """`(MedCLIPConfig, params, {"batch_stats": ...})` of MedCLIP's `pytorch_model.bin` (or a
  safetensors file of the same state dict). `text`: the BERT tower's config: a Hugging Face
  model directory with its config.json (Bio_ClinicalBERT's), that config as a dict, or a
  `BertConfig` (its `pooler` is dropped: MedCLIP does not use it)."""
  text_config = _bert_config(text)
  state = common.read_state_file(path)
  if any(isinstance(v, dict) for v in state.values()):
    raise common.ConversionError(f"{path} holds a dict of state dicts ({sorted(state)[:6]}), "
                                 "not MedCLIP's state dict.")
  cfg, params, model_state = medclip_params(state, text_config)
  check_medclip(cfg, params, model_state)
  return cfg, params, model_state
