"""Converts pretrained checkpoints into mmjax: an Orbax checkpoint and the model config.

  python -m mmjax.convert --hf_dir=/models/Llama-3.2-1B --output=/ckpt/llama-1b

reads a Hugging Face model directory (config.json and model.safetensors, sharded
safetensors with their index, or pytorch_model.bin; nothing is downloaded) and writes
`output/checkpoints/0` (the parameters, as a run's checkpoint) and `output/config.json`
(`{"task": "lm", "model": ...}`). A recipe uses it as a frozen backbone with
`config.init = [dict(target="lm", workdir="/ckpt/llama-1b")]` and the same model config.

Language models: GPT-2 (`gpt2`), OPT (`opt`, pre-norm sizes: all but 350m) and the LLaMA
family (`llama`, `mistral` without sliding window): grouped-query attention, RoPE (plain,
or scaled "linear" or "llama3"), RMSNorm, SwiGLU, tied or untied output. CLIP (`clip`):
the dual encoder (`task: "clip"`); its vision tower alone is the `image` subtree
(`config.init` entry `source="image"`).
MPT language models (`mpt`, as mosaicml/mpt-7b): ALiBi, bias-free LayerNorm, fused q/k/v.
BERT (`bert`): the encoder of a BertModel or of any BertFor* model (`task: "bert"`), with
its pooler where the checkpoint has one.
IDEFICS (`idefics`, with `--media_token_id` and `--endofchunk_token_id`): the whole
Flamingo (`task: "flamingo"`; decoupled extra vocabulary appended). OpenFlamingo:

  python -m mmjax.convert --openflamingo=checkpoint.pt --vision=ViT-L-14.pt \
      --hf_dir=/models/mpt-7b --output=/ckpt/openflamingo-9b

combines its checkpoint (perceiver, gated blocks, input embeddings with the added tokens)
with the CLIP vision tower (open_clip / OpenAI weights, or an HF CLIP directory) and the
LM it was built on (`task: "flamingo"`; the media token ids come from the LM directory's
tokenizer, extended as OpenFlamingo extends it). The
parameters are float32, numerically equal to the reference implementation (tests compare
logits and features with transformers').
"""

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np
from absl import app, flags, logging

from mmjax.layers import RopeScaling
from mmjax.models.bert import BertConfig
from mmjax.models.flamingo import FlamingoConfig
from mmjax.models.lm import LMConfig
from mmjax.models.perceiver import ResamplerConfig
from mmjax.models.two_towers import TwoTowersConfig
from mmjax.models.vit import ViTConfig
from mmjax.models.xattn import XAttnConfig

LM_TYPES = ("gpt2", "opt", "llama", "mistral", "mpt")
ROPE_SCALINGS = ("linear", "llama3")


class ConversionError(ValueError):
  """A checkpoint that does not match what its config describes."""


# ---------------------------------------------------------------------------------------
# Reading a Hugging Face directory.
# ---------------------------------------------------------------------------------------
def read_hf_dir(path: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """`(config.json as a dict, {parameter name: float32 array})` of a local model dir."""
  path = pathlib.Path(path)
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"{path} has no config.json: expected a Hugging Face model "
                            "directory (save_pretrained's output).")
  config = json.loads((path / "config.json").read_text())
  files = sorted(path.glob("*.safetensors")) or [path / "pytorch_model.bin"]
  if not files[0].exists():
    raise FileNotFoundError(f"{path} has neither *.safetensors nor pytorch_model.bin.")
  state = {}
  for f in files:  # one file, or the shards of a sharded checkpoint
    state.update(read_state_file(f))
  return config, state


def read_state_file(path: str | pathlib.Path) -> dict[str, Any]:
  """A weights file as `{name: float32 array}`: safetensors, a torch state dict (or a dict
  holding state dicts, whose tensors are converted) or a TorchScript archive (OpenAI's
  CLIP `.pt`)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No weights file {path}.")
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
# Language models.
# ---------------------------------------------------------------------------------------
def lm_config(hf: dict[str, Any]) -> LMConfig:
  """The `LMConfig` of a Hugging Face LM config."""
  kind = hf.get("model_type")
  if kind == "gpt2":
    activation = {"gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    return LMConfig(
        vocab_size=hf["vocab_size"], width=hf["n_embd"], depth=hf["n_layer"],
        num_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"],
        activation=activation[hf.get("activation_function", "gelu_new")],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), max_len=hf["n_positions"],
        tie_embeddings=hf.get("tie_word_embeddings", True))
  if kind == "opt":
    if not hf.get("do_layer_norm_before", True) or (
        hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"]):
      raise ConversionError("OPT with post-norm or projected embeddings (opt-350m) is not "
                            "supported; every other OPT size is.")
    return LMConfig(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], mlp_dim=hf["ffn_dim"],
        activation=hf.get("activation_function", "relu"), use_bias=hf.get("enable_bias", True),
        max_len=hf["max_position_embeddings"], tie_embeddings=hf.get("tie_word_embeddings", True))
  if kind in ("llama", "mistral"):
    theta, scaling = rope_settings(hf)
    if kind == "mistral" and hf.get("sliding_window"):
      raise ConversionError("Mistral's sliding-window attention is not supported.")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ConversionError("LLaMA variants with attention or MLP biases are not supported.")
    return LMConfig(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), mlp_dim=hf["intermediate_size"],
        activation=hf.get("hidden_act", "silu"), gated_mlp=True, norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), use_bias=False, position="rope",
        max_len=hf["max_position_embeddings"], rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=hf.get("tie_word_embeddings", False))
  if kind == "mpt":
    attn = hf.get("attn_config") or {}
    d, n = hf["d_model"], hf["n_heads"]
    # Settings that change the computation from the one mmjax implements (several of
    # which transformers' MptForCausalLM would silently ignore).
    unsupported = [f"{name}={value!r}" for name, value, supported in (
        ("no_bias", hf.get("no_bias", True), True),
        ("logit_scale", hf.get("logit_scale"), None),
        ("attn_config.alibi", attn.get("alibi", True), True),
        ("attn_config.attn_type", attn.get("attn_type", "multihead_attention"),
         "multihead_attention"),
        ("attn_config.prefix_lm", attn.get("prefix_lm", False), False),
        ("attn_config.qk_ln", attn.get("qk_ln", False), False),
        ("attn_config.clip_qkv", attn.get("clip_qkv") or None, None),
    ) if value != supported]
    scale = attn.get("softmax_scale")
    if scale is not None and not math.isclose(scale, (d // n) ** -0.5, rel_tol=1e-6):
      unsupported.append(f"attn_config.softmax_scale={scale!r}")
    if unsupported:
      raise ConversionError(
          f"MPT with {', '.join(unsupported)} is not supported; supported is mosaicml/mpt-7b's "
          "design: ALiBi, no biases, multi-head attention without q/k clipping or norms, the "
          "default softmax scale 1/sqrt(head_dim) and unscaled logits.")
    return LMConfig(
        vocab_size=hf["vocab_size"], width=d, depth=hf["n_layers"], num_heads=n,
        mlp_dim=int(hf.get("expansion_ratio", 4) * d), activation="gelu",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), use_bias=False, position="alibi",
        alibi_bias_max=attn.get("alibi_bias_max", 8), max_len=hf.get("max_seq_len", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", True))
  raise ConversionError(f"model_type {kind!r} is not a supported LM; expected one of "
                        f"{LM_TYPES}.")


def rope_settings(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """`(theta, scaling)` of a Hugging Face config's RoPE, read as transformers reads it.

  transformers >= 5 writes `rope_parameters` (with `rope_theta` inside); earlier versions a
  top-level `rope_theta` and `rope_scaling` (whose type is under "type" or "rope_type").
  """
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind not in ROPE_SCALINGS:
    raise ConversionError(f"RoPE scaling type {kind!r} ({rope}) is not supported; supported "
                          f"are unscaled RoPE ('default') and {ROPE_SCALINGS}.")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConversionError(f"RoPE on part of each head (partial_rotary_factor in {rope}) is "
                          "not supported.")
  if kind == "linear":
    return theta, RopeScaling("linear", factor=rope["factor"])
  # As transformers: a top-level original_max_position_embeddings wins, then the rope
  # dict's, then the model's own context length.
  original = hf.get("original_max_position_embeddings") or rope.get(
      "original_max_position_embeddings", hf["max_position_embeddings"])
  return theta, RopeScaling("llama3", factor=rope["factor"],
                            low_freq_factor=rope["low_freq_factor"],
                            high_freq_factor=rope["high_freq_factor"], original_max_len=original)


_CONFIG_HINT = ("Check that config.json belongs to these weights (hidden_size, "
                "intermediate_size, num_attention_heads, num_key_value_heads, "
                "num_hidden_layers, vocab_size).")
_OPENFLAMINGO_HINT = ("Check that it is OpenFlamingo's checkpoint.pt (or a training "
                      "checkpoint of it) for the --vision tower and --hf_dir LM it was built on.")


class _Reader:
  """Takes parameters out of a state dict by name, checking shapes. Problems are
  collected (a placeholder of the expected shape stands in) and `finish` reports them all
  at once: missing, mis-shaped and unexpected parameters."""

  def __init__(self, state: dict[str, np.ndarray], prefixes: tuple[str, ...]):
    self.state = state
    self.prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), "")
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.mismatched: list[str] = []

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

  def finish(self, ignore: tuple[str, ...] = (), hint: str = _CONFIG_HINT) -> None:
    """Raises `ConversionError` naming every problem, if there is any, then `hint`."""
    unexpected = sorted(k for k in self.state if k not in self.used
                        and not any(part in k for part in ignore))
    problems = [f"{what} ({len(items)}): {items[:6]}{' ...' if len(items) > 6 else ''}"
                for what, items in (("missing parameters", self.missing),
                                    ("shape mismatches", self.mismatched),
                                    ("unexpected parameters", unexpected)) if items]
    if problems:
      raise ConversionError("The checkpoint does not match the model it should hold: "
                            + "; ".join(problems) + ". " + hint)


def _dense(kernel: np.ndarray, bias: np.ndarray | None, in_shape, out_shape) -> dict:
  out = {"kernel": kernel.reshape(*in_shape, *out_shape)}
  if bias is not None:
    out["bias"] = bias.reshape(out_shape)
  return out


def _linear(read: _Reader, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
            bias: bool = False) -> dict:
  """A torch `Linear` (weight `[out, in]`) as a `Dense` kernel `[*in_shape, *out_shape]`."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return _dense(read(name + ".weight", (n_out, n_in)).T,
                read(name + ".bias", (n_out,)) if bias else None, in_shape, out_shape)


def _norm(read: _Reader, name: str, width: int, bias: bool = True) -> dict:
  """A LayerNorm (`weight`, `bias`) or, without bias, an RMSNorm or bias-free LayerNorm
  (`weight`)."""
  out = {"scale": read(name + ".weight", (width,))}
  if bias:
    out["bias"] = read(name + ".bias", (width,))
  return out


def _linear_layer(read: _Reader, p: str, names: tuple[str, str, str, str], d: int, h: int,
                  k: int, m: int, bias: bool = True) -> dict:
  """A pre-norm layer stored as torch Linear weights (`[out, in]`): `self_attn.{q,k,v,out}
  _proj`, two LayerNorms and a two-matrix MLP, named `(attn_norm, mlp_norm, up, down)`
  after `p` (OPT, CLIP)."""
  linear = lambda name, in_shape, out_shape: _linear(read, p + name, in_shape, out_shape, bias)
  attn_norm, mlp_norm, up, down = names
  return {
      "attn_norm": _norm(read, p + attn_norm, d),
      "attn": {name: linear(f"self_attn.{name[0]}_proj", (d,), (h, k))
               for name in ("query", "key", "value")}
              | {"out": linear("self_attn.out_proj", (h, k), (d,))},
      "mlp_norm": _norm(read, p + mlp_norm, d),
      "mlp": {"up": linear(up, (d,), (m,)), "down": linear(down, (m,), (d,))}}


def _llama_layer(read: _Reader, p: str, d: int, h: int, g: int, k: int, m: int,
                 attn: str = "self_attn", kv_width: int | None = None) -> dict:
  """A LLaMA-style layer after `p`: bias-free torch Linear weights, RMSNorm, SwiGLU. With
  `attn="cross_attn"` and keys/values from `kv_width`-wide media, IDEFICS's gated block
  (without its gates)."""
  linear = lambda name, in_shape, out_shape: _linear(read, p + name, in_shape, out_shape)
  e = kv_width or d
  return {
      "attn_norm": _norm(read, p + "input_layernorm", d, bias=False),
      "attn": {"query": linear(f"{attn}.q_proj", (d,), (h, k)),
               "key": linear(f"{attn}.k_proj", (e,), (g, k)),
               "value": linear(f"{attn}.v_proj", (e,), (g, k)),
               "out": linear(f"{attn}.o_proj", (h, k), (d,))},
      "mlp_norm": _norm(read, p + "post_attention_layernorm", d, bias=False),
      "mlp": {"gate": linear("mlp.gate_proj", (d,), (m,)),
              "up": linear("mlp.up_proj", (d,), (m,)),
              "down": linear("mlp.down_proj", (m,), (d,))}}


def lm_params(hf: dict[str, Any], state: dict[str, np.ndarray], cfg: LMConfig) -> dict:
  """mmjax `LanguageModel` parameters from a Hugging Face LM state dict."""
  kind = hf["model_type"]
  d, h, k = cfg.width, cfg.num_heads, cfg.dims_per_head
  g, m = cfg.num_kv_heads or h, cfg.mlp_dim or 4 * cfg.width
  params: dict[str, Any] = {}
  if kind == "gpt2":
    read = _Reader(state, ("transformer.",))
    params["embed"] = {"embedding": read("wte.weight", (cfg.vocab_size, d))}
    params["positions"] = {"embedding": read("wpe.weight", (cfg.max_len, d))}
    for i in range(cfg.depth):
      p = f"h.{i}."
      qkv_w = read(p + "attn.c_attn.weight", (d, 3 * d))  # Conv1D: [in, out]
      qkv_b = read(p + "attn.c_attn.bias", (3 * d,))
      q, kk, v = (_dense(qkv_w[:, j * d:(j + 1) * d], qkv_b[j * d:(j + 1) * d], (d,), (h, k))
                  for j in range(3))
      params[f"layers_{i}"] = {
          "attn_norm": _norm(read, p + "ln_1", d),
          "attn": {"query": q, "key": kk, "value": v, "out": _dense(
              read(p + "attn.c_proj.weight", (d, d)), read(p + "attn.c_proj.bias"), (h, k), (d,))},
          "mlp_norm": _norm(read, p + "ln_2", d),
          "mlp": {"up": _dense(read(p + "mlp.c_fc.weight", (d, m)), read(p + "mlp.c_fc.bias"),
                               (d,), (m,)),
                  "down": _dense(read(p + "mlp.c_proj.weight", (m, d)),
                                 read(p + "mlp.c_proj.bias"), (m,), (d,))}}
    params["final_norm"] = _norm(read, "ln_f", d)
    read.finish(ignore=("attn.bias", "attn.masked_bias", "lm_head.weight"))
    return params

  if kind == "opt":
    read = _Reader(state, ("model.decoder.", "decoder."))
    params["embed"] = {"embedding": read("embed_tokens.weight", (cfg.vocab_size, d))}
    # OPT's learned positions are offset by 2 (a fairseq legacy).
    params["positions"] = {"embedding": read("embed_positions.weight",
                                             (cfg.max_len + 2, d))[2:]}
    for i in range(cfg.depth):
      params[f"layers_{i}"] = _linear_layer(
          read, f"layers.{i}.", ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2"),
          d, h, k, m, cfg.use_bias)
    params["final_norm"] = _norm(read, "final_layer_norm", d)
    read.finish(ignore=("lm_head.weight",))
    return params

  if kind == "mpt":
    read = _Reader(state, ("transformer.",))
    params["embed"] = {"embedding": read("wte.weight", (cfg.vocab_size, d))}
    for i in range(cfg.depth):
      p = f"blocks.{i}."
      qkv = read(p + "attn.Wqkv.weight", (3 * d, d))  # torch Linear: q, k, v rows stacked
      q, kk, v = (_dense(qkv[j * d:(j + 1) * d].T, None, (d,), (h, k)) for j in range(3))
      params[f"layers_{i}"] = {
          "attn_norm": _norm(read, p + "norm_1", d, bias=False),
          "attn": {"query": q, "key": kk, "value": v,
                   "out": _linear(read, p + "attn.out_proj", (h, k), (d,))},
          "mlp_norm": _norm(read, p + "norm_2", d, bias=False),
          "mlp": {"up": _linear(read, p + "ffn.up_proj", (d,), (m,)),
                  "down": _linear(read, p + "ffn.down_proj", (m,), (d,))}}
    params["final_norm"] = _norm(read, "norm_f", d, bias=False)
    if not cfg.tie_embeddings:
      read.prefix = ""
      params["lm_head"] = {"kernel": read("lm_head.weight", (cfg.vocab_size, d)).T}
    read.finish(ignore=("lm_head.weight",) if cfg.tie_embeddings else ())
    return params

  read = _Reader(state, ("model.",))  # the LLaMA family
  params["embed"] = {"embedding": read("embed_tokens.weight", (cfg.vocab_size, d))}
  for i in range(cfg.depth):
    params[f"layers_{i}"] = _llama_layer(read, f"layers.{i}.", d, h, g, k, m)
  params["final_norm"] = _norm(read, "norm", d, bias=False)
  if not cfg.tie_embeddings:
    read.prefix = ""
    params["lm_head"] = {"kernel": read("lm_head.weight", (cfg.vocab_size, d)).T}
  read.finish(ignore=("rotary_emb.inv_freq",) + (
      ("lm_head.weight",) if cfg.tie_embeddings else ()))
  return params


# ---------------------------------------------------------------------------------------
# CLIP: the vision tower, and the dual encoder.
# ---------------------------------------------------------------------------------------
def vit_config(hf: dict[str, Any], projection_dim: int | None) -> ViTConfig:
  """The `ViTConfig` of a Hugging Face CLIP vision config (`vision_config`)."""
  return ViTConfig(
      image_size=hf["image_size"], patch_size=hf["patch_size"], width=hf["hidden_size"],
      depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      mlp_dim=hf["intermediate_size"], activation=hf.get("hidden_act", "quick_gelu"),
      norm_eps=hf.get("layer_norm_eps", 1e-5), channels=hf.get("num_channels", 3),
      output_dim=projection_dim)


def vit_params(read: _Reader, cfg: ViTConfig, projection: str | None) -> dict:
  """ViT parameters from `vision_model.*` (read relative to it) and `projection`."""
  d, p, c = cfg.width, cfg.patch_size, cfg.channels
  # Conv weights [d, c, p, q] -> the (p q c) order of the ViT's flattened patches.
  conv = read("embeddings.patch_embedding.weight", (d, c, p, p))
  params = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(p * p * c, d)},
      "cls_token": read("embeddings.class_embedding", (d,)),
      "positions": read("embeddings.position_embedding.weight", (cfg.num_patches + 1, d)),
      "pre_norm": _norm(read, "pre_layrnorm", d),
      "post_norm": _norm(read, "post_layernorm", d),
  }
  for i in range(cfg.depth):
    params[f"layers_{i}"] = _linear_layer(
        read, f"encoder.layers.{i}.", ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"), d,
        cfg.num_heads, d // cfg.num_heads, cfg.mlp_dim or 4 * d)
  if projection:
    prefix, read.prefix = read.prefix, ""
    params["head"] = {"kernel": read(projection, (cfg.output_dim, d)).T}
    read.prefix = prefix
  return params


def convert_clip(hf_dir: str | pathlib.Path) -> tuple[TwoTowersConfig, dict]:
  """`(TwoTowersConfig, parameters)` of a Hugging Face CLIPModel directory; the vision
  tower alone is `params["image"]` with `config.vision`."""
  hf, state = read_hf_dir(hf_dir)
  if hf.get("model_type") != "clip":
    raise ConversionError(f"model_type {hf.get('model_type')!r} is not 'clip'.")
  vision_hf, text_hf = hf["vision_config"], hf["text_config"]
  embed_dim = hf.get("projection_dim", 512)
  vision = vit_config(vision_hf, embed_dim)
  text = LMConfig(
      vocab_size=text_hf["vocab_size"], width=text_hf["hidden_size"],
      depth=text_hf["num_hidden_layers"], num_heads=text_hf["num_attention_heads"],
      mlp_dim=text_hf["intermediate_size"], activation=text_hf.get("hidden_act", "quick_gelu"),
      norm_eps=text_hf.get("layer_norm_eps", 1e-5),
      max_len=text_hf["max_position_embeddings"])
  cfg = TwoTowersConfig(vision=vision, text=text, embed_dim=embed_dim,
                        pad_id=text_hf.get("pad_token_id") or 0)
  read = _Reader(state, ("vision_model.",))
  read.prefix = "vision_model."
  image = vit_params(read, vision, "visual_projection.weight")
  read.prefix = "text_model."
  d, h = text.width, text.num_heads
  text_params = {
      "embed": {"embedding": read("embeddings.token_embedding.weight", (text.vocab_size, d))},
      "positions": {"embedding": read("embeddings.position_embedding.weight",
                                      (text.max_len, d))},
      "final_norm": _norm(read, "final_layer_norm", d)}
  for i in range(text.depth):
    text_params[f"layers_{i}"] = _linear_layer(
        read, f"encoder.layers.{i}.", ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"), d,
        h, d // h, text.mlp_dim)
  read.prefix = ""
  params = {"image": image, "text": text_params,
            "text_head": {"kernel": read("text_projection.weight", (embed_dim, d)).T},
            "log_scale": read("logit_scale").reshape(())}
  read.finish(ignore=("position_ids",))
  return cfg, params


# ---------------------------------------------------------------------------------------
# BERT: the bidirectional encoder.
# ---------------------------------------------------------------------------------------
def bert_config(hf: dict[str, Any]) -> BertConfig:
  """The `BertConfig` of a Hugging Face BERT config."""
  if hf.get("model_type") != "bert":
    raise ConversionError(f"model_type {hf.get('model_type')!r} is not 'bert'.")
  position = hf.get("position_embedding_type", "absolute")
  if position != "absolute":
    raise ConversionError(f"BERT with position_embedding_type={position!r} is not supported; "
                          "only 'absolute' (learned) positions are.")
  if hf.get("is_decoder") or hf.get("add_cross_attention"):
    raise ConversionError("BERT as a decoder (is_decoder) or with cross-attention "
                          "(add_cross_attention) is not supported; only the bidirectional "
                          "encoder is.")
  activation = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}
  act = hf.get("hidden_act", "gelu")
  if act not in activation:
    raise ConversionError(f"BERT with hidden_act={act!r} is not supported; expected one of "
                          f"{sorted(activation)}.")
  return BertConfig(
      vocab_size=hf["vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
      max_len=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
      activation=activation[act], norm_eps=hf.get("layer_norm_eps", 1e-12))


def convert_bert(hf_dir: str | pathlib.Path) -> tuple[BertConfig, dict]:
  """`(BertConfig, parameters)` of a Hugging Face BERT directory: a BertModel, or a BertFor*
  model, whose encoder is under `bert.` and whose task heads (everything else) are left
  out. `config.pooler` says whether the checkpoint has the pooler."""
  hf, state = read_hf_dir(hf_dir)
  cfg = bert_config(hf)
  # Google's original checkpoints (bert-base-uncased among them) name LayerNorm parameters
  # gamma and beta.
  state = {k.replace("LayerNorm.gamma", "LayerNorm.weight")
           .replace("LayerNorm.beta", "LayerNorm.bias"): v for k, v in state.items()}
  trunk = {k: v for k, v in state.items() if k.startswith("bert.")}
  read = _Reader(trunk or state, ("bert.",))
  cfg = dataclasses.replace(cfg, pooler=read.prefix + "pooler.dense.weight" in read.state)
  d, h, m = cfg.width, cfg.num_heads, cfg.mlp_dim
  linear = lambda name, in_shape, out_shape: _linear(read, name, in_shape, out_shape, bias=True)
  params = {
      "embed": {"embedding": read("embeddings.word_embeddings.weight", (cfg.vocab_size, d))},
      "positions": {"embedding": read("embeddings.position_embeddings.weight",
                                      (cfg.max_len, d))},
      "token_types": {"embedding": read("embeddings.token_type_embeddings.weight",
                                        (cfg.type_vocab_size, d))},
      "embed_norm": _norm(read, "embeddings.LayerNorm", d)}
  for i in range(cfg.depth):
    p = f"encoder.layer.{i}."
    params[f"layers_{i}"] = {
        "attn": {name: linear(f"{p}attention.self.{name}", (d,), (h, d // h))
                 for name in ("query", "key", "value")}
                | {"out": linear(p + "attention.output.dense", (h, d // h), (d,))},
        "attn_norm": _norm(read, p + "attention.output.LayerNorm", d),
        "mlp": {"up": linear(p + "intermediate.dense", (d,), (m,)),
                "down": linear(p + "output.dense", (m,), (d,))},
        "mlp_norm": _norm(read, p + "output.LayerNorm", d)}
  if cfg.pooler:
    params["pooler"] = linear("pooler.dense", (d,), (d,))
  read.finish(ignore=("position_ids", "token_type_ids"))
  return cfg, params


# ---------------------------------------------------------------------------------------
# IDEFICS: a whole Flamingo-family model.
# ---------------------------------------------------------------------------------------
def convert_idefics(hf_dir: str | pathlib.Path, *, media_token_id: int,
                    endofchunk_token_id: int) -> tuple[FlamingoConfig, dict]:
  """`(FlamingoConfig, parameters)` of a Hugging Face IdeficsForVisionText2Text directory
  (with its perceiver resampler). The media token ids are the tokenizer's `<image>` and
  end-of-chunk ids. Additional (decoupled) embeddings and output rows are appended to the
  vocabulary."""
  hf, state = read_hf_dir(hf_dir)
  if hf.get("model_type") != "idefics":
    raise ConversionError(f"model_type {hf.get('model_type')!r} is not 'idefics'.")
  if not hf.get("use_resampler"):
    raise ConversionError("IDEFICS without its perceiver resampler (use_resampler=False) "
                          "is not a Flamingo; not supported.")
  vis, per = hf["vision_config"], hf["perceiver_config"]
  extra = hf.get("additional_vocab_size", 0)
  d, h, m = hf["hidden_size"], hf["num_attention_heads"], hf["intermediate_size"]
  qk_norm = "rmsnorm" if hf.get("qk_layer_norms") else None
  # The text model is a LLaMA (its decoupled extra vocabulary appended below).
  lm = dataclasses.replace(lm_config({**hf, "model_type": "llama"}),
                           vocab_size=hf["vocab_size"] + extra, tie_embeddings=False)
  vision = ViTConfig(
      image_size=vis["image_size"], patch_size=vis["patch_size"], width=vis["embed_dim"],
      depth=vis["num_hidden_layers"], num_heads=vis["num_attention_heads"],
      mlp_dim=vis["intermediate_size"], activation=vis.get("hidden_act", "gelu"),
      norm_eps=vis.get("layer_norm_eps", 1e-5), channels=vis.get("num_channels", 3),
      output_dim=None, keep_class_token=True)
  resampler = ResamplerConfig(
      depth=per["resampler_depth"], num_heads=per["resampler_n_heads"],
      head_dim=per["resampler_head_dim"], num_latents=per["resampler_n_latents"],
      activation="relu", qk_norm="layernorm" if per.get("qk_layer_norms_perceiver") else None)
  xattn = XAttnConfig(
      every=hf.get("cross_layer_interval", 1), placement="idefics", num_heads=h,
      head_dim=d // h, mlp_dim=m, activation=hf.get("hidden_act", "silu"), gated_ff=True,
      norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=qk_norm,
      gate={"float": "scalar", "vector": "vector"}[hf.get("alpha_type", "float")])
  cfg = FlamingoConfig(vision=vision, resampler=resampler, lm=lm, xattn=xattn,
                       media_token_id=media_token_id, endofchunk_token_id=endofchunk_token_id)

  read = _Reader(state, ("model.",))
  read.prefix = "model.vision_model."
  params: dict[str, Any] = {"vision": vit_params(read, vision, None)}
  read.prefix = "model.perceiver_resampler."
  e, rh, rk = vision.width, resampler.num_heads, resampler.head_dim
  perceiver = {"latents": read("latents", (resampler.num_latents, e)),
               "final_norm": _norm(read, "layer_norm", e)}
  for i in range(resampler.depth):
    b = f"blocks.{i}."
    attn = {name: _linear(read, f"{b}0.{name[0]}_proj", (e,), (rh, rk))
            for name in ("query", "key", "value")}
    attn["out"] = _linear(read, f"{b}0.output_proj", (rh, rk), (e,))
    if resampler.qk_norm:
      attn |= {"query_norm": _norm(read, f"{b}0.q_layer_norm", rk),
               "key_norm": _norm(read, f"{b}0.k_layer_norm", rk)}
    perceiver[f"layers_{i}"] = {
        "latents_norm": _norm(read, f"{b}0.latents_layer_norm", e),
        "media_norm": _norm(read, f"{b}0.context_layer_norm", e),
        "attn": attn, "mlp_norm": _norm(read, f"{b}1.ln", e),
        "mlp": {"up": _linear(read, f"{b}1.fc", (e,), (4 * e,)),
                "down": _linear(read, f"{b}1.c_proj", (4 * e,), (e,))}}
  params["resampler"] = perceiver

  read.prefix = "model."
  text: dict[str, Any] = {"embed": {"embedding": np.concatenate(
      [read("embed_tokens.weight", (hf["vocab_size"], d))]
      + ([read("embed_tokens.additional_embedding.weight", (extra, d))] if extra else []))}}
  k = d // h
  gate_shape = (1,) if xattn.gate == "scalar" else (d,)
  for j, i in enumerate(xattn.layer_indices(lm.depth)):
    b = f"gated_cross_attn_layers.{j}."
    block = _llama_layer(read, b, d, h, h, k, m, attn="cross_attn", kv_width=e)
    if qk_norm:
      block["attn"] |= {"query_norm": _norm(read, b + "cross_attn.q_layer_norm", k, bias=False),
                        "key_norm": _norm(read, b + "cross_attn.k_layer_norm", k, bias=False)}
    text[f"xattn_{i}"] = block | {
        "attn_gate": read(b + "alpha_cross_attn").reshape(gate_shape),
        "mlp_gate": read(b + "alpha_dense").reshape(gate_shape)}
  for i in range(lm.depth):
    text[f"layers_{i}"] = _llama_layer(read, f"layers.{i}.", d, h, h, k, m)
  text["final_norm"] = _norm(read, "norm", d, bias=False)
  read.prefix = ""
  text["lm_head"] = {"kernel": np.concatenate(
      [read("lm_head.weight", (hf["vocab_size"], d))]
      + ([read("lm_head.additional_fc.weight", (extra, d))] if extra else [])).T}
  params["lm"] = text
  read.finish(ignore=("rotary_emb.inv_freq", "position_ids"))
  return cfg, params


# ---------------------------------------------------------------------------------------
# OpenFlamingo: its trainable weights, an open_clip (or HF CLIP) vision tower, an HF LM.
# ---------------------------------------------------------------------------------------
def open_clip_vision(state: dict[str, np.ndarray], activation: str = "quick_gelu"
                     ) -> tuple[ViTConfig, dict[str, np.ndarray]]:
  """The ViT config and an HF-layout (`CLIPVisionModel`) state dict of an open_clip (or
  OpenAI CLIP) state dict's `visual.*` tower; open_clip stores no config, so the shapes
  give it (heads are 64 wide, as in every open_clip ViT). `activation` is not in the
  weights: "quick_gelu" for OpenAI's weights (OpenFlamingo's ViT-L-14), "gelu" for
  LAION's. Patch tokens are returned before `ln_post` (`token_norm=False`): open_clip
  <= 2.22 did so, and OpenFlamingo was trained with it."""
  visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
  if "conv1.weight" not in visual:
    raise ConversionError("No open_clip vision tower (visual.conv1.weight) in the state dict.")
  width, channels, patch, _ = visual["conv1.weight"].shape
  grid = math.isqrt(visual["positional_embedding"].shape[0] - 1)
  depth = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
  cfg = ViTConfig(image_size=grid * patch, patch_size=patch, width=width, depth=depth,
                  num_heads=width // 64, activation=activation, channels=channels,
                  mlp_dim=visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  output_dim=None, token_norm=False)
  renames = {"conv1": "embeddings.patch_embedding", "ln_pre": "pre_layrnorm",
             "ln_post": "post_layernorm", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
  hf = {"embeddings.class_embedding": visual.pop("class_embedding"),
        "embeddings.position_embedding.weight": visual.pop("positional_embedding")}
  visual.pop("proj", None)  # projects the pooled embedding; Flamingo reads patch tokens
  for key, value in visual.items():
    block, _, name = key.rpartition(".")  # `name` is weight or bias
    prefix = ""
    if block.startswith("transformer.resblocks."):
      i, block = block.split(".", 3)[2:]
      prefix = f"encoder.layers.{i}."
    if block == "attn" and name.startswith("in_proj_"):  # q, k, v stacked on the output dim
      for part, chunk in zip("qkv", np.split(value, 3), strict=True):
        hf[f"{prefix}self_attn.{part}_proj.{name[len('in_proj_'):]}"] = chunk
    else:
      hf[f"{prefix}{renames.get(block, block)}.{name}"] = value
  return cfg, hf


def convert_openflamingo(checkpoint: str | pathlib.Path, *, vision: str | pathlib.Path,
                         lm_dir: str | pathlib.Path, media_token_id: int,
                         endofchunk_token_id: int, vision_activation: str = "quick_gelu"
                         ) -> tuple[FlamingoConfig, dict]:
  """`(FlamingoConfig, parameters)` of an OpenFlamingo model.

  Args:
    checkpoint: OpenFlamingo's `checkpoint.pt`: the perceiver, the gated blocks (saved
      under the LM's decoder layers) and the LM's input embeddings with the added
      `<|endofchunk|>`, `<image>` (and `<PAD>`) rows. A training checkpoint
      (`model_state_dict`, DDP's `module.` prefix) works too.
    vision: the CLIP vision tower: an open_clip / OpenAI CLIP weights file (`visual.*`;
      see `open_clip_vision`) or a Hugging Face CLIP directory.
    lm_dir: the Hugging Face LM the model was built on (a family `convert_lm` reads).
    media_token_id, endofchunk_token_id: `<image>` and `<|endofchunk|>` in the tokenizer
      extended as OpenFlamingo does (`HFTokenizer(lm_dir)` gives them).
    vision_activation: of an open_clip tower ("quick_gelu" for OpenAI's weights).
  An untied output layer has no rows for the added tokens in the checkpoint (OpenFlamingo
  trains and saves only the input embeddings); they are filled with the mean row.
  """
  ckpt = read_state_file(checkpoint)
  ckpt = ckpt.get("model_state_dict", ckpt)
  ckpt = {k.removeprefix("module.").replace("._checkpoint_wrapped_module", ""): v
          for k, v in ckpt.items()}
  hf, lm_state = read_hf_dir(lm_dir)
  lm = lm_config(hf)

  # Vision tower.
  if pathlib.Path(vision).is_dir():
    vision_hf, vision_state = read_hf_dir(vision)
    vision_hf = vision_hf.get("vision_config", vision_hf)
    vision_cfg = dataclasses.replace(vit_config(vision_hf, None), token_norm=False)
  else:
    vision_cfg, vision_state = open_clip_vision(read_state_file(vision), vision_activation)
  read = _Reader(vision_state, ("vision_model.",))  # CLIPModel's, not CLIPVisionModel's
  params: dict[str, Any] = {"vision": vit_params(read, vision_cfg, None)}
  read.finish(ignore=("position_ids", "text_model.", "visual_projection", "text_projection",
                      "logit_scale"))

  # The LM, its input embeddings (and anything else saved) replaced by the checkpoint's.
  blocks: dict[int, dict[str, np.ndarray]] = {}
  lm_state = dict(lm_state)
  other = {}
  for key, value in ckpt.items():
    if not key.startswith("lang_encoder."):
      other[key] = value
      continue
    name = key[len("lang_encoder."):]
    head, sep, tail = name.partition(".gated_cross_attn_layer.")
    if sep:  # <decoder layers>.<i>.gated_cross_attn_layer.<param>
      blocks.setdefault(int(head.rpartition(".")[2]), {})[tail] = value
    elif name in lm_state:
      lm_state[name] = value
    elif not name.startswith(("old_decoder_blocks.", "gated_cross_attn_layers.")) and (
        ".decoder_layer." not in name):  # aliases of the layers already read
      other[key] = value
  embed_key = {"gpt2": "transformer.wte.weight", "opt": "model.decoder.embed_tokens.weight",
               "mpt": "transformer.wte.weight"}.get(hf["model_type"], "model.embed_tokens.weight")
  vocab = lm_state[embed_key].shape[0]
  if not lm.tie_embeddings and lm_state["lm_head.weight"].shape[0] != vocab:
    from mmjax.checkpoints import extend_with_mean
    lm_state["lm_head.weight"] = extend_with_mean(lm_state["lm_head.weight"][:vocab], vocab)
  lm = dataclasses.replace(lm, vocab_size=vocab)
  params["lm"] = lm_params(hf, lm_state, lm)

  # Perceiver resampler.
  read = _Reader(other, ("perceiver.",))
  read.prefix = "perceiver."
  e = vision_cfg.width
  latents = read("latents")
  depth = len({k.split(".")[2] for k in other if k.startswith("perceiver.layers.")})
  inner = read("layers.0.0.to_q.weight").shape[0]
  frames = other.get("perceiver.frame_embs")
  if "perceiver.media_time_embs" in other:
    raise ConversionError("perceiver.media_time_embs (max_num_media) is not supported.")
  resampler = ResamplerConfig(
      depth=depth, num_heads=inner // 64, head_dim=64, num_latents=latents.shape[0],
      ff_mult=read("layers.0.1.1.weight").shape[0] // e, activation="gelu",
      max_frames=None if frames is None else frames.shape[0])
  perceiver = {"latents": read("latents", (resampler.num_latents, e)),
               "final_norm": _norm(read, "norm", e)}
  if frames is not None:
    perceiver["frame_embed"] = read("frame_embs", frames.shape)
  for i in range(depth):
    perceiver[f"layers_{i}"] = {
        "latents_norm": _norm(read, f"layers.{i}.0.norm_latents", e),
        "media_norm": _norm(read, f"layers.{i}.0.norm_media", e),
        "attn": _openflamingo_attention(read, f"layers.{i}.0.", e, e, resampler.num_heads),
        **_openflamingo_ff(read, f"layers.{i}.1.", e, resampler.ff_mult)}
  params["resampler"] = perceiver
  read.finish(ignore=("vision_encoder.",), hint=_OPENFLAMINGO_HINT)  # a full state dict's tower

  # Gated cross-attention blocks.
  if not blocks:
    raise ConversionError(f"{checkpoint} has no gated cross-attention blocks "
                          "(lang_encoder.<layers>.<i>.gated_cross_attn_layer.*).")
  every = min(blocks) + 1
  d = lm.width
  block_inner, ff_mult = (blocks[min(blocks)][k].shape[0] for k in ("attn.to_q.weight",
                                                                     "ff.1.weight"))
  xattn = XAttnConfig(every=every, placement="openflamingo", num_heads=block_inner // 64,
                      head_dim=64, ff_mult=ff_mult // d, activation="gelu")
  if sorted(blocks) != list(xattn.layer_indices(lm.depth)):
    raise ConversionError(f"Gated blocks in front of layers {sorted(blocks)}: not every "
                          f"{every} layers of the {lm.depth}-layer LM.")
  for i, block in blocks.items():
    read = _Reader(block, ("",))
    params["lm"][f"xattn_{i}"] = {
        "attn_norm": _norm(read, "attn.norm", d),
        "attn": _openflamingo_attention(read, "attn.", d, e, xattn.num_heads),
        "attn_gate": read("attn_gate", (1,)), "mlp_gate": read("ff_gate", (1,)),
        **_openflamingo_ff(read, "ff.", d, xattn.ff_mult)}
    read.finish(hint=_OPENFLAMINGO_HINT)
  cfg = FlamingoConfig(vision=vision_cfg, resampler=resampler, lm=lm, xattn=xattn,
                       media_token_id=media_token_id, endofchunk_token_id=endofchunk_token_id)
  return cfg, params


def _openflamingo_attention(read: _Reader, p: str, d: int, e: int, heads: int) -> dict:
  """`to_q`, `to_kv` (keys and values stacked on the output dim) and `to_out`, bias-free,
  64-wide heads: `d`-wide queries, `e`-wide keys and values."""
  inner = heads * 64
  kv = read(p + "to_kv.weight", (2 * inner, e))
  return {"query": _linear(read, p + "to_q", (d,), (heads, 64)),
          "key": _dense(kv[:inner].T, None, (e,), (heads, 64)),
          "value": _dense(kv[inner:].T, None, (e,), (heads, 64)),
          "out": _linear(read, p + "to_out", (heads, 64), (d,))}


def _openflamingo_ff(read: _Reader, p: str, d: int, mult: int) -> dict:
  """OpenFlamingo's `FeedForward`: LayerNorm (`.0`), Linear (`.1`), GELU, Linear (`.3`)."""
  return {"mlp_norm": _norm(read, p + "0", d),
          "mlp": {"up": _linear(read, p + "1", (d,), (mult * d,)),
                  "down": _linear(read, p + "3", (mult * d,), (d,))}}


def convert_lm(hf_dir: str | pathlib.Path) -> tuple[LMConfig, dict]:
  """`(LMConfig, parameters)` of a Hugging Face LM directory."""
  hf, state = read_hf_dir(hf_dir)
  cfg = lm_config(hf)
  return cfg, lm_params(hf, state, cfg)


def export_lm(params: dict, like: str | pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
  """mmjax LM parameters (e.g. fine-tuned) back in the Hugging Face layout of the model
  directory `like` they were converted from: `(config.json dict, state dict)`.

  Conversion only moves, transposes and reshapes numbers, so it is linear and exporting
  is its transpose (`jax.linear_transpose`): one mapping serves both directions. OPT's
  two unused position rows come back as zeros; a tied output layer is not written (it
  is the embedding).
  """
  import jax

  hf, state = read_hf_dir(like)
  cfg = lm_config(hf)
  recording = _Recording(state)
  lm_params(hf, recording, cfg)  # which entries conversion reads (not buffers, tied heads)
  primal = {k: jax.ShapeDtypeStruct(state[k].shape, np.float32) for k in recording.read}
  (exported,) = jax.linear_transpose(lambda weights: lm_params(hf, weights, cfg), primal)(
      jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params))
  return hf, {k: np.asarray(v) for k, v in exported.items()}


class _Recording(dict):
  """A state dict that remembers which entries were read."""

  def __init__(self, *args):
    super().__init__(*args)
    self.read: set[str] = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)


def save_hf(output: str | pathlib.Path, hf_config: dict, state: dict[str, np.ndarray]) -> None:
  """Writes `config.json` and `model.safetensors`, loadable by `from_pretrained`."""
  from safetensors.numpy import save_file
  output = pathlib.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  (output / "config.json").write_text(json.dumps(hf_config, indent=2))
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            str(output / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------
# Output: a run-shaped checkpoint that `config.init` entries can point at.
# ---------------------------------------------------------------------------------------
def save(output: str | pathlib.Path, task: str, model_config, params: dict) -> None:
  """Writes `output/checkpoints/0` (params, as a finished run's) and `output/config.json`."""
  import orbax.checkpoint as ocp

  from mmjax import checkpoints
  output = pathlib.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  mngr = checkpoints.manager(output)
  mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
  mngr.wait_until_finished()
  mngr.close()
  (output / "config.json").write_text(json.dumps(
      {"task": task, "model": dataclasses.asdict(model_config)}, indent=2))


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax's INFO logs only with --verbosity=0
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  hf_dir, output = f.hf_dir, f.output
  kind = json.loads((pathlib.Path(hf_dir) / "config.json").read_text()).get("model_type")
  if f.openflamingo:
    if f.vision is None:
      raise app.UsageError("--openflamingo needs --vision: the CLIP vision tower (open_clip "
                           "weights file or Hugging Face CLIP directory).")
    media, endofchunk = f.media_token_id, f.endofchunk_token_id
    if media is None or endofchunk is None:
      from mmjax.data.tokenizer import HFTokenizer
      tokenizer = HFTokenizer(hf_dir)  # extended as OpenFlamingo's factory extends it
      media, endofchunk = tokenizer.media_id, tokenizer.endofchunk_id
    cfg, params = convert_openflamingo(f.openflamingo, vision=f.vision, lm_dir=hf_dir,
                                       media_token_id=media, endofchunk_token_id=endofchunk,
                                       vision_activation=f.vision_activation)
    save(output, "flamingo", cfg, params)
  elif kind == "idefics":
    if f.media_token_id is None or f.endofchunk_token_id is None:
      raise app.UsageError("IDEFICS needs --media_token_id and --endofchunk_token_id (its "
                           "tokenizer's <image> and end-of-chunk ids).")
    cfg, params = convert_idefics(hf_dir, media_token_id=f.media_token_id,
                                  endofchunk_token_id=f.endofchunk_token_id)
    save(output, "flamingo", cfg, params)
  elif kind == "clip":
    cfg, params = convert_clip(hf_dir)
    save(output, "clip", cfg, params)
  elif kind == "bert":
    cfg, params = convert_bert(hf_dir)
    save(output, "bert", cfg, params)
  else:
    cfg, params = convert_lm(hf_dir)
    save(output, "lm", cfg, params)
  count = sum(int(np.prod(np.shape(x))) for x in _leaves(params))
  print(f"Converted {hf_dir} ({count:,} parameters) to {output}.")


def _leaves(tree):
  for value in tree.values():
    yield from (_leaves(value) if isinstance(value, dict) else (value,))


if __name__ == "__main__":
  # Defined here, not at import, so that the library API imports cleanly anywhere.
  flags.DEFINE_string("hf_dir", None, "A Hugging Face model directory.")
  flags.DEFINE_string("output", None, "Where the checkpoint and config go.")
  flags.DEFINE_string("openflamingo", None, "OpenFlamingo's checkpoint.pt; --hf_dir is then "
                      "its language model and --vision its CLIP vision tower.")
  flags.DEFINE_string("vision", None, "OpenFlamingo: open_clip / OpenAI CLIP weights file, "
                      "or a Hugging Face CLIP directory.")
  flags.DEFINE_string("vision_activation", "quick_gelu", "OpenFlamingo: the open_clip "
                      "tower's activation (quick_gelu: OpenAI's weights; gelu: LAION's).")
  flags.DEFINE_integer("media_token_id", None, "IDEFICS, OpenFlamingo: the <image> token id "
                       "(OpenFlamingo: default from --hf_dir's tokenizer).")
  flags.DEFINE_integer("endofchunk_token_id", None, "IDEFICS, OpenFlamingo: the end-of-chunk "
                       "token id.")
  flags.mark_flags_as_required(["hf_dir", "output"])
  app.run(main)
