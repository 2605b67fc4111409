"""BLIP-2's Querying Transformer: a BERT whose learned queries read image features.

The input is `[queries; text]`: `num_queries` learned query embeddings (no position
embedding) followed by BERT's word + learned position embeddings of the text (positions
from 0), the embedding LayerNorm over both. Each layer is BERT's post-norm layer with
two additions for the query positions only: cross-attention to the image features on
every `cross_attention_freq`-th layer (0, 2, 4, ... by default; keys and values project
from the image features' own width), and a feed-forward of their own (`mlp_query`),
while text positions keep BERT's (`mlp`). Parameter names are BERT's (`mmjax.models.bert`)
plus `queries`, `xattn`/`xattn_norm` and `mlp_query`/`mlp_query_norm`, so a converted
BERT grafts onto a Q-Former (its token types and pooler dropped, its vocabulary grown by
`[DEC]`), and `query_mlp_from_text` then starts the query feed-forwards as copies of
BERT's, as BLIP-2's stage 1 starts.

Which positions see which is the attention mask, one per BLIP-2 objective:
  "unimodal"      (ITC) queries see queries, text sees text: one pass gives the image's
                  query outputs and the text's [CLS] output as two separate passes would;
  "bidirectional" (ITM) everything sees everything;
  "causal"        (ITG) queries see queries, text sees every query and earlier text.
Padding text keys are hidden from every position in all three.

A stage-2 BLIP-2 runs the queries alone, which never creates the text parameters
(word and position embeddings, `mlp`): exactly the tree the paper keeps.
"""

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Attention, LearnedPositions, Mlp, Norm, remat
from mmjax.models.bert import post_norm
from mmjax.models.common import dtype as to_dtype

MaskKind = Literal["unimodal", "bidirectional", "causal"]
MASK_KINDS = ("unimodal", "bidirectional", "causal")


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Shape of a Q-Former (defaults: BLIP-2's, from BERT-base over ViT-g features).

  Attributes:
    vocab_size: text vocabulary, BERT's plus the decoder's BOS (`[DEC]`).
    encoder_width: width of the image features the queries cross-attend to.
    cross_attention_freq: layers `0, f, 2f, ...` cross-attend.
    mlp_dim: feed-forward width (text and query); None means 4 x width.
  """

  vocab_size: int = 30523
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  max_len: int = 512
  num_queries: int = 32
  cross_attention_freq: int = 2
  encoder_width: int = 1408
  activation: str = "gelu"
  norm_eps: float = 1e-12
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: Literal["xla", "cudnn"] | None = None
  remat: str = "none"  # policy for each layer: mmjax.layers.stack

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"QFormerConfig: width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if self.cross_attention_freq < 1:
      raise ValueError("QFormerConfig: cross_attention_freq must be at least 1, got "
                       f"{self.cross_attention_freq}.")

  def cross_attends(self, layer: int) -> bool:
    return layer % self.cross_attention_freq == 0


def attention_mask(kind: MaskKind, num_queries: int, text_valid: jax.Array | None
                   ) -> jax.Array:
  """Boolean `"b 1 L L"` mask over `[queries; text]`, `L = num_queries + t`: True where
  a position (row) may attend to a key (column).

  Args:
    kind: "unimodal", "bidirectional" or "causal" (see the module docstring).
    num_queries: query positions first (0 for text alone).
    text_valid: `"b t"` True for real text tokens; None for no text.
  """
  if kind not in MASK_KINDS:
    raise ValueError(f"Unknown Q-Former mask {kind!r}; expected one of {MASK_KINDS}.")
  if text_valid is None:
    text_valid = jnp.zeros((1, 0), bool)
  b, t = text_valid.shape
  q = num_queries
  is_query = jnp.arange(q + t) < q
  valid = jnp.concatenate([jnp.ones((b, q), bool), text_valid.astype(bool)], axis=1)
  row_query, key_query = is_query[:, None], is_query[None, :]
  if kind == "bidirectional":
    sees = jnp.ones((q + t, q + t), bool)
  elif kind == "unimodal":
    sees = row_query == key_query
  else:  # causal: queries see queries; text sees all queries and text up to itself
    sees = jnp.where(row_query, key_query,
                     key_query | (jnp.arange(q + t)[None, :] <= jnp.arange(q + t)[:, None]))
  return (sees[None] & valid[:, None, :])[:, None]


class QFormerLayer(nn.Module):
  """One post-norm layer over `x "b L d"` whose first `num_queries` positions are queries;
  they cross-attend to `image "b n e"` when `cross` and have their own feed-forward."""

  config: QFormerConfig
  cross: bool

  @nn.compact
  def __call__(self, x: jax.Array, image: jax.Array | None, mask: jax.Array,
               num_queries: int) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    heads = dict(num_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads, use_bias=True,
                 implementation=cfg.attention_impl, **kw)
    mlp = lambda name: Mlp(cfg.mlp_dim or 4 * cfg.width, cfg.activation, use_bias=True,
                           name=name, **kw)
    x = post_norm(x, Attention(**heads, name="attn"), cfg.norm_eps, mask=mask)
    queries, text = x[:, :num_queries], x[:, num_queries:]
    if num_queries:
      if self.cross:
        queries = post_norm(queries, Attention(**heads, cross=True, name="xattn"),
                            cfg.norm_eps, image)
      queries = post_norm(queries, mlp("mlp_query"), cfg.norm_eps)
    if text.shape[1]:
      text = post_norm(text, mlp("mlp"), cfg.norm_eps)
    x = jnp.concatenate([queries, text], axis=1)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class QFormer(nn.Module):
  """`image "b n e"` and/or `tokens "b t"` -> `{"queries": "b q d", "text": "b t d"}`."""

  config: QFormerConfig

  @nn.compact
  def __call__(self, image: jax.Array | None = None, tokens: jax.Array | None = None, *,
               token_mask: jax.Array | None = None, mask: MaskKind = "unimodal"
               ) -> dict[str, jax.Array]:
    """Runs the queries (when `image` is given), the text (when `tokens` are), or both.

    Args:
      image: `"b n e"` image features (e = `encoder_width`); None runs the text alone.
      tokens: `"b t"` token ids at positions `0..t-1`; None runs the queries alone.
      token_mask: `"b t"` True for real tokens; default all real.
      mask: which positions see which when both run: "unimodal", "bidirectional" or
        "causal" (the module docstring).
    Returns:
      "queries": `"b q d"` the queries' outputs (when `image` is given);
      "text": `"b t d"` the text's (when `tokens` are).
    """
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    if image is None and tokens is None:
      raise ValueError("QFormer needs image features, tokens, or both.")
    if image is not None and image.shape[-1] != cfg.encoder_width:
      raise ValueError(f"QFormer: image features are {image.shape[-1]} wide but the "
                       f"cross-attention reads encoder_width={cfg.encoder_width}; set "
                       "QFormerConfig.encoder_width to the vision tower's width.")
    parts = []
    if image is not None:
      queries = self.param("queries", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("latents", "embed")),
                           (cfg.num_queries, cfg.width), kw["param_dtype"])
      parts.append(jnp.broadcast_to(queries.astype(kw["dtype"]),
                                    (image.shape[0], *queries.shape)))
    if tokens is not None:
      b, t = tokens.shape
      if t > cfg.max_len:
        raise ValueError(f"QFormer: {t} tokens exceed max_len={cfg.max_len}.")
      x = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("vocab", "embed")), name="embed", **kw)(tokens)
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      parts.append(x + LearnedPositions(cfg.max_len, cfg.width, kw["param_dtype"],
                                        name="positions")(positions).astype(x.dtype))
      if token_mask is None:
        token_mask = jnp.ones((b, t), bool)
    x = Norm("layernorm", cfg.norm_eps, name="embed_norm", **kw)(jnp.concatenate(parts, 1))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    num_queries = cfg.num_queries if image is not None else 0
    attend = attention_mask(mask, num_queries, token_mask if tokens is not None else None)
    layer = remat(QFormerLayer, cfg.remat, static_argnums=(4,))
    for i in range(cfg.depth):
      x = layer(cfg, cfg.cross_attends(i), name=f"layers_{i}")(x, image, attend, num_queries)
    out = {}
    if image is not None:
      out["queries"] = x[:, :num_queries]
    if tokens is not None:
      out["text"] = x[:, num_queries:]
    return out


def query_mlp_from_text(qformer: dict) -> dict:
  """Q-Former parameters whose query feed-forwards (`mlp_query`, `mlp_query_norm`) are
  copies of the text ones: how BLIP-2 initialises them at the start of stage 1."""
  out = dict(qformer)
  for name, layer in qformer.items():
    if name.startswith("layers_"):
      copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # buffers of their own
      out[name] = dict(layer, mlp_query=copy(layer["mlp"]),
                       mlp_query_norm=copy(layer["mlp_norm"]))
  return out
