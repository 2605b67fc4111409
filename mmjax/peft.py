"""Parameter-efficient fine-tuning of any mmjax model: LoRA and bottleneck adapters.

    model = peft.wrap(LanguageModel(cfg), lora=peft.LoraConfig(rank=8, targets=("query",
                                                                             "value")))
    params = model.init(rng, tokens)["params"]   # the base tree plus .../query/lora_a, ...
    logits = model.apply({"params": params}, tokens)
    merged = peft.merge(params, model.peft_lora)      # plain base params: kernel += scale * A B

`wrap` leaves the model's classes untouched: it returns an instance of a subclass of the
model's class (made once per class) whose `init`, `init_with_output` and `apply` run under
a `flax.linen.intercept_methods` interceptor. Every method works as on the original,
`method=` included (a name, or an unbound function of the original class such as
`Blip2.prefix`), and the wrapped module stays hashable, so it can be a static `jax.jit`
argument.

The interceptor sees every `mmjax.layers.Dense` call (no mmjax model uses
`flax.linen.Dense`) and compares the Dense's '/'-joined module path, e.g.
"layers_0/attn/query" ("lm/layers/attn/query" in a scanned Flamingo LM), with the config's
patterns, with peft's semantics: a string is a regex that must `re.fullmatch` the path, a
tuple of names matches a path equal to a name or ending in "/" + name. `exclude` is tested
first; a path it matches is left alone.

LoRA (`LoraConfig`): a matched Dense with kernel `[*in, *features]` computes
`y = x W + scale * (dropout(x) A) B` where `A = lora_a [*in, r]` and `B = lora_b [r,
*features]` are created beside `kernel` in the Dense's own scope (`.../query/lora_a`),
factorised like the kernel and carrying its logical axis names, so they shard as it does.
`scale` is alpha / r, or alpha / sqrt(r) with `rslora`. peft's initialisation
(`init="peft"`): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's kaiming_uniform with
a=sqrt(5)), B = 0, so a fresh LoRA leaves the model's function unchanged;
`init="gaussian"`: A ~ N(0, 1/r). Dropout applies to the LoRA branch's input only, and
only when the call is given a "dropout" rng (`rngs={"dropout": key}`); without one the
branch is deterministic.

Adapters (`AdapterConfig`): after the output `y` of each matched module, `y + up(act(down(
y)))` with `down` to `dim` features and `up` back, `up` zero-initialised so that a fresh
adapter is the identity. On a Dense the adapter acts on its `features` axes (flattened),
elsewhere on the last axis; its parameters live in the matched module's scope as
`adapter_down [*features, dim]`, `adapter_down_bias`, `adapter_up [dim, *features]`,
`adapter_up_bias`.

Parameter trees (pure functions): `merge` folds the LoRA update into the kernels and drops
the LoRA leaves, `unmerge` takes it back out, `split` separates the LoRA leaves (or the
adapters', `ADAPTER_LEAVES`) from the rest and `combine` joins them again. Scanned layer
stacks (a leading "layers" axis on every leaf) are handled alike.

Training (`from_config`, called where the trainer, evaluation, inference and the summary
build a recipe's model): `config.peft` with `lora=dict(...)` (`LoraConfig` fields;
LoRA dropout applies in the train step, whose loss runs inside `training(key)`),
`adapters=dict(...)` (`AdapterConfig` fields) and `modules_to_save` (regexes on parameter
paths, e.g. r"^projector/") wraps the model the task builds and replaces
`config.trainable` with `trainable_pattern(config)`: only the LoRA and adapter parameters
and the modules to save train; everything else is frozen and has no optimizer state.
peft's adapter files for converted LMs: `mmjax.convert.peft`.
"""

import contextlib
import dataclasses
import functools
import math
import re
import threading
from collections.abc import Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Dense
from mmjax.layers.dense import contract
from mmjax.layers.mlp import activation_fn

Patterns = str | tuple[str, ...]
LORA_LEAVES = ("lora_a", "lora_b")
ADAPTER_LEAVES = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank updates `W + scale * A B` on the Denses `targets` matches (module docstring).

  Attributes:
    rank: r, the inner width of A `[*in, r]` and B `[r, *features]`.
    alpha: the update's scale is alpha / r (alpha / sqrt(r) with `rslora`).
    rslora: rank-stabilised scaling.
    dropout: dropout rate on the LoRA branch's input (needs a "dropout" rng to apply).
    targets: Dense module paths to adapt (regex to fullmatch, or names to end in).
    exclude: paths never adapted, tested before `targets`.
    init: "peft" (A uniform in +-1/sqrt(fan_in), B = 0) or "gaussian" (A ~ N(0, 1/r)).
  """

  rank: int = 8
  alpha: float = 8.0
  rslora: bool = False
  dropout: float = 0.0
  targets: Patterns = ("query", "value")
  exclude: Patterns = ()
  init: Literal["peft", "gaussian"] = "peft"

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Bottleneck adapters `y + up(act(down(y)))` after the modules `targets` matches.

  Attributes:
    dim: the bottleneck width.
    activation: a name in `mmjax.layers.mlp.ACTIVATIONS`.
    targets: module paths whose output is adapted (regex to fullmatch, or names to end in).
    exclude: paths never adapted, tested before `targets`.
  """

  dim: int = 16
  activation: str = "gelu"
  targets: Patterns = ("attn/out", "mlp/down")
  exclude: Patterns = ()


def _freeze(patterns) -> Patterns:
  return patterns if isinstance(patterns, str) else tuple(patterns)


def lora_config(**fields) -> LoraConfig:
  """A `LoraConfig` from a mapping's fields (lists of targets become tuples)."""
  return _from_fields(LoraConfig, fields)


def adapter_config(**fields) -> AdapterConfig:
  return _from_fields(AdapterConfig, fields)


def _from_fields(cls, fields):
  for name in ("targets", "exclude"):
    if name in fields:
      fields[name] = _freeze(fields[name])
  return cls(**fields)


def matches(path: str, targets: Patterns, exclude: Patterns = ()) -> bool:
  """Whether the '/'-joined module `path` is a target: not matched by `exclude`, matched by
  `targets` (a str: `re.fullmatch`; a tuple: a path equal to an entry or ending in
  "/" + entry)."""
  def match(patterns):
    if isinstance(patterns, str):
      return re.fullmatch(patterns, path) is not None
    return any(path == p or path.endswith("/" + p) for p in patterns)
  return not match(exclude) and match(targets)


# ---------------------------------------------------------------------------------------
# The interceptor.
# ---------------------------------------------------------------------------------------
def _peft_a_init(key, shape, dtype):
  # torch's kaiming_uniform_(a=sqrt(5)) on a [r, fan_in] weight: U(+-1/sqrt(fan_in)).
  # The shape seen here is the flattened [fan_in, r].
  return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")(key, shape, dtype)


def _gaussian_a_init(key, shape, dtype):
  return jax.random.normal(key, shape, dtype) / math.sqrt(shape[1])


def _flat_init(init, in_shape, out_shape):
  """`init` seeing the flattened `[prod(in), prod(out)]` shape, as `Dense`'s kernels do."""
  def flat(key, shape, dtype):
    return jnp.reshape(init(key, (math.prod(in_shape), math.prod(out_shape)), dtype), shape)
  return flat


def _dense_dims(module: Dense, x: jax.Array):
  features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
  axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  axis = tuple(a % x.ndim for a in axis)
  return features, axis, tuple(x.shape[a] for a in axis)


def _param(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


def _lora(module: Dense, x: jax.Array, y: jax.Array, cfg: LoraConfig) -> jax.Array:
  features, axis, in_shape = _dense_dims(module, x)
  n_in, r = len(in_shape), cfg.rank
  in_axes, out_axes = tuple(module.axes[:n_in]), tuple(module.axes[n_in:])
  a_init = {"peft": _peft_a_init, "gaussian": _gaussian_a_init}[cfg.init]
  a = _param(module, "lora_a", _flat_init(a_init, in_shape, (r,)), in_shape + (r,),
             in_axes + (None,), module.param_dtype)
  b = _param(module, "lora_b", nn.initializers.zeros_init(), (r,) + features,
             (None,) + out_axes, module.param_dtype)
  if cfg.dropout > 0 and module.has_rng("dropout"):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - cfg.dropout), 0).astype(x.dtype)
  x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=module.dtype)
  t = contract(x, a, axis)  # "... r"
  update = contract(t, b, (t.ndim - 1,))
  return y + (cfg.scale * update).astype(y.dtype)


def _adapter(module: nn.Module, y: Any, cfg: AdapterConfig) -> Any:
  path = "/".join(module.scope.path)
  if not isinstance(y, jax.Array):
    raise TypeError(f"peft: the adapter after {path!r} needs an array output, not "
                    f"{type(y).__name__}; narrow AdapterConfig.targets to modules that "
                    "return one array.")
  if isinstance(module, Dense):
    features = (module.features,) if isinstance(module.features, int) else tuple(
        module.features)
    out_axes = tuple(module.axes[-len(features):])
  else:
    features, out_axes = y.shape[-1:], (None,)
  n, param_dtype = len(features), getattr(module, "param_dtype", jnp.float32)
  flat = y.reshape(*y.shape[:y.ndim - n], math.prod(features))
  down = _param(module, "adapter_down", _flat_init(nn.initializers.lecun_normal(), features,
                                                   (cfg.dim,)),
                features + (cfg.dim,), out_axes + (None,), param_dtype)
  down_bias = _param(module, "adapter_down_bias", nn.initializers.zeros_init(), (cfg.dim,),
                     (None,), param_dtype)
  up = _param(module, "adapter_up", nn.initializers.zeros_init(), (cfg.dim,) + features,
              (None,) + out_axes, param_dtype)
  up_bias = _param(module, "adapter_up_bias", nn.initializers.zeros_init(), features,
                   out_axes, param_dtype)
  dtype = getattr(module, "dtype", None) or y.dtype
  h = flat.astype(dtype) @ down.reshape(-1, cfg.dim).astype(dtype) + down_bias.astype(dtype)
  h = activation_fn(cfg.activation)(h)
  h = h @ up.reshape(cfg.dim, -1).astype(dtype) + up_bias.reshape(-1).astype(dtype)
  return y + h.reshape(y.shape).astype(y.dtype)


def interceptor(lora: LoraConfig | None = None, adapters: AdapterConfig | None = None):
  """The `flax.linen.intercept_methods` interceptor that `wrap` installs."""
  def intercept(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    module = context.module
    path = "/".join(module.scope.path) if module.scope is not None else ""
    y = next_fun(*args, **kwargs)
    if lora is not None and isinstance(module, Dense) and matches(path, lora.targets,
                                                                  lora.exclude):
      y = _lora(module, args[0], y, lora)
    if adapters is not None and matches(path, adapters.targets, adapters.exclude):
      y = _adapter(module, y, adapters)
    return y
  return intercept


# ---------------------------------------------------------------------------------------
# Wrapping a model.
# ---------------------------------------------------------------------------------------
class _Active(threading.local):
  depth = 0
  dropout_key = None  # set by `training`: the applies inside draw LoRA dropout from it
  applies = 0


_ACTIVE = _Active()


@contextlib.contextmanager
def training(key: jax.Array):
  """Inside, every `apply` of a wrapped model that is given no "dropout" rng draws one
  from `key` (folded with a count of the applies, so each differs): how the trainer's
  step turns LoRA dropout on without the tasks' losses knowing. Outside (evaluation,
  inference) the LoRA branch is deterministic."""
  previous = _ACTIVE.dropout_key, _ACTIVE.applies
  _ACTIVE.dropout_key, _ACTIVE.applies = key, 0
  try:
    yield
  finally:
    _ACTIVE.dropout_key, _ACTIVE.applies = previous


@functools.cache
def _wrapped_class(cls: type[nn.Module]) -> type[nn.Module]:
  """A subclass of `cls` with two more fields, `peft_lora` and `peft_adapters`, whose `init`,
  `init_with_output` and `apply` run under their interceptor. Made once per class, so
  that two wraps of equal models are equal and hash alike."""

  def under(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
      if _ACTIVE.depth:  # `init` calls `init_with_output`: one interceptor, not two
        return method(self, *args, **kwargs)
      if _ACTIVE.dropout_key is not None and method is nn.Module.apply:
        rngs = dict(kwargs.get("rngs") or {})
        if "dropout" not in rngs:
          rngs["dropout"] = jax.random.fold_in(_ACTIVE.dropout_key, _ACTIVE.applies)
          _ACTIVE.applies += 1
          kwargs["rngs"] = rngs
      _ACTIVE.depth += 1
      try:
        with nn.intercept_methods(interceptor(self.peft_lora, self.peft_adapters)):
          return method(self, *args, **kwargs)
      finally:
        _ACTIVE.depth -= 1
    return run

  namespace = {
      "__annotations__": {"peft_lora": LoraConfig | None,
                          "peft_adapters": AdapterConfig | None},
      "peft_lora": None, "peft_adapters": None, "peft_base": cls, "__module__": cls.__module__,
      "__doc__": f"{cls.__name__} with LoRA and adapters (mmjax.peft.wrap).",
      "init": under(nn.Module.init), "init_with_output": under(nn.Module.init_with_output),
      "apply": under(nn.Module.apply)}
  return type(f"Peft{cls.__name__}", (cls,), namespace)


def wrap(model: nn.Module, lora: LoraConfig | None = None,
         adapters: AdapterConfig | None = None) -> nn.Module:
  """`model` with LoRA on the Denses `lora.targets` matches and adapters after the modules
  `adapters.targets` matches; `init`/`apply` behave as the original's otherwise."""
  if lora is None and adapters is None:
    return model
  if hasattr(model, "peft_base"):
    raise ValueError(f"{type(model).__name__} is wrapped already; wrap the original once "
                     "with both configs.")
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}
  return _wrapped_class(type(model))(**fields, peft_lora=lora, peft_adapters=adapters)


def unwrap(model: nn.Module) -> nn.Module:
  """The original model of a `wrap`ped one (itself otherwise)."""
  if not hasattr(model, "peft_base"):
    return model
  cls = model.peft_base
  return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(cls)
                if f.init and f.name not in ("parent", "name")})


# ---------------------------------------------------------------------------------------
# Parameter trees.
# ---------------------------------------------------------------------------------------
def _lora_nodes(params, path=()):
  """(path, node) of every dict holding `lora_a` and `lora_b`."""
  if isinstance(params, Mapping):
    if "lora_a" in params and "lora_b" in params:
      yield path, params
    for k, v in params.items():
      if isinstance(v, Mapping):
        yield from _lora_nodes(v, path + (k,))


def lora_delta(kernel, a, b, scale: float) -> jax.Array:
  """`scale * A B` in the kernel's shape. A `[*lead, *in, r]`, B `[*lead, r, *out]`,
  kernel `[*lead, *in, *out]`; `lead` are stacking axes (scanned layers)."""
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  n_in = a.ndim - lead - 1
  shape = kernel.shape
  a2 = jnp.reshape(a, shape[:lead] + (math.prod(shape[lead:lead + n_in]), a.shape[-1]))
  b2 = jnp.reshape(b, shape[:lead] + (b.shape[lead], math.prod(shape[lead + n_in:])))
  delta = jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32))
  return (scale * delta).reshape(shape)


def _rebuild(params, fn, path=()):
  if not isinstance(params, Mapping):
    return params
  out = {k: _rebuild(v, fn, path + (k,)) for k, v in params.items()}
  return fn(path, out)


def merge(params: dict, lora: LoraConfig) -> dict:
  """Params with each LoRA update folded into its kernel (`kernel + scale * A B`) and the
  LoRA leaves removed: the base model's tree, computing what the wrapped one did (without
  dropout)."""
  def fn(path, node):
    if "lora_a" not in node:
      return node
    node = dict(node)
    a, b = node.pop("lora_a"), node.pop("lora_b")
    kernel = node["kernel"]
    node["kernel"] = (kernel + lora_delta(kernel, a, b, lora.scale)).astype(kernel.dtype)
    return node
  return _rebuild(params, fn)


def unmerge(params: dict, lora_params: dict, lora: LoraConfig) -> dict:
  """The inverse of `merge`: `lora_params` (the LoRA tree of `split`) taken back out of the
  merged kernels and put back beside them."""
  lora_flat = {path: node for path, node in _lora_nodes(lora_params)}

  def fn(path, node):
    if path not in lora_flat:
      return node
    if "kernel" not in node:
      raise ValueError(f"peft.unmerge: {'/'.join(path)} has LoRA parameters but no kernel.")
    node = dict(node)
    a, b = lora_flat[path]["lora_a"], lora_flat[path]["lora_b"]
    kernel = node["kernel"]
    node["kernel"] = (kernel - lora_delta(kernel, a, b, lora.scale)).astype(kernel.dtype)
    node["lora_a"], node["lora_b"] = a, b
    return node

  missing = set(lora_flat) - {path for path, _ in _nodes(params)}
  if missing:
    raise ValueError(f"peft.unmerge: the params have no module {min(missing)!r} "
                     "that the LoRA tree adapts.")
  return _rebuild(params, fn)


def _nodes(params, path=()):
  if isinstance(params, Mapping):
    yield path, params
    for k, v in params.items():
      yield from _nodes(v, path + (k,))


def split(params: dict, leaves: tuple[str, ...] = LORA_LEAVES) -> tuple[dict, dict]:
  """`(lora, base)`: the LoRA leaves (or any `leaves`) and everything else, each a nested
  tree of the same layout (empty modules dropped)."""
  def part(tree, keep):
    out = {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        sub = part(v, keep)
        if sub:
          out[k] = sub
      elif (k in leaves) == keep:
        out[k] = v
    return out
  return part(params, True), part(params, False)


def combine(*trees: dict) -> dict:
  """The union of trees of disjoint leaves (`split`'s inverse)."""
  out: dict = {}
  for tree in trees:
    for k, v in tree.items():
      if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
        out[k] = combine(out[k], v)
      elif k in out:
        raise ValueError(f"peft.combine: {k!r} is in more than one tree.")
      else:
        out[k] = v
  return out


# ---------------------------------------------------------------------------------------
# The trainer's hook: config.peft.
# ---------------------------------------------------------------------------------------
PEFT_FIELDS = ("lora", "adapters", "modules_to_save")


def _section(config, name):
  peft = config.get("peft") or {}
  value = peft.get(name) if hasattr(peft, "get") else None
  if value is None:
    return None
  return dict(value.to_dict() if hasattr(value, "to_dict") else value)


def configs(config) -> tuple[LoraConfig | None, AdapterConfig | None]:
  """`(LoraConfig, AdapterConfig)` of `config.peft` (None where not set)."""
  lora, adapters = _section(config, "lora"), _section(config, "adapters")
  return (None if lora is None else lora_config(**lora),
          None if adapters is None else adapter_config(**adapters))


def modules_to_save(config) -> tuple[str, ...]:
  value = (config.get("peft") or {}).get("modules_to_save") or ()
  return (value,) if isinstance(value, str) else tuple(value)


def trainable_pattern(config) -> str:
  """The regex for `config.trainable` of a `config.peft` run: its LoRA leaves, its
  adapters' parameters and `config.peft.modules_to_save`'s patterns."""
  lora, adapters = configs(config)
  parts = []
  if lora is not None:
    parts.append(r"(?:^|/)lora_[ab]$")
  if adapters is not None:
    parts.append(r"(?:^|/)adapter_(?:down|up)(?:_bias)?$")
  parts += [f"(?:{p})" for p in modules_to_save(config)]
  return "|".join(parts)


def problems(config) -> list[str]:
  """What is wrong with `config.peft` (for `mmjax.config.validate`), beyond each field's
  type, which `mmjax.config` checks against the dataclasses."""
  peft = config.get("peft")
  if not peft:
    return []
  found = []
  if not any(peft.get(k) for k in PEFT_FIELDS):
    found.append(f"config.peft={peft} sets none of {PEFT_FIELDS}; set config.peft.lora="
                 "dict(rank=8, targets=('query', 'value')) or remove config.peft")
  lora, adapters = _section(config, "lora"), _section(config, "adapters")
  for name, section in (("lora", lora), ("adapters", adapters)):
    for field in ("targets", "exclude"):
      value = (section or {}).get(field)
      if isinstance(value, str):
        try:
          re.compile(value)
        except re.error as e:
          found.append(f"config.peft.{name}.{field}={value!r} is not a regular expression "
                       f"({e})")
  if lora:
    if lora.get("rank", 1) < 1:
      found.append(f"config.peft.lora.rank={lora['rank']} must be >= 1")
    if not 0 <= lora.get("dropout", 0.0) < 1:
      found.append(f"config.peft.lora.dropout={lora['dropout']} must be in [0, 1)")
  if adapters and adapters.get("dim", 1) < 1:
    found.append(f"config.peft.adapters.dim={adapters['dim']} must be >= 1")
  for pattern in modules_to_save(config):
    try:
      re.compile(pattern)
    except re.error as e:
      found.append(f"config.peft.modules_to_save={pattern!r} is not a regular expression ({e})")
  return found


def from_config(config, model: nn.Module) -> nn.Module:
  """`model` wrapped as `config.peft` says (unchanged without it). With `config.peft`,
  `config.trainable` becomes `trainable_pattern(config)`: only the LoRA and adapter
  parameters and the modules to save train."""
  lora, adapters = configs(config)
  if lora is None and adapters is None:
    return model
  pattern = trainable_pattern(config)
  if config.get("trainable") != pattern:
    print(f"config.peft: training {pattern!r} (config.trainable={config.get('trainable')!r} "
          "replaced).", flush=True)
    config.trainable = pattern
  return wrap(model, lora=lora, adapters=adapters)
