"""LLaVA: a CLIP vision tower, a projector, and a decoder-only LM reading the projected
patch features in place of the prompt's image tokens.

Images -> the ViT's hidden state `vision_feature_layer` (the penultimate by default,
before any final norm) -> its patch tokens (`vision_feature_select="default"` drops the
class token, "full" keeps it) -> `projector` (`linear`, or `mlp{N}x_gelu`: N Dense layers
with erf GELU between them) -> one vector per image token. The text arrives with each
`<image>` already expanded to `image_tokens` copies of `image_token_id` (as Hugging Face's
processor does, and as `mmjax.data.conversation` builds training sequences): the k-th
image-token position of a row reads the k-th projected feature of that row's images, in
order, so a sequence truncated inside an image keeps the features of the positions left.
Parameters: `vision/` (the ViT), `projector/linear_<i>` and `lm/`.

LLaVA-1.6 ("LLaVA-NeXT") anyres (`anyres_grid` set): each image arrives as its base view
and its tiles (`mmjax.data.anyres.tiles`, zero views after an image's own tiles) with its
original size; every view is encoded and projected, and the features are packed as LLaVA's
"spatial_unpad" sequence (`anyres.pack_anyres_features`: base, then the unpadded tile grid
row by row, each row ended by the learned `image_newline`), a different number per image.
The packing is a gather with static shapes (`anyres.layout`, `anyres.packed_index`), so
rows whose images have different grids batch and jit together: a row's images' sequences
follow each other, zeros after, and its text holds exactly each image's count of image
tokens (`anyres.layout(...)["length"]`).
"""

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import decoding
from mmjax.data import anyres
from mmjax.layers import Dense
from mmjax.layers.mlp import activation_fn
from mmjax.models.common import config_from_dict
from mmjax.models.common import dtype as to_dtype
from mmjax.models.lm import LanguageModel, LMConfig
from mmjax.models.vit import ViT, ViTConfig

_MLP = re.compile(r"mlp(\d+)x_gelu")


def projector_depth(projector: str) -> int:
  """Dense layers of a projector name: 1 for "linear", N for "mlp{N}x_gelu"."""
  if projector == "linear":
    return 1
  match = _MLP.fullmatch(projector)
  if not match or int(match.group(1)) < 1:
    raise ValueError(f"Unknown LLaVA projector {projector!r}; expected 'linear' or "
                     "'mlp<N>x_gelu' (LLaVA-1.5's is 'mlp2x_gelu').")
  return int(match.group(1))


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """The whole model.

  Attributes:
    vision: the ViT; its `keep_class_token` is set from `vision_feature_select` and its
      `token_norm` must be off (LLaVA reads hidden states before any final norm).
    lm: the decoder-only LM.
    image_token_id: the id whose positions read image features.
    projector: "linear" (LLaVA) or "mlp<N>x_gelu" (LLaVA-1.5: "mlp2x_gelu").
    projector_bias: biases on the projector's layers (Hugging Face's
      `multimodal_projector_bias`).
    vision_feature_layer: the ViT hidden state read, counted like Hugging Face's
      `hidden_states` (-2: the penultimate layer's output).
    vision_feature_select: "default" drops the class token, "full" keeps it.
    pad_token_id: text padding.
    anyres_grid: LLaVA-1.6's tile grid resolutions `((width, height), ...)` in pixels,
      multiples of the vision tower's `image_size` (LLaVA-1.6: ((336, 672), (672, 336),
      (672, 672), (1008, 336), (336, 1008))); None: one view per image (LLaVA-1.5).
  """

  vision: ViTConfig
  lm: LMConfig
  image_token_id: int
  projector: str = "mlp2x_gelu"
  projector_bias: bool = True
  vision_feature_layer: int = -2
  vision_feature_select: Literal["default", "full"] = "default"
  pad_token_id: int = 0
  anyres_grid: tuple[tuple[int, int], ...] | None = None

  def __post_init__(self):
    projector_depth(self.projector)
    if self.vision_feature_select not in ("default", "full"):
      raise ValueError(f"LlavaConfig.vision_feature_select={self.vision_feature_select!r}; "
                       "expected 'default' (drop the class token) or 'full'.")
    if self.vision.token_norm:
      raise ValueError("LlavaConfig: LLaVA reads the ViT's hidden states before any final "
                       "norm; set vision.token_norm=False.")
    if not -self.vision.depth - 1 <= self.vision_feature_layer <= self.vision.depth:
      raise ValueError(f"LlavaConfig.vision_feature_layer={self.vision_feature_layer} is "
                       f"outside the ViT's {self.vision.depth + 1} hidden states.")
    if not 0 <= self.image_token_id < self.lm.vocab_size:
      raise ValueError(f"LlavaConfig.image_token_id={self.image_token_id} is outside the "
                       f"LM's vocabulary [0, {self.lm.vocab_size}).")
    if self.anyres_grid is not None:
      grid = tuple(tuple(int(v) for v in p) for p in self.anyres_grid)
      size = self.vision.image_size
      if not grid or any(len(p) != 2 or min(p) <= 0 or p[0] % size or p[1] % size
                         for p in grid):
        raise ValueError(f"LlavaConfig.anyres_grid={self.anyres_grid!r}: expected "
                         "(width, height) pairs of positive multiples of the vision "
                         f"tower's image_size={size}.")
      if self.vision_feature_select != "default":
        raise ValueError("LlavaConfig: anyres lays each view's patches out as a grid, "
                         "which a class token does not fit; set vision_feature_select="
                         "'default'.")
      object.__setattr__(self, "anyres_grid", grid)
    keep = self.vision_feature_select == "full"
    if self.vision.keep_class_token != keep:
      object.__setattr__(self, "vision",
                         dataclasses.replace(self.vision, keep_class_token=keep))

  @property
  def image_tokens(self) -> int:
    """Features (and image-token positions) per image."""
    return self.vision.num_patches + (self.vision_feature_select == "full"
                                      and self.vision.class_token)

  @property
  def anyres_views(self) -> int:
    """Views per image under anyres: the base view and the most tiles of any grid."""
    return 1 + anyres.max_tiles(self.anyres_grid, self.vision.image_size)

  @property
  def anyres_max_features(self) -> int:
    """Features (image-token positions) of an image under anyres, at most."""
    return anyres.max_feature_length(self.anyres_grid, self.vision.image_size,
                                     self.vision.image_size // self.vision.patch_size)

  def anyres_lengths(self, image_sizes):
    """Image-token count of each image of `image_sizes "... 2"` (width, height; 0 0 for
    none) under anyres: int32 `"..."`, numpy for numpy input."""
    xp = np if isinstance(image_sizes, (np.ndarray, list, tuple)) else jnp
    return anyres.layout(image_sizes, self.anyres_grid, self.vision.image_size,
                         self.vision.image_size // self.vision.patch_size, xp)["length"]

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "LlavaConfig":
    return config_from_dict(cls, values)


class Projector(nn.Module):
  """`"... e" -> "... d"`: `linear_0`, then GELU and `linear_<i>` for each further layer."""

  width: int
  depth: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.depth):
      if i:
        x = activation_fn("gelu")(x)
      x = Dense(self.width, ("embed", "mlp") if i < self.depth - 1 else ("mlp", "embed"),
                name=f"linear_{i}", **kw)(x)
    return x


def splice(embedded: jax.Array, tokens: jax.Array, features: jax.Array,
           image_token_id: int) -> jax.Array:
  """`embedded "b t d"` with each image-token position of `tokens "b t"` replaced by the
  row's next feature of `features "b n d"` (n = images x tokens per image), in order.

  Positions past the row's `n` features (more image tokens than features) read the last
  one; `mmjax.data.conversation` never builds such rows.
  """
  is_image = tokens == image_token_id
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
  gathered = jnp.take_along_axis(features, index[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered.astype(embedded.dtype), embedded)


class Llava(nn.Module):
  """`(images "b m h w c", tokens "b t") -> logits "b t v"`."""

  config: LlavaConfig

  def setup(self):
    cfg = self.config
    self.vision = ViT(cfg.vision)
    self.projector = Projector(cfg.lm.width, projector_depth(cfg.projector),
                               cfg.projector_bias, dtype=to_dtype(cfg.lm.dtype),
                               param_dtype=to_dtype(cfg.lm.param_dtype))
    self.lm = LanguageModel(cfg.lm)
    if cfg.anyres_grid is not None:
      self.image_newline = self.param(
          "image_newline", nn.with_logical_partitioning(
              nn.initializers.normal(cfg.lm.width ** -0.5), ("embed",)),
          (cfg.lm.width,), to_dtype(cfg.lm.param_dtype))

  def image_features(self, images: jax.Array, image_sizes: jax.Array | None = None
                     ) -> jax.Array:
    """`images "b m h w c" -> "b (m n) d"`: each image's projected features, in order.

    Under anyres: `images "b m v h w c"` (each image's base view, then its tiles, zero
    views after them) and `image_sizes "b m 2"` (original width, height; 0 0 where a row
    has fewer images) -> `"b (m n) d"`, `n = config.anyres_max_features`: each row's
    images' packed sequences one after another, zeros after them.
    """
    if self.config.anyres_grid is not None:
      return self._anyres_features(images, image_sizes)
    b, m = images.shape[:2]
    tokens = self.vision(images.reshape(b * m, *images.shape[2:]),
                         feature_layer=self.config.vision_feature_layer)["tokens"]
    features = self.projector(tokens)
    return features.reshape(b, m * features.shape[1], features.shape[2])

  def _anyres_features(self, images: jax.Array, image_sizes: jax.Array | None) -> jax.Array:
    cfg = self.config
    if images.ndim != 6 or images.shape[2] != cfg.anyres_views:
      raise ValueError(f"Anyres LLaVA expects images 'b m v h w c' with v = "
                       f"{cfg.anyres_views} views (the base view and up to "
                       f"{cfg.anyres_views - 1} tiles), got {images.shape}.")
    if image_sizes is None or image_sizes.shape != (*images.shape[:2], 2):
      raise ValueError(f"Anyres LLaVA needs image_sizes 'b m 2' (each image's original "
                       f"width and height) for images {images.shape}, got "
                       f"{None if image_sizes is None else image_sizes.shape}.")
    b, m, v = images.shape[:3]
    side = cfg.vision.image_size // cfg.vision.patch_size
    tokens = self.vision(images.reshape(b * m * v, *images.shape[3:]),
                         feature_layer=cfg.vision_feature_layer)["tokens"]
    features = self.projector(tokens)
    d = features.shape[-1]
    newline = jnp.broadcast_to(self.image_newline.astype(features.dtype), (b, m, 1, d))
    table = jnp.concatenate([features.reshape(b, m, v * side * side, d), newline,
                             jnp.zeros_like(newline)], axis=2)
    lay = anyres.layout(image_sizes, cfg.anyres_grid, cfg.vision.image_size, side, jnp)
    n = cfg.anyres_max_features
    index = anyres.packed_index(lay, side, v - 1, n, jnp)
    packed = jnp.take_along_axis(table, index[..., None], axis=2).reshape(b, m * n, d)
    # The row's images back to back: output position q reads image i's local q - start_i.
    ends = jnp.cumsum(lay["length"], axis=1)
    q = jnp.arange(m * n)
    image = jnp.minimum(jnp.sum(q[None, :, None] >= ends[:, None, :], axis=-1), m - 1)
    start = jnp.take_along_axis(ends - lay["length"], image, axis=1)
    source = image * n + jnp.clip(q[None] - start, 0, n - 1)
    out = jnp.take_along_axis(packed, source[..., None], axis=1)
    return jnp.where((q[None] < ends[:, -1:])[..., None], out, 0)

  def __call__(self, images: jax.Array | None, tokens: jax.Array,
               image_sizes: jax.Array | None = None, *, token_mask: jax.Array | None = None,
               positions: jax.Array | None = None, features: jax.Array | None = None,
               decode: bool = False) -> jax.Array:
    """LM logits of `tokens`, image-token positions reading the features of `images`
    (or precomputed `features "b n d"`); neither is needed when no token is an image
    token (decoding after the prompt).

    Args:
      images: `"b m h w c"`, m images per row (zeros where a row has fewer); under
        anyres `"b m v h w c"` with `image_sizes "b m 2"` (see `image_features`).
      tokens: `"b t"` with each image expanded to `config.image_tokens` image tokens
        (under anyres: to its `config.anyres_lengths` count).
      token_mask, positions, decode: as `LanguageModel`'s.
    """
    cfg = self.config
    if features is None and images is not None:
      features = self.image_features(images, image_sizes)
    embeddings = None
    if features is not None:
      embedded = jnp.zeros(tokens.shape + (cfg.lm.width,), features.dtype)
      embeddings = splice(embedded, tokens, features, cfg.image_token_id)
    return self.lm(tokens, positions=positions, token_mask=token_mask, decode=decode,
                   embeddings=embeddings,
                   embedding_mask=None if embeddings is None else tokens == cfg.image_token_id)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "stop_ids", "pad_id",
                                             "sampling", "beams"))
def generate(model: Llava, params: Any, images: jax.Array, prompt: jax.Array,
             prompt_lengths: jax.Array, rng: jax.Array, *, max_new_tokens: int,
             stop_ids: Sequence[int] = (), pad_id: int = 0,
             sampling: decoding.SamplingConfig = decoding.GREEDY,
             beams: decoding.BeamConfig | None = None,
             image_sizes: jax.Array | None = None) -> decoding.Generated:
  """Continues right-padded prompts `"b t"` (real lengths `"b"`, image tokens expanded)
  about `images "b m h w c"` (anyres: `"b m v h w c"` and `image_sizes "b m 2"`) with the
  KV cache: greedy, sampled, or the best beam search hypothesis. Returns
  `decoding.Generated`."""
  features = model.apply({"params": params}, images, image_sizes,
                         method=Llava.image_features)
  max_len = prompt.shape[1] + max_new_tokens
  lm = model.config.lm
  if lm.position == "learned" and max_len > lm.max_len:
    raise ValueError(f"Prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} "
                     f"exceeds the LM's learned positions (max_len={lm.max_len}).")

  run, cache_for = decode_fns(model, params, max_len)
  return decoding.decode(run, cache_for, prompt, prompt_lengths, rng,
                         max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                         pad_id=pad_id, sampling=sampling, beams=beams,
                         prefill_fn=functools.partial(run, features=features))


def decode_fns(model: Llava, params: Any, max_len: int
               ) -> tuple[decoding.StepFn, Callable[[int], Any]]:
  """`(run, cache_for)`: KV-cached decoding of a LLaVA, as `decoding` takes it.
  `run(cache, tokens, positions, features=None)` runs the model on `tokens` (their
  image-token positions reading `features "b n d"`, given on the prefill); `cache_for(n)`
  is an empty cache of `max_len` positions for `n` rows."""

  def run(cache, tokens, positions, features=None):
    logits, state = model.apply({"params": params, "cache": cache}, None, tokens,
                                positions=positions, features=features, decode=True,
                                mutable=["cache"])
    return logits, state["cache"]

  def cache_for(n):
    return decoding.init_cache(
        model.apply, {"params": params}, None, jnp.zeros((n, max_len), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(max_len), (n, max_len)), decode=True,
        mutable=["cache"])

  return run, cache_for
