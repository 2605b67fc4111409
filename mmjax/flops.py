"""Analytic model FLOPs of a train step, counted as MaxText counts them.

2 FLOPs per multiply-add of every matmul (projections, attention scores and values, the
feed-forward, the output head); norms, activations and softmax are not counted. Causal
attention is counted over the whole `t x t` score matrix, as the kernels compute it.

A train step costs, per component, its forward FLOPs times
  1  for a frozen component that no gradient passes through (e.g. the frozen ViT),
  2  for a frozen component that gradients pass through on their way to trainable
     parameters upstream of it (activation backward only: the frozen LM layers from
     Flamingo's first gated block on; not those below it, which see no trainable input),
  3  for a component with trainable parameters (activation and weight backward).
Rematerialisation's recomputation is not counted: MFU measures useful work.

BLIP-2 (`blip2`) runs its frozen ViT once per image (forward only: `ln_vision` trains, but
a norm is not counted). Its Q-Former runs over `[queries; text]` rows: self-attention over
the whole row, cross-attention from the query positions (on every
`cross_attention_freq`-th layer) to all ViT tokens, class token included, projected from
the vision width; the query feed-forward on query positions, the text one on text
positions. Stage 1 runs three such passes (ITC over the batch under the unimodal mask, ITM
over 3 x batch pairs, ITG over the batch) and the heads (the two projections and the
similarities, the ITM head on every query, the text head with its vocabulary on every
text token). Stage 2 runs the queries alone, `lm_proj`, and the frozen LM over the
queries and the text (a T5 encodes the queries and the whole row, its targets masked, and
decodes the row); gradients pass through the LM to the prefix (x2).
"""

import re
from collections.abc import Iterable
from typing import Any

import ml_collections

from mmjax.checkpoints import per_layer
from mmjax.models.blip2 import Blip2Config
from mmjax.models.flamingo import FlamingoConfig
from mmjax.models.llava import LlavaConfig, projector_depth
from mmjax.models.lm import LMConfig
from mmjax.models.perceiver import ResamplerConfig
from mmjax.models.qformer import QFormerConfig
from mmjax.models.t5 import T5Config
from mmjax.models.two_towers import TwoTowersConfig
from mmjax.models.vit import ViTConfig
from mmjax.models.xattn import XAttnConfig
from mmjax.tasks import model_config


def attention(queries: int, keys: int, width_in: int, heads: int, head_dim: int,
              kv_heads: int | None = None, kv_width: int | None = None) -> int:
  """Projections, scores and weighted values of one attention layer."""
  kv_heads, kv_width = kv_heads or heads, kv_width or width_in
  projections = 2 * queries * width_in * heads * head_dim * 2  # query and output
  projections += 2 * keys * kv_width * kv_heads * head_dim * 2  # key and value
  return projections + 2 * 2 * queries * keys * heads * head_dim


def mlp(tokens: int, width: int, hidden: int, gated: bool = False) -> int:
  return 2 * tokens * width * hidden * (3 if gated else 2)


def vit_layer(cfg: ViTConfig) -> int:
  n = cfg.num_patches + cfg.class_token
  return (attention(n, n, cfg.width, cfg.num_heads, cfg.width // cfg.num_heads)
          + mlp(n, cfg.width, cfg.mlp_dim or 4 * cfg.width))


def vit(cfg: ViTConfig, feature_layer: int = -1) -> list[tuple[str, int]]:
  """`[(parameter path prefix, forward FLOPs per image)]` in the order they run."""
  layers = feature_layer % (cfg.depth + 1)
  stem = 2 * cfg.num_patches * cfg.patch_size ** 2 * cfg.channels * cfg.width
  parts = [("patch_embed", stem)] + [(f"layers_{i}", vit_layer(cfg)) for i in range(layers)]
  if layers == cfg.depth and cfg.pooling == "map":  # one probe over every token
    n, heads = cfg.num_patches + cfg.class_token, cfg.num_heads
    parts.append(("map_head", attention(1, n, cfg.width, heads, cfg.width // heads)
                  + mlp(1, cfg.width, cfg.mlp_dim or 4 * cfg.width)))
  if layers == cfg.depth and cfg.output_dim:
    parts.append(("head", 2 * cfg.width * cfg.output_dim))
  return parts


def resampler(cfg: ResamplerConfig, media_tokens: int, width: int) -> list[tuple[str, int]]:
  """Per image of `media_tokens` visual tokens (all frames) of `width`."""
  context = media_tokens + cfg.num_latents
  layer = (attention(cfg.num_latents, context, width, cfg.num_heads, cfg.head_dim)
           + mlp(cfg.num_latents, width, cfg.ff_mult * width))
  return [(f"layers_{i}", layer) for i in range(cfg.depth)]


def lm(cfg: LMConfig, tokens: int, xattn: XAttnConfig | None = None, media_tokens: int = 0,
       media_width: int = 0) -> list[tuple[str, int]]:
  """Per sequence of `tokens`; gated blocks read `media_tokens` visual tokens."""
  layer = (attention(tokens, tokens, cfg.width, cfg.num_heads, cfg.dims_per_head,
                     cfg.num_kv_heads)
           + mlp(tokens, cfg.width, cfg.mlp_dim or 4 * cfg.width, cfg.gated_mlp))
  blocks = set(xattn.layer_indices(cfg.depth)) if xattn else set()
  parts = []
  for i in range(cfg.depth):
    if i in blocks:
      block = (attention(tokens, media_tokens, cfg.width, xattn.num_heads, xattn.head_dim,
                         kv_width=media_width)
               + mlp(tokens, cfg.width, xattn.ff_dim(cfg.width), xattn.gated_ff))
      parts.append((f"xattn_{i}", block))
    parts.append((f"layers_{i}", layer))
  head = "embed" if cfg.tie_embeddings else "lm_head"
  return parts + [(head, 2 * tokens * cfg.width * cfg.vocab_size)]


def t5(cfg: T5Config, encoder_tokens: int, decoder_tokens: int) -> list[tuple[str, int]]:
  """Per example of `encoder_tokens` encoded and `decoder_tokens` decoded over them."""
  hidden = cfg.mlp_dim or 4 * cfg.width
  n, m, heads, head_dim = encoder_tokens, decoder_tokens, cfg.num_heads, cfg.dims_per_head
  encoder = attention(n, n, cfg.width, heads, head_dim) + mlp(n, cfg.width, hidden,
                                                              cfg.gated_mlp)
  decoder = (attention(m, m, cfg.width, heads, head_dim)
             + attention(m, n, cfg.width, heads, head_dim)
             + mlp(m, cfg.width, hidden, cfg.gated_mlp))
  head = "embed" if cfg.tie_embeddings else "lm_head"
  return ([(f"encoder/layers_{i}", encoder) for i in range(cfg.depth)]
          + [(f"decoder/layers_{i}", decoder) for i in range(cfg.decoder_layers)]
          + [(head, 2 * m * cfg.width * cfg.vocab_size)])


def qformer(cfg: QFormerConfig, queries: int, text: int, image_tokens: int
            ) -> list[tuple[str, int]]:
  """One pass over a row of `queries` query and `text` text positions whose queries read
  `image_tokens` image tokens of `cfg.encoder_width`."""
  n, head_dim, hidden = queries + text, cfg.width // cfg.num_heads, cfg.mlp_dim or 4 * cfg.width
  parts = []
  for i in range(cfg.depth):
    layer = attention(n, n, cfg.width, cfg.num_heads, head_dim)
    if queries and cfg.cross_attends(i):
      layer += attention(queries, image_tokens, cfg.width, cfg.num_heads, head_dim,
                         kv_width=cfg.encoder_width)
    parts.append((f"layers_{i}", layer + mlp(queries, cfg.width, hidden)
                  + mlp(text, cfg.width, hidden)))
  return parts


def blip2(cfg: Blip2Config, batch: int, seq_len: int, captioning: bool = True,
          joint_contrastive: bool = True) -> list[tuple[str, int, str]]:
  """`(parameter path prefix, forward FLOPs, stream)` of a BLIP-2 step on `batch` images
  and texts of `seq_len` tokens (see `step_flops`); the Q-Former and its heads are the
  "media" stream, the LM reads it ("join").

  Stage 1 as `mmjax.tasks.blip2` computes it by default; `captioning=False` leaves out
  ITG, `joint_contrastive=False` counts ITC as separate query and text passes (as
  transformers' Blip2ForImageTextRetrieval runs it)."""
  q, d = cfg.qformer.num_queries, cfg.qformer.width
  image_tokens = cfg.vision.num_patches + 1

  def scale(parts, n, prefix):
    return [(f"{prefix}/{p}", n * f, "media") for p, f in parts]

  parts = scale(vit(cfg.vision, cfg.vision_feature_layer), batch, "vision")
  if cfg.stage == 2:
    parts += (scale(qformer(cfg.qformer, q, 0, image_tokens), batch, "qformer")
              + [("lm_proj", batch * q * 2 * d * (cfg.lm or cfg.t5).width, "media")])
    if cfg.lm is not None:
      text = seq_len - 1  # the LM reads the tokens before each target
      lm_parts = lm(cfg.lm, q + text)[:-1] + lm(cfg.lm, text)[-1:]
    else:  # the queries and the text encoded (its targets masked), the targets decoded
      lm_parts = [(f"t5/{p}", f) for p, f in t5(cfg.t5, q + seq_len, seq_len)]
    return parts + [(p if cfg.lm is None else f"lm/{p}", batch * f, "join")
                    for p, f in lm_parts]
  if joint_contrastive:
    parts += scale(qformer(cfg.qformer, q, seq_len, image_tokens), batch, "qformer")
  else:
    parts += (scale(qformer(cfg.qformer, q, 0, image_tokens), batch, "qformer")
              + scale(qformer(cfg.qformer, 0, seq_len, image_tokens), batch, "qformer"))
  k = cfg.embed_dim
  parts += [("vision_proj", batch * q * 2 * d * k + 2 * batch * batch * q * k, "media"),
            ("text_proj", batch * 2 * d * k, "media")]  # and the similarities
  parts += scale(qformer(cfg.qformer, q, seq_len, image_tokens), 3 * batch, "qformer")
  parts += [("itm_head", 3 * batch * q * 2 * d * 2, "media")]
  if captioning:
    parts += scale(qformer(cfg.qformer, q, seq_len, image_tokens), batch, "qformer")
    parts += [("text_head", batch * seq_len * 2 * d * (d + cfg.qformer.vocab_size), "media")]
  return parts


def step_flops(parts: Iterable[tuple[str, int, str]], param_paths: Iterable[str],
               trainable: str) -> dict[str, float]:
  """Train-step FLOPs by kind and in total.

  Args:
    parts: `(parameter path prefix, forward FLOPs, stream)` in execution order. Streams
      are "media" (vision tower, resampler), "text" (the LM) and "join" (a gated block:
      a text component that also reads the media stream).
    param_paths: every parameter's '/'-joined path, one entry per layer (see
      `mmjax.checkpoints.per_layer`); trainable: the trainable regex.
  """
  paths = list(param_paths)
  totals = dict.fromkeys(("forward", "frozen_forward_only", "frozen_backprop", "trainable",
                          "total"), 0.0)
  media_trains = text_trains = joined = False
  for prefix, fwd, stream in parts:
    trains = any(re.search(trainable, p) for p in paths if p.startswith(prefix + "/"))
    joined |= stream == "join"
    upstream = media_trains if stream == "media" else text_trains or (joined and media_trains)
    kind, factor = (("trainable", 3) if trains else ("frozen_backprop", 2) if upstream
                    else ("frozen_forward_only", 1))
    totals[kind] += factor * fwd
    totals["forward"] += fwd
    totals["total"] += factor * fwd
    if stream == "media":
      media_trains |= trains
    else:
      text_trains |= trains
  return totals


def components(config: ml_collections.ConfigDict) -> list[tuple[str, int, str]]:
  """`(parameter path prefix, forward FLOPs per step, stream)` of the recipe's model, in
  execution order (see `step_flops`)."""
  batch, seq_len = config.data.batch_size, config.data.seq_len

  def scale(parts, n, prefix, stream):
    return [(f"{prefix}/{p}".lstrip("/"), n * f,
             "join" if p.startswith("xattn_") else stream) for p, f in parts]

  if config.task == "lm":
    return scale(lm(model_config(LMConfig, config), seq_len), batch, "", "text")
  if config.task == "clip":
    cfg = model_config(TwoTowersConfig, config)
    return (scale(vit(cfg.vision), batch, "image", "media")
            + scale(lm(cfg.text, seq_len)[:-1], batch, "text", "text")
            + [("text_head", batch * 2 * cfg.text.width * cfg.embed_dim, "text"),
               # The global batch's similarities, every image against every text; both
               # operands are activations, so their backward is two matmuls, as a
               # trained layer's (counted with the text head, which trains with them).
               ("text_head", 2 * batch * batch * cfg.embed_dim, "join")])
  if config.task == "flamingo":
    cfg = model_config(FlamingoConfig, config)
    images = batch * config.data.max_images
    media_tokens = config.data.max_images * cfg.resampler.num_latents
    return (scale(vit(cfg.vision, cfg.vision_feature_layer), images, "vision", "media")
            + scale(resampler(cfg.resampler, cfg.vision.num_tokens, cfg.vision.width),
                    images, "resampler", "media")
            + scale(lm(cfg.lm, seq_len, cfg.xattn, media_tokens, cfg.vision.width), batch,
                    "lm", "text"))
  if config.task == "blip2":
    return blip2(model_config(Blip2Config, config), batch, seq_len)
  if config.task == "llava":
    # The LM reads the projected features in its input, so a trained projector needs the
    # LM's backward even where the LM is frozen ("join"). LoRA counts its layers as
    # trained (an over-count: the frozen kernels' own gradients are not formed).
    cfg = model_config(LlavaConfig, config)
    images = batch * max(config.data.get("max_images", 1), 1)
    images *= cfg.anyres_views if cfg.anyres_grid else 1  # anyres: every view, tiles too
    widths = [cfg.vision.width] + [cfg.lm.width] * projector_depth(cfg.projector)
    projector = [(f"linear_{i}", 2 * cfg.image_tokens * widths[i] * widths[i + 1])
                 for i in range(len(widths) - 1)]
    return (scale(vit(cfg.vision, cfg.vision_feature_layer), images, "vision", "media")
            + scale(projector, images, "projector", "media")
            + scale(lm(cfg.lm, seq_len), batch, "lm", "join"))
  raise ValueError(f"No FLOP count for task {config.task!r}.")


def train_step_flops(config: ml_collections.ConfigDict, params: dict[str, Any]
                     ) -> dict[str, float]:
  """Model FLOPs of one train step of `config` (global batch), by kind and in total;
  `params` is the model's flat parameter dict (arrays or shapes), scanned or not."""
  paths = per_layer(params, take=lambda value, i: value)
  return step_flops(components(config), paths, config.trainable)
