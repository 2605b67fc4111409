"""The shipped tokenizer: reproducible from its script, with single-id media tokens."""

import pytest

from configs import flamingo as recipe
from mmjax.data import shapes_world as sw
from mmjax.data import tokenizer as tok


def test_shipped_model_is_what_the_script_trains():
  assert tok.train(tok.shapes_world_corpus(), tok.VOCAB_SIZE) == tok.EMBEDDED.read_bytes()


def test_special_ids_agree_with_the_recipe_and_round_trip():
  t = tok.Tokenizer()
  assert (t.pad_id, t.eos_id, t.bos_id, t.media_id, t.endofchunk_id) == (
      recipe.PAD, recipe.EOS, recipe.BOS, recipe.MEDIA, recipe.ENDOFCHUNK)
  assert t.vocab_size == recipe.get_config().model.lm["vocab_size"]
  text = sw.ShapesWorld().document("eval", 0)["text"]
  ids = t.encode(text, bos=True, eos=True)
  assert ids[0] == t.bos_id and ids[-1] == t.eos_id
  assert ids.count(t.media_id) == text.count(sw.MEDIA_TOKEN)
  assert t.decode(ids[1:-1]) == text
  assert t.decode(t.encode("Zebra, 42 ünïcode!")) == "Zebra, 42 ünïcode!"  # byte fallback


def test_a_model_without_media_tokens_is_rejected(tmp_path):
  import io

  import sentencepiece as spm
  buffer = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 50),
                                 model_writer=buffer, vocab_size=12, minloglevel=2)
  path = tmp_path / "plain.model"
  path.write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match="lacks the media tokens"):
    tok.Tokenizer(path)
  with pytest.raises(FileNotFoundError, match="train one with"):
    tok.Tokenizer(tmp_path / "missing.model")


def test_names_and_colours_are_single_pieces_that_captions_never_use():
  """In-context naming is scored on one token per name; names must carry no other meaning."""
  t = tok.Tokenizer()
  for word in (*sw.NAMES, *sw.COLOURS):
    assert t.encode(f"a {word}")[1:] == [t.word_id(word)], word
  with pytest.raises(ValueError, match="not a single piece"):
    t.word_id("zebra")
  world = sw.ShapesWorld()
  words = set()
  for i in range(200):
    e = world.example("train", i)
    words.update(f"{e.caption} {e.question} {e.answer}".replace(".", " ").split())
  assert words.isdisjoint(sw.NAMES) and words & set(sw.COLOURS)
