"""OPT (`model_type: opt`), pre-norm sizes (all but opt-350m): learned positions offset
by 2, LayerNorm, torch Linear weights; with `enable_bias=False` the projections lose their
biases and the LayerNorms keep theirs; tied or untied output layer."""

from typing import Any

from mmjax.convert import common
from mmjax.models.lm import LMConfig

# Where a causal-LM checkpoint (its *ForCausalLM) keeps the decoder layers and the input
# embedding (OpenFlamingo's checkpoints name them so).
DECODER_LAYERS = "model.decoder.layers"
EMBEDDING = "model.decoder.embed_tokens.weight"
IGNORED_FIELDS = {
    "dropout": common.DROPOUT, "attention_dropout": common.DROPOUT,
    "activation_dropout": common.DROPOUT,
    "layerdrop": "drops whole layers in training only",
}
IGNORED_TENSORS: dict[str, str] = {}
# transformers' OPTConfig() values of the fields `config` reads. A config nested in another
# and saved by transformers 4.x (BLIP-2's `text_config`) lists only the fields that differ
# from these; the others have these values.
DEFAULTS = {"vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
            "max_position_embeddings": 2048, "do_layer_norm_before": True,
            "_remove_final_layer_norm": False, "word_embed_proj_dim": 768,
            "num_attention_heads": 12, "activation_function": "relu", "enable_bias": True,
            "layer_norm_elementwise_affine": True, "tie_word_embeddings": True}


def config(f: common.Fields) -> LMConfig:
  d = f["hidden_size"]
  f.require("do_layer_norm_before", (True,), True,
            "post-norm OPT (opt-350m) is not what the LM computes")
  f.require("word_embed_proj_dim", (d,), d,
            "projected embeddings (opt-350m) are not supported; the value must equal "
            "hidden_size")
  f.require("_remove_final_layer_norm", (False,), False, "the LM ends with a LayerNorm")
  f.require("layer_norm_elementwise_affine", (True,), True,
            "LayerNorms without scale and bias are not supported")
  bias = f.get("enable_bias", True)
  return LMConfig(
      vocab_size=f["vocab_size"], width=d, depth=f["num_hidden_layers"],
      num_heads=f["num_attention_heads"], mlp_dim=f["ffn_dim"],
      activation=common.activation(f, "activation_function", "relu"), use_bias=bias,
      norm_bias=None if bias else True, max_len=f["max_position_embeddings"],
      tie_embeddings=f.get("tie_word_embeddings", True))


def params(state: dict[str, Any], cfg: LMConfig) -> dict:
  read = common.Reader(state, ("model.decoder.", "decoder."))
  d, h, k, m = cfg.width, cfg.num_heads, cfg.dims_per_head, cfg.mlp_dim
  out: dict[str, Any] = {
      "embed": {"embedding": read("embed_tokens.weight", (cfg.vocab_size, d))},
      # OPT's learned positions are offset by 2 (a fairseq legacy).
      "positions": {"embedding": read("embed_positions.weight", (cfg.max_len + 2, d))[2:]}}
  for i in range(cfg.depth):
    out[f"layers_{i}"] = common.linear_layer(
        read, f"layers.{i}.", ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2"),
        d, h, k, m, bias=cfg.use_bias, norm_bias=True)
  out["final_norm"] = common.norm(read, "final_layer_norm", d)
  common.output_layer(read, out, cfg, "model.decoder.embed_tokens.weight")
  read.finish(IGNORED_TENSORS)
  return out
