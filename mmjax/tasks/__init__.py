"""Recipes' tasks: how a config becomes a model, its init inputs and its loss.

A task module provides:
  build_model(config) -> flax module
  init_inputs(config) -> (args, kwargs) of one dummy forward pass for `model.init`
  loss_terms(model, params, batch) -> (loss_sum, count, metrics): see `mmjax.losses`.
The trainer picks the module named by `config.task`.
"""

import importlib
from types import ModuleType

TASKS = ("lm", "clip", "flamingo")


def get_task(name: str) -> ModuleType:
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; expected one of {TASKS}.")
  return importlib.import_module(f"mmjax.tasks.{name}")
