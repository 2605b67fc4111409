"""GPT-2 (`model_type: gpt2`): learned positions, LayerNorm, Conv1D (`[in, out]`) weights,
fused q/k/v, biases everywhere; tied or untied output layer."""

from typing import Any

import numpy as np

from mmjax.convert import common
from mmjax.models.lm import LMConfig

# Where a causal-LM checkpoint (its *ForCausalLM) keeps the decoder layers and the input
# embedding (OpenFlamingo's checkpoints name them so).
DECODER_LAYERS = "transformer.h"
EMBEDDING = "transformer.wte.weight"
IGNORED_FIELDS = {
    "n_ctx": "the context length of old configs, unused by transformers (n_positions is "
             "read)",
    "reorder_and_upcast_attn": "computes the same attention in float32 in another order",
    "summary_type": "the multiple-choice head of GPT2DoubleHeadsModel (not converted; its "
                    "tensors are refused if present)",
    "summary_use_proj": "as summary_type", "summary_activation": "as summary_type",
    "summary_proj_to_labels": "as summary_type", "summary_first_dropout": "as summary_type",
    "attn_pdrop": common.DROPOUT, "embd_pdrop": common.DROPOUT, "resid_pdrop": common.DROPOUT,
}
IGNORED_TENSORS = {
    r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias":
        "causal-mask buffers that older transformers saved; mmjax builds the mask",
}


def config(f: common.Fields) -> LMConfig:
  f.require("add_cross_attention", (False,), False,
            "cross-attention layers are an encoder-decoder's")
  d = f["n_embd"]
  scale_weights = f.get("scale_attn_weights", True)
  return LMConfig(
      vocab_size=f["vocab_size"], width=d, depth=f["n_layer"], num_heads=f["n_head"],
      mlp_dim=f.get("n_inner", 4 * d),
      activation=common.activation(f, "activation_function", "gelu_new"),
      norm_eps=f.get("layer_norm_epsilon", 1e-5), max_len=f["n_positions"],
      attn_scale=None if scale_weights else 1.0,
      attn_scale_by_layer=bool(f.get("scale_attn_by_inverse_layer_idx", False)),
      tie_embeddings=f.get("tie_word_embeddings", True))


def params(state: dict[str, Any], cfg: LMConfig) -> dict:
  read = common.Reader(state, ("transformer.",))
  d, h, k, m = cfg.width, cfg.num_heads, cfg.dims_per_head, cfg.mlp_dim
  out: dict[str, Any] = {"embed": {"embedding": read("wte.weight", (cfg.vocab_size, d))},
                         "positions": {"embedding": read("wpe.weight", (cfg.max_len, d))}}
  conv1d = lambda name, in_shape, out_shape: common.dense(
      read(name + ".weight", (np.prod(in_shape), np.prod(out_shape))),
      read(name + ".bias", (np.prod(out_shape),)), in_shape, out_shape)
  for i in range(cfg.depth):
    p = f"h.{i}."
    qkv_w = read(p + "attn.c_attn.weight", (d, 3 * d))  # Conv1D: [in, out]
    qkv_b = read(p + "attn.c_attn.bias", (3 * d,))
    q, kk, v = (common.dense(qkv_w[:, j * d:(j + 1) * d], qkv_b[j * d:(j + 1) * d], (d,),
                             (h, k)) for j in range(3))
    out[f"layers_{i}"] = {
        "attn_norm": common.norm(read, p + "ln_1", d),
        "attn": {"query": q, "key": kk, "value": v,
                 "out": conv1d(p + "attn.c_proj", (h, k), (d,))},
        "mlp_norm": common.norm(read, p + "ln_2", d),
        "mlp": {"up": conv1d(p + "mlp.c_fc", (d,), (m,)),
                "down": conv1d(p + "mlp.c_proj", (m,), (d,))}}
  out["final_norm"] = common.norm(read, "ln_f", d)
  common.output_layer(read, out, cfg, "transformer.wte.weight")
  read.finish(IGNORED_TENSORS)
  return out
