"""Shared model plumbing: dtype names in configs, checked dataclass configs."""

import dataclasses
from typing import Any, get_args

import jax.numpy as jnp


def dtype(name: str | Any):
  """Config dtypes are strings ("float32", "bfloat16") so configs stay serialisable."""
  return jnp.dtype(name)


def config_from_dict(cls, values: dict[str, Any] | Any):
  """Builds a config dataclass from a (nested) dict, naming any unknown or missing field.

  Fields whose type is itself a config dataclass (or one or None) are built recursively
  from their dicts.
  """
  if isinstance(values, cls):
    return values
  values = dict(values)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are "
                     f"{sorted(fields)}.")
  missing = sorted(name for name, f in fields.items() if name not in values
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING)
  if missing:
    raise ValueError(f"{cls.__name__}: missing field(s) {missing}.")
  for name, value in values.items():
    nested = _config_class(fields[name].type)
    if nested is not None and value is not None and not isinstance(value, nested):
      values[name] = config_from_dict(nested, value)
    elif isinstance(value, list):  # JSON's arrays: configs hold tuples, to stay hashable
      values[name] = _tuples(value)
  return cls(**values)


def _config_class(annotation) -> type | None:
  """The config dataclass a field holds, for `Config` and optional `Config | None` fields."""
  return next((t for t in (annotation, *get_args(annotation))
               if isinstance(t, type) and dataclasses.is_dataclass(t)), None)


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
