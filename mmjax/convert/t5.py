"""T5 (`model_type: t5`): a T5ForConditionalGeneration (T5 v1.0, v1.1, FLAN-T5) as
`mmjax.models.t5.T5` (`task: "t5"`).

The output layer: transformers 4 ties it to the shared embedding (and scales the
decoder's output by `d_model ** -0.5`) exactly when `tie_word_embeddings` is true (its
default). transformers 5 writes `scale_decoder_outputs` for the scaling, always writes
`tie_word_embeddings: true`, and keeps an `lm_head.weight` of the checkpoint that differs
from `shared.weight` as its own layer; a config that has `scale_decoder_outputs` is read
that way.
"""

import dataclasses
import pathlib
from typing import Any

import numpy as np

from mmjax.convert import common
from mmjax.models.t5 import T5, T5Config

IGNORED_FIELDS = {
    "dropout_rate": common.DROPOUT, "classifier_dropout": common.DROPOUT,
    "dense_act_fn": "derived from feed_forward_proj (read), from which transformers "
                    "recomputes it",
    "is_gated_act": "derived from feed_forward_proj (read), from which transformers "
                    "recomputes it",
    "n_positions": "a field of the original T5 configs that transformers' T5 does not use: "
                   "relative positions have no table of positions",
}
IGNORED_TENSORS = {
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight":
        "a relative bias of the first cross-attention in the original checkpoints, which "
        "transformers' T5 never uses (its cross-attention has no position bias)",
}

# feed_forward_proj: "<activation>" or "gated-<activation>", activations as transformers
# names them; "gated-gelu" is transformers' alias of the tanh approximation.
FEED_FORWARD = ({name: (act, False) for name, act in common.HF_ACTIVATIONS.items()}
                | {f"gated-{name}": (act, True) for name, act in common.HF_ACTIVATIONS.items()}
                | {"gated-gelu": ("gelu_tanh", True)})


def t5_config(hf: dict[str, Any] | common.Fields) -> T5Config:
  """The `T5Config` of a Hugging Face T5 config, every field read or ignored on purpose
  (`IGNORED_FIELDS`). A config written by transformers 5 says nothing of whether the output
  layer is tied (see the module docstring): it is taken as tied here, and `convert_t5`
  unties it where `has_own_output_layer`.

  Given `Fields` (a T5 nested in another model's config, e.g. BLIP-2's `text_config`),
  only reads them: the caller finishes them, with `IGNORED_FIELDS` under its prefix."""
  f = hf if isinstance(hf, common.Fields) else common.Fields(hf, "T5")
  f.require("model_type", ("t5",))
  activation, gated = f.choice("feed_forward_proj", FEED_FORWARD, "relu")
  tied = f.get("tie_word_embeddings", True)
  scale = f.get("scale_decoder_outputs", tied) if "scale_decoder_outputs" in f else tied
  eos = f.get("eos_token_id", 1)
  if isinstance(eos, list):
    if len(eos) != 1:
      raise common.ConversionError(f"T5 with eos_token_id={eos!r} is not supported; "
                                   "supported: one end token.")
    eos = eos[0]
  buckets = f.get("relative_attention_num_buckets", 32)
  max_distance = f.get("relative_attention_max_distance", 128)
  if buckets < 4 or max_distance <= buckets // 2:
    raise common.ConversionError(
        f"T5 with relative_attention_num_buckets={buckets}, relative_attention_max_distance="
        f"{max_distance} is not supported; supported: at least 4 buckets, and a maximum "
        "distance above half of them (else the logarithmic buckets are undefined).")
  cfg = T5Config(
      vocab_size=f["vocab_size"], width=f["d_model"], depth=f["num_layers"],
      decoder_depth=f.get("num_decoder_layers", f["num_layers"]), num_heads=f["num_heads"],
      head_dim=f["d_kv"], mlp_dim=f["d_ff"], activation=activation, gated_mlp=gated,
      relative_buckets=buckets, relative_max_distance=max_distance,
      norm_eps=f.get("layer_norm_epsilon", 1e-6), tie_embeddings=bool(tied),
      scale_output=bool(scale), pad_id=f.get("pad_token_id", 0),
      decoder_start_id=f.get("decoder_start_token_id", f.get("pad_token_id", 0)), eos_id=eos)
  if not isinstance(hf, common.Fields):
    f.finish(IGNORED_FIELDS)
  return cfg


def _layer(read: common.Reader, p: str, cfg: T5Config, decoder: bool) -> dict:
  """One T5Block `p` (`encoder.block.<i>.`): its sub-layers `layer.<j>`."""
  d, h, k, m = cfg.width, cfg.num_heads, cfg.dims_per_head, cfg.mlp_dim or 4 * cfg.width
  lin = lambda name, in_shape, out_shape: common.linear(read, p + name, in_shape, out_shape)

  def attention(name):
    return ({role: lin(f"{name}.{role[0]}", (d,), (h, k)) for role in ("query", "key", "value")}
            | {"out": lin(f"{name}.o", (h, k), (d,))})

  ff = f"layer.{2 if decoder else 1}."
  if cfg.gated_mlp:
    mlp = {"gate": lin(ff + "DenseReluDense.wi_0", (d,), (m,)),
           "up": lin(ff + "DenseReluDense.wi_1", (d,), (m,))}
  else:
    mlp = {"up": lin(ff + "DenseReluDense.wi", (d,), (m,))}
  mlp["down"] = lin(ff + "DenseReluDense.wo", (m,), (d,))
  attn = "self_attn" if decoder else "attn"
  out = {f"{attn}_norm": common.norm(read, p + "layer.0.layer_norm", d, bias=False),
         attn: attention("layer.0.SelfAttention"),
         "mlp_norm": common.norm(read, p + ff + "layer_norm", d, bias=False), "mlp": mlp}
  if decoder:
    out["cross_attn_norm"] = common.norm(read, p + "layer.1.layer_norm", d, bias=False)
    out["cross_attn"] = attention("layer.1.EncDecAttention")
  return out


def read_t5(read: common.Reader, cfg: T5Config) -> dict:
  """`T5(cfg)`'s parameters, read (relative to `read.prefix`) from a
  T5ForConditionalGeneration's tensors; the caller finishes `read` (with
  `IGNORED_TENSORS` under its prefix)."""
  d = cfg.width
  embedding = read("shared.weight", (cfg.vocab_size, d))
  params = {"embed": {"embedding": embedding}}
  for stack, depth, decoder in (("encoder", cfg.depth, False),
                                ("decoder", cfg.decoder_layers, True)):
    read.tied(f"{stack}.embed_tokens.weight", embedding, "shared.weight")
    params[stack] = {
        "relative_bias": {"embedding": read(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (cfg.relative_buckets, cfg.num_heads))},
        "final_norm": common.norm(read, f"{stack}.final_layer_norm", d, bias=False)}
    for i in range(depth):
      params[stack][f"layers_{i}"] = _layer(read, f"{stack}.block.{i}.", cfg, decoder)
  if cfg.tie_embeddings:
    read.tied("lm_head.weight", embedding, "shared.weight")
  else:
    params["lm_head"] = {"kernel": read("lm_head.weight", (cfg.vocab_size, d)).T}
  return params


def t5_params(state: dict[str, np.ndarray], cfg: T5Config) -> dict:
  """`T5(cfg)`'s parameters from a T5ForConditionalGeneration state dict, every tensor
  consumed or ignored on purpose (`IGNORED_TENSORS`)."""
  read = common.Reader(state)
  params = read_t5(read, cfg)
  read.finish(IGNORED_TENSORS)
  return params


def has_own_output_layer(hf: dict[str, Any], state: dict[str, np.ndarray],
                         prefix: str = "") -> bool:
  """Whether transformers 5 (whose configs have `scale_decoder_outputs`) keeps the
  checkpoint's `<prefix>lm_head.weight` as its own layer: when it differs from
  `<prefix>shared.weight`."""
  head, shared = state.get(prefix + "lm_head.weight"), state.get(prefix + "shared.weight")
  return ("scale_decoder_outputs" in hf and head is not None and not (
      shared is not None and head.shape == shared.shape and np.array_equal(head, shared)))


def convert_t5(hf_dir: str | pathlib.Path) -> tuple[T5Config, dict]:
  """`(T5Config, parameters)` of a Hugging Face T5ForConditionalGeneration directory."""
  import jax.numpy as jnp
  hf = common.read_hf_config(hf_dir)
  cfg = t5_config(hf)
  state = common.read_hf_weights(hf_dir)
  if cfg.tie_embeddings and has_own_output_layer(hf, state):
    cfg = dataclasses.replace(cfg, tie_embeddings=False)
  params = t5_params(state, cfg)
  common.check_tree(params, T5(cfg), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32))
  return cfg, params
