"""IDEFICS (`model_type: idefics`, IdeficsForVisionText2Text with its perceiver resampler):
a whole Flamingo-family model (`task: "flamingo"`): a CLIP-style ViT (class token kept),
the perceiver, gated blocks in front of every `cross_layer_interval`-th LLaMA layer, and
the decoupled extra vocabulary appended to the LM's."""

import dataclasses
import pathlib
from typing import Any

import numpy as np

from mmjax.convert import clip, common, llama
from mmjax.models.flamingo import FlamingoConfig
from mmjax.models.perceiver import ResamplerConfig
from mmjax.models.vit import ViTConfig
from mmjax.models.xattn import XAttnConfig

IGNORED_FIELDS = {
    "dropout": common.DROPOUT, "vision_config.attention_dropout": common.DROPOUT,
    "alpha_initializer": "initialisation of the gates only; the checkpoint's are read",
    "alphas_initializer_range": "as alpha_initializer",
    "freeze_text_layers": "which parameters train; the weights compute the same function",
    "freeze_text_module_exceptions": "as freeze_text_layers",
    "freeze_vision_layers": "as freeze_text_layers",
    "freeze_vision_module_exceptions": "as freeze_text_layers",
    "freeze_lm_head": "as freeze_text_layers",
    "perceiver_config.use_resampler": "a copy of the top-level use_resampler (read)",
    "vision_config.vision_model_name": "names the CLIP the tower came from; its shape is "
                                       "read from the other fields",
    **llama.IGNORED_FIELDS,
}
IGNORED_TENSORS = {
    r"model\.vision_model\.embeddings\.position_ids": "a buffer of arange(positions)",
    r"model\.(layers|gated_cross_attn_layers)\.\d+\.(self_attn|cross_attn)\.rotary_emb\."
    r"inv_freq": "RoPE's frequencies, a buffer computed from the config",
}


def idefics_config(hf: dict[str, Any], media_token_id: int,
                   endofchunk_token_id: int) -> FlamingoConfig:
  """The `FlamingoConfig` of a Hugging Face IDEFICS config, every field read or ignored on
  purpose (`IGNORED_FIELDS`)."""
  f = common.Fields(hf, "IDEFICS")
  f.require("model_type", ("idefics",))
  f.require("use_resampler", (True,), False,
            "without its perceiver resampler IDEFICS is not a Flamingo")
  f.require("tie_word_embeddings", (False,), False, "IDEFICS's output layer is its own")
  f.require("cross_layer_activation_function", ("swiglu",), "swiglu",
            "the gated blocks' feed-forward is a SwiGLU")
  extra = f.get("additional_vocab_size", 0)
  d, h, m = f["hidden_size"], f["num_attention_heads"], f["intermediate_size"]
  qk_norm = "rmsnorm" if f.get("qk_layer_norms", False) else None
  # The text model is a LLaMA (its decoupled extra vocabulary appended).
  lm = llama.config(f)
  lm = dataclasses.replace(lm, vocab_size=lm.vocab_size + extra, tie_embeddings=False)
  vis, per = f.sub("vision_config"), f.sub("perceiver_config")
  vision = ViTConfig(
      image_size=vis["image_size"], patch_size=vis["patch_size"], width=vis["embed_dim"],
      depth=vis["num_hidden_layers"], num_heads=vis["num_attention_heads"],
      mlp_dim=vis["intermediate_size"], activation=common.activation(vis, "hidden_act", "gelu"),
      norm_eps=vis.get("layer_norm_eps", 1e-5), channels=vis.get("num_channels", 3),
      output_dim=None, keep_class_token=True)
  resampler = ResamplerConfig(
      depth=per["resampler_depth"], num_heads=per["resampler_n_heads"],
      head_dim=per["resampler_head_dim"], num_latents=per["resampler_n_latents"],
      activation="relu",
      qk_norm="layernorm" if per.get("qk_layer_norms_perceiver", False) else None)
  xattn = XAttnConfig(
      every=f.get("cross_layer_interval", 1), placement="idefics", num_heads=h,
      head_dim=d // h, mlp_dim=m, activation=lm.activation, gated_ff=True,
      norm="rmsnorm", norm_eps=lm.norm_eps, qk_norm=qk_norm,
      gate=f.choice("alpha_type", {"float": "scalar", "vector": "vector"}, "float"))
  f.finish(IGNORED_FIELDS)
  return FlamingoConfig(vision=vision, resampler=resampler, lm=lm, xattn=xattn,
                        media_token_id=media_token_id, endofchunk_token_id=endofchunk_token_id)


def idefics_params(state: dict[str, np.ndarray], cfg: FlamingoConfig, extra: int) -> dict:
  vision, resampler, lm, xattn = cfg.vision, cfg.resampler, cfg.lm, cfg.xattn
  read = common.Reader(state)
  read.prefix = "model.vision_model."
  params: dict[str, Any] = {"vision": clip.vit_params(read, vision, None)}
  read.prefix = "model.perceiver_resampler."
  e, rh, rk = vision.width, resampler.num_heads, resampler.head_dim
  perceiver = {"latents": read("latents", (resampler.num_latents, e)),
               "final_norm": common.norm(read, "layer_norm", e)}
  for i in range(resampler.depth):
    b = f"blocks.{i}."
    attn = {name: common.linear(read, f"{b}0.{name[0]}_proj", (e,), (rh, rk))
            for name in ("query", "key", "value")}
    attn["out"] = common.linear(read, f"{b}0.output_proj", (rh, rk), (e,))
    if resampler.qk_norm:
      attn |= {"query_norm": common.norm(read, f"{b}0.q_layer_norm", rk),
               "key_norm": common.norm(read, f"{b}0.k_layer_norm", rk)}
    perceiver[f"layers_{i}"] = {
        "latents_norm": common.norm(read, f"{b}0.latents_layer_norm", e),
        "media_norm": common.norm(read, f"{b}0.context_layer_norm", e),
        "attn": attn, "mlp_norm": common.norm(read, f"{b}1.ln", e),
        "mlp": {"up": common.linear(read, f"{b}1.fc", (e,), (4 * e,)),
                "down": common.linear(read, f"{b}1.c_proj", (4 * e,), (e,))}}
  params["resampler"] = perceiver

  read.prefix = "model."
  d, h, m, k = lm.width, lm.num_heads, lm.mlp_dim, lm.dims_per_head
  base = lm.vocab_size - extra
  text: dict[str, Any] = {"embed": {"embedding": np.concatenate(
      [read("embed_tokens.weight", (base, d))]
      + ([read("embed_tokens.additional_embedding.weight", (extra, d))] if extra else []))}}
  gate_shape = (1,) if xattn.gate == "scalar" else (d,)
  for j, i in enumerate(xattn.layer_indices(lm.depth)):
    b = f"gated_cross_attn_layers.{j}."
    block = llama.layer(read, b, d, h, h, k, m, attn="cross_attn", kv_width=e)
    if xattn.qk_norm:
      block["attn"] |= {
          "query_norm": common.norm(read, b + "cross_attn.q_layer_norm", k, bias=False),
          "key_norm": common.norm(read, b + "cross_attn.k_layer_norm", k, bias=False)}
    text[f"xattn_{i}"] = block | {
        "attn_gate": read(b + "alpha_cross_attn").reshape(gate_shape),
        "mlp_gate": read(b + "alpha_dense").reshape(gate_shape)}
  for i in range(lm.depth):
    text[f"layers_{i}"] = llama.layer(read, f"layers.{i}.", d, h, lm.num_kv_heads or h, k, m)
  text["final_norm"] = common.norm(read, "norm", d, bias=False)
  read.prefix = ""
  text["lm_head"] = {"kernel": np.concatenate(
      [read("lm_head.weight", (base, d))]
      + ([read("lm_head.additional_fc.weight", (extra, d))] if extra else [])).T}
  params["lm"] = text
  read.finish(IGNORED_TENSORS)
  return params


def convert_idefics(hf_dir: str | pathlib.Path, *, media_token_id: int,
                    endofchunk_token_id: int) -> tuple[FlamingoConfig, dict]:
  """`(FlamingoConfig, parameters)` of a Hugging Face IdeficsForVisionText2Text directory
  (with its perceiver resampler). The media token ids are the tokenizer's `<image>` and
  end-of-chunk ids. Additional (decoupled) embeddings and output rows are appended to the
  vocabulary."""
  hf = common.read_hf_config(hf_dir)
  cfg = idefics_config(hf, media_token_id, endofchunk_token_id)
  params = idefics_params(common.read_hf_weights(hf_dir), cfg,
                          hf.get("additional_vocab_size") or 0)
  common.check_flamingo(params, cfg)
  return cfg, params

