"""Sentencepiece tokenizer with Flamingo's media tokens, and the script that trains one.

The embedded default tokenizer is trained on the shapes-world corpus and shipped with
the package (`EMBEDDED`); to reproduce it bit for bit:

  python -m mmjax.data.tokenizer --output=mmjax/data/assets/shapes_world

Special tokens, by id: 0 `<pad>`, 1 `</s>` (EOS), 2 `<s>` (BOS), 3 `<unk>`, then the
user-defined symbols 4 `<image>` and 5 `<|endofchunk|>`. Byte fallback keeps any text
encodable without `<unk>`.
"""

import io
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from absl import app, flags

from mmjax.data.shapes_world import ENDOFCHUNK_TOKEN, MEDIA_TOKEN, ShapesWorld

EMBEDDED = pathlib.Path(__file__).parent / "assets" / "shapes_world.model"
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MEDIA_ID, ENDOFCHUNK_ID = range(6)
VOCAB_SIZE = 512  # of the embedded tokenizer: the corpus has few words


def train(lines: Iterable[str], vocab_size: int) -> bytes:
  """Trains a BPE sentencepiece model on `lines`; returns the serialised model."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", character_coverage=1.0, byte_fallback=True,
      normalization_rule_name="identity", pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID,
      unk_id=UNK_ID, user_defined_symbols=[MEDIA_TOKEN, ENDOFCHUNK_TOKEN],
      add_dummy_prefix=False, num_threads=1, minloglevel=2)
  return model.getvalue()


def shapes_world_corpus(num_documents: int = 4000, seed: int = 0) -> list[str]:
  return ShapesWorld(seed=seed).corpus(num_documents)


class Tokenizer:
  """Text <-> ids with `<image>`, `<|endofchunk|>`, pad, BOS and EOS as single ids."""

  def __init__(self, model: str | pathlib.Path | bytes = EMBEDDED):
    self._sp = spm.SentencePieceProcessor()
    if isinstance(model, bytes):
      self._sp.LoadFromSerializedProto(model)
    else:
      path = pathlib.Path(model)
      if not path.is_file():
        raise FileNotFoundError(f"No sentencepiece model at {path}; train one with "
                                "`python -m mmjax.data.tokenizer --output=PREFIX`.")
      self._sp.Load(str(path))
    self.pad_id, self.eos_id, self.bos_id = (self._sp.pad_id(), self._sp.eos_id(),
                                             self._sp.bos_id())
    self.media_id = self._sp.PieceToId(MEDIA_TOKEN)
    self.endofchunk_id = self._sp.PieceToId(ENDOFCHUNK_TOKEN)
    if self.media_id == self._sp.unk_id() or self.endofchunk_id == self._sp.unk_id():
      raise ValueError(f"Tokenizer {model!r} lacks the media tokens {MEDIA_TOKEN!r} and "
                       f"{ENDOFCHUNK_TOKEN!r}; add them as user_defined_symbols when "
                       "training it.")

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    ids = self._sp.EncodeAsIds(text)
    return [self.bos_id] * bos + ids + [self.eos_id] * eos

  def word_id(self, word: str) -> int:
    """The id of `word` as one piece following a space, as it is inside a sentence."""
    piece = "\u2581" + word
    i = self._sp.PieceToId(piece)
    if self._sp.IdToPiece(i) != piece:
      raise ValueError(f"{word!r} is not a single piece of this tokenizer; "
                       "retrain it (python -m mmjax.data.tokenizer) on a corpus that uses it.")
    return i

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Drops padding; special tokens other than pad are spelled out."""
    return self._sp.DecodeIds([int(i) for i in ids if int(i) != self.pad_id])

  def pieces(self) -> list[str]:
    return [self._sp.IdToPiece(i) for i in range(self.vocab_size)]


class HFTokenizer:
  """A Hugging Face tokenizer (a directory with `tokenizer.json`, as `save_pretrained`
  writes it) with Flamingo's media tokens added the way OpenFlamingo adds them:
  `<|endofchunk|>` then `<image>` as special tokens, then `<PAD>` if the tokenizer has no
  pad token. Added ids follow the original vocabulary, so the LM's embedding needs
  `vocab_size` rows. Same interface as `Tokenizer`.
  """

  def __init__(self, path: str | pathlib.Path):
    import json

    from tokenizers import AddedToken
    from tokenizers import Tokenizer as FastTokenizer
    path = pathlib.Path(path)
    if not (path / "tokenizer.json").is_file():
      raise FileNotFoundError(f"No tokenizer.json in {path}: expected a Hugging Face "
                              "tokenizer directory (save_pretrained's output).")
    self._tok = FastTokenizer.from_file(str(path / "tokenizer.json"))
    settings = path / "tokenizer_config.json"
    settings = json.loads(settings.read_text()) if settings.is_file() else {}
    token = lambda name: (settings.get(name) or {}).get("content") if isinstance(
        settings.get(name), dict) else settings.get(name)
    self._tok.add_special_tokens([AddedToken(ENDOFCHUNK_TOKEN, special=True),
                                  AddedToken(MEDIA_TOKEN, special=True)])
    pad = token("pad_token")
    if pad is None or self._tok.token_to_id(pad) is None:
      pad = "<PAD>"
      self._tok.add_special_tokens([AddedToken(pad, special=True)])
    ids = {name: self._tok.token_to_id(t) if t else None
           for name, t in (("bos", token("bos_token")), ("eos", token("eos_token")))}
    self.bos_id, self.eos_id = ids["bos"], ids["eos"]
    self.pad_id = self._tok.token_to_id(pad)
    self.media_id = self._tok.token_to_id(MEDIA_TOKEN)
    self.endofchunk_id = self._tok.token_to_id(ENDOFCHUNK_TOKEN)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    for flag, name in ((bos, "bos"), (eos, "eos")):
      if flag and getattr(self, f"{name}_id") is None:
        raise ValueError(f"This tokenizer has no {name} token (tokenizer_config.json).")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return [self.bos_id] * bos + ids + [self.eos_id] * eos

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Drops padding; special tokens other than pad are spelled out."""
    return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id],
                            skip_special_tokens=False)



def main(argv):
  del argv
  f = flags.FLAGS
  model = train(shapes_world_corpus(f.num_documents, f.seed), f.vocab_size)
  path = pathlib.Path(f.output + ".model")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(model)
  print(f"wrote {path} ({Tokenizer(path).vocab_size} pieces, {len(model)} bytes)")


if __name__ == "__main__":
  # Defined here, not at import: every entry point imports this module.
  flags.DEFINE_string("output", None, "Path prefix; writes PREFIX.model.")
  flags.DEFINE_integer("vocab_size", VOCAB_SIZE, "Number of pieces.")
  flags.DEFINE_integer("num_documents", 4000, "Shapes-world documents to train on.")
  flags.DEFINE_integer("seed", 0, "Shapes-world seed.")
  flags.mark_flag_as_required("output")
  app.run(main)
