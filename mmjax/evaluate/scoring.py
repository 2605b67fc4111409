"""A Flamingo's answers to batches of few-shot prompts: generated text, or class names
ranked by their log-likelihood after the prompt; a BLIP-2's zero-shot answers.

Both pad every batch to one token length and one image count, so that all the cells of an
evaluation (tasks x shots) share one compilation per batch size.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import decoding
from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluate.prompts import IMG, answer_text, encode_prompts
from mmjax.models import blip2
from mmjax.models.flamingo import Flamingo, decode_fns, generate


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One test example's whole prompt (demonstrations and query) and its images
  `"n h w 3"`, one per `<image>` (the text-only demonstrations of zero shots have none)."""

  text: str
  images: np.ndarray


def pad_images(prompts: Sequence[Prompt], max_images: int) -> tuple[np.ndarray, np.ndarray]:
  """`"b max_images 1 h w 3"` images (zeros after each prompt's own, masked out by
  `num_images`) and `"b"` counts."""
  loaded = [p.images for p in prompts]
  images = np.zeros((len(prompts), max_images, 1, *loaded[0].shape[1:]), np.uint8)
  for i, own in enumerate(loaded):
    images[i, :len(own), 0] = own
  return images, np.array([len(own) for own in loaded], np.int32)


def make_answer_fn(model: Flamingo | blip2.Blip2, tokenizer: Tokenizer, max_new_tokens: int,
                   beams: decoding.BeamConfig | None = None):
  """`(params, prompts, length, max_images, task="", max_new_tokens=...) -> answers`:
  generation of up to `max_new_tokens`, greedy or by beam search (`beams`), read by
  `prompts.answer_text`.

  A (stage-2) BLIP-2 answers zero-shot: each prompt's query (its last image and the text
  after it) is the image's soft prompt and the text; the text-only demonstrations of a
  zero-shot prompt are not shown."""
  default_max_new_tokens = max_new_tokens
  zero_shot = isinstance(model, blip2.Blip2)

  @functools.partial(jax.jit, static_argnames="max_new_tokens")
  def answer(params, tokens, lengths, images, num_images, max_new_tokens):
    settings = dict(max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id, beams=beams,
                    stop_ids=(tokenizer.endofchunk_id, tokenizer.eos_id))
    if zero_shot:
      out = blip2.generate(model, params, images, tokens, lengths, jax.random.key(0),
                           **settings)
    else:
      out = generate(model, params, tokens, lengths, jax.random.key(0), images=images,
                     num_images=num_images, **settings)
    return out.tokens, out.lengths

  def run(params, prompts: Sequence[Prompt], length: int, max_images: int, task: str = "",
          max_new_tokens: int | None = None):
    if zero_shot:  # one image each
      texts = [p.text.split(IMG)[-1] for p in prompts]
      images, num_images = np.stack([p.images[-1] for p in prompts]), None
    else:
      texts = [p.text for p in prompts]
      images, num_images = pad_images(prompts, max_images)
    tokens, lengths = encode_prompts(tokenizer, texts, length)
    tokens_out, lengths_out = map(np.asarray, answer(
        params, tokens, lengths, images, num_images,
        max_new_tokens=max_new_tokens or default_max_new_tokens))
    return [answer_text(tokenizer, t, n, task)
            for t, n in zip(tokens_out, lengths_out, strict=True)]

  return run


def continuation_ids(tokenizer: Tokenizer, prefix: str, continuations: Sequence[str]
                     ) -> tuple[np.ndarray, np.ndarray]:
  """`"c L"` token ids of each continuation as the tokenizer splits it after `prefix`
  (a prompt's last text), right-padded, and their lengths `"c"`."""
  before = tokenizer.encode(prefix)
  ids = []
  for text in continuations:
    both = tokenizer.encode(prefix + text)
    if both[:len(before)] != before or len(both) == len(before):
      raise ValueError(f"{text!r} does not tokenize as a continuation of {prefix!r}.")
    ids.append(both[len(before):])
  lengths = np.array([len(i) for i in ids], np.int32)
  out = np.full((len(ids), lengths.max()), tokenizer.pad_id, np.int32)
  for row, i in zip(out, ids, strict=True):
    row[:len(i)] = i
  return out, lengths


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def continuation_log_probs(model: Flamingo, params, tokens, lengths, images, num_images,
                           continuations, continuation_lengths, batch_size: int = 16):
  """`"b c"` summed log-probabilities of each continuation `"c L"` after each prompt.

  The prompts' keys and values are computed once, then every continuation is scored
  against that cache (`lax.map` over continuations, `batch_size` at a time); the cache
  is never written back, so each continuation sees only its own prompt.
  """
  b, t = tokens.shape
  num_tokens = continuations.shape[1]
  media = model.apply({"params": params}, images, method=Flamingo.encode_media)
  step, prefill, cache_for = decode_fns(model, params, media, num_images, t + num_tokens)
  logits, cache = prefill(cache_for(b), tokens, jnp.broadcast_to(jnp.arange(t), (b, t)))
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)  # b 1 v

  def score(args):
    ids, n = args
    ids = jnp.broadcast_to(ids, (b, num_tokens))
    out, _ = step(cache, ids, lengths[:, None] + jnp.arange(num_tokens))
    logp = jax.nn.log_softmax(jnp.concatenate([last, out[:, :-1]], axis=1).astype(jnp.float32))
    token_logp = jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(jnp.arange(num_tokens) < n, token_logp, 0.0), axis=-1)

  scores = jax.lax.map(score, (continuations, continuation_lengths), batch_size=batch_size)
  return scores.T


def make_rank_fn(model: Flamingo, tokenizer: Tokenizer):
  """`(params, prompts, length, max_images, classes, prefix, normalize=True) -> "b c"`:
  each class name's log-likelihood as the prompt's continuation, averaged over its tokens
  when `normalize` (as OpenFlamingo ranks classes), summed otherwise."""

  def run(params, prompts: Sequence[Prompt], length: int, max_images: int,
          classes: Sequence[str], prefix: str, normalize: bool = True) -> np.ndarray:
    tokens, lengths = encode_prompts(tokenizer, [p.text for p in prompts], length)
    images, num_images = pad_images(prompts, max_images)
    ids, id_lengths = continuation_ids(tokenizer, prefix, classes)
    scores = np.asarray(continuation_log_probs(model, params, tokens, lengths, images,
                                               num_images, ids, id_lengths))
    return scores / id_lengths[None] if normalize else scores

  return run
