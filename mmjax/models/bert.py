"""BERT: a bidirectional, post-norm transformer encoder over tokens.

Word, learned position and token-type embeddings are summed and normalised; each layer is
`x = norm(x + attn(x))`, then `x = norm(x + mlp(x))` (the norm after the residual sum,
unlike the pre-norm ViT and LM); "pooled" is a tanh projection of the first ([CLS]) token.

RoBERTa is this model with `position_offset` = its pad id + 1 (= 2): its position table
(514 rows) is read from row 2 on, one token type, and pad id 1. (RoBERTa numbers only the
non-pad tokens; with rows right-padded, as mmjax's pipelines pad them, the real tokens get
the same positions.)

A layer is a sequence of post-norm sub-blocks, each a sublayer named `<name>` and its
norm `<name>_norm`: `attn`, then `mlp`. BLIP-2's Q-Former (a BERT with cross-attention in
every other layer) adds one more sub-block between the two, so its layers keep BERT's
parameter names and a converted BERT's layers graft onto them, the new sub-blocks
keeping their initial values.
"""

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Attention, Dense, LearnedPositions, Mlp, Norm, padding_mask, remat, stack
from mmjax.models.common import dtype as to_dtype


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape of a BERT encoder (defaults: BERT-base's settings other than its shape).

  Attributes:
    type_vocab_size: number of token types (segments A and B in BERT).
    mlp_dim: feed-forward width; None means 4 x width.
    pooler: compute "pooled" (BertModel has the pooler; BertForMaskedLM has none).
    position_offset: row of the position table for the first token (RoBERTa: 2); tokens
      are at positions `position_offset .. position_offset + t - 1`, below `max_len`.
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int | None = None
  max_len: int = 512
  type_vocab_size: int = 2
  activation: str = "gelu"
  norm_eps: float = 1e-12
  pooler: bool = True
  position_offset: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: Literal["xla", "cudnn"] | None = None
  remat: str = "none"  # policy for each layer: mmjax.layers.stack
  scan_layers: bool = False  # one scanned layer, parameters stacked under "layers"

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"BertConfig: width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if not 0 <= self.position_offset < self.max_len:
      raise ValueError(f"BertConfig: position_offset={self.position_offset} must be in "
                       f"[0, max_len={self.max_len}).")


def post_norm(x: jax.Array, sublayer: nn.Module, norm_eps: float, *args, **kwargs
              ) -> jax.Array:
  """`norm(x + sublayer(x, *args, **kwargs))`, the norm named `<sublayer name>_norm` (with
  the sublayer's dtypes): BERT's post-norm sub-block, called inside a compact method."""
  h = sublayer(x, *args, **kwargs)
  return Norm("layernorm", norm_eps, name=f"{sublayer.name}_norm", dtype=sublayer.dtype,
              param_dtype=sublayer.param_dtype)(x + h)


class BertLayer(nn.Module):
  """Post-norm bidirectional layer, `x "b t d" -> "b t d"`; `mask` is boolean `"b t s"` or
  `"b h t s"` (True where a query may attend to a key), None to attend everywhere."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    x = post_norm(x, Attention(num_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads,
                               use_bias=True, implementation=cfg.attention_impl, name="attn",
                               **kw), cfg.norm_eps, mask=mask)
    x = post_norm(x, Mlp(cfg.mlp_dim or 4 * cfg.width, cfg.activation, use_bias=True,
                         name="mlp", **kw), cfg.norm_eps)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Bert(nn.Module):
  """`tokens "b t" -> {"hidden": "b t d", "pooled": "b d"}`."""

  config: BertConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, token_types: jax.Array | None = None,
               token_mask: jax.Array | None = None, hidden_layers: tuple[int, ...] = ()
               ) -> dict[str, jax.Array]:
    """Encodes token sequences.

    Args:
      tokens: `"b t"` token ids, at positions `0..t-1` (plus `position_offset`).
      token_types: `"b t"` segment ids below `type_vocab_size`; default all 0.
      token_mask: `"b t"` True for real tokens; padding keys are hidden from every query
        (padding positions still get outputs, which mean nothing).
      hidden_layers: hidden states to return as "hidden_layers", counted like Hugging
        Face's `hidden_states`: 0 is the embeddings' output, `depth` (or -1) the last
        layer's (MedCLIP pools `(1, 2, -1)`).
    Returns:
      "hidden": `"b t d"` the last layer's outputs;
      "pooled": `"b d"` tanh of a projection of the first token's, if `config.pooler`;
      "hidden_layers": `"n b t d"` the hidden states `hidden_layers` name, if any.
    """
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    b, t = tokens.shape
    if t + cfg.position_offset > cfg.max_len:
      raise ValueError(f"Bert: {t} tokens exceed max_len={cfg.max_len}"
                       + (f" less position_offset={cfg.position_offset}"
                          if cfg.position_offset else "") + ".")
    if token_types is None:
      token_types = jnp.zeros_like(tokens)
    embed = lambda size, axes, name: nn.Embed(
        size, cfg.width, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), axes), name=name, **kw)
    x = embed(cfg.vocab_size, ("vocab", "embed"), "embed")(tokens)
    x = x + embed(cfg.type_vocab_size, (None, "embed"), "token_types")(token_types)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + cfg.position_offset, (b, t))
    x = x + LearnedPositions(cfg.max_len, cfg.width, kw["param_dtype"],
                             name="positions")(positions).astype(x.dtype)
    x = Norm("layernorm", cfg.norm_eps, name="embed_norm", **kw)(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    mask = None if token_mask is None else padding_mask(token_mask)
    layer = remat(BertLayer, cfg.remat)
    make = lambda name: layer(cfg, name=name)
    out = {}
    if hidden_layers:
      # The chosen states are kept in a carried "n b t d" buffer, so that a scanned stack
      # can return them too: after layer i (1-based), the rows that name i take its output.
      wanted = []
      for i in hidden_layers:
        if not -cfg.depth - 1 <= i <= cfg.depth:
          raise ValueError(f"Bert: hidden_layers={hidden_layers} names hidden state {i}; "
                           f"there are {cfg.depth + 1} (0: the embeddings, -1: the last).")
        wanted.append(i % (cfg.depth + 1))
      wanted = jnp.asarray(wanted)
      keep = jnp.where((wanted == 0)[:, None, None, None], x[None],
                       jnp.zeros((len(wanted), *x.shape), x.dtype))

      def call(module, carry):
        x, i, keep = carry
        x = module(x, mask)
        return x, i + 1, jnp.where((wanted == i + 1)[:, None, None, None], x[None], keep)

      x, _, out["hidden_layers"] = stack(make, cfg.depth, (x, jnp.zeros((), jnp.int32), keep),
                                         scanned=cfg.scan_layers, call=call)
    else:
      x = stack(make, cfg.depth, x, scanned=cfg.scan_layers,
                call=lambda module, x: module(x, mask))
    out["hidden"] = x
    if cfg.pooler:
      out["pooled"] = jnp.tanh(Dense(cfg.width, ("embed", None), use_bias=True, name="pooler",
                                     **kw)(x[:, 0]))
    return out
