"""Recipe configs: the `--config` flag, and the check every config passes at start-up.

    python -m mmjax.train --config=configs/flamingo.py --config.train.steps=20 \
        --config.init.lm.workdir=/ckpt/llama --config.data.datasets.pairs.weight=0

`validate(config)` checks a whole recipe config before anything is built: every key is
known (sections here, `config.model` against the fields of the task's model config
dataclass), every value has the right type, enumerated fields hold an allowed value and
numbers lie in their range, and fields agree with each other (the task's
`check_config`). All problems are reported at once in one `cli.UserError`, each naming the
field, its value and what is allowed.

Entries keyed by a name the recipe chooses are mappings, so the command line reaches
them: `config.init.<target>` (pretrained backbones, keyed by the parameter subtree they
fill), `config.data.datasets.<name>` and `config.data.eval_datasets.<name>`. A dataset
with `weight=0` is left out of the mixture. A whole mapping (or one entry) can be
replaced by a Python dict literal, e.g. `--config.data.datasets="{'cc': {'source':
{'kind': 'arrayrecord_pairs', 'paths': '/data/cc-*.array_record', 'image_size': 64}}}"`
or `--config.init="{}"` (no pretrained backbones).

A field the recipe does not list can be set too (`--config.model.lm.head_dim=64`, or a
source's `--config.data.datasets.documents.source.paths=...`): the value is read as a
Python literal, else as a string, and a misspelt name is refused here with the names
allowed.
"""

import dataclasses
import difflib
import importlib.util
import math
import pathlib
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from mmjax import cli, peft, sharding
from mmjax.data import conversation, keywords, sequences
from mmjax.data.regions import RegionSpec
from mmjax.data.tokenizer import make_tokenizer
from mmjax.data.video import VideoSpec
from mmjax.evaluate.prompts import FORMATS
from mmjax.evaluate.zeroshot import template_set_names
from mmjax.layers import REMAT_POLICIES
from mmjax.layers.mlp import ACTIVATIONS
from mmjax.tasks import TASKS, get_task

DTYPES = ("float32", "bfloat16")
NONFINITE = ("abort", "skip")


_FLAGS: list[str] = []  # the names `define_flag` defined


def define_flag(name: str = "config"):
  """The `--config=configs/<recipe>.py[:variant]` flag, with `--config.<field>=value`
  overrides of existing fields and new ones (checked by `validate`)."""
  _FLAGS.append(name)
  return config_flags.DEFINE_config_file(
      name, None, "Recipe config file: configs/<recipe>.py[:variant].", lock_config=False,
      accept_new_attributes=True)


# ---------------------------------------------------------------------------------------
# Field specifications.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Field:
  """One value: its type(s), allowed values, range, and whether it may be absent.
  `check(value)` returns a problem (the text after "field=value ") or None."""

  types: type | tuple[type, ...]
  choices: Collection | None = None
  min: float | None = None
  max: float | None = None
  optional: bool = False
  check: Callable[[Any], str | None] | None = None


@dataclasses.dataclass(frozen=True)
class Section:
  """A mapping with a fixed set of keys."""

  fields: Mapping[str, Any]
  optional: bool = False


@dataclasses.dataclass(frozen=True)
class Named:
  """A mapping from names the recipe chooses (datasets, backbones) to entries."""

  entry: Any
  optional: bool = False


@dataclasses.dataclass(frozen=True)
class Struct:
  """A mapping of the fields of a config dataclass (`check_model`)."""

  cls: type
  optional: bool = False


@dataclasses.dataclass(frozen=True)
class Model:
  """`config.model`: the fields of the task's model config dataclass."""

  optional: bool = False


def _regex(value: str) -> str | None:
  try:
    re.compile(value)
  except re.error as e:
    return f"is not a regular expression ({e})"
  return None


def _sharding(value) -> str | None:
  try:
    sharding.rules(value)
  except (ValueError, TypeError) as e:
    return f"is not a sharding preset or rule list: {str(e).rstrip('.')}"
  return None


def _recipe(value: str) -> str | None:
  try:
    found = not value or importlib.util.find_spec(f"mmjax.configs.{value}") is not None
  except ModuleNotFoundError:
    found = False
  return None if found else "names no recipe module configs/<recipe>.py"


def _shots(value) -> str | None:
  if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
    return "must hold shot counts >= 0"
  return None


def _templates(value: str) -> str | None:
  """"" (the data's own set), a named template set or a file (`mmjax.evaluate.zeroshot`)."""
  if not value or value in template_set_names() or pathlib.Path(value).is_file():
    return None
  return (f"is neither a template set {template_set_names()} nor a file of one template "
          "per line")


def _prompt(value: str) -> str | None:
  return None if not value or value.count("{}") == 1 else \
      "needs exactly one '{}' where the class name goes, e.g. 'a photo of a {}.'"


def _formats(value) -> str | None:
  unknown = sorted(set(value.values()) - set(FORMATS))
  return f"names unknown prompt formats {unknown}; choose from {sorted(FORMATS)}" if unknown \
      else None


def _class_weights(value) -> str | None:
  if isinstance(value, bool):
    return None
  if not value or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                          for w in value) or not sum(value) > 0:
    return "must be True, False or class weights >= 0 (one per label), not all 0"
  return None


INT, FLOAT, STR, BOOL = (int,), (int, float), (str,), (bool,)
SEQUENCE = (tuple, list)

DATASET = Section({
    # `kind` and the keyword arguments of its source class (mmjax.data.pipeline).
    "source": Field(Mapping, check=lambda s: None if "kind" in s else "has no 'kind'"),
    "weight": Field(FLOAT, min=0, optional=True),  # 0: left out of the mixture
    "loss_weight": Field(FLOAT, min=0, optional=True),
    # Class-balanced sampling with replacement (mmjax.data.pipeline.balanced_order): True
    # for equal class weights, or one weight per label.
    "balance": Field((bool, tuple, list), check=_class_weights, optional=True),
})

BACKBONE = Section({
    # configs/<recipe>.py:<variant>, trained once and cached (see mmjax.train).
    "recipe": Field(STR, check=_recipe, optional=True),
    "variant": Field(STR, optional=True),
    # The recipe's train.steps: -1 keeps the recipe's own; 0 skips pretraining, leaving
    # the target as initialised.
    "steps": Field(INT, min=-1, optional=True),
    # A finished run or converted checkpoint to take the parameters from instead.
    "workdir": Field(STR, optional=True),
    # The subtree of the source's parameters to graft ("" for all; "image" for CLIP's).
    "source": Field(STR, optional=True),
    # A regex on the source's '/'-joined parameter paths (within `source`) that the
    # target leaves out on purpose (BLIP-2's stage 2 drops the Q-Former's text parts).
    "drop": Field(STR, check=_regex, optional=True),
})

SCHEMA = Section({
    "task": Field(STR, choices=TASKS),
    "variant": Field(STR, optional=True),
    "seed": Field(INT),
    "mesh": Section({axis: Field(INT, min=-1, optional=True)
                     for axis in ("data", "fsdp", "tensor")}, optional=True),
    "sharding": Field((str, tuple, list), check=_sharding, optional=True),
    "compute_dtype": Field(STR, choices=DTYPES, optional=True),
    "remat": Field(STR, choices=tuple(REMAT_POLICIES), optional=True),
    "scan_layers": Field(BOOL, optional=True),
    "attention_impl": Field((str, type(None)), choices=("xla", "cudnn", None), optional=True),
    "tokenizer": Field(STR, optional=True),
    "model": Model(),
    "trainable": Field(STR, check=_regex),
    # Contrastive recipes: the log logit scale clamped to [0, ln 100] after every step.
    "clamp_logit_scale": Field(BOOL, optional=True),
    "trainable_token_rows": Field(SEQUENCE, optional=True),
    # LoRA and adapters (mmjax.peft); set, they replace `trainable`.
    "peft": Section({"lora": Struct(peft.LoraConfig, optional=True),
                     "adapters": Struct(peft.AdapterConfig, optional=True),
                     "modules_to_save": Field((str, tuple, list), optional=True)},
                    optional=True),
    "init": Named(BACKBONE, optional=True),
    "data": Section({
        "seq_len": Field(INT, min=1),
        "batch_size": Field(INT, min=1),
        "max_images": Field(INT, min=0, optional=True),
        "image_size": Field(INT, min=1, optional=True),
        "mode": Field(STR, choices=sequences.MODES, optional=True),
        # Clips and labelled frames (modes "video", "segment"; mmjax.data.video).
        "video": Struct(VideoSpec, optional=True),
        # MMBCD's detector regions (mmjax.data.regions) and the tf-idf keyword masking of
        # the training texts (mmjax.data.keywords).
        "regions": Struct(RegionSpec, optional=True),
        "keyword_mask": Section({"mode": Field(STR, choices=keywords.MODES),
                                 "top": Field(INT, min=1, optional=True),
                                 "rate": Field(FLOAT, min=0, max=1, optional=True),
                                 "seed": Field(INT, optional=True)}, optional=True),
        # Conversations (LLaVA): their template and system prompt (None: the template's),
        # and the image tokens each <image> expands to (mmjax.data.conversation).
        "template": Field(STR, choices=conversation.TEMPLATES, optional=True),
        "system": Field((str, type(None)), optional=True),
        "image_tokens": Field(INT, min=0, optional=True),
        # LLaVA-1.6 anyres: the tile grid's resolutions, (width, height) pairs; each
        # <image> then expands to its own image's count (mmjax.data.anyres).
        "grid_pinpoints": Field(SEQUENCE, optional=True),
        "datasets": Named(DATASET),
        "eval_datasets": Named(DATASET, optional=True),
    }),
    # Segmentation (the "segment" task): the mask loss and BCE's positive weight.
    "loss": Section({"kind": Field(STR, choices=("dice", "bce", "jaccard")),
                     "pos_weight": Field(FLOAT, min=0, optional=True)}, optional=True),
    "optim": Section({
        "lr": Field(FLOAT, min=0),
        "warmup_steps": Field(INT, min=0),
        "final_lr_fraction": Field(FLOAT, min=0, max=1),
        "b1": Field(FLOAT, min=0, max=1),
        "b2": Field(FLOAT, min=0, max=1),
        "eps": Field(FLOAT, min=0),
        "weight_decay": Field(FLOAT, min=0),
        "decay_pattern": Field(STR, check=_regex),
        "clip_norm": Field(FLOAT, min=0),
        "accum_steps": Field(INT, min=1),
    }),
    "train": Section({
        "steps": Field(INT, min=1),
        "log_every": Field(INT, min=1),
        "eval_every": Field(INT, min=0),  # 0: no held-out loss
        "eval_batches": Field(INT, min=1),
        "checkpoint_every": Field(INT, min=1),
        "keep_checkpoints": Field(INT, min=1),
        "nonfinite": Field(STR, choices=NONFINITE),
        "few_shot_every": Field(INT, min=0, optional=True),  # 0: at the end only
    }),
    "evaluate": Section({  # mmjax.evaluate
        "tasks": Field(SEQUENCE, optional=True),
        "shots": Field(SEQUENCE, check=_shots),
        "episodes": Field(INT, min=-1, check=lambda v: "must be -1 or >= 1" if v == 0 else None),
        "trials": Field(INT, min=1, optional=True),
        "query_set_size": Field(INT, min=-1, optional=True),
        "demos": Field(STR, choices=("random", "rices"), optional=True),
        "rices_tower": Field(STR, optional=True),
        "ways": Field(INT, min=1, max=6, optional=True),
        "batch_size": Field(INT, min=1, optional=True),
        "max_new_tokens": Field(INT, min=1, optional=True),
        "num_beams": Field(INT, min=1, optional=True),  # 1: greedy
        "length_penalty": Field(FLOAT, optional=True),
        "data_dir": Field(STR, optional=True),
        # {task: a name in mmjax.evaluate.prompts.FORMATS}: its prompt format
        "formats": Field(Mapping, check=_formats, optional=True),
        # Contrastive (CLIP) runs' zero-shot classifier: a template set or file ("": the
        # data's own), or one template (the single-prompt classifier, replacing the set).
        "templates": Field(STR, check=_templates, optional=True),
        "prompt": Field(STR, check=_prompt, optional=True),
        # MedCLIP's classifier: each class's prompts composed from its severity x subtype x
        # location words (`prompts_per_class` of them, drawn with `seed`), an image's
        # class score the mean or max of its logits against them.
        "prompts_per_class": Field(INT, min=1, optional=True),
        "prompt_scoring": Field(STR, choices=("mean", "max"), optional=True),
        # Classifiers' (MMBCD's) calibration: bins of the reliability diagram and its ECE.
        "bins": Field(INT, min=1, optional=True),
        "seed": Field(INT),
    }, optional=True),
    "tokens": Section({name: Field(INT, min=0) for name in ("pad", "eos", "bos")},
                      optional=True),
    # mmjax.summary's random batch (models that do not generate need no max_new_tokens,
    # those without interleaved images no num_images)
    "summary": Section({"batch_size": Field(INT, min=1), "seq_len": Field(INT, min=1),
                        "num_images": Field(INT, min=1, optional=True),
                        "max_new_tokens": Field(INT, min=1, optional=True)},
                       optional=True),
})

# Fields of model config dataclasses, by name: the same name means the same thing in
# every family's config (mmjax.models.*), so the next families are checked too.
MODEL_CHOICES: dict[str, Collection] = {
    "activation": tuple(ACTIVATIONS), "remat": tuple(REMAT_POLICIES), "dtype": DTYPES,
    "param_dtype": DTYPES}
MODEL_POSITIVE = frozenset({
    "vocab_size", "width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
    "max_len", "image_size", "patch_size", "output_dim", "channels", "num_latents",
    "ff_mult", "every", "embed_dim", "max_frames", "type_vocab_size", "norm_eps",
    "rope_theta", "init_temperature"})


# ---------------------------------------------------------------------------------------
# Checking.
# ---------------------------------------------------------------------------------------
def _show(value) -> str:
  return repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)


def _unknown(path: str, keys, allowed) -> list[str]:
  problems = []
  for key in sorted(set(keys) - set(allowed)):
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    problems.append(f"{path} has no field {key!r}{hint}; its fields are {sorted(allowed)}")
  return problems


def _is_type(value, types) -> bool:
  types = types if isinstance(types, tuple) else (types,)
  if isinstance(value, bool) and bool not in types:
    return False  # True is an int to Python, not to a config
  return isinstance(value, types)


def _type_names(types) -> str:
  types = types if isinstance(types, tuple) else (types,)
  names = {int: "an integer", float: "a number", str: "a string", bool: "True or False",
           tuple: "a tuple", list: "a list", type(None): "None"}
  return " or ".join(dict.fromkeys(names.get(t, getattr(t, "__name__", str(t)))
                                   for t in types))


def _check_field(spec: Field, value, path: str) -> list[str]:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if not _is_type(value, spec.types):
    return [f"{path}={_show(value)} must be {_type_names(spec.types)}"]
  if spec.choices is not None:
    choices = tuple(spec.choices)
    if value not in choices:
      return [f"{path}={_show(value)} is not one of {choices}"]
  numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
  # `not (value >= min)` also refuses NaN.
  if numeric and spec.min is not None and not value >= spec.min:
    return [f"{path}={_show(value)} must be >= {spec.min}"
            + (f" and <= {spec.max}" if spec.max is not None else "")]
  if numeric and spec.max is not None and not value <= spec.max:
    return [f"{path}={_show(value)} must be <= {spec.max}"]
  problem = spec.check(value) if spec.check else None
  return [f"{path}={_show(value)} {problem}"] if problem else []


def _check(spec, value, path: str, model_class: type | None) -> list[str]:
  if isinstance(spec, Field):
    return _check_field(spec, value, path)
  if isinstance(spec, Model):
    return check_model(model_class, value, path) if model_class else []
  if isinstance(spec, Struct):
    return check_model(spec.cls, value, path)
  if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
    return [f"{path}={_show(value)} must be a mapping"
            + (" of names to entries" if isinstance(spec, Named) else "")]
  if isinstance(spec, Named):
    return [p for name in value for p in _check(spec.entry, value[name], f"{path}.{name}",
                                                 model_class)]
  problems = _unknown(path, value.keys(), spec.fields)
  for name, sub in spec.fields.items():
    if name in value:
      problems += _check(sub, value[name], f"{path}.{name}", model_class)
    elif not sub.optional:
      problems.append(f"{path} has no {name!r}")
  return problems


def _annotation_types(annotation) -> tuple[tuple, tuple | None]:
  """(types a value may have, its Literal choices or None)."""
  origin = typing.get_origin(annotation)
  if origin is typing.Literal:
    choices = typing.get_args(annotation)
    return tuple({type(c) for c in choices}), choices
  if origin in (typing.Union, types.UnionType):
    allowed, choices = (), None
    for arg in typing.get_args(annotation):
      t, c = _annotation_types(arg)
      allowed += t
      if c is not None:
        choices = (choices or ()) + c
    if choices is not None and type(None) in allowed:
      choices += (None,)
    return allowed, choices
  if origin in (tuple, list):
    return SEQUENCE, None
  if annotation is float:
    return FLOAT, None
  if annotation is type(None):
    return (type(None),), None
  return ((annotation,) if isinstance(annotation, type) else (object,)), None


def check_model(cls: type, value, path: str = "config.model") -> list[str]:
  """Problems of a (nested) model config mapping against the dataclass `cls`: unknown and
  missing fields, types, `Literal` and named choices, positive sizes."""
  if dataclasses.is_dataclass(value):
    value = dataclasses.asdict(value)
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if not isinstance(value, Mapping):
    return [f"{path}={_show(value)} must be a mapping of {cls.__name__} fields"]
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  problems = _unknown(f"{path} ({cls.__name__})", value, fields)
  missing = [name for name, f in fields.items() if name not in value
             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    problems.append(f"{path} ({cls.__name__}) has no {', '.join(map(repr, missing))}, "
                    "which it needs")
  for name, f in fields.items():
    if name not in value:
      continue
    item, where = value[name], f"{path}.{name}"
    nested = next((t for t in (hints[name], *typing.get_args(hints[name]))
                   if isinstance(t, type) and dataclasses.is_dataclass(t)), None)
    if nested is not None and isinstance(item, (Mapping, ml_collections.ConfigDict)):
      problems += check_model(nested, item, where)
      continue
    if nested is not None and dataclasses.is_dataclass(item):
      continue
    types, choices = _annotation_types(hints[name])
    if choices is None and name in MODEL_CHOICES and isinstance(item, str):
      choices = tuple(MODEL_CHOICES[name])
    minimum = 1 if name in MODEL_POSITIVE else None
    if minimum is not None and float in types:
      minimum = math.ulp(0.0)
    problems += _check_field(Field(types, choices=choices, min=minimum), item, where)
  if not problems:
    problems += _model_shapes(value, path)
  return problems


def _model_shapes(m: Mapping, path: str) -> list[str]:
  """Divisibility that every family's attention and patching needs."""
  problems = []
  if m.get("head_dim") is None and {"width", "num_heads"} <= set(m) and m["width"] % m["num_heads"]:
    problems.append(f"{path}.width={m['width']} is not divisible by {path}.num_heads="
                    f"{m['num_heads']}; set {path}.head_dim or change either")
  if m.get("num_kv_heads") and m["num_heads"] % m["num_kv_heads"]:
    problems.append(f"{path}.num_heads={m['num_heads']} is not divisible by "
                    f"{path}.num_kv_heads={m['num_kv_heads']}")
  if {"image_size", "patch_size"} <= set(m) and m["image_size"] % m["patch_size"]:
    problems.append(f"{path}.image_size={m['image_size']} is not divisible by "
                    f"{path}.patch_size={m['patch_size']}")
  return problems


def problems(config: ml_collections.ConfigDict, *, process_count: int = 1,
             num_devices: int | None = None) -> list[str]:
  """Every problem `validate` would report, as `config.<field>=<value> ...` lines."""
  task = None
  if config.get("task") in TASKS:
    task = get_task(config.task)
  found = _check(SCHEMA, config, "config", getattr(task, "MODEL_CONFIG", None))
  checks = [lambda: _check_data(config, process_count), lambda: _check_init(config),
            lambda: peft.problems(config)]
  if num_devices is not None:
    checks.append(lambda: _check_mesh(config, num_devices))
  if task is not None and hasattr(task, "check_config"):
    checks.append(lambda: task.check_config(config))
  for check in checks:
    try:
      found += check()
    except (TypeError, KeyError, AttributeError, ValueError):
      pass  # the fields it compares are missing or ill-typed: already reported
  if not found:
    found += _check_tokenizer(config)
  return found


def _check_mesh(config, num_devices: int) -> list[str]:
  try:
    sharding.mesh_shape(config.get("mesh") or {"data": -1}, num_devices)
  except ValueError as e:
    return [str(e).rstrip(".")]
  return []


def _check_data(config, process_count: int) -> list[str]:
  d, found = config.data, []
  if not any(entry.get("weight", 1.0) > 0 for entry in d.datasets.values()):
    found.append(f"config.data.datasets has no dataset with a weight > 0 (have "
                 f"{ {k: v.get('weight', 1.0) for k, v in d.datasets.items()} })")
  if d.batch_size % process_count:
    found.append(f"config.data.batch_size={d.batch_size} is not divisible by the "
                 f"{process_count} processes")
  elif (d.batch_size // process_count) % config.optim.accum_steps:
    found.append(f"config.optim.accum_steps={config.optim.accum_steps} does not divide the "
                 f"batch of each of the {process_count} process(es) "
                 f"(config.data.batch_size={d.batch_size}); choose a divisor")
  if config.train.eval_every and not any(
      entry.get("weight", 1.0) > 0 for entry in (d.get("eval_datasets") or {}).values()):
    found.append(f"config.train.eval_every={config.train.eval_every} needs "
                 "config.data.eval_datasets; set --config.train.eval_every=0 for no "
                 "held-out loss")
  return found


def _check_init(config) -> list[str]:
  found = []
  for target, entry in (config.get("init") or {}).items():
    path = f"config.init.{target}"
    if entry.get("workdir") and entry.get("steps", -1) != -1:
      found.append(f"{path}.steps={entry.steps} applies to {path}.recipe; {path}.workdir "
                   f"is set, whose run is used as it is")
    if not entry.get("workdir") and not entry.get("recipe") and entry.get("steps", -1) != 0:
      found.append(f"{path} needs a recipe (configs/<recipe>.py, trained once and cached) or "
                   f"a workdir (a finished run or converted checkpoint); set "
                   f"--config.init.{target}.steps=0 to start {target!r} from random weights")
  return found


def _check_tokenizer(config) -> list[str]:
  if "model" not in config or config.task == "clip":
    return []
  try:
    make_tokenizer(config)
  except (ValueError, OSError) as e:
    return [str(e).rstrip(".")]
  return []


def validate(config: ml_collections.ConfigDict, *, process_count: int = 1,
             num_devices: int | None = None) -> None:
  """Raises one `cli.UserError` naming every problem of `config` (see `problems`).

  Args:
    process_count: processes that share each batch (`jax.process_count()`).
    num_devices: devices the mesh is laid over, if known here.
  """
  found = problems(config, process_count=process_count, num_devices=num_devices)
  if len(found) == 1:
    raise cli.UserError(f"Invalid config: {found[0]}.")
  if found:
    raise cli.UserError(f"Invalid config ({len(found)} problems):\n"
                        + "\n".join(f"  {p}." for p in found))


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  return error


def _missing_parent(config, path: str, flag: str) -> str | None:
  """Why the override `--<flag>.<path>=...` cannot apply to `config`, or None. An
  override can add a field to an existing mapping, not a whole new entry."""
  node, parts = config, path.split(".")
  for i, part in enumerate(parts[:-1]):
    where = ".".join([flag, *parts[:i]])
    keys = list(node.keys()) if isinstance(node, (Mapping, ml_collections.ConfigDict)) else []
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      return (f"--{flag}.{path}: {where} has no {part!r} ({hint}it has {sorted(keys)}). "
              f"A new entry is given whole, as a dict literal: --{where}.{part}=\"{{...}}\"")
    node = node[part]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (for `cli.run`), with a mistake in a config flag reported as one
  message instead of a traceback: a recipe refusing its variant, an override whose parent
  entry does not exist, a config file that cannot be read."""
  try:
    return _checked_config_files(flags.FLAGS(argv))
  except flags.Error as e:
    cause = _root_cause(e)  # ml_collections wraps a recipe's error in its traceback's text
    message = str(e) if cause is e else f"{str(e).split(': Error whilst')[0]}: {cause}"
    cli.fail(f"{message}\nPass --helpshort or --helpfull to see help on flags.")
  except (AttributeError, KeyError) as e:  # ml_collections: an override it cannot place
    for name in _FLAGS:
      prefix = f"--{name}="
      path = next((a[len(prefix):] for a in argv if a.startswith(prefix)), None)
      if path is None:
        continue
      fresh = flags.FLAGS[name].parser.parse(path)
      for arg in argv:
        if arg.startswith(f"--{name}."):
          problem = _missing_parent(fresh, arg[len(name) + 3:].split("=")[0], name)
          if problem:
            cli.fail(problem)
    cli.fail(f"a config override cannot be applied: {_root_cause(e)}")
  raise AssertionError("unreachable")


def _checked_config_files(argv: list[str]) -> list[str]:
  for name in _FLAGS:
    # ml_collections defers an unreadable file's error to the config's first use.
    error = getattr(flags.FLAGS[name].value, "_error", None)
    if isinstance(error, OSError):
      cli.fail(f"--{name}: cannot read the config file: {error}")
  return argv
