"""Shared model plumbing: dtype names in configs, checked dataclass configs."""

import dataclasses
from typing import Any

import jax.numpy as jnp


def dtype(name: str | Any):
  """Config dtypes are strings ("float32", "bfloat16") so configs stay serialisable."""
  return jnp.dtype(name)


def config_from_dict(cls, values: dict[str, Any] | Any):
  """Builds a config dataclass from a (nested) dict, naming any unknown field."""
  if isinstance(values, cls):
    return values
  values = dict(values)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are "
                     f"{sorted(fields)}.")
  return cls(**values)
