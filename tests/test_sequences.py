"""Interleaved sequence building: OpenFlamingo's label masking, truncation, bad records."""

import numpy as np
import pytest

from mmjax.data.sequences import CorruptRecord, SequenceSpec, build_sequence
from mmjax.data.tokenizer import Tokenizer

TOK = Tokenizer()
SPEC = SequenceSpec(seq_len=48, max_images=3, image_size=8)
IMG, EOC = "<image>", "<|endofchunk|>"


def images(n):
  return np.arange(n * 8 * 8 * 3, dtype=np.uint8).reshape(n, 8, 8, 3)


def trained_text(out):
  """The target text whose loss counts, and the text whose loss does not."""
  on = TOK.decode(out["targets"][out["loss_mask"] == 1])
  off = TOK.decode([t for t, m in zip(out["targets"], out["loss_mask"], strict=True)
                    if m == 0 and t not in (TOK.media_id,)])
  return on, off


def test_loss_covers_chunk_text_and_endofchunk_only():
  text = f"intro words {IMG}a red circle.{EOC} between {IMG}two blue squares.{EOC}"
  out, stats = build_sequence({"text": text, "images": images(2)}, TOK, SPEC)
  on, off = trained_text(out)
  assert on == f"a red circle.{EOC}two blue squares.{EOC}"
  assert "intro words" in off and "between" in off  # before the first image; the gap
  assert out["num_images"] == 2 and stats == {"images_over_limit": 0, "images_truncated": 0}
  # Inputs keep the <image> tokens (they locate the media); targets are inputs shifted.
  np.testing.assert_array_equal(out["tokens"][1:], out["targets"][:-1])
  assert np.sum(out["tokens"] == TOK.media_id) == 2 and out["tokens"][0] == TOK.bos_id
  np.testing.assert_array_equal(out["images"][:2, 0], images(2))
  np.testing.assert_array_equal(out["images"][2], 0)
  assert np.all(out["loss_mask"][out["targets"] == TOK.pad_id] == 0)


def test_truncation_drops_images_whose_token_was_cut():
  chunk = f"{IMG}" + "a small green triangle on the left. " * 3 + EOC
  out, stats = build_sequence({"text": chunk * 3, "images": images(3)}, TOK, SPEC)
  kept = int(np.sum(out["tokens"] == TOK.media_id))
  assert out["num_images"] == kept < 3 and stats["images_truncated"] == 3 - kept
  np.testing.assert_array_equal(out["images"][kept:], 0)
  assert out["loss_mask"].sum() > 0 and out["tokens"].shape == (48,)


def test_images_over_the_limit_are_cut_and_counted():
  text = "".join(f"{IMG}shape {i}.{EOC}" for i in range(5))
  out, stats = build_sequence({"text": text, "images": images(5)}, TOK, SPEC)
  assert out["num_images"] == 3 and stats["images_over_limit"] == 2
  on, _ = trained_text(out)
  assert on == "".join(f"shape {i}.{EOC}" for i in range(3))


@pytest.mark.parametrize("record,reason", [
    ({"text": "  ", "images": images(1)}, "empty_text"),
    ({"text": None, "images": images(1)}, "empty_text"),
    ({"text": f"{IMG}a.{EOC}{IMG}b.{EOC}", "images": images(1)}, "image_token_mismatch"),
    ({"text": f"{IMG}a.{EOC}", "images": images(1).astype(np.float32)}, "bad_image"),
    ({"text": f"{IMG}a.{EOC}", "images": np.zeros((1, 9, 9, 3), np.uint8)}, "bad_image"),
    ({"text": "word " * 60 + f"{IMG}a.{EOC}", "images": images(1)}, "no_image_left"),
])
def test_corrupt_records_name_their_reason(record, reason):
  with pytest.raises(CorruptRecord) as error:
    build_sequence(record, TOK, SPEC)
  assert error.value.reason == reason


def test_text_only_sequences_train_every_real_token():
  text = f"{IMG}a red circle.{EOC}{IMG}two blue squares.{EOC}"
  out, stats = build_sequence({"text": text, "images": images(2)}, TOK,
                              SequenceSpec(seq_len=40, mode="text"))
  assert set(out) == {"tokens", "targets", "loss_mask"} and not stats
  on = TOK.decode(out["targets"][out["loss_mask"] == 1])
  assert on == text + TOK.decode([TOK.eos_id])
  assert np.all(out["loss_mask"][out["targets"] == TOK.pad_id] == 0)


def test_pairs_keep_one_image_and_the_caption_ending_in_eos():
  record = {"text": f"{IMG}a red circle on the left.{EOC}", "images": images(1)}
  out, stats = build_sequence(record, TOK, SequenceSpec(seq_len=6, image_size=8, mode="pair"))
  assert out["tokens"].shape == (6,) and out["tokens"][0] == TOK.bos_id
  assert out["tokens"][-1] == TOK.eos_id  # truncated, but still pooled at an EOS
  assert TOK.decode(out["tokens"][1:-1]) == "a red circle on"
  assert stats == {"text_truncated": 1}  # counted, never silent
  _, stats = build_sequence(record, TOK, SequenceSpec(seq_len=16, image_size=8, mode="pair"))
  assert stats == {"text_truncated": 0}
  np.testing.assert_array_equal(out["image"], images(1)[0])
  with pytest.raises(CorruptRecord, match="exactly one image"):
    build_sequence({"text": "x", "images": images(2)}, TOK,
                   SequenceSpec(seq_len=6, image_size=8, mode="pair"))
