"""Interleaved image-text documents -> fixed-shape training sequences with label masks.

A document is `{"images": uint8 "n h w c", "text": str}` whose text holds one `<image>`
per image, in order, and `<|endofchunk|>` after each image's text (the OpenFlamingo
format; image-caption pairs are one-chunk documents). Building a sequence:

1. tokenize `BOS + text + EOS`; keep the first `max_images` images and cut the text
   before the next `<image>` (counted in the stats, never silent);
2. truncate to `seq_len + 1` tokens, dropping images whose `<image>` token was cut;
3. shift: `tokens = ids[:-1]`, `targets = ids[1:]`;
4. mask the loss (as OpenFlamingo does): no loss on padding, on `<image>` targets, on
   text before the first image, and on the gap after `<|endofchunk|>` up to the next
   `<image>` (the `<|endofchunk|>` itself is predicted: it is how the model learns to stop).
"""

import dataclasses
from typing import Any, Literal

import numpy as np

from mmjax import cli
from mmjax.data.shapes_world import ENDOFCHUNK_TOKEN, MEDIA_TOKEN
from mmjax.data.tokenizer import Tokenizer


def right_pad(ids, length: int, pad_id: int) -> np.ndarray:
  """int32 `"length"`: `ids` (at most `length` of them) followed by padding."""
  out = np.full(length, pad_id, np.int32)
  out[:len(ids)] = ids
  return out


class CorruptRecord(ValueError):
  """A record that cannot become a training sequence; `reason` names the category."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


MODES = ("interleaved", "text", "pair", "conversation", "regions", "video", "segment")
VIDEO_MODES = ("video", "segment")  # built without a tokenizer


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
  """What to build, and its shapes.

  Modes:
    "interleaved": Flamingo sequences (tokens, targets, loss_mask, images, num_images).
    "text": language-model sequences: the whole text (media tokens included, as ordinary
      tokens), every non-padding target trained; no images.
    "pair": contrastive pairs: exactly one image and its text without media markup,
      `BOS text EOS` right-padded (EOS kept when truncating; truncated texts are
      counted as `text_truncated`).
    "conversation": LLaVA's instruction data, rendered by `conversation` (a
      `mmjax.data.conversation.Format`: template, system prompt, image tokens per
      `<image>`), the answers trained.
    "regions": MMBCD's examples: a mammogram's detector regions, its clinical history
      and label, built by `regions` (a `mmjax.data.regions.RegionSpec`).
    "video", "segment": clips, or labelled frames and their masks, shaped by `video` (a
      `mmjax.data.video.VideoSpec`); `seq_len` is unused and no tokenizer is needed.
  """

  seq_len: int
  max_images: int = 0
  image_size: int = 0
  channels: int = 3
  mode: Literal["interleaved", "text", "pair", "conversation", "regions", "video",
                "segment"] = "interleaved"
  conversation: Any = None
  regions: Any = None
  video: Any = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"Unknown sequence mode {self.mode!r}; expected one of {MODES}.")
    if (self.mode in VIDEO_MODES) != (self.video is not None):
      raise ValueError("SequenceSpec: modes 'video' and 'segment' and a `video` spec "
                       "(VideoSpec) go together.")
    if (self.mode == "conversation") != (self.conversation is not None):
      raise ValueError("SequenceSpec: mode 'conversation' and a `conversation` format go "
                       "together.")
    if (self.mode == "regions") != (self.regions is not None):
      raise ValueError("SequenceSpec: mode 'regions' and a `regions` spec (RegionSpec) go "
                       "together.")
    if self.mode == "interleaved" and self.max_images < 1:
      # Every record would lose all its images and be skipped: refuse now, not after a
      # window of skipped records.
      raise cli.UserError(f"Interleaved sequences need max_images >= 1, got "
                          f"{self.max_images}: every record would lose its images and be "
                          "skipped (set data.max_images).")

  @property
  def needs_tokenizer(self) -> bool:
    return self.mode not in VIDEO_MODES


def loss_mask(targets: np.ndarray, *, media_id: int, endofchunk_id: int,
              pad_id: int) -> np.ndarray:
  """`targets "t"` -> float32 `"t"`: 1 where predicting the target is trained."""
  mask = np.zeros(targets.shape, np.float32)
  in_chunk = False  # inside an image's text: after <image>, up to its <|endofchunk|>
  for i, target in enumerate(targets):
    if target == media_id:
      in_chunk = True
      continue
    if in_chunk and target != pad_id:
      mask[i] = 1.0
    if target == endofchunk_id:
      in_chunk = False
  return mask


def build_sequence(document: dict[str, Any], tokenizer: Tokenizer,
                   spec: SequenceSpec) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """One document -> fixed-shape arrays and per-record stats.

  Returns:
    ({"tokens": int32 "t", "targets": int32 "t", "loss_mask": float32 "t",
      "images": uint8 "m 1 h w c", "num_images": int32}, stats) where `t = seq_len`,
    `m = max_images` and stats counts images dropped by the image limit or truncation
    (pairs: texts cut to `seq_len`).
  Raises:
    CorruptRecord: empty text, images that do not match the `<image>` tokens, or
      images of the wrong shape or type.
  """
  text, images = document.get("text"), document.get("images")
  if not isinstance(text, str) or not text.strip():
    raise CorruptRecord("empty_text", "the record has no text")
  if spec.mode == "text":
    return _text_sequence(text, tokenizer, spec.seq_len), {}
  images = np.asarray(images if images is not None else np.zeros((0,)), dtype=None)
  expected = (spec.image_size, spec.image_size, spec.channels)
  if images.size and (images.ndim != 4 or images.shape[1:] != expected
                      or images.dtype != np.uint8):
    raise CorruptRecord("bad_image", f"images must be uint8 'n {' '.join(map(str, expected))}'"
                        f", got {images.dtype} {images.shape}")
  num_given = len(images) if images.size else 0
  if spec.mode == "pair":
    if num_given != 1:
      raise CorruptRecord("image_count", f"a pair needs exactly one image, got {num_given}")
    return _pair(text, images[0], tokenizer, spec.seq_len)
  ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), np.int32)
  media_positions = np.flatnonzero(ids == tokenizer.media_id)
  if len(media_positions) != num_given:
    raise CorruptRecord("image_token_mismatch", f"{len(media_positions)} <image> tokens for "
                        f"{num_given} images")
  stats = {"images_over_limit": 0, "images_truncated": 0}
  if num_given > spec.max_images:
    stats["images_over_limit"] = num_given - spec.max_images
    ids = ids[:media_positions[spec.max_images]]
  if len(ids) > spec.seq_len + 1:
    ids = ids[:spec.seq_len + 1]
  num_images = int(np.sum(ids[:-1] == tokenizer.media_id))  # an image needs text after it
  if num_images < np.sum(ids == tokenizer.media_id):
    ids = ids[:-1]
  stats["images_truncated"] = min(num_given, spec.max_images) - num_images
  if num_images == 0:
    raise CorruptRecord("no_image_left", "no <image> token survives truncation to "
                        f"seq_len={spec.seq_len}")

  padded = right_pad(ids, spec.seq_len + 1, tokenizer.pad_id)
  tokens, targets = padded[:-1], padded[1:]
  out_images = np.zeros((spec.max_images, 1, *expected), np.uint8)
  out_images[:num_images, 0] = images[:num_images]
  return {
      "tokens": tokens,
      "targets": targets,
      "loss_mask": loss_mask(targets, media_id=tokenizer.media_id,
                             endofchunk_id=tokenizer.endofchunk_id, pad_id=tokenizer.pad_id),
      "images": out_images,
      "num_images": np.int32(num_images),
  }, stats


def _text_sequence(text: str, tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  ids = np.asarray(tokenizer.encode(text, bos=True, eos=True)[:seq_len + 1], np.int32)
  padded = right_pad(ids, seq_len + 1, tokenizer.pad_id)
  targets = padded[1:]
  return {"tokens": padded[:-1], "targets": targets,
          "loss_mask": (targets != tokenizer.pad_id).astype(np.float32)}


def _pair(text: str, image: np.ndarray, tokenizer: Tokenizer,
          seq_len: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  caption = text.replace(MEDIA_TOKEN, "").replace(ENDOFCHUNK_TOKEN, "").strip()
  if not caption:
    raise CorruptRecord("empty_text", "the pair has no text besides media markup")
  ids = tokenizer.encode(caption, bos=True)
  stats = {"text_truncated": int(len(ids) + 1 > seq_len)}
  ids = ids[:seq_len - 1] + [tokenizer.eos_id]
  return {"tokens": right_pad(ids, seq_len, tokenizer.pad_id), "image": image}, stats
