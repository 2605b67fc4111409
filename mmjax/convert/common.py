"""What every converter shares: reading weights files and Hugging Face directories, taking
tensors out of a state dict (`Reader`) and fields out of a config (`Fields`) so that what
was not used is refused by name, torch layer layouts, the check against the tree `init`
builds (`check_tree`), and writing the result.

Strict in both directions: a conversion consumes every tensor of the source (or lists it as
ignored on purpose, with why), reads every config field (or lists it as ignored on purpose,
with why; an unknown value of a field it reads is refused naming the field and the values
it supports), and produces exactly the parameter tree the mmjax model's `init` builds.
"""

import dataclasses
import json
import math
import pathlib
import re
from typing import Any

import numpy as np

from mmjax import cli


class ConversionError(cli.UserError):
  """A checkpoint that cannot be converted exactly: its message names the tensors or
  config fields, what was wrong and what is supported."""


# ---------------------------------------------------------------------------------------
# Reading files.
# ---------------------------------------------------------------------------------------
def read_hf_dir(path: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """`(config.json as a dict, {parameter name: float32 array})` of a local model dir."""
  return read_hf_config(path), read_hf_weights(path)


def read_hf_config(path: str | pathlib.Path) -> dict[str, Any]:
  """config.json of a local model dir (read, and checked, before any weights are)."""
  path = pathlib.Path(path)
  if not (path / "config.json").is_file():
    raise ConversionError(f"{path} has no config.json: expected a Hugging Face model "
                          "directory (save_pretrained's output).")
  try:
    return json.loads((path / "config.json").read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path / 'config.json'} is not valid JSON: {e}.") from None


def read_hf_weights(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """`{parameter name: float32 array}` of a local model dir: model.safetensors, the shards
  of a sharded one, or pytorch_model.bin."""
  path = pathlib.Path(path)
  files = sorted(path.glob("*.safetensors")) or [path / "pytorch_model.bin"]
  if not files[0].exists():
    raise ConversionError(f"{path} has neither *.safetensors nor pytorch_model.bin.")
  state = {}
  for f in files:  # one file, or the shards of a sharded checkpoint
    state.update(read_state_file(f))
  return state


def read_state_file(path: str | pathlib.Path) -> dict[str, Any]:
  """A weights file as `{name: float32 array}`: safetensors, a torch state dict (or a dict
  holding state dicts, whose tensors are converted) or a TorchScript archive (OpenAI's
  CLIP `.pt`)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"No weights file {path}.")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    return {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
  import torch
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except RuntimeError:  # not a pickle: a TorchScript archive
    state = torch.jit.load(path, map_location="cpu").state_dict()
  to_numpy = lambda v: v.float().numpy() if isinstance(v, torch.Tensor) else (
      {k: to_numpy(x) for k, x in v.items()} if isinstance(v, dict) else v)
  return to_numpy(state)


# ---------------------------------------------------------------------------------------
# Config fields: every one read or ignored on purpose.
# ---------------------------------------------------------------------------------------
# `PretrainedConfig`'s own fields (any transformers version), at any level of a config:
# none changes what the weights compute. Fields a converter reads (the token ids CLIP pools
# at, tie_word_embeddings, is_decoder, ...) are read before this list is consulted.
GENERIC_FIELDS = {
    name: "bookkeeping, generation or fine-tuning settings of transformers' "
          "PretrainedConfig; the weights compute the same function whatever they say"
    for name in (
        "_name_or_path", "_commit_hash", "_attn_implementation_internal",
        "_attn_implementation_autoset", "attn_implementation", "architectures", "auto_map",
        "transformers_version", "model_type", "torch_dtype", "dtype", "use_bfloat16",
        "torchscript", "tf_legacy_loss", "return_dict", "output_hidden_states",
        "output_attentions", "use_cache", "output_past", "gradient_checkpointing",
        "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder", "id2label",
        "label2id", "num_labels", "problem_type",
        "finetuning_task", "task_specific_params", "prefix", "tokenizer_class",
        "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
        "decoder_start_token_id", "max_length", "min_length", "do_sample", "early_stopping",
        "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
        "top_p", "typical_p", "repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "initializer_range", "initializer_factor", "init_std")}
GENERIC_FIELDS["tie_word_embeddings"] = (
    "ties an output layer to the input embedding; every converter of a model with an "
    "output layer reads it")
# `PretrainedConfig` fields that change the function unless they hold these values (older
# transformers wrote them into every config, sub-configs included).
NEUTRAL_VALUES = {"pruned_heads": ({}, None), "is_decoder": (False,),
                  "add_cross_attention": (False,), "cross_attention_hidden_size": (None,)}
# Fields that only set dropout (mmjax converts for inference and fine-tuning without it).
DROPOUT = "a dropout rate: dropout is off at inference, and mmjax models have none"


class Fields:
  """A Hugging Face config read field by field. Every field read is recorded, so that
  `finish` can refuse each one that was neither read nor listed as ignored on purpose.
  Nested dicts (`text_config`, `attn_config`, ...) are read through `sub`, with dotted
  names."""

  def __init__(self, config: dict[str, Any], family: str, _path: str = "",
               _root: "Fields | None" = None):
    self.config, self.family, self.path = config, family, _path
    self.root = _root or self
    if _root is None:
      self.read: set[str] = set()
      self.opened: list[Fields] = [self]

  def _name(self, name: str) -> str:
    return f"{self.path}{name}"

  def __contains__(self, name: str) -> bool:
    return name in self.config

  def __getitem__(self, name: str):
    if name not in self.config:
      raise ConversionError(f"The {self.family} config has no {self._name(name)!r}, which "
                            "the conversion needs.")
    self.root.read.add(self._name(name))
    return self.config[name]

  def get(self, name: str, default=None):
    self.root.read.add(self._name(name))
    value = self.config.get(name)
    return default if value is None else value

  def require(self, name: str, supported: tuple, default=None, why: str = ""):
    """The field's value, refused by name unless it is one of `supported`."""
    value = self.get(name, default)
    if value not in supported:
      raise ConversionError(
          f"{self.family} with {self._name(name)}={value!r} is not supported; supported: "
          f"{', '.join(repr(s) for s in supported)}{'. ' + why if why else ''}.")
    return value

  def choice(self, name: str, mapping: dict[str, Any], default=None):
    """`mapping[value]`, refused naming the field and the supported values if missing."""
    value = self.get(name, default)
    if value not in mapping:
      raise ConversionError(
          f"{self.family} with {self._name(name)}={value!r} is not supported; supported "
          f"values: {sorted(mapping)}.")
    return mapping[value]

  def sub(self, name: str, default: dict | None = None) -> "Fields":
    """The nested config `name` (or `default`), read with names `name.<field>`."""
    value = self.get(name, default)
    if not isinstance(value, dict):
      raise ConversionError(f"The {self.family} config's {self._name(name)} is {value!r}, "
                            "not a dict.")
    sub = Fields(value, self.family, f"{self._name(name)}.", self.root)
    self.root.opened.append(sub)
    return sub

  def finish(self, ignored: dict[str, str]) -> None:
    """Refuses every field of every opened dict that was neither read, nor a generic
    `PretrainedConfig` field, nor (by dotted name) in `ignored` (field -> why)."""
    unknown = sorted(
        f"{fields.path}{name}={value!r}" if name in NEUTRAL_VALUES else f"{fields.path}{name}"
        for fields in self.root.opened for name, value in fields.config.items()
        if f"{fields.path}{name}" not in self.root.read | set(ignored)
        and name not in GENERIC_FIELDS
        and not (name in NEUTRAL_VALUES and value in NEUTRAL_VALUES[name]))
    if unknown:
      raise ConversionError(
          f"The {self.family} config has field(s) {unknown} that the conversion does not "
          "know (or not at these values); they may change what the weights compute, so "
          "converting without them "
          "could give wrong numbers silently. If a field does not change the computation, "
          "remove it from config.json; otherwise this checkpoint is not supported.")


# Hugging Face activation names (transformers' ACT2FN) -> mmjax's (mmjax.layers.mlp), where
# the two compute the same function.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu",
                  "swish": "silu"}


def activation(fields: Fields, name: str, default: str) -> str:
  """The mmjax activation of an HF activation field, refused by name if unknown."""
  return fields.choice(name, HF_ACTIVATIONS, default)


# ---------------------------------------------------------------------------------------
# Tensors: every one consumed or ignored on purpose.
# ---------------------------------------------------------------------------------------
class Reader:
  """Takes parameters out of a state dict by name, checking shapes. Problems are
  collected (a placeholder of the expected shape stands in) and `finish` reports them all
  at once: missing, mis-shaped, unconsumed tensors."""

  def __init__(self, state: dict[str, np.ndarray], prefixes: tuple[str, ...] = ("",)):
    self.state = state
    self.prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), "")
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.mismatched: list[str] = []

  def __contains__(self, name: str) -> bool:
    return self.prefix + name in self.state

  def __call__(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    key = self.prefix + name
    if key not in self.state:
      self.missing.append(key)
      return np.zeros(shape or (), np.float32)
    value = self.state[key]
    self.used.add(key)
    if shape is not None and value.shape != tuple(shape):
      self.mismatched.append(f"{key}: {value.shape} in the checkpoint, {tuple(shape)} from "
                             "the config")
      return np.zeros(shape, np.float32)
    return value

  def tied(self, name: str, like: Any, what: str) -> None:
    """Consumes an optional copy `name` of a tensor the model shares (a tied output layer
    saved beside the embedding it equals): it must equal `like`, since mmjax keeps one."""
    key = self.prefix + name
    if key not in self.state:
      return
    self.used.add(key)
    value = self.state.get(key)  # not a read of a parameter (export_lm records reads)
    if isinstance(value, np.ndarray) and isinstance(like, np.ndarray) and not (
        value.shape == like.shape and np.array_equal(value, like)):
      self.mismatched.append(f"{key}: differs from {what}, which the config says it is "
                             "tied to (set tie_word_embeddings=false if it is its own)")

  def finish(self, ignored: dict[str, str] | None = None,
             hint: str = "Check that config.json belongs to these weights.") -> None:
    """Raises `ConversionError` naming every problem, if there is any, then `hint`.
    `ignored` maps regular expressions of tensor names (matching whole names) that are
    not parameters on purpose to why (buffers, task heads)."""
    patterns = [re.compile(p) for p in (ignored or {})]
    unconsumed = sorted(k for k in self.state if k not in self.used
                        and not any(p.fullmatch(k) for p in patterns))
    problems = [f"{what} ({len(items)}): {items[:6]}{' ...' if len(items) > 6 else ''}"
                for what, items in (("missing parameters", self.missing),
                                    ("shape mismatches", self.mismatched),
                                    ("unexpected parameters", unconsumed)) if items]
    if problems:
      raise ConversionError("The checkpoint does not match the model it should hold: "
                            + "; ".join(problems) + ". " + hint)


def dense(kernel: np.ndarray, bias: np.ndarray | None, in_shape, out_shape) -> dict:
  out = {"kernel": kernel.reshape(*in_shape, *out_shape)}
  if bias is not None:
    out["bias"] = bias.reshape(out_shape)
  return out


def linear(read: Reader, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
           bias: bool = False) -> dict:
  """A torch `Linear` (weight `[out, in]`) as a `Dense` kernel `[*in_shape, *out_shape]`."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return dense(read(name + ".weight", (n_out, n_in)).T,
               read(name + ".bias", (n_out,)) if bias else None, in_shape, out_shape)


def packed_qkv(read: Reader, weight: str, bias: str | None, d: int, h: int) -> dict:
  """Queries, keys and values projected by one torch `Linear` (DINO's and timm's `qkv`,
  `MultiheadAttention`'s `in_proj_weight` / `in_proj_bias`: weight `[3 * d, d]`, the three
  stacked on the output dim in that order) as the `Attention`'s `query`, `key`, `value`
  `Dense`s (kernels `[d, h, d // h]`)."""
  w = read(weight, (3 * d, d))
  b = np.split(read(bias, (3 * d,)), 3) if bias else (None,) * 3
  return {name: dense(wi.T, bi, (d,), (h, d // h))
          for name, wi, bi in zip(("query", "key", "value"), np.split(w, 3), b, strict=True)}


def norm(read: Reader, name: str, width: int, bias: bool = True) -> dict:
  """A LayerNorm (`weight`, `bias`) or, without bias, an RMSNorm or bias-free LayerNorm
  (`weight`)."""
  out = {"scale": read(name + ".weight", (width,))}
  if bias:
    out["bias"] = read(name + ".bias", (width,))
  return out


def output_layer(read: Reader, out: dict, cfg, embedding_name: str) -> None:
  """Adds a causal LM's output layer to `out` from the top-level `lm_head.weight`: with
  tied embeddings nothing (a saved copy must equal the embedding `embedding_name`),
  otherwise its own `lm_head` kernel."""
  read.prefix = ""
  if cfg.tie_embeddings:
    read.tied("lm_head.weight", out["embed"]["embedding"], embedding_name)
  else:
    out["lm_head"] = {"kernel": read("lm_head.weight", (cfg.vocab_size, cfg.width)).T}


def linear_layer(read: Reader, p: str, names: tuple[str, str, str, str], d: int, h: int,
                 k: int, m: int, bias: bool = True, norm_bias: bool | None = None) -> dict:
  """A pre-norm layer stored as torch Linear weights (`[out, in]`): `self_attn.{q,k,v,out}
  _proj`, two LayerNorms and a two-matrix MLP, named `(attn_norm, mlp_norm, up, down)`
  after `p` (OPT, CLIP). `norm_bias` (default: `bias`) for the LayerNorms."""
  lin = lambda name, in_shape, out_shape: linear(read, p + name, in_shape, out_shape, bias)
  norm_bias = bias if norm_bias is None else norm_bias
  attn_norm, mlp_norm, up, down = names
  return {
      "attn_norm": norm(read, p + attn_norm, d, norm_bias),
      "attn": {name: lin(f"self_attn.{name[0]}_proj", (d,), (h, k))
               for name in ("query", "key", "value")}
              | {"out": lin("self_attn.out_proj", (h, k), (d,))},
      "mlp_norm": norm(read, p + mlp_norm, d, norm_bias),
      "mlp": {"up": lin(up, (d,), (m,)), "down": lin(down, (m,), (d,))}}


# ---------------------------------------------------------------------------------------
# The tree `init` builds.
# ---------------------------------------------------------------------------------------
def check_tree(params: dict, module, *args, collection: str = "params", **kwargs) -> None:
  """Refuses `params` unless it is exactly the tree `module.init(rng, *args, **kwargs)`
  builds: the same names, shapes and dtypes (computed with `jax.eval_shape`, so nothing
  is allocated). A difference is a converter's fault, or a checkpoint layout it does not
  know; either way the numbers would not be the ones the model computes with.
  `collection`: the variable collection to compare with ("batch_stats": BatchNorm's
  running statistics)."""
  import flax
  import jax

  expected = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  expected = flax.traverse_util.flatten_dict(
      flax.linen.meta.unbox(expected.get(collection, {})), sep="/")
  got = flax.traverse_util.flatten_dict(params, sep="/")
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  differ = [f"{k}: {np.shape(got[k])} {np.asarray(got[k]).dtype} converted, "
            f"{expected[k].shape} {expected[k].dtype} from init"
            for k in sorted(set(got) & set(expected))
            if (np.shape(got[k]) != expected[k].shape
                or np.asarray(got[k]).dtype != expected[k].dtype)]
  problems = [f"{what} ({len(items)}): {items[:6]}{' ...' if len(items) > 6 else ''}"
              for what, items in (("not converted", missing), ("not in the model", extra),
                                  ("shape or dtype differs", differ)) if items]
  if problems:
    what = "parameters" if collection == "params" else collection
    raise ConversionError(f"The converted {what} are not the tree "
                          f"{type(module).__name__}.init builds: " + "; ".join(problems) + ".")


def check_flamingo(params: dict, cfg) -> None:
  """Refuses `params` unless they are the tree `Flamingo(cfg).init` builds."""
  import jax.numpy as jnp

  from mmjax.models.flamingo import Flamingo
  size, channels = cfg.vision.image_size, cfg.vision.channels
  check_tree(params, Flamingo(cfg), jnp.zeros((1, 1), jnp.int32),
             jnp.zeros((1, 1, 1, size, size, channels)), jnp.ones((1,), jnp.int32))


# ---------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------
def save(output: str | pathlib.Path, task: str, model_config, params: dict,
         model_state: dict | None = None) -> None:
  """Writes `output/checkpoints/0` (params, as a finished run's) and `output/config.json`
  (`{"task": task, "model": model_config}`). `model_state`: the model's variables other
  than its parameters (`{"batch_stats": ...}`: BatchNorm's running statistics), saved
  beside them as the state's "model_state"."""
  from mmjax import checkpoints
  output = pathlib.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  mngr = checkpoints.manager(output)
  state = {"params": params} if model_state is None else {"params": params,
                                                           "model_state": model_state}
  checkpoints.save(mngr, 0, state)  # with fingerprints: verified when loaded
  mngr.wait_until_finished()
  mngr.close()
  (output / "config.json").write_text(json.dumps(
      {"task": task, "model": dataclasses.asdict(model_config)}, indent=2))


def save_hf(output: str | pathlib.Path, hf_config: dict, state: dict[str, np.ndarray]) -> None:
  """Writes `config.json` and `model.safetensors`, loadable by `from_pretrained`."""
  from safetensors.numpy import save_file
  output = pathlib.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  (output / "config.json").write_text(json.dumps(hf_config, indent=2))
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            str(output / "model.safetensors"), metadata={"format": "pt"})


def count(tree) -> int:
  """Number of numbers in a nested dict of arrays."""
  return sum(count(v) if isinstance(v, dict) else int(np.prod(np.shape(v)))
             for v in tree.values())
