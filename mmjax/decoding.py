"""Autoregressive generation in one compiled loop, with a KV cache.

Model-agnostic: a model is seen through `step_fn(cache, tokens "b t", positions "b t") ->
(logits "b t v", cache)`. Prompts are right-padded with per-row lengths; each row writes
its cache at its own positions, so rows of different lengths decode together with no
holes in their caches.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Cache = Any
StepFn = Callable[[Cache, jax.Array, jax.Array], tuple[jax.Array, Cache]]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """`temperature == 0` is greedy; otherwise sample, optionally restricted to the `top_k`
  most likely tokens and/or the smallest set whose probability reaches `top_p`."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """`"b v" -> "b"` next tokens."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k is not None:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None and sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is below top_p (the top one always).
    keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Generated:
  """`tokens "b n"` (padding after a row's end) and `lengths "b"` (the stop token
  included)."""

  tokens: jax.Array
  lengths: jax.Array


jax.tree_util.register_dataclass(Generated, data_fields=["tokens", "lengths"], meta_fields=[])


def init_cache(apply_fn: Callable[..., tuple[Any, dict]], *args, **kwargs) -> Cache:
  """A zero cache shaped by one abstract decode call at the maximum length.

  `apply_fn(*args, **kwargs)` must run the model with `decode=True, mutable=["cache"]`
  and return `(output, variables)`; nothing is computed, only shapes are traced.
  """
  shapes = jax.eval_shape(lambda: apply_fn(*args, **kwargs)[1]["cache"])
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


GREEDY = SamplingConfig()


def generate(step_fn: StepFn, cache: Cache, prompt: jax.Array, prompt_lengths: jax.Array,
             rng: jax.Array, *, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
             sampling: SamplingConfig = GREEDY,
             prefill_fn: StepFn | None = None) -> Generated:
  """Continues each prompt until a stop token or `max_new_tokens`.

  Jit-compatible (wrap with `jax.jit` and static step functions and settings); the decode
  loop is a `lax.while_loop` that ends early once every row has stopped.

  Args:
    step_fn: one decoding step on `"b 1"` tokens.
    cache: from `init_cache`, with room for `prompt.shape[1] + max_new_tokens` positions.
    prompt: `"b t"` right-padded prompt tokens; prompt_lengths: `"b"` real lengths (>= 1).
    rng: key for sampling (unused when greedy).
    stop_ids: tokens that end a row (e.g. EOS and `<|endofchunk|>`); they are emitted.
    pad_id: fills a row after it stopped.
    sampling: greedy or sampling settings.
    prefill_fn: the call that consumes the whole prompt (default `step_fn`); Flamingo
      passes its media here.
  """
  b, t = prompt.shape
  prefill_fn = prefill_fn or step_fn
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, cache = prefill_fn(cache, prompt, positions)
  last_logits = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
  stop_ids = jnp.asarray(stop_ids, jnp.int32)

  def cond(state):
    i, _, _, _, done, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, cache, last_logits, position, done, out, rng = state
    rng, key = jax.random.split(rng)
    token = jnp.where(done, pad_id, sample_logits(last_logits, key, sampling))
    out = out.at[:, i].set(token)
    done = done | jnp.isin(token, stop_ids)
    logits, cache = step_fn(cache, token[:, None], position[:, None])
    return i + 1, cache, logits[:, 0], position + 1, done, out, rng

  state = (jnp.int32(0), cache, last_logits, prompt_lengths.astype(jnp.int32),
           jnp.zeros((b,), bool), jnp.full((b, max_new_tokens), pad_id, jnp.int32), rng)
  *_, out, _ = jax.lax.while_loop(cond, body, state)
  is_stop = jnp.isin(out, stop_ids)
  first_stop = jnp.argmax(is_stop, axis=1)
  lengths = jnp.where(jnp.any(is_stop, axis=1), first_stop + 1, max_new_tokens)
  return Generated(out, lengths.astype(jnp.int32))
