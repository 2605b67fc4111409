"""Recipes' tasks: how a config becomes a model, its init inputs and its loss.

A task module provides:
  MODEL_CONFIG: the dataclass `config.model` describes (checked field by field)
  check_config(config) -> [problem, ...]: what its config needs beyond each field's own
    type and range (`mmjax.config.validate` checks those, then calls this)
  build_model(config) -> flax module
  init_inputs(config) -> (args, kwargs) of one dummy forward pass for `model.init`
  loss_terms(model, params, batch, rng) -> (loss_sum, count, terms): see `mmjax.losses`;
    `rng` is a key drawn per step and micro-batch (fixed in evaluation), `terms` a dict
    of scalars (each loss of a multi-objective task) logged beside the loss.
and optionally
  MODEL: the module class `build_model` builds (dual encoders: `mmjax.evaluate.zeroshot`
    builds their towers from `MODEL(config)` alone)
  loss_terms(..., *, model_state, train) -> (loss_sum, count, terms, model_state): the
    signature of a model with non-parameter collections (BatchNorm's `batch_stats`): the
    trainer passes them (`train=False` in evaluation) and carries the returned ones.
  initial_params(params, loaded) -> params: the fresh parameters (pretrained backbones
    grafted; `loaded` holds the paths they filled) as training starts from them.
  project_params(config, trainable) -> trainable: applied inside the train step after
    every optimizer update (CLIP's logit-scale clamp).
The trainer picks the module named by `config.task`.
"""

import dataclasses
import importlib
from types import ModuleType

from mmjax.cli import UserError
from mmjax.models.common import config_from_dict

TASKS = ("lm", "clip", "flamingo", "blip2", "coop", "medclip", "llava", "mmbcd", "vqvae",
         "segment")


def get_task(name: str) -> ModuleType:
  if name not in TASKS:
    raise UserError(f"Unknown task {name!r}; expected one of {TASKS}.")
  return importlib.import_module(f"mmjax.tasks.{name}")


def data_fits_model(config, mode: str, text: str = "", vision: str = "") -> list[str]:
  """Problems every recipe's data config can have against its model: sequences of
  another `mode` than the task trains on, images of another size than the vision tower
  `config.model.<vision>` takes, sequences longer than the learned positions of the text
  model `config.model.<text>` ("" for `config.model` itself; dotted for a nested one,
  e.g. "clip.text")."""
  found, data = [], config.data

  def sub_model(name):  # "clip.vision": config.model.clip.vision
    node = config.model
    for part in name.split(".") if name else ():
      node = node[part]
    return node

  if data.get("mode", mode) != mode:
    found.append(f"config.data.mode={data.mode!r}: the {config.task} task trains on "
                 f"{mode!r} sequences")
  if vision and data.get("image_size") != sub_model(vision).image_size:
    found.append(f"config.data.image_size={data.get('image_size')} differs from "
                 f"config.model.{vision}.image_size={sub_model(vision).image_size}")
  model = sub_model(text)
  name = f"config.model.{text}" if text else "config.model"
  if (model.get("position", "learned") == "learned"
      and data.seq_len > model.get("max_len", 1024)):
    found.append(f"config.data.seq_len={data.seq_len} exceeds the learned positions' "
                 f"{name}.max_len={model.get('max_len', 1024)}")
  return found


def model_config(cls, config):
  """`config.model` as the dataclass `cls`, with the recipe-wide settings applied to it
  and to every nested sub-model config:

  `compute_dtype="bfloat16"` is mixed precision: every sub-model computes in bf16 while
  its parameters (the optimizer's master weights) stay in their `param_dtype`, float32 by
  default; losses upcast logits to float32.
  `remat="full"` (or another `mmjax.layers.REMAT_POLICIES` name) rematerialises every
  layer of every sub-model.
  `scan_layers=True` runs every layer stack as one scanned layer (`mmjax.layers.scan`).
  `attention_impl` ("xla" or "cudnn") picks every attention's kernel
  (`jax.nn.dot_product_attention`); unset, XLA chooses.
  """
  model = config_from_dict(cls, config.model.to_dict())
  overrides = {"dtype": config.get("compute_dtype"), "remat": config.get("remat"),
               "scan_layers": config.get("scan_layers"),
               "attention_impl": config.get("attention_impl")}
  return with_fields(model, **{k: v for k, v in overrides.items() if v is not None})


def with_fields(model_config, **values):
  """`model_config` with the fields `values` set on it and on each nested config that
  has them."""
  changes = {}
  for field in dataclasses.fields(model_config):
    value = getattr(model_config, field.name)
    if field.name in values:
      changes[field.name] = values[field.name]
    elif dataclasses.is_dataclass(value):
      changes[field.name] = with_fields(value, **values)
  return dataclasses.replace(model_config, **changes)
