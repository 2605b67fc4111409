"""The LLaMA family (`model_type: llama`, `mistral`): grouped-query attention, RoPE (plain,
or scaled "linear" or "llama3"), RMSNorm, SwiGLU, bias-free torch Linear weights; tied or
untied output layer; Mistral's sliding window (`LMConfig.sliding_window`, left unset where
it covers `max_position_embeddings`)."""

from typing import Any

from mmjax.convert import common
from mmjax.layers import RopeScaling
from mmjax.models.lm import LMConfig

ConversionError = common.ConversionError
ROPE_SCALINGS = ("linear", "llama3")
# Where a causal-LM checkpoint (its *ForCausalLM) keeps the decoder layers and the input
# embedding (OpenFlamingo's checkpoints name them so).
DECODER_LAYERS = "model.layers"
EMBEDDING = "model.embed_tokens.weight"
IGNORED_FIELDS = {
    "pretraining_tp": "splits the same matmuls across devices in pretraining; transformers "
                      "computes them whole",
    "attention_dropout": common.DROPOUT,
}
IGNORED_TENSORS = {
    r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq":
        "RoPE's frequencies, a buffer computed from the config",
}


def config(f: common.Fields) -> LMConfig:
  """The LLaMA (or Mistral) fields of `f` as an `LMConfig`."""
  f.require("attention_bias", (False,), False, "LLaMA variants with biases are not")
  f.require("mlp_bias", (False,), False, "LLaMA variants with biases are not")
  max_len = f["max_position_embeddings"]
  window = f.get("sliding_window")
  if window is not None and window >= max_len:
    window = None  # it hides no position the model sees
  theta, scaling = rope_settings(f)
  return LMConfig(
      vocab_size=f["vocab_size"], width=f["hidden_size"], depth=f["num_hidden_layers"],
      num_heads=f["num_attention_heads"],
      num_kv_heads=f.get("num_key_value_heads", f["num_attention_heads"]),
      head_dim=f.get("head_dim"), mlp_dim=f["intermediate_size"],
      activation=common.activation(f, "hidden_act", "silu"), gated_mlp=True, norm="rmsnorm",
      norm_eps=f.get("rms_norm_eps", 1e-6), use_bias=False, position="rope",
      max_len=max_len, rope_theta=theta, rope_scaling=scaling, sliding_window=window,
      tie_embeddings=f.get("tie_word_embeddings", False))


def rope_settings(f: common.Fields | dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """`(theta, scaling)` of a Hugging Face config's RoPE, read as transformers reads it.

  transformers >= 5 writes `rope_parameters` (with `rope_theta` inside); earlier versions a
  top-level `rope_theta` and `rope_scaling` (whose type is under "type" or "rope_type").
  """
  if not isinstance(f, common.Fields):
    f = common.Fields(f, "LLaMA")
  name = next((n for n in ("rope_scaling", "rope_parameters") if f.get(n)), None)
  rope = f.sub(name) if name else common.Fields({}, f.family)
  theta = rope.get("rope_theta", f.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("default",) + ROPE_SCALINGS:
    raise ConversionError(f"RoPE scaling type {kind!r} ({rope.config}) is not supported; "
                          f"supported are unscaled RoPE ('default') and {ROPE_SCALINGS}.")
  rope.require("partial_rotary_factor", (1.0,), 1.0, "RoPE on part of each head is not")
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, RopeScaling("linear", factor=rope["factor"])
  # As transformers: a top-level original_max_position_embeddings wins, then the rope
  # dict's, then the model's own context length.
  original = f.get("original_max_position_embeddings") or rope.get(
      "original_max_position_embeddings", f["max_position_embeddings"])
  return theta, RopeScaling("llama3", factor=rope["factor"],
                            low_freq_factor=rope["low_freq_factor"],
                            high_freq_factor=rope["high_freq_factor"], original_max_len=original)


def layer(read: common.Reader, p: str, d: int, h: int, g: int, k: int, m: int,
          attn: str = "self_attn", kv_width: int | None = None) -> dict:
  """A LLaMA-style layer after `p`: bias-free torch Linear weights, RMSNorm, SwiGLU. With
  `attn="cross_attn"` and keys/values from `kv_width`-wide media, IDEFICS's gated block
  (without its gates)."""
  lin = lambda name, in_shape, out_shape: common.linear(read, p + name, in_shape, out_shape)
  e = kv_width or d
  return {
      "attn_norm": common.norm(read, p + "input_layernorm", d, bias=False),
      "attn": {"query": lin(f"{attn}.q_proj", (d,), (h, k)),
               "key": lin(f"{attn}.k_proj", (e,), (g, k)),
               "value": lin(f"{attn}.v_proj", (e,), (g, k)),
               "out": lin(f"{attn}.o_proj", (h, k), (d,))},
      "mlp_norm": common.norm(read, p + "post_attention_layernorm", d, bias=False),
      "mlp": {"gate": lin("mlp.gate_proj", (d,), (m,)),
              "up": lin("mlp.up_proj", (d,), (m,)),
              "down": lin("mlp.down_proj", (m,), (d,))}}


def params(state: dict[str, Any], cfg: LMConfig) -> dict:
  read = common.Reader(state, ("model.",))
  d, h, k, m = cfg.width, cfg.num_heads, cfg.dims_per_head, cfg.mlp_dim
  g = cfg.num_kv_heads or h
  out: dict[str, Any] = {
      "embed": {"embedding": read("embed_tokens.weight", (cfg.vocab_size, d))}}
  for i in range(cfg.depth):
    out[f"layers_{i}"] = layer(read, f"layers.{i}.", d, h, g, k, m)
  out["final_norm"] = common.norm(read, "norm", d, bias=False)
  common.output_layer(read, out, cfg, "model.embed_tokens.weight")
  read.finish(IGNORED_TENSORS)
  return out
