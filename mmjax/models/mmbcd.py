"""MMBCD: a mammogram as a set of detector regions, each cropped at full resolution and
embedded by a ViT, with the clinical history attending over the regions.

Each region's crop goes through the ViT (DINO ViT-S/8 in the paper's code) to its class
token, then `BatchNorm1d -> Linear -> GELU` to `embed_dim`; the regions are max-pooled. The
history's RoBERTa `<s>` state goes through its own `BatchNorm1d -> Linear -> GELU`. With
`fusion="attention"` the text embedding is the one query of a one-head attention over the
region embeddings (torch's `nn.MultiheadAttention`: queries scaled by `1/sqrt(e)`, dropout
on the attention weights in training), and `[attended, text, max-pooled]` (in that order)
goes to the head: the code's single linear layer, or the paper's MLP.

Fewer real regions than `k` are padding (`region_mask` False): left out of the max-pool, of
the BatchNorm statistics and, with `mask_regions`, hidden from the attention. The
reference pads with duplicates of real regions and attends without a mask; with every
region real (the pipeline's `pad="duplicate"`) and `mask_regions=False` this is its
function.

Regions come as crops (`regions "b k s s c"`), or as the whole image on a fixed canvas and
boxes (`image "b S S c"`, `boxes "b k 4"`) cropped and resized here by `crop_and_resize`:
a fixed-shape, separable resampling with PIL's antialiased bilinear filter, so that the
cropping runs on the accelerator beside the towers.

Parameters: "vision" (`ViT`), "text" (`Bert`, RoBERTa's positions), "vision_bn",
"vision_proj", "text_bn", "text_proj", "attn" (`query`, `key`, `value`, `out`), "head"
(and "head_hidden" for the MLP); BatchNorm statistics in "batch_stats".
"""

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Dense
from mmjax.models.bert import Bert, BertConfig
from mmjax.models.common import dtype as to_dtype
from mmjax.models.resnet import TORCH_LINEAR_INIT, BatchNorm
from mmjax.models.vit import ViT, ViTConfig, normalise_pixels

FUSIONS = ("vision", "concat", "attention")


@dataclasses.dataclass(frozen=True)
class MMBCDConfig:
  """MMBCD's shape and ablation switches.

  Attributes:
    vision: the region tower; its `pooled` (the class token after its final norm, no
      projection: `output_dim=None`) is each region's feature.
    text: the history tower (RoBERTa); its last layer's first token is the text feature.
    embed_dim: width of the region and text embeddings (256).
    num_classes: 2 (benign, malignant).
    fusion: what the head reads: "vision", the max-pooled regions only; "concat", the
      text embedding and the max-pooled regions; "attention" (MMBCD), the text-queried
      attention over the regions too.
    head: "linear" (the code's `Linear(3e, 2)`) or "mlp" (the paper's: `head_hidden`
      wide, GELU).
    attn_dropout: dropout on the attention weights in training (torch's `dropout=0.3`).
    mask_regions: hide padding regions from the attention (the reference has no mask and
      pads with duplicates instead).
    pad_id: the text's padding id (RoBERTa's 1), masked from the text tower.
    bn_momentum, bn_eps: the two BatchNorm1d's, in torch's convention.
    crop_window: with whole images and boxes, each box is resampled from a patch this
      wide around it (`crop_and_resize`); None: from the whole image.
  """

  vision: ViTConfig
  text: BertConfig
  embed_dim: int = 256
  num_classes: int = 2
  fusion: Literal["vision", "concat", "attention"] = "attention"
  head: Literal["linear", "mlp"] = "linear"
  head_hidden: int = 256
  attn_dropout: float = 0.3
  mask_regions: bool = True
  pad_id: int = 1
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  crop_window: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.fusion not in FUSIONS:
      raise ValueError(f"MMBCDConfig: fusion must be one of {FUSIONS}, got {self.fusion!r}.")
    if self.head not in ("linear", "mlp"):
      raise ValueError(f"MMBCDConfig: head must be 'linear' or 'mlp', got {self.head!r}.")
    if self.vision.output_dim is not None or self.vision.pooling != "class":
      raise ValueError("MMBCDConfig: each region's feature is the ViT's class token after "
                       "its final norm; set vision.output_dim=None and vision.pooling="
                       f"'class' (got {self.vision.output_dim!r}, {self.vision.pooling!r}).")
    if not 0 <= self.attn_dropout < 1:
      raise ValueError(f"MMBCDConfig: attn_dropout={self.attn_dropout} must be in [0, 1).")

  @property
  def feature_dim(self) -> int:
    """Width of the head's input: one `embed_dim` per fused part."""
    return self.embed_dim * {"vision": 1, "concat": 2, "attention": 3}[self.fusion]


def resize_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int
                   ) -> jax.Array:
  """`"o i"` weights resampling the span `[start, start + length)` of an axis of `in_size`
  pixels to `out_size` with PIL's antialiased bilinear filter: output pixel `o` is centred
  at `start + (o + 0.5) * length / out_size`, the triangle filter widened by the
  downscaling factor (at least 1), pixels outside the span get no weight (PIL resizes the
  crop, not the image), and each row is normalised. Traceable in `start` and `length`."""
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixel = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  w = jnp.maximum(0.0, 1.0 - jnp.abs(pixel[None, :] - centre[:, None]) / support)
  w = jnp.where((pixel >= start) & (pixel < start + length), w, 0.0)  # cropped first
  return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-12)


def crop_and_resize(image: jax.Array, boxes: jax.Array, size: int,
                    window: int | None = None) -> jax.Array:
  """`image "b H W c"`, `boxes "b k 4"` (y0, x0, y1, x1 in pixels, ends exclusive) ->
  float32 `"b k size size c"` crops in the image's value range, each box resampled to
  `size x size` (aspect ratio not kept, as the reference's `Resize((224, 224))`).

  The resampling is separable: rows then columns, each a `"o i"` weight matrix of fixed
  shape (`resize_weights`), so the shapes never depend on the boxes. Over the whole image
  that costs `k * size * H * W` per image; with `window`, each box is first cut out of a
  `window x window` patch around it (a fixed-shape dynamic slice) and resampled there,
  `(window / H) * (window / W)` of the cost: exact whenever every box of the batch fits
  its window, and when one does not the batch takes the whole-image path (`lax.cond`)."""
  _, h, w, _ = image.shape
  image = image.astype(jnp.float32)
  if window is None or (window >= h and window >= w):
    return _resample(image, boxes.astype(jnp.float32), size)
  wy, wx = min(window, h), min(window, w)
  boxes = boxes.astype(jnp.float32)
  fits = jnp.all((boxes[..., 2] - boxes[..., 0] <= wy) & (boxes[..., 3] - boxes[..., 1] <= wx))

  def windowed(image, boxes):
    start = jnp.stack([jnp.clip(jnp.floor(boxes[..., 0]), 0, h - wy),
                       jnp.clip(jnp.floor(boxes[..., 1]), 0, w - wx)], -1).astype(jnp.int32)
    patches = jax.vmap(lambda im, s: jax.vmap(lambda t: jax.lax.dynamic_slice(
        im, (t[0], t[1], 0), (wy, wx, im.shape[-1])))(s))(image, start)  # "b k wy wx c"
    offset = jnp.concatenate([start, start], -1).astype(jnp.float32)
    return jax.vmap(lambda p, b: _resample(p, b[:, None], size)[:, 0], in_axes=(1, 1),
                    out_axes=1)(patches, boxes - offset)

  return jax.lax.cond(fits, windowed, lambda im, bx: _resample(im, bx, size), image, boxes)


def _resample(image: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """`crop_and_resize` over the whole of each image: `"b H W c"`, `"b k 4"`."""
  _, h, w, _ = image.shape
  y0, x0, y1, x1 = jnp.moveaxis(boxes, -1, 0)
  rows = jax.vmap(jax.vmap(lambda s, n: resize_weights(s, n, h, size)))(y0, y1 - y0)
  cols = jax.vmap(jax.vmap(lambda s, n: resize_weights(s, n, w, size)))(x0, x1 - x0)
  out = jnp.einsum("bkoh,bhwc->bkowc", rows, image)
  return jnp.einsum("bkpw,bkowc->bkopc", cols, out)


class RegionAttention(nn.Module):
  """One-head attention of torch's `nn.MultiheadAttention` from one query `"b e"` over
  `"b k e"` -> (`"b e"`, weights `"b k"`); `mask "b k"` hides keys (None: none hidden)."""

  width: int
  dropout: float
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, keys: jax.Array, mask: jax.Array | None, train: bool
               ) -> tuple[jax.Array, jax.Array]:
    e = self.width
    kw = dict(use_bias=True, kernel_init=TORCH_LINEAR_INIT, dtype=self.dtype,
              param_dtype=self.param_dtype)
    project = lambda name, x: Dense((1, e), ("embed", "heads", "head_dim"), name=name,
                                    **kw)(x)[..., 0, :]
    q, k, v = project("query", query), project("key", keys), project("value", keys)
    scores = jnp.einsum("be,bke->bk", q.astype(jnp.float32) * e ** -0.5,
                        k.astype(jnp.float32))
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    dropped = weights
    if train and self.dropout > 0:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.dropout, weights.shape)
      dropped = jnp.where(keep, weights / (1 - self.dropout), 0.0)
    out = jnp.einsum("bk,bke->be", dropped.astype(v.dtype), v)
    out = Dense(e, ("heads", "head_dim", "embed"), axis=(-2, -1), name="out", **kw)(
        out[:, None])
    return out, weights


class MMBCD(nn.Module):
  """`regions "b k s s c"`, `tokens "b t"` -> `{"logits": "b classes", ...}`."""

  config: MMBCDConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
    bn = lambda: BatchNorm(cfg.bn_momentum, cfg.bn_eps, **kw)
    dense = lambda width, axes=("embed", "mlp"): Dense(
        width, axes, use_bias=True, kernel_init=TORCH_LINEAR_INIT, **kw)
    e = cfg.embed_dim
    self.vision = ViT(cfg.vision)
    self.vision_bn = bn()
    self.vision_proj = dense(e)
    if cfg.fusion != "vision":
      self.text = Bert(cfg.text)
      self.text_bn = bn()
      self.text_proj = dense(e)
    if cfg.fusion == "attention":
      self.attn = RegionAttention(e, cfg.attn_dropout, **kw)
    if cfg.head == "mlp":
      self.head_hidden = dense(cfg.head_hidden)
    self.head = dense(cfg.num_classes, ("mlp", None))

  def encode_regions(self, regions: jax.Array, region_mask: jax.Array, train: bool
                     ) -> jax.Array:
    """`regions "b k s s c"` (c = 1 or 3; uint8, or float already normalised) ->
    `"b k e"` region embeddings."""
    b, k = regions.shape[:2]
    flat = regions.reshape(b * k, *regions.shape[2:])
    if flat.shape[-1] == 1:  # grey mammograms, as RGB
      flat = jnp.repeat(flat, 3, axis=-1)
    features = self.vision(flat)["pooled"]
    features = self.vision_bn(features, not train, mask=region_mask.reshape(b * k))
    return jax.nn.gelu(self.vision_proj(features), approximate=False).reshape(b, k, -1)

  def encode_text(self, tokens: jax.Array, train: bool) -> jax.Array:
    """`tokens "b t"` -> `"b e"`: the last layer's first token, normalised and projected."""
    hidden = self.text(tokens, token_mask=tokens != self.config.pad_id)["hidden"][:, 0]
    return jax.nn.gelu(self.text_proj(self.text_bn(hidden, not train)), approximate=False)

  def __call__(self, regions: jax.Array | None = None, tokens: jax.Array | None = None, *,
               region_mask: jax.Array | None = None, image: jax.Array | None = None,
               boxes: jax.Array | None = None, train: bool = False) -> dict[str, jax.Array]:
    """Classifies a batch of cases.

    Args:
      regions: `"b k s s c"` crops at the tower's input size (uint8, or float already
        normalised); or None with `image` and `boxes`.
      tokens: `"b t"` the history's token ids (`<s> ... </s>`, padded with `pad_id`);
        unused with `fusion="vision"`.
      region_mask: `"b k"` True for real regions; default all.
      image, boxes: `"b S S c"` uint8 whole images and `"b k 4"` boxes (y0, x0, y1, x1 in
        its pixels), cropped to the tower's size here (`crop_and_resize`).
      train: BatchNorm on the batch's statistics (apply with `mutable=["batch_stats"]`) and
        attention dropout (a "dropout" rng).
    Returns:
      "logits": `"b classes"` float32; "features": `"b f"` the head's input; "attention":
      `"b k"` the attention weights (fusion "attention"); "regions": `"b k e"`.
    """
    cfg = self.config
    if regions is None:
      if image is None or boxes is None:
        raise ValueError("MMBCD needs `regions`, or `image` and `boxes` to crop them from.")
      regions = crop_and_resize(image, boxes, cfg.vision.image_size, cfg.crop_window)
      if regions.shape[-1] == 1:  # grey mammograms, as RGB
        regions = jnp.repeat(regions, 3, axis=-1)
      if jnp.issubdtype(image.dtype, jnp.integer):  # normalised as the ViT normalises uint8
        regions = normalise_pixels(regions, cfg.vision)
    b, k = regions.shape[:2]
    if region_mask is None:
      region_mask = jnp.ones((b, k), bool)
    region_mask = region_mask.astype(bool)
    embedded = self.encode_regions(regions, region_mask, train)
    pooled = jnp.max(jnp.where(region_mask[..., None], embedded,
                               jnp.finfo(embedded.dtype).min), axis=1)
    parts, out = [pooled], {"regions": embedded}
    if cfg.fusion != "vision":
      if tokens is None:
        raise ValueError(f"MMBCD with fusion={cfg.fusion!r} needs the history's tokens.")
      text = self.encode_text(tokens, train)
      parts = [text, pooled]
      if cfg.fusion == "attention":
        attended, out["attention"] = self.attn(
            text, embedded, region_mask if cfg.mask_regions else None, train)
        parts = [attended, text, pooled]
    features = jnp.concatenate(parts, axis=-1)
    h = features
    if cfg.head == "mlp":
      h = jax.nn.gelu(self.head_hidden(h), approximate=False)
    out["logits"] = self.head(h).astype(jnp.float32)
    out["features"] = features
    return out
