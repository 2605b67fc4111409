"""The shipped tokenizer: reproducible from its script, with single-id media tokens; the
tokenizer a run's config names, checked against the config's token ids."""

import json
import re

import pytest

from mmjax.configs import flamingo as recipe
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


def test_a_run_uses_the_tokenizer_its_config_names_and_says_which_ids_to_change(tmp_path):
  config = recipe.get_config()
  assert isinstance(tok.make_tokenizer(config), tok.Tokenizer)
  # The embedded model as a LLaMA-style directory without a pad token: `<PAD>` is added
  # after the vocabulary, so the pad id and the vocabulary size change.
  (tmp_path / "tokenizer.model").write_bytes(tok.EMBEDDED.read_bytes())
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  config.tokenizer = str(tmp_path)
  config.model.media_token_id = tok.ENDOFCHUNK_ID
  with pytest.raises(ValueError, match="does not match the tokenizer") as error:
    tok.make_tokenizer(config)
  fixes = dict(re.findall(r"--config\.(\S+)=(\d+)", str(error.value)))
  assert fixes == {"model.media_token_id": str(tok.MEDIA_ID),
                   "model.lm.vocab_size": str(tok.VOCAB_SIZE + 1),
                   "tokens.pad": str(tok.VOCAB_SIZE)}
  for key, value in fixes.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = int(value)
  tokenizer = tok.make_tokenizer(config)
  assert (tokenizer.pad_id, tokenizer.media_id) == (tok.VOCAB_SIZE, tok.MEDIA_ID)
