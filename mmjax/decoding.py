"""Autoregressive generation in one compiled loop, with a KV cache: greedy, sampling and
beam search.

Model-agnostic: a model is seen through `step_fn(cache, tokens "b t", positions "b t") ->
(logits "b t v", cache)`. Prompts are right-padded with per-row lengths; each row writes
its cache at its own positions, so rows of different lengths decode together with no
holes in their caches.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

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


@dataclasses.dataclass(frozen=True)
class BeamConfig:
  """Beam search settings, with the meaning transformers gives them.

  A finished hypothesis of `n` new tokens (its stop token included) scores
  `sum of its log-probabilities / n ** length_penalty`: 0 ranks by total log-probability,
  positive values favour longer outputs. Each row keeps the `num_beams` best finished
  hypotheses and stops when (`early_stopping`):

    False    no running beam can beat the worst kept one, assuming it finished now;
    True     as False, and also as soon as `num_beams` hypotheses are finished;
    "never"  as False, but with a positive `length_penalty` assuming it finished at
             `max_new_tokens` (an upper bound: the exact classic beam search).

  Stop tokens are forbidden until `min_new_tokens` tokens were generated.
  """

  num_beams: int = 4
  length_penalty: float = 1.0
  early_stopping: bool | Literal["never"] = False
  min_new_tokens: int = 0

  def __post_init__(self):
    if self.num_beams < 1:
      raise ValueError(f"num_beams must be >= 1, got {self.num_beams}.")
    if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
      raise ValueError("early_stopping must be True, False or 'never', got "
                       f"{self.early_stopping!r}.")
    if self.min_new_tokens < 0:
      raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}.")


def cache_batch_axes(cache_for: Callable[[int], Cache]) -> Any:
  """The batch axis of every leaf of a cache, as a tree of ints shaped like the cache.

  `cache_for(n)` builds (e.g. with `init_cache`) the cache for `n` rows; only its shapes
  are traced, for two batch sizes, and the axis whose size changes is the batch axis. This
  is how beams are tiled and reordered whatever the model's cache layout: scanned layers
  stack their caches on a leading layer axis, which puts the batch second.
  """
  two, three = (jax.eval_shape(functools.partial(cache_for, n)) for n in (2, 3))

  def axis(path, a, b):
    changed = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    if len(changed) != 1 or (a.shape[changed[0]], b.shape[changed[0]]) != (2, 3):
      raise ValueError(f"Cache leaf {jax.tree_util.keystr(path)} has no single batch axis "
                       f"(shapes {a.shape} for 2 rows, {b.shape} for 3); beam search needs "
                       "every cache leaf to hold one entry per row.")
    return changed[0]

  return jax.tree_util.tree_map_with_path(axis, two, three)


def beam_search(step_fn: StepFn, cache_for: Callable[[int], Cache], prompt: jax.Array,
                prompt_lengths: jax.Array, *, beams: BeamConfig, max_new_tokens: int,
                stop_ids: Sequence[int], pad_id: int,
                prefill_fn: StepFn | None = None) -> Generated:
  """Each row's best beam search hypothesis, as transformers' beam search finds it.

  Each prompt is run once; its cache is then copied to `num_beams` beams, which decode
  together as `"(b k)"` rows of one `lax.while_loop`. At every step the `(1 + number of
  stop ids) * num_beams` best continuations of a row (by total log-probability) are kept:
  the best `num_beams` that do not stop become the next beams (their caches gathered from
  their parents'), and those among the first `num_beams` that stop (or reach
  `max_new_tokens`) compete, scored as `BeamConfig` says, for the row's finished slots.

  Jit-compatible like `generate` (static step functions, `cache_for` and settings).

  Args:
    step_fn: one decoding step, as for `generate`.
    cache_for: `n -> ` a fresh cache for `n` rows with room for `prompt.shape[1] +
      max_new_tokens` positions; called for the batch and (shapes only) by
      `cache_batch_axes`.
    prompt: `"b t"` right-padded prompt tokens; prompt_lengths: `"b"` real lengths (>= 1).
    beams: the beam search settings.
    max_new_tokens: at most this many tokens per row (>= 1).
    stop_ids: tokens that end a hypothesis (e.g. EOS and `<|endofchunk|>`); emitted.
    pad_id: fills a row after its end.
    prefill_fn: the call that consumes the whole prompt (default `step_fn`).
  Returns:
    `Generated` with the best finished hypothesis of each row, `"b max_new_tokens"`.
  """
  if max_new_tokens < 1:
    raise ValueError(f"beam search needs max_new_tokens >= 1, got {max_new_tokens}.")
  b, t = prompt.shape
  k = beams.num_beams
  num_candidates = (1 + max(1, len(stop_ids))) * k
  stop_ids = jnp.asarray(stop_ids, jnp.int32)
  prefill_fn = prefill_fn or step_fn
  axes = cache_batch_axes(cache_for)

  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, cache = prefill_fn(cache_for(b), prompt, positions)
  last_logits = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
  # Beam j of row r is row r * k + j of the cache and of the logits.
  cache = jax.tree_util.tree_map(lambda x, axis: jnp.repeat(x, k, axis=axis), cache, axes)
  last_logits = jnp.repeat(last_logits, k, axis=0)
  beam_positions = jnp.repeat(prompt_lengths.astype(jnp.int32), k)
  length_scale = lambda n: jnp.asarray(n, jnp.float32) ** beams.length_penalty
  take = lambda x, index: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)),
                                              axis=1)

  def cond(state):
    i, *_, finished, searching = state
    open_rows = searching & ~(jnp.all(finished, axis=1) & (beams.early_stopping is True))
    return (i < max_new_tokens) & jnp.any(open_rows)

  def body(state):
    (i, cache, last_logits, tokens, scores, best_tokens, best_scores, best_lengths, finished,
     searching) = state
    log_probs = jax.nn.log_softmax(last_logits.astype(jnp.float32), axis=-1)
    vocab = log_probs.shape[-1]
    banned = jnp.isin(jnp.arange(vocab), stop_ids) & (i < beams.min_new_tokens)
    log_probs = jnp.where(banned, -jnp.inf, log_probs).reshape(b, k, vocab)
    totals = (log_probs + scores[:, :, None]).reshape(b, k * vocab)

    # The best continuations of each row, sorted; what their beams generated, then them.
    cand_scores, flat = jax.lax.top_k(totals, num_candidates)  # b c
    parents, cand_token = flat // vocab, flat % vocab
    cand_tokens = take(tokens, parents).at[:, :, i].set(cand_token)  # b c n
    ends = jnp.isin(cand_token, stop_ids) | (i + 1 >= max_new_tokens)

    # The next beams: the best continuations that go on.
    scores, order = jax.lax.top_k(jnp.where(ends, -jnp.inf, cand_scores), k)
    tokens = take(cand_tokens, order)
    rows = (jnp.arange(b)[:, None] * k + take(parents, order)).reshape(-1)
    cache = jax.tree_util.tree_map(lambda x, axis: jnp.take(x, rows, axis=axis), cache, axes)

    # Ended continuations among the first k join the row's finished ones, while it searches
    # (and, with early_stopping=True, while it has room).
    room = ~(jnp.all(finished, axis=1) & (beams.early_stopping is True))
    joins = ends & (jnp.arange(num_candidates) < k) & (searching & room)[:, None]
    new_scores = jnp.where(joins, cand_scores / length_scale(i + 1), -jnp.inf)
    merged = jnp.concatenate([best_scores, new_scores], axis=1)
    best_scores, order = jax.lax.top_k(merged, k)
    best_tokens = take(jnp.concatenate([best_tokens, cand_tokens], axis=1), order)
    best_lengths = take(jnp.concatenate(
        [best_lengths, jnp.full((b, num_candidates), i + 1, jnp.int32)], axis=1), order)
    finished = take(jnp.concatenate([finished, joins], axis=1), order)

    # A row with every slot finished stops searching once its best beam, finishing at the
    # best length that early_stopping allows, would score no better than its worst slot.
    best_length = (max_new_tokens if beams.early_stopping == "never" and beams.length_penalty > 0
                   else i + 1)
    hopeless = scores[:, 0] / length_scale(best_length) <= jnp.min(best_scores, axis=1)
    searching &= ~(jnp.all(finished, axis=1) & hopeless)

    logits, cache = step_fn(cache, tokens[:, :, i].reshape(-1, 1), (beam_positions + i)[:, None])
    return (i + 1, cache, logits[:, 0], tokens, scores, best_tokens, best_scores, best_lengths,
            finished, searching)

  # Only the first beam of each row is live at first: the others are copies of it.
  scores = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf).astype(jnp.float32),
                            (b, k))
  tokens = jnp.full((b, k, max_new_tokens), pad_id, jnp.int32)
  state = (jnp.int32(0), cache, last_logits, tokens, scores, tokens,
           jnp.full((b, k), -jnp.inf, jnp.float32), jnp.zeros((b, k), jnp.int32),
           jnp.zeros((b, k), bool), jnp.ones((b,), bool))
  *_, best_tokens, _, best_lengths, _, _ = jax.lax.while_loop(cond, body, state)
  return Generated(best_tokens[:, 0], best_lengths[:, 0])


def decode(step_fn: StepFn, cache_for: Callable[[int], Cache], prompt: jax.Array,
           prompt_lengths: jax.Array, rng: jax.Array, *, max_new_tokens: int,
           stop_ids: Sequence[int], pad_id: int, sampling: SamplingConfig = GREEDY,
           beams: BeamConfig | None = None, prefill_fn: StepFn | None = None) -> Generated:
  """`generate` (greedy or sampling) on a cache for the batch, or `beam_search` when `beams`
  is given: what models' `generate` functions call. `cache_for(n)` builds a cache for `n`
  rows; the other arguments are those of `generate`."""
  if beams is None:
    return generate(step_fn, cache_for(prompt.shape[0]), prompt, prompt_lengths, rng,
                    max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                    sampling=sampling, prefill_fn=prefill_fn)
  if sampling != GREEDY:
    raise ValueError(f"Beam search is deterministic; got sampling={sampling} with "
                     f"beams={beams}. Pass one or the other.")
  return beam_search(step_fn, cache_for, prompt, prompt_lengths, beams=beams,
                     max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                     prefill_fn=prefill_fn)
