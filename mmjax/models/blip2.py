"""BLIP-2: a frozen image encoder and a frozen LM bridged by a Q-Former.

Images -> ViT tokens (all of them, the class token first) -> `vision/post_norm` (BLIP-2's
`ln_vision`, trainable while the rest of the ViT is frozen) -> the Q-Former's queries
cross-attend to them. Stage 1 trains the Q-Former on image-text pairs with three
objectives (`mmjax.tasks.blip2`), through heads that live beside it:
  `vision_proj`, `text_proj`  (ITC) queries' and [CLS]'s outputs -> `embed_dim`, compared
                              by cosine similarity over a learned temperature `temp`;
  `itm_head`                  (ITM) a 2-way match/no-match head on each query's output;
  `text_head`                 (ITG) BERT's LM head (dense, GELU, LayerNorm, the word
                              embeddings tied, a bias) on the text under the causal mask.
Stage 2 feeds the query outputs through `lm_proj` into a frozen LM as a soft prompt: a
decoder-only LM (`lm/`, OPT in the paper) reads them before the text; an encoder-decoder
(`t5/`, FLAN-T5) encodes them before a prefix of the text and decodes the rest.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import decoding
from mmjax.layers import Dense, Norm
from mmjax.layers.mlp import activation_fn
from mmjax.models.common import config_from_dict
from mmjax.models.common import dtype as to_dtype
from mmjax.models.lm import LanguageModel, LMConfig
from mmjax.models.qformer import QFormer, QFormerConfig
from mmjax.models.t5 import T5, T5Config
from mmjax.models.t5 import generate as t5_generate
from mmjax.models.vit import ViT, ViTConfig

TEMP_RANGE = (0.001, 0.5)  # BLIP's clamp of the contrastive temperature


@dataclasses.dataclass(frozen=True)
class Blip2Config:
  """The whole model.

  Attributes:
    vision: the image encoder; BLIP-2 reads all its tokens (`keep_class_token`) through
      its `post_norm` (`token_norm`), which is `ln_vision`.
    qformer: the Q-Former; its `encoder_width` must be the vision width.
    lm: the frozen decoder-only LM of stage 2; None for a stage-1 model.
    t5: the frozen encoder-decoder LM of stage 2, instead of `lm`.
    embed_dim: width of the contrastive embeddings (ITC).
    dec_token_id: the Q-Former's decoder BOS (`[DEC]`), put in place of the first
      ([CLS]) token for captioning (ITG).
    pad_token_id: text padding, hidden from attention and from the losses.
    vision_feature_layer: the ViT layer whose tokens the queries read.
    temp: initial contrastive temperature.
  """

  vision: ViTConfig
  qformer: QFormerConfig
  dec_token_id: int
  lm: LMConfig | None = None
  t5: T5Config | None = None
  pad_token_id: int = 0
  embed_dim: int = 256
  vision_feature_layer: int = -1
  temp: float = 0.07

  def __post_init__(self):
    if self.lm is not None and self.t5 is not None:
      raise ValueError("Blip2Config: stage 2 has one language model; set `lm` (decoder-only) "
                       "or `t5` (encoder-decoder), not both.")
    if self.vision.width != self.qformer.encoder_width:
      raise ValueError(f"Blip2Config: the vision tower is {self.vision.width} wide but the "
                       f"Q-Former's cross-attention reads "
                       f"qformer.encoder_width={self.qformer.encoder_width}; set it to "
                       f"{self.vision.width}.")
    if not 0 <= self.dec_token_id < self.qformer.vocab_size:
      raise ValueError(f"Blip2Config.dec_token_id={self.dec_token_id} is outside the "
                       f"Q-Former's vocabulary [0, {self.qformer.vocab_size}).")

  @property
  def stage(self) -> int:
    """1 for the Q-Former with its heads, 2 with a language model."""
    return 1 if self.lm is None and self.t5 is None else 2

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "Blip2Config":
    return config_from_dict(cls, values)


def l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Blip2(nn.Module):
  """Methods per objective; `__call__` (used by `init`) runs those of the model's stage:
  all three stage-1 heads without a language model, its logits with one (`lm` or `t5`).
  Parameters are created on first use, so a stage-2 model has no stage-1 heads."""

  config: Blip2Config

  def setup(self):
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.qformer.dtype), param_dtype=to_dtype(cfg.qformer.param_dtype))
    self.vision = ViT(cfg.vision)
    self.qformer = QFormer(cfg.qformer)
    self.vision_proj = Dense(cfg.embed_dim, ("embed", None), use_bias=True, **kw)
    self.text_proj = Dense(cfg.embed_dim, ("embed", None), use_bias=True, **kw)
    self.itm_head = Dense(2, ("embed", None), use_bias=True, **kw)
    self.text_head = TextHead(cfg.qformer.activation, cfg.qformer.norm_eps, **kw)
    if cfg.stage == 1:
      self.temp = self.param("temp", nn.with_logical_partitioning(
          nn.initializers.constant(cfg.temp), ()), (), jnp.float32)
    else:
      self.lm_proj = Dense((cfg.lm or cfg.t5).width, ("embed", None), use_bias=True, **kw)
    if cfg.lm is not None:
      self.lm = LanguageModel(cfg.lm)
    if cfg.t5 is not None:
      self.t5 = T5(cfg.t5)

  def image_features(self, images: jax.Array) -> jax.Array:
    """`images "b h w c" -> "b n e"`: what the queries read (ViT tokens, `ln_vision`)."""
    return self.vision(images, feature_layer=self.config.vision_feature_layer)["tokens"]

  def contrastive(self, image: jax.Array, tokens: jax.Array, token_mask: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ITC's embeddings, from one pass under the unimodal mask.

    Args:
      image: `"b n e"` image features; tokens, token_mask: `"b t"`, [CLS]-first text.
    Returns:
      `(image "b q k", text "b k", temperature)`: L2-normalised query and [CLS]
      embeddings and the temperature, clamped to `TEMP_RANGE`.
    """
    out = self.qformer(image, tokens, token_mask=token_mask, mask="unimodal")
    image_embeds = l2_normalize(self.vision_proj(out["queries"]))
    text_embed = l2_normalize(self.text_proj(out["text"][:, 0]))
    return image_embeds, text_embed, jnp.clip(self.temp, *TEMP_RANGE)

  def matching(self, image: jax.Array, tokens: jax.Array, token_mask: jax.Array
               ) -> jax.Array:
    """ITM: `"b 2"` no-match/match logits of image-text pairs, the mean over the
    queries of the head on each, from a pass under the bidirectional mask."""
    out = self.qformer(image, tokens, token_mask=token_mask, mask="bidirectional")
    return jnp.mean(self.itm_head(out["queries"]).astype(jnp.float32), axis=1)

  def captioning(self, image: jax.Array, tokens: jax.Array, token_mask: jax.Array
                 ) -> jax.Array:
    """ITG: `"b t v"` next-token logits of the text (its first token replaced by
    `[DEC]`) given the queries, under the causal mask."""
    tokens = tokens.at[:, 0].set(self.config.dec_token_id)
    out = self.qformer(image, tokens, token_mask=token_mask, mask="causal")
    embedding = self.qformer.variables["params"]["embed"]["embedding"]
    return self.text_head(out["text"], nn.unbox(embedding))

  def prefix(self, images: jax.Array) -> jax.Array:
    """`images "b h w c" -> "b q d"`: the queries' outputs projected into the LM."""
    return self.lm_proj(self.qformer(self.image_features(images))["queries"])

  def __call__(self, images: jax.Array, tokens: jax.Array,
               token_mask: jax.Array | None = None, *, prefix: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False,
               decoder_tokens: jax.Array | None = None):
    """Stage 2 with an `lm`: LM logits `"b t v"` of `tokens` read after the projected
    queries of `images` (or a precomputed `prefix`, or, when decoding after the first
    call, the cache). With a `t5`: logits `"b s v"` of `decoder_tokens` (default:
    `tokens`) decoded from the encoding of the queries and `tokens` (`token_mask`).
    Stage 1: the three objectives' outputs, for `init`."""
    if token_mask is None:
      token_mask = jnp.ones(tokens.shape, bool)
    if self.config.stage == 1:
      image = self.image_features(images)
      return (self.contrastive(image, tokens, token_mask),
              self.matching(image, tokens, token_mask),
              self.captioning(image, tokens, token_mask))
    if prefix is None and images is not None:
      prefix = self.prefix(images)
    if self.config.t5 is not None:
      return self.t5(tokens, tokens if decoder_tokens is None else decoder_tokens,
                     token_mask=token_mask, prefix=prefix)
    return self.lm(tokens, prefix=prefix, positions=positions, decode=decode)


class TextHead(nn.Module):
  """BERT's masked-LM head, `"b t d" -> "b t v"`: dense, activation, LayerNorm, then the
  word embeddings `"v d"` (tied) and a bias."""

  activation: str
  norm_eps: float
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = activation_fn(self.activation)(Dense(x.shape[-1], ("embed", None), use_bias=True,
                                             name="dense", **kw)(x))
    x = Norm("layernorm", self.norm_eps, name="norm", **kw)(x)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("vocab",)),
                      (embedding.shape[0],), self.param_dtype)
    logits = jnp.einsum("btd,vd->btv", x, embedding.astype(x.dtype)) + bias.astype(x.dtype)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "stop_ids", "pad_id",
                                             "sampling", "beams"))
def generate(model: Blip2, params: Any, images: jax.Array, prompt: jax.Array,
             prompt_lengths: jax.Array, rng: jax.Array, *, max_new_tokens: int,
             stop_ids: Sequence[int] = (), pad_id: int = 0,
             sampling: decoding.SamplingConfig = decoding.GREEDY,
             beams: decoding.BeamConfig | None = None) -> decoding.Generated:
  """Continues right-padded text prompts `"b t"` (real lengths `"b"`) after the projected
  queries of `images "b h w c"`, with the KV cache: greedy, sampled, or the best beam
  search hypothesis (`beams`). With a `t5`, the queries and the prompt are encoded and
  the output decoded from its start token. Returns `decoding.Generated`."""
  prefix = model.apply({"params": params}, images, method=Blip2.prefix)
  if model.config.t5 is not None:
    mask = jnp.arange(prompt.shape[1]) < prompt_lengths[:, None]
    return t5_generate(T5(model.config.t5), params["t5"], prompt, mask, rng,
                       max_new_tokens=max_new_tokens, prefix=prefix,
                       stop_ids=tuple(stop_ids) or None, pad_id=pad_id, sampling=sampling,
                       beams=beams)
  step, prefill, cache_for = decode_fns(model, params, prefix,
                                        prompt.shape[1] + max_new_tokens)
  return decoding.decode(step, cache_for, prompt, prompt_lengths, rng,
                         max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                         pad_id=pad_id, sampling=sampling, beams=beams, prefill_fn=prefill)


def decode_fns(model: Blip2, params: Any, prefix: jax.Array, max_len: int
               ) -> tuple[decoding.StepFn, decoding.StepFn, Any]:
  """`(step, prefill, cache_for)`: KV-cached decoding of a stage-2 BLIP-2, as `decoding`
  takes it, for text of up to `max_len` positions after the `prefix "b p d"`.

  Text positions count from 0 as `decoding` gives them; the prefix's `p` positions come
  first in the LM.
  """
  variables = {"params": params}
  p = prefix.shape[1]

  def run(cache, tokens, positions, prefix=None):
    if prefix is not None:
      positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (tokens.shape[0], p)),
                                   positions + p], axis=1)
    else:
      positions = positions + p
    logits, state = model.apply({**variables, "cache": cache}, None, tokens, prefix=prefix,
                                positions=positions, decode=True, mutable=["cache"])
    return logits, state["cache"]

  def cache_for(n):  # only the inputs' shapes matter
    return decoding.init_cache(
        model.apply, variables, None, jnp.zeros((n, max_len), jnp.int32),
        prefix=jnp.zeros((n,) + prefix.shape[1:], prefix.dtype),
        positions=jnp.broadcast_to(jnp.arange(p + max_len), (n, p + max_len)), decode=True,
        mutable=["cache"])

  return run, functools.partial(run, prefix=prefix), cache_for
