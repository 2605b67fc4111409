"""MPT (`model_type: mpt`, as mosaicml/mpt-7b): ALiBi, bias-free LayerNorm and GELU MLP,
fused q/k/v; tied or untied output layer.

`expansion_ratio` and `attn_config.alibi_bias_max` are honoured as mosaicml's own
modeling code (which trained these checkpoints) honours them; transformers' MptModel
ignores both (a 4x MLP, slopes for 8), so for other values it is not the reference."""

import math
from typing import Any

from mmjax.convert import common
from mmjax.models.lm import LMConfig

# Where a causal-LM checkpoint (its *ForCausalLM) keeps the decoder layers and the input
# embedding (OpenFlamingo's checkpoints name them so).
DECODER_LAYERS = "transformer.blocks"
EMBEDDING = "transformer.wte.weight"
IGNORED_FIELDS = {
    "learned_pos_emb": "with ALiBi (the only position scheme supported) MPT has no position "
                       "table; a checkpoint holding one (transformer.wpe.weight) is refused",
    "embedding_fraction": "scales the embeddings' gradient only; the forward pass is the same",
    "init_config": "initialisation only", "init_device": "initialisation only",
    "verbose": "logging", "tokenizer_name": "names the tokenizer; the weights are the same",
    "emb_pdrop": common.DROPOUT, "resid_pdrop": common.DROPOUT,
    "attn_config.attn_pdrop": common.DROPOUT,
    "attn_config.attn_impl": "the attention kernel (torch, triton, flash); all compute the "
                             "same function",
    "attn_config.attn_uses_sequence_id": "masks across packed sequences only when sequence "
                                         "ids are passed, as mmjax's LM never does",
}
IGNORED_TENSORS: dict[str, str] = {}


def config(f: common.Fields) -> LMConfig:
  # Settings that change the computation from the one mmjax implements (several of which
  # transformers' MptForCausalLM would silently ignore).
  attn = f.sub("attn_config", {})
  d, n = f["d_model"], f["n_heads"]
  why = ("supported is mosaicml/mpt-7b's design: ALiBi, no biases, multi-head attention "
         "without q/k clipping or norms, the default softmax scale 1/sqrt(head_dim) and "
         "unscaled logits")
  f.require("no_bias", (True,), True, why)
  f.require("logit_scale", (None,), None, why)
  f.require("fc_type", ("torch", "te"), "torch",
            "mosaicml's linear layers are torch's or TransformerEngine's, the same function")
  f.require("norm_type", ("low_precision_layernorm", "layernorm"), "low_precision_layernorm",
            "both are a LayerNorm (the first computed in low precision under autocast)")
  attn.require("alibi", (True,), True, why)
  attn.require("attn_type", ("multihead_attention",), "multihead_attention", why)
  attn.require("prefix_lm", (False,), False, why)
  attn.require("qk_ln", (False,), False, why)
  attn.require("clip_qkv", (None, 0), None, why)
  scale = attn.get("softmax_scale")
  if scale is not None and not math.isclose(scale, (d // n) ** -0.5, rel_tol=1e-6):
    raise common.ConversionError(f"MPT with attn_config.softmax_scale={scale!r} is not "
                                 f"supported; {why}.")
  return LMConfig(
      vocab_size=f["vocab_size"], width=d, depth=f["n_layers"], num_heads=n,
      mlp_dim=int(f.get("expansion_ratio", 4) * d), activation="gelu",
      norm_eps=f.get("layer_norm_epsilon", 1e-5), use_bias=False, position="alibi",
      alibi_bias_max=attn.get("alibi_bias_max", 8), max_len=f.get("max_seq_len", 2048),
      tie_embeddings=f.get("tie_word_embeddings", True))


def params(state: dict[str, Any], cfg: LMConfig) -> dict:
  read = common.Reader(state, ("transformer.",))
  d, h, k, m = cfg.width, cfg.num_heads, cfg.dims_per_head, cfg.mlp_dim
  out: dict[str, Any] = {"embed": {"embedding": read("wte.weight", (cfg.vocab_size, d))}}
  for i in range(cfg.depth):
    p = f"blocks.{i}."
    qkv = read(p + "attn.Wqkv.weight", (3 * d, d))  # torch Linear: q, k, v rows stacked
    q, kk, v = (common.dense(qkv[j * d:(j + 1) * d].T, None, (d,), (h, k)) for j in range(3))
    out[f"layers_{i}"] = {
        "attn_norm": common.norm(read, p + "norm_1", d, bias=False),
        "attn": {"query": q, "key": kk, "value": v,
                 "out": common.linear(read, p + "attn.out_proj", (h, k), (d,))},
        "mlp_norm": common.norm(read, p + "norm_2", d, bias=False),
        "mlp": {"up": common.linear(read, p + "ffn.up_proj", (d,), (m,)),
                "down": common.linear(read, p + "ffn.down_proj", (m,), (d,))}}
  out["final_norm"] = common.norm(read, "norm_f", d, bias=False)
  common.output_layer(read, out, cfg, "transformer.wte.weight")
  read.finish(IGNORED_TENSORS)
  return out
