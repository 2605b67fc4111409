"""Converts pretrained checkpoints into mmjax: an Orbax checkpoint and the model config.

  python -m mmjax.convert --hf_dir=/models/Llama-3.2-1B --output=/ckpt/llama-1b

reads a Hugging Face model directory (config.json and model.safetensors, sharded
safetensors with their index, or pytorch_model.bin; nothing is downloaded) and writes
`output/checkpoints/0` (the parameters, as a run's checkpoint) and `output/config.json`
(`{"task": "lm", "model": ...}`). A recipe uses it as a frozen backbone with
`config.init = [dict(target="lm", workdir="/ckpt/llama-1b")]` and the same model config.

Language models: GPT-2 (`gpt2`), OPT (`opt`, pre-norm sizes: all but 350m) and the LLaMA
family (`llama`, `mistral` without sliding window): grouped-query attention, RoPE, RMSNorm,
SwiGLU, tied or untied output. CLIP (`clip`): the dual encoder (`task: "clip"`); its
vision tower alone is the `image` subtree (`config.init` entry `source="image"`).
IDEFICS (`idefics`, with `--media_token_id` and `--endofchunk_token_id`): the whole
Flamingo (`task: "flamingo"`; decoupled extra vocabulary appended). The
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

from mmjax.models.flamingo import FlamingoConfig
from mmjax.models.lm import LMConfig
from mmjax.models.perceiver import ResamplerConfig
from mmjax.models.two_towers import TwoTowersConfig
from mmjax.models.vit import ViTConfig
from mmjax.models.xattn import XAttnConfig

LM_TYPES = ("gpt2", "opt", "llama", "mistral")


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
  files = sorted(path.glob("*.safetensors"))
  if files:
    from safetensors.numpy import load_file
    state = {}
    for f in files:
      state.update(load_file(str(f)))
  elif (path / "pytorch_model.bin").exists():
    import torch
    state = {k: v.float().numpy() for k, v in torch.load(
        path / "pytorch_model.bin", map_location="cpu", weights_only=True).items()}
  else:
    raise FileNotFoundError(f"{path} has neither *.safetensors nor pytorch_model.bin.")
  return config, {k: np.asarray(v, np.float32) for k, v in state.items()}


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
    # transformers >= 5 writes `rope_parameters`; earlier versions `rope_theta` and
    # `rope_scaling`.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      raise ConversionError(f"RoPE scaling {rope} is not supported yet; only unscaled RoPE "
                            "converts exactly.")
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
        max_len=hf["max_position_embeddings"], rope_theta=theta,
        tie_embeddings=hf.get("tie_word_embeddings", False))
  raise ConversionError(f"model_type {kind!r} is not a supported LM; expected one of "
                        f"{LM_TYPES}.")


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

  def finish(self, ignore: tuple[str, ...] = ()) -> None:
    """Raises `ConversionError` naming every problem, if there is any."""
    unexpected = sorted(k for k in self.state if k not in self.used
                        and not any(part in k for part in ignore))
    problems = [f"{what} ({len(items)}): {items[:6]}{' ...' if len(items) > 6 else ''}"
                for what, items in (("missing parameters", self.missing),
                                    ("shape mismatches", self.mismatched),
                                    ("unexpected parameters", unexpected)) if items]
    if problems:
      raise ConversionError(
          "The checkpoint does not match its config.json: " + "; ".join(problems) + ". Check "
          "that config.json belongs to these weights (hidden_size, intermediate_size, "
          "num_attention_heads, num_key_value_heads, num_hidden_layers, vocab_size).")


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
  """A LayerNorm (`weight`, `bias`) or, without bias, an RMSNorm (`weight`)."""
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
  rope = hf.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise ConversionError(f"RoPE scaling {rope} is not supported yet.")
  vis, per = hf["vision_config"], hf["perceiver_config"]
  extra = hf.get("additional_vocab_size", 0)
  d, h, m = hf["hidden_size"], hf["num_attention_heads"], hf["intermediate_size"]
  qk_norm = "rmsnorm" if hf.get("qk_layer_norms") else None
  lm = LMConfig(
      vocab_size=hf["vocab_size"] + extra, width=d, depth=hf["num_hidden_layers"],
      num_heads=h, mlp_dim=m, activation=hf.get("hidden_act", "silu"), gated_mlp=True,
      norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), use_bias=False, position="rope",
      max_len=hf["max_position_embeddings"],
      rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), tie_embeddings=False)
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
  hf_dir, output = flags.FLAGS.hf_dir, flags.FLAGS.output
  kind = json.loads((pathlib.Path(hf_dir) / "config.json").read_text()).get("model_type")
  if kind == "idefics":
    f = flags.FLAGS
    if f.media_token_id is None or f.endofchunk_token_id is None:
      raise app.UsageError("IDEFICS needs --media_token_id and --endofchunk_token_id (its "
                           "tokenizer's <image> and end-of-chunk ids).")
    cfg, params = convert_idefics(hf_dir, media_token_id=f.media_token_id,
                                  endofchunk_token_id=f.endofchunk_token_id)
    save(output, "flamingo", cfg, params)
  elif kind == "clip":
    cfg, params = convert_clip(hf_dir)
    save(output, "clip", cfg, params)
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
  flags.DEFINE_integer("media_token_id", None, "IDEFICS: the <image> token id.")
  flags.DEFINE_integer("endofchunk_token_id", None, "IDEFICS: the end-of-chunk token id.")
  flags.mark_flags_as_required(["hf_dir", "output"])
  app.run(main)
