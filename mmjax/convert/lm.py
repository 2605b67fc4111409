"""Decoder-only language models: the families `LM_FAMILIES` names (one module each, with
its `config`, `params`, `IGNORED_FIELDS` and `IGNORED_TENSORS`), converted to and exported
from mmjax's `LanguageModel`."""

import pathlib
from types import ModuleType
from typing import Any

import numpy as np

from mmjax.convert import common, gpt2, llama, mpt, opt
from mmjax.models.lm import LanguageModel, LMConfig

LM_FAMILIES: dict[str, ModuleType] = {"gpt2": gpt2, "opt": opt, "llama": llama,
                                      "mistral": llama, "mpt": mpt}
LM_TYPES = tuple(LM_FAMILIES)
NAMES = {"gpt2": "GPT-2", "opt": "OPT", "llama": "LLaMA", "mistral": "Mistral", "mpt": "MPT"}


def _family(hf: dict[str, Any]) -> ModuleType:
  kind = hf.get("model_type")
  if kind not in LM_FAMILIES:
    raise common.ConversionError(f"model_type {kind!r} is not a supported LM; expected one "
                                 f"of {LM_TYPES}.")
  return LM_FAMILIES[kind]


def lm_config(hf: dict[str, Any]) -> LMConfig:
  """The `LMConfig` of a Hugging Face LM config; every field is read or ignored on purpose
  (the family's `IGNORED_FIELDS`), and settings mmjax cannot compute are refused by name."""
  family = _family(hf)
  fields = common.Fields(hf, NAMES[hf["model_type"]])
  cfg = family.config(fields)
  fields.finish(family.IGNORED_FIELDS)
  return cfg


def lm_params(hf: dict[str, Any], state: dict[str, np.ndarray], cfg: LMConfig) -> dict:
  """mmjax `LanguageModel` parameters from a Hugging Face LM state dict, every tensor
  consumed (or ignored on purpose: the family's `IGNORED_TENSORS`)."""
  return _family(hf).params(state, cfg)


def check_lm(params: dict, cfg: LMConfig) -> None:
  """Refuses `params` unless they are the tree `LanguageModel(cfg).init` builds."""
  import jax.numpy as jnp
  common.check_tree(params, LanguageModel(cfg), jnp.zeros((1, 1), jnp.int32))


def convert_lm(hf_dir: str | pathlib.Path) -> tuple[LMConfig, dict]:
  """`(LMConfig, parameters)` of a Hugging Face LM directory."""
  hf = common.read_hf_config(hf_dir)
  cfg = lm_config(hf)
  params = lm_params(hf, common.read_hf_weights(hf_dir), cfg)
  check_lm(params, cfg)
  return cfg, params


def export_lm(params: dict, like: str | pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
  """mmjax LM parameters (e.g. fine-tuned) back in the Hugging Face layout of the model
  directory `like` they were converted from: `(config.json dict, state dict)`.

  Conversion only moves, transposes and reshapes numbers, so it is linear and exporting
  is its transpose (`jax.linear_transpose`): one mapping serves both directions. OPT's
  two unused position rows come back as zeros; a tied output layer is not written (it
  is the embedding).
  """
  import jax

  hf, state = common.read_hf_dir(like)
  cfg = lm_config(hf)
  check_lm(params, cfg)
  recording = _Recording(state)
  lm_params(hf, recording, cfg)  # which entries conversion reads (not buffers, tied heads)
  primal = {k: jax.ShapeDtypeStruct(state[k].shape, np.float32) for k in recording.read}
  (exported,) = jax.linear_transpose(lambda weights: lm_params(hf, weights, cfg), primal)(
      jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params))
  return hf, {k: np.asarray(v) for k, v in exported.items()}


class _Recording(dict):
  """A state dict that remembers which entries were read (`[]`; `get` is not recorded)."""

  def __init__(self, *args):
    super().__init__(*args)
    self.read: set[str] = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)
