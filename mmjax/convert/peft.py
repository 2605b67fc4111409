"""Hugging Face peft's LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`)
for the decoder-only LMs mmjax converts (`mmjax.convert.lm`: LLaMA, Mistral, GPT-2, ...),
loaded as `mmjax.peft` LoRA parameters and saved back.

    cfg, params = convert_lm(base_dir)                       # the base model
    lora, lora_params = load_adapter(adapter_dir, base_dir)  # peft's files
    model = mmjax.peft.wrap(LanguageModel(cfg), lora=lora)
    logits = model.apply({"params": mmjax.peft.combine(params, lora_params)}, tokens)
    save_adapter(out_dir, lora_params, lora, base_dir)       # back to peft's files

peft stores, for each adapted torch module `M`, `base_model.model.M.lora_A.weight`
`[r, in]` and `base_model.model.M.lora_B.weight` `[out, r]`, and adds
`lora_alpha / r * B A` (`/ sqrt(r)` with `use_rslora`) to the module's weight, whether
that is a torch Linear (`[out, in]`) or a GPT-2 Conv1D (`[in, out]`, peft's
`fan_in_fan_out`). In mmjax's layout `lora_a = A^T` and `lora_b = B^T`, each factorised
like the Dense kernel they sit beside.

Which mmjax kernel holds which rows and columns of a torch weight is not restated here:
it is found by running the LM family's own conversion (`mmjax.convert.lm.lm_params`) on
probe state dicts, where every tensor is a zero-strided array of zeros (no memory) except
the probed weight, which holds the indices of its output (or input) features. So the
names, transposes, reshapes and splits are exactly the conversion's. GPT-2's fused q/k/v
Conv1D `c_attn`, which mmjax splits into `query`, `key` and `value`, loads as the same A
on the three and B split by rows; saving fuses them back, which needs the three A's to
be equal (a module the LoRA tree leaves out gets zero rows of B), and is refused
otherwise.

Strict in both directions, as the model converters: every tensor of the adapter file is
consumed, and every adapter_config.json field either read, at a value that does not
change the function (DoRA, LoRA biases, per-module ranks, ... are refused by name), or
known not to change it.
"""

import json
import math
import pathlib
from typing import Any

import numpy as np

from mmjax import checkpoints, peft
from mmjax.convert import common
from mmjax.convert.lm import lm_config, lm_params

ConversionError = common.ConversionError
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
FAMILY = "peft LoRA adapter"
# adapter_config.json fields that do not change what the adapted model computes.
IGNORED_FIELDS = {
    name: "bookkeeping, training or initialisation settings; the saved weights compute the "
          "same function whatever they say"
    for name in ("task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                 "revision", "inference_mode", "megatron_core", "qalora_group_size",
                 "runtime_config", "ensure_weight_tying", "layers_pattern",
                 "layers_to_transform", "exclude_modules", "target_modules")}
IGNORED_FIELDS["fan_in_fan_out"] = (
    "whether the module's weight is [in, out] (GPT-2's Conv1D): found from the base "
    "model's conversion instead")
# Fields that change the function unless they hold these values (or are absent).
NEUTRAL = {"bias": ("none",), "use_dora": (False,), "lora_bias": (False,),
           "rank_pattern": ({},), "alpha_pattern": ({},), "modules_to_save": (None, []),
           "layer_replication": (None,), "target_parameters": (None, []),
           "trainable_token_indices": (None,), "use_qalora": (False,),
           "alora_invocation_tokens": (None,), "use_bdlora": (None, False),
           "megatron_config": (None,), "arrow_config": (None,), "kasa_config": (None,),
           "monteclora_config": (None,), "velora_config": (None,),
           # Initialisations that rewrite the base weights (PiSSA, OLoRA, LoftQ, ...):
           # such an adapter only fits the rewritten base.
           "init_lora_weights": (True, False, "gaussian"), "loftq_config": ({}, None),
           "eva_config": (None,), "corda_config": (None,), "lora_ga_config": (None,)}


# ---------------------------------------------------------------------------------------
# Where each torch weight goes: the conversion, probed.
# ---------------------------------------------------------------------------------------
def _shapes(base_dir: pathlib.Path) -> dict[str, tuple[int, ...]]:
  """`{name: shape}` of the base model's weights (safetensors headers only)."""
  files = sorted(base_dir.glob("*.safetensors"))
  if not files:
    return {k: v.shape for k, v in common.read_hf_weights(base_dir).items()}
  from safetensors import safe_open
  shapes = {}
  for f in files:
    with safe_open(str(f), "np") as st:
      shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})  # noqa: SIM118
  return shapes


class _Probe:
  """The base LM's conversion run on probe state dicts."""

  def __init__(self, base_dir: str | pathlib.Path):
    self.base_dir = pathlib.Path(base_dir)
    self.hf = common.read_hf_config(self.base_dir)
    self.cfg = lm_config(self.hf)
    self.shapes = _shapes(self.base_dir)

  def convert(self, name: str, probe: np.ndarray) -> dict[str, np.ndarray]:
    """`{mmjax path: leaf}` of the leaves the probe `name` reaches."""
    zero = np.float32(0)
    state = {k: np.broadcast_to(zero, s) for k, s in self.shapes.items()}
    state[name] = probe
    out = checkpoints.flat_params(lm_params(self.hf, state, self.cfg))
    # Leaves the probe does not reach stay zero-strided views: skipped without a scan.
    return {k: v for k, v in out.items()
            if any(v.strides) and v.size and np.any(v)}

  def module(self, module: str, n_in: int, n_out: int
             ) -> tuple[str, list[tuple[str, tuple, int, np.ndarray]]]:
    """`(layout, [(mmjax module path, kernel shape, number of input axes, out_index)])` of
    the torch module `module`, whose weight is `[n_out, n_in]` (layout "linear") or
    `[n_in, n_out]` ("conv1d"): each kernel, flattened to `[n_in, -1]`, holds the
    weight's output features `out_index` (in order) and all its input features, in
    order."""
    name = f"{module}.weight"
    if name not in self.shapes:
      raise ConversionError(f"The adapter adapts {module!r}, but the base model in "
                            f"{self.base_dir} has no {name!r}.")
    shape = self.shapes[name]
    layouts = [t for t, s in (("linear", (n_out, n_in)), ("conv1d", (n_in, n_out)))
               if shape == s]
    for layout in layouts:
      found = self._module(name, layout, shape, n_in, n_out)
      if found:
        return layout, found
    raise ConversionError(
        f"The adapter's {module!r} is [in={n_in}, out={n_out}], which the base model's "
        f"{name} {shape} does not map onto Dense kernels as a Linear or Conv1D weight (an "
        "embedding or another kind of layer?); LoRA on it is not supported.")

  def _module(self, name, layout, shape, n_in, n_out):
    def probe(axis_values: str):  # the indices of one axis, at index 0 of the other
      p = np.zeros(shape, np.float32)
      values = np.arange(1, (n_out if axis_values == "out" else n_in) + 1, dtype=np.float32)
      out_axis = 0 if layout == "linear" else 1
      if (axis_values == "out") == (out_axis == 0):
        p[:, 0] = values
      else:
        p[0, :] = values
      return p

    outs = self.convert(name, probe("out"))
    found = []
    for path, leaf in outs.items():
      parts = path.rsplit("/", 1)
      n_axes = next((j for j in range(leaf.ndim + 1)
                     if math.prod(leaf.shape[:j]) == n_in), None)
      if parts[-1] != "kernel" or n_axes is None:
        return None
      flat = np.asarray(leaf).reshape(n_in, -1)
      if np.any(flat[1:]) or not np.all(flat[0]):  # not [in, out] with all in order
        return None
      found.append((parts[0], leaf.shape, n_axes, flat[0].astype(np.int64) - 1))
    covered = np.sort(np.concatenate([f[3] for f in found])) if found else np.array([])
    if not np.array_equal(covered, np.arange(n_out)):
      return None
    first = next(f for f in found if 0 in f[3])
    ins = self.convert(name, probe("in"))
    flat = np.asarray(ins[f"{first[0]}/kernel"]).reshape(n_in, -1)
    column = int(np.nonzero(first[3] == 0)[0][0])
    if not np.array_equal(flat[:, column], np.arange(1, n_in + 1)):
      return None  # the conversion reorders the inputs: not a plain LoRA on the kernel
    return sorted(found)


# ---------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------
def read_config(adapter_dir: str | pathlib.Path) -> peft.LoraConfig:
  """The `mmjax.peft.LoraConfig` (rank, alpha, rslora, dropout) of adapter_config.json;
  settings mmjax cannot compute are refused by name. Its `targets` are filled in by
  `load_adapter` from the weights."""
  path = pathlib.Path(adapter_dir) / CONFIG
  if not path.is_file():
    raise ConversionError(f"{adapter_dir} has no {CONFIG}: expected a peft adapter "
                          "directory (PeftModel.save_pretrained's output).")
  f = common.Fields(json.loads(path.read_text()), FAMILY)
  f.require("peft_type", ("LORA",), "LORA", "only LoRA adapters are")
  for name, values in NEUTRAL.items():
    f.require(name, values, values[0])
  cfg = peft.LoraConfig(rank=int(f["r"]), alpha=float(f["lora_alpha"]),
                        rslora=bool(f.get("use_rslora", False)),
                        dropout=float(f.get("lora_dropout", 0.0)))
  f.finish(IGNORED_FIELDS)
  return cfg


def load_adapter(adapter_dir: str | pathlib.Path, base_dir: str | pathlib.Path
                 ) -> tuple[peft.LoraConfig, dict]:
  """`(LoraConfig, LoRA parameters)` of peft's adapter for the Hugging Face LM in
  `base_dir` (the directory `mmjax.convert` converted): the parameters are the `lora_a`,
  `lora_b` leaves of `mmjax.peft` (combine them with the converted base params), the
  config's `targets` the adapted mmjax module paths."""
  from safetensors.numpy import load_file

  cfg = read_config(adapter_dir)
  weights_file = pathlib.Path(adapter_dir) / WEIGHTS
  if not weights_file.is_file():
    raise ConversionError(f"{adapter_dir} has no {WEIGHTS}.")
  state = {k: np.asarray(v, np.float32) for k, v in load_file(str(weights_file)).items()}
  modules, unknown = {}, []
  for key, value in state.items():
    for leaf in ("lora_A", "lora_B"):
      suffix = f".{leaf}.weight"
      if key.startswith(PREFIX) and key.endswith(suffix):
        modules.setdefault(key[len(PREFIX):-len(suffix)], {})[leaf] = value
        break
    else:
      unknown.append(key)
  if unknown:
    raise ConversionError(
        f"{weights_file} has tensors that are not LoRA A/B weights of a module "
        f"({len(unknown)}): {sorted(unknown)[:6]}; only plain LoRA on Linear/Conv1D layers "
        f"({PREFIX}<module>.lora_A.weight / .lora_B.weight) is supported.")
  probe = _Probe(base_dir)
  out: dict[str, Any] = {}
  for module, ab in sorted(modules.items()):
    if set(ab) != {"lora_A", "lora_B"}:
      raise ConversionError(f"{weights_file}: {module!r} has only {sorted(ab)}.")
    a, b = ab["lora_A"], ab["lora_B"]
    if a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
      raise ConversionError(f"{weights_file}: {module!r} has A {a.shape} and B {b.shape}, "
                            f"not of the config's rank r={cfg.rank}.")
    n_in, n_out = a.shape[1], b.shape[0]
    for path, shape, n_axes, index in probe.module(module, n_in, n_out)[1]:
      out[f"{path}/lora_a"] = a.T.reshape(*shape[:n_axes], cfg.rank)
      out[f"{path}/lora_b"] = b[index].T.reshape(cfg.rank, *shape[n_axes:])
  targets = tuple(sorted({k.rsplit("/", 1)[0] for k in out}))
  return peft.lora_config(**{**cfg.__dict__, "targets": targets}), checkpoints.tree_params(out)


# ---------------------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------------------
def _candidate_modules(probe: _Probe) -> list[str]:
  """The base model's modules with a 2-d weight: those LoRA could adapt."""
  return sorted(k[:-len(".weight")] for k, s in probe.shapes.items()
                if k.endswith(".weight") and len(s) == 2)


def save_adapter(output: str | pathlib.Path, lora_params: dict, lora: peft.LoraConfig,
                 base_dir: str | pathlib.Path) -> None:
  """Writes `lora_params` (the `lora_a`/`lora_b` leaves of an LM converted from
  `base_dir`; other leaves are ignored) as peft's adapter_config.json and
  adapter_model.safetensors in `output`, for `PeftModel.from_pretrained`."""
  from safetensors.numpy import save_file

  flat = checkpoints.flat_params(peft.split(lora_params)[0])
  adapted = {k.rsplit("/", 1)[0] for k in flat}
  probe = _Probe(base_dir)
  tensors, layouts, modules = {}, set(), []
  for module in _candidate_modules(probe):
    shape = probe.shapes[f"{module}.weight"]
    mapping = None
    for n_out, n_in in dict.fromkeys([shape, shape[::-1]]):
      try:
        layout, mapping = probe.module(module, n_in, n_out)
        break
      except ConversionError:
        continue
    if not mapping or not adapted & {path for path, *_ in mapping}:
      continue
    a_rows, b = set(), np.zeros((n_out, lora.rank), np.float32)
    for path, _, _, index in mapping:
      if path not in adapted:
        continue  # a part of a fused module without LoRA: zero rows of B
      a_rows.add(np.asarray(flat[f"{path}/lora_a"], np.float32).reshape(n_in, -1).T.tobytes())
      b[index] = np.asarray(flat[f"{path}/lora_b"], np.float32).reshape(lora.rank, -1).T
    if len(a_rows) != 1:
      raise ConversionError(
          f"{module!r} is one torch module holding mmjax's "
          f"{[p for p, *_ in mapping]}, whose LoRA A's differ; peft's LoRA on it has one A "
          "for all of them, so these parameters have no peft form (train them with equal "
          "A's or target the module whole).")
    a = np.frombuffer(a_rows.pop(), np.float32).reshape(lora.rank, n_in)
    tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a)
    tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    adapted -= {path for path, *_ in mapping}
    layouts.add(layout)
    modules.append(module)
  if adapted:
    raise ConversionError(f"No module of the base model in {base_dir} holds the LoRA "
                          f"parameters of {sorted(adapted)[:6]}.")
  if len(layouts) > 1:
    raise ConversionError("The adapted modules mix Linear and Conv1D layouts, which one "
                          "peft fan_in_fan_out setting cannot describe.")
  short = sorted({m.rsplit(".", 1)[-1] for m in modules})
  everywhere = [m for m in _candidate_modules(probe) if m.rsplit(".", 1)[-1] in short]
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
      "lora_alpha": lora.alpha, "use_rslora": lora.rslora, "lora_dropout": lora.dropout,
      "target_modules": short if everywhere == modules else modules, "bias": "none",
      "fan_in_fan_out": layouts == {"conv1d"}, "modules_to_save": None,
      "init_lora_weights": True, "use_dora": False, "base_model_name_or_path": None}
  output = pathlib.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(output / WEIGHTS))
  (output / CONFIG).write_text(json.dumps(config, indent=2))

