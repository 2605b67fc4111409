"""BERT (`model_type: bert`) and RoBERTa (`model_type: roberta`): the encoder of a
BertModel / RobertaModel or of any BertFor* / RobertaFor* model (`task: "bert"`), with its
pooler where the checkpoint has one; task heads are left out.

RoBERTa is BERT with its positions read from row `pad_token_id + 1` of the table on
(`BertConfig.position_offset`); its encoder is under `roberta.` in the RobertaFor* models.
"""

import dataclasses
import pathlib
from typing import Any

import numpy as np

from mmjax.convert import common
from mmjax.models.bert import Bert, BertConfig

IGNORED_FIELDS = {
    "hidden_dropout_prob": common.DROPOUT, "attention_probs_dropout_prob": common.DROPOUT,
    "classifier_dropout": common.DROPOUT,
    # Fields of Google's original TF configs (bert-base-chinese, multilingual), unused by
    # transformers' BERT.
    **{name: "a field of Google's TF configs that transformers' BERT does not use"
       for name in ("directionality", "pooler_fc_size", "pooler_num_attention_heads",
                    "pooler_num_fc_layers", "pooler_size_per_head", "pooler_type")},
    "tie_word_embeddings": "ties the masked-LM head, which is not converted",
}
IGNORED_TENSORS = {
    r"((bert|roberta)\.)?embeddings\.(position_ids|token_type_ids)": "buffers of aranges "
                                                                    "and zeros",
    r"cls\..*": "BertForPreTraining's / BertForMaskedLM's heads: not part of the encoder",
    r"lm_head\..*": "RobertaForMaskedLM's head: not part of the encoder",
    r"(classifier|qa_outputs)\..*": "{Bert,Roberta}For{Sequence,Token}Classification's, "
                                    "-ForMultipleChoice's, -ForQuestionAnswering's heads: "
                                    "not part of the encoder",
}
# Where the encoder is in the -For* models.
PREFIXES = ("bert.", "roberta.")
FAMILIES = {"bert": "BERT", "roberta": "RoBERTa"}


def bert_config(hf: dict[str, Any]) -> BertConfig:
  """The `BertConfig` of a Hugging Face BERT or RoBERTa config, every field read or ignored
  on purpose (`IGNORED_FIELDS`)."""
  f = common.Fields(hf, FAMILIES.get(hf.get("model_type"), "BERT"))
  kind = f.require("model_type", tuple(FAMILIES))
  # RoBERTa numbers its tokens from padding_idx + 1 (transformers'
  # create_position_ids_from_input_ids), its padding_idx being the pad id.
  offset = f.get("pad_token_id", 1) + 1 if kind == "roberta" else 0
  f.require("position_embedding_type", ("absolute",), "absolute",
            "only learned absolute positions are")
  f.require("is_decoder", (False,), False, "only the bidirectional encoder is")
  f.require("add_cross_attention", (False,), False, "only the bidirectional encoder is")
  cfg = BertConfig(
      vocab_size=f["vocab_size"], width=f["hidden_size"], depth=f["num_hidden_layers"],
      num_heads=f["num_attention_heads"], mlp_dim=f["intermediate_size"],
      max_len=f["max_position_embeddings"], type_vocab_size=f.get("type_vocab_size", 2),
      activation=common.activation(f, "hidden_act", "gelu"),
      norm_eps=f.get("layer_norm_eps", 1e-12), position_offset=offset)
  f.finish(IGNORED_FIELDS)
  return cfg


def attention(read: common.Reader, p: str, d: int, h: int, kv_width: int | None = None,
              inner: str = "self") -> dict:
  """BERT's attention `p` as mmjax's: `{p}.{inner}.{query,key,value}` (keys and values
  projecting from `kv_width`, default `d`: cross-attention reads another width) and
  `{p}.output.dense` (Hugging Face's ViT names them so too, `inner="attention"`)."""
  k, e = d // h, kv_width or d
  lin = lambda name, in_shape, out_shape: common.linear(read, name, in_shape, out_shape, True)
  return {"query": lin(f"{p}.{inner}.query", (d,), (h, k)),
          "key": lin(f"{p}.{inner}.key", (e,), (h, k)),
          "value": lin(f"{p}.{inner}.value", (e,), (h, k)),
          "out": lin(f"{p}.output.dense", (h, k), (d,))}


def feed_forward(read: common.Reader, up: str, down: str, d: int, m: int) -> dict:
  """BERT's feed-forward as mmjax's `Mlp`: `{up}.dense`, `{down}.dense`."""
  return {"up": common.linear(read, up + ".dense", (d,), (m,), True),
          "down": common.linear(read, down + ".dense", (m,), (d,), True)}


def attention_block(read: common.Reader, p: str, d: int, h: int, kv_width: int | None = None,
                    inner: str = "self") -> tuple[dict, dict]:
  """BERT's post-norm attention sub-block `p` as mmjax's `(attention, norm)`: `attention`
  and `{p}.output.LayerNorm`."""
  return (attention(read, p, d, h, kv_width, inner),
          common.norm(read, f"{p}.output.LayerNorm", d))


def feed_forward_block(read: common.Reader, up: str, down: str, d: int, m: int
                       ) -> tuple[dict, dict]:
  """BERT's post-norm feed-forward as mmjax's `(mlp, norm)`: `feed_forward` and
  `{down}.LayerNorm`."""
  return feed_forward(read, up, down, d, m), common.norm(read, down + ".LayerNorm", d)


def bert_params(state: dict[str, np.ndarray], cfg: BertConfig) -> dict:
  read = common.Reader(state, PREFIXES)
  d, h, m = cfg.width, cfg.num_heads, cfg.mlp_dim
  lin = lambda name, in_shape, out_shape: common.linear(read, name, in_shape, out_shape, True)
  params = {
      "embed": {"embedding": read("embeddings.word_embeddings.weight", (cfg.vocab_size, d))},
      "positions": {"embedding": read("embeddings.position_embeddings.weight",
                                      (cfg.max_len, d))},
      "token_types": {"embedding": read("embeddings.token_type_embeddings.weight",
                                        (cfg.type_vocab_size, d))},
      "embed_norm": common.norm(read, "embeddings.LayerNorm", d)}
  for i in range(cfg.depth):
    p = f"encoder.layer.{i}."
    layer = params[f"layers_{i}"] = {}
    layer["attn"], layer["attn_norm"] = attention_block(read, p + "attention", d, h)
    layer["mlp"], layer["mlp_norm"] = feed_forward_block(read, p + "intermediate",
                                                         p + "output", d, m)
  if cfg.pooler:
    params["pooler"] = lin("pooler.dense", (d,), (d,))
  read.finish(IGNORED_TENSORS)
  return params


def convert_bert(hf_dir: str | pathlib.Path) -> tuple[BertConfig, dict]:
  """`(BertConfig, parameters)` of a Hugging Face BERT or RoBERTa directory: a BertModel /
  RobertaModel, or a BertFor* / RobertaFor* model, whose encoder is under `bert.` /
  `roberta.` and whose task heads are left out. `config.pooler` says whether the
  checkpoint has the pooler."""
  import jax.numpy as jnp
  cfg = bert_config(common.read_hf_config(hf_dir))
  state = common.read_hf_weights(hf_dir)
  # Google's original checkpoints (bert-base-uncased among them) name LayerNorm parameters
  # gamma and beta.
  state = {k.replace("LayerNorm.gamma", "LayerNorm.weight")
           .replace("LayerNorm.beta", "LayerNorm.bias"): v for k, v in state.items()}
  prefix = common.Reader(state, PREFIXES).prefix
  cfg = dataclasses.replace(cfg, pooler=prefix + "pooler.dense.weight" in state)
  params = bert_params(state, cfg)
  common.check_tree(params, Bert(cfg), jnp.zeros((1, 1), jnp.int32))
  return cfg, params
