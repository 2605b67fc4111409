"""Flamingo: frozen vision encoder -> Perceiver Resampler -> LM with gated cross-attention.

Inputs are interleaved: `<image>` tokens in the text mark where images occur, in order,
and `<|endofchunk|>` ends the text that belongs to an image. Text tokens attend (through
the gated blocks) to the visual tokens of the latest preceding image, or of all
preceding images when `xattn.only_immediate` is False; tokens before the first image
attend to nothing.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import decoding
from mmjax.models.common import config_from_dict
from mmjax.models.lm import LanguageModel, LMConfig
from mmjax.models.perceiver import PerceiverResampler, ResamplerConfig
from mmjax.models.vit import ViT, ViTConfig
from mmjax.models.xattn import XAttnConfig, media_attention_mask, media_index


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
  """The whole model. `vision_feature_layer` picks the ViT layer the resampler reads."""

  vision: ViTConfig
  resampler: ResamplerConfig
  lm: LMConfig
  xattn: XAttnConfig
  media_token_id: int
  endofchunk_token_id: int
  vision_feature_layer: int = -1

  def __post_init__(self):
    for name in ("media_token_id", "endofchunk_token_id"):
      token = getattr(self, name)
      if not 0 <= token < self.lm.vocab_size:
        raise ValueError(f"FlamingoConfig.{name}={token} is outside the LM vocabulary "
                         f"[0, {self.lm.vocab_size}).")

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "FlamingoConfig":
    return config_from_dict(cls, values)


class Flamingo(nn.Module):
  """`tokens "b t"`, `images "b T F h w c"`, `num_images "b"` -> logits `"b t v"`.

  Parameters live under `vision/`, `resampler/` and `lm/` (the gated blocks are
  `lm/xattn_<i>/`), so freezing is a matter of path patterns.
  """

  config: FlamingoConfig

  def setup(self):
    cfg = self.config
    self.vision = ViT(cfg.vision)
    self.resampler = PerceiverResampler(cfg.resampler)
    self.lm = LanguageModel(cfg.lm, xattn=cfg.xattn)

  def encode_media(self, images: jax.Array) -> jax.Array:
    """`"b T F h w c" -> "b T n e"`: vision tokens of every frame, resampled per image."""
    if images.ndim != 6:
      raise ValueError("Flamingo expects images shaped 'b T F h w c' (batch, images, "
                       f"frames, height, width, channels), got {images.shape}.")
    b, num_media, frames = images.shape[:3]
    tokens = self.vision(images.reshape(-1, *images.shape[3:]),
                         feature_layer=self.config.vision_feature_layer)["tokens"]
    tokens = tokens.reshape(b, num_media, frames, *tokens.shape[1:])
    return self.resampler(tokens)

  def __call__(self, tokens: jax.Array, images: jax.Array | None = None,
               num_images: jax.Array | None = None, *, media: jax.Array | None = None,
               positions: jax.Array | None = None, token_mask: jax.Array | None = None,
               decode: bool = False, return_hidden: bool = False) -> jax.Array:
    """Logits for interleaved text and images.

    Args:
      tokens: `"b t"` token ids with `<image>` tokens where images occur.
      images: `"b T F h w c"`, or None when `media` is given (or, when decoding, after
        the first call: the media's projections are cached then).
      num_images: `"b"` real images per row; images at index >= num_images are padding
        and have no effect. Default: all T are real.
      media: `"b T n e"` precomputed `encode_media(images)`.
      positions, token_mask, decode, return_hidden: as for `LanguageModel`.
    """
    cfg = self.config
    b = tokens.shape[0]
    if images is not None:
      if media is not None:
        raise ValueError("Flamingo: pass either images or precomputed media, not both.")
      media = self.encode_media(images)

    if media is not None:
      num_media = media.shape[1]
      if num_images is None:
        num_images = jnp.full((b,), num_media, jnp.int32)
      media_valid = jnp.arange(num_media) < num_images[:, None]
      if decode:
        self.put_variable("cache", "media_valid", media_valid)
      media = media.reshape(b, -1, media.shape[-1])  # b (T n) e
    elif decode and self.has_variable("cache", "media_valid"):
      media_valid = self.get_variable("cache", "media_valid")
    else:
      raise ValueError("Flamingo needs `images` or `media` (when decoding: on the first "
                       "call, which caches them).")

    offset = None
    if decode:
      offset = self.get_variable("cache", "media_count", jnp.zeros((b,), jnp.int32))
    text_index = media_index(tokens, cfg.media_token_id, offset)
    if decode:
      self.put_variable("cache", "media_count", text_index[:, -1])
    mask = media_attention_mask(text_index, media_valid, cfg.xattn.only_immediate)
    mask = jnp.repeat(mask, cfg.resampler.num_latents, axis=-1)  # b t (T n)
    return self.lm(tokens, positions=positions, token_mask=token_mask, media=media,
                   media_mask=mask, decode=decode, return_hidden=return_hidden)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "stop_ids", "pad_id",
                                             "sampling", "beams"))
def generate(model: Flamingo, params: Any, prompt: jax.Array, prompt_lengths: jax.Array,
             rng: jax.Array, *, images: jax.Array | None = None,
             num_images: jax.Array | None = None, media: jax.Array | None = None,
             max_new_tokens: int, stop_ids: Sequence[int] | None = None, pad_id: int = 0,
             sampling: decoding.SamplingConfig = decoding.GREEDY,
             beams: decoding.BeamConfig | None = None) -> decoding.Generated:
  """Continues interleaved prompts; media are encoded once and their projections cached.

  Args:
    model, params: the Flamingo and its (unboxed) parameters.
    prompt: `"b t"` right-padded tokens; prompt_lengths: `"b"` real lengths.
    images / num_images / media: as for `Flamingo.__call__`.
    stop_ids: default `(<|endofchunk|>,)`; add the tokenizer's EOS.
    sampling: greedy (default) or sampling settings.
    beams: beam search instead (`decoding.beam_search`); each prompt and its media are
      run once, then their caches copied to the beams.
  Returns:
    `decoding.Generated` with `"b max_new_tokens"` tokens and per-row lengths.
  """
  cfg = model.config
  b, t = prompt.shape
  max_len = t + max_new_tokens
  if cfg.lm.position == "learned" and max_len > cfg.lm.max_len:
    raise ValueError(f"Prompt length {t} + max_new_tokens {max_new_tokens} exceeds the LM's "
                     f"learned positions (max_len={cfg.lm.max_len}).")
  if media is None:
    media = model.apply({"params": params}, images, method=Flamingo.encode_media)
  if num_images is None:
    num_images = jnp.full((b,), media.shape[1], jnp.int32)
  stop_ids = tuple(stop_ids) if stop_ids is not None else (cfg.endofchunk_token_id,)
  step, prefill, cache_for = decode_fns(model, params, media, num_images, max_len)
  return decoding.decode(step, cache_for, prompt, prompt_lengths, rng,
                         max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                         sampling=sampling, beams=beams, prefill_fn=prefill)


def decode_fns(model: Flamingo, params: Any, media: jax.Array, num_images: jax.Array,
               max_len: int) -> tuple[decoding.StepFn, decoding.StepFn, Any]:
  """`(step, prefill, cache_for)`: KV-cached decoding of a Flamingo, as `decoding` takes it.

  `prefill(cache, tokens, positions)` consumes prompts with their `media "b T n e"`
  (caching the media's projections), `step` continues them from the cache, and
  `cache_for(n)` is an empty cache for `n` rows of up to `max_len` positions.
  """
  variables = {"params": params}

  def step(cache, tokens, positions, **media_kw):
    logits, state = model.apply({**variables, "cache": cache}, tokens, positions=positions,
                                decode=True, mutable=["cache"], **media_kw)
    return logits, state["cache"]

  def cache_for(n):  # only the inputs' shapes matter
    return decoding.init_cache(
        model.apply, variables, jnp.zeros((n, max_len), jnp.int32),
        media=jnp.zeros((n,) + media.shape[1:], media.dtype),
        num_images=jnp.zeros((n,), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(max_len), (n, max_len)), decode=True,
        mutable=["cache"])

  return step, functools.partial(step, media=media, num_images=num_images), cache_for
