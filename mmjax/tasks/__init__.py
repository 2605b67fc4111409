"""Recipes' tasks: how a config becomes a model, its init inputs and its loss.

A task module provides:
  build_model(config) -> flax module
  init_inputs(config) -> (args, kwargs) of one dummy forward pass for `model.init`
  loss_terms(model, params, batch) -> (loss_sum, count, metrics): see `mmjax.losses`.
The trainer picks the module named by `config.task`.
"""

import dataclasses
import importlib
from types import ModuleType

from mmjax.models.common import config_from_dict

TASKS = ("lm", "clip", "flamingo")


def get_task(name: str) -> ModuleType:
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; expected one of {TASKS}.")
  return importlib.import_module(f"mmjax.tasks.{name}")


def model_config(cls, config):
  """`config.model` as the dataclass `cls`, computing in `config.compute_dtype` if set.

  `compute_dtype="bfloat16"` is mixed precision: every sub-model computes in bf16 while
  its parameters (the optimizer's master weights) stay in their `param_dtype`, float32 by
  default; losses upcast logits to float32.
  """
  model = config_from_dict(cls, config.model.to_dict())
  compute = config.get("compute_dtype")
  return with_dtype(model, compute) if compute else model


def with_dtype(model_config, dtype: str):
  """`model_config` with `dtype` set on it and on each nested config that has one."""
  changes = {}
  for field in dataclasses.fields(model_config):
    value = getattr(model_config, field.name)
    if field.name == "dtype":
      changes["dtype"] = dtype
    elif dataclasses.is_dataclass(value):
      changes[field.name] = with_dtype(value, dtype)
  return dataclasses.replace(model_config, **changes)
