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
"""

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import decoding
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
  """

  vision: ViTConfig
  lm: LMConfig
  image_token_id: int
  projector: str = "mlp2x_gelu"
  projector_bias: bool = True
  vision_feature_layer: int = -2
  vision_feature_select: Literal["default", "full"] = "default"
  pad_token_id: int = 0

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
    keep = self.vision_feature_select == "full"
    if self.vision.keep_class_token != keep:
      object.__setattr__(self, "vision",
                         dataclasses.replace(self.vision, keep_class_token=keep))

  @property
  def image_tokens(self) -> int:
    """Features (and image-token positions) per image."""
    return self.vision.num_patches + (self.vision_feature_select == "full"
                                      and self.vision.class_token)

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

  def image_features(self, images: jax.Array) -> jax.Array:
    """`images "b m h w c" -> "b (m n) d"`: each image's projected features, in order."""
    b, m = images.shape[:2]
    tokens = self.vision(images.reshape(b * m, *images.shape[2:]),
                         feature_layer=self.config.vision_feature_layer)["tokens"]
    features = self.projector(tokens)
    return features.reshape(b, m * features.shape[1], features.shape[2])

  def __call__(self, images: jax.Array | None, tokens: jax.Array, *,
               token_mask: jax.Array | None = None, positions: jax.Array | None = None,
               features: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """LM logits of `tokens`, image-token positions reading the features of `images`
    (or precomputed `features "b n d"`); neither is needed when no token is an image
    token (decoding after the prompt).

    Args:
      images: `"b m h w c"`, m images per row (zeros where a row has fewer).
      tokens: `"b t"` with each image expanded to `config.image_tokens` image tokens.
      token_mask, positions, decode: as `LanguageModel`'s.
    """
    cfg = self.config
    if features is None and images is not None:
      features = self.image_features(images)
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
             beams: decoding.BeamConfig | None = None) -> decoding.Generated:
  """Continues right-padded prompts `"b t"` (real lengths `"b"`, image tokens expanded)
  about `images "b m h w c"` with the KV cache: greedy, sampled, or the best beam search
  hypothesis. Returns `decoding.Generated`."""
  features = model.apply({"params": params}, images, method=Llava.image_features)
  max_len = prompt.shape[1] + max_new_tokens
  lm = model.config.lm
  if lm.position == "learned" and max_len > lm.max_len:
    raise ValueError(f"Prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} "
                     f"exceeds the LM's learned positions (max_len={lm.max_len}).")

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

  return decoding.decode(run, cache_for, prompt, prompt_lengths, rng,
                         max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                         pad_id=pad_id, sampling=sampling, beams=beams,
                         prefill_fn=functools.partial(run, features=features))
