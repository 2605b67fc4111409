"""Sentencepiece tokenizer with Flamingo's media tokens, and the script that trains one.

The embedded default tokenizer is trained on the shapes-world corpus and shipped with
the package (`EMBEDDED`); to reproduce it bit for bit:

  python -m mmjax.data.tokenizer --output=mmjax/data/assets/shapes_world

Special tokens, by id: 0 `<pad>`, 1 `</s>` (EOS), 2 `<s>` (BOS), 3 `<unk>`, then the
user-defined symbols 4 `<image>` and 5 `<|endofchunk|>`. Byte fallback keeps any text
encodable without `<unk>`.
"""

import io
import json
import pathlib
import re
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
  """A Hugging Face tokenizer directory (`save_pretrained`'s output) with Flamingo's media
  tokens added the way OpenFlamingo adds them: `<|endofchunk|>` then `<image>` as special
  tokens, then `<PAD>` if the tokenizer has no pad token. Added ids follow the original
  vocabulary, so the LM's embedding needs `vocab_size` rows. Same interface as `Tokenizer`.

  The directory holds `tokenizer.json`, or, as older LLaMA-family ones do, only a
  sentencepiece `tokenizer.model` (read as transformers reads it: `_LlamaSentencePiece`).
  Special tokens are named in `tokenizer_config.json`, or in `special_tokens_map.json`
  where the former has no `added_tokens_decoder`.
  """

  def __init__(self, path: str | pathlib.Path):
    path = pathlib.Path(path)
    settings = _read_json(path / "tokenizer_config.json")
    if "added_tokens_decoder" not in settings:  # older directories: transformers reads both
      settings |= _read_json(path / "special_tokens_map.json")
    if (path / "tokenizer.json").is_file():
      self._tok = _TokenizerJson(path / "tokenizer.json")
    elif (path / "tokenizer.model").is_file():
      settings = {**_LLAMA_SPECIAL_TOKENS, **settings}
      self._tok = _LlamaSentencePiece(path / "tokenizer.model", settings)
    else:
      raise FileNotFoundError(f"Neither tokenizer.json nor tokenizer.model in {path}: expected "
                              "a Hugging Face tokenizer directory (save_pretrained's output).")
    token = lambda name: _content(settings.get(name))
    self._tok.add_special_tokens([ENDOFCHUNK_TOKEN, MEDIA_TOKEN])
    pad = token("pad_token")
    if pad is None or self._tok.token_to_id(pad) is None:
      pad = "<PAD>"
      self._tok.add_special_tokens([pad])
    self.bos_id, self.eos_id = (self._tok.token_to_id(t) if t else None
                                for t in (token("bos_token"), token("eos_token")))
    self.pad_id = self._tok.token_to_id(pad)
    self.media_id = self._tok.token_to_id(MEDIA_TOKEN)
    self.endofchunk_id = self._tok.token_to_id(ENDOFCHUNK_TOKEN)

  @property
  def vocab_size(self) -> int:
    return self._tok.vocab_size

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    for flag, name in ((bos, "bos"), (eos, "eos")):
      if flag and getattr(self, f"{name}_id") is None:
        raise ValueError(f"This tokenizer has no {name} token (tokenizer_config.json).")
    return [self.bos_id] * bos + self._tok.encode(text) + [self.eos_id] * eos

  def word_id(self, word: str) -> int:
    """The id of `word` as one piece following a space, as it is inside a sentence."""
    before, ids = self.encode("a"), self.encode(f"a {word}")
    if len(ids) != len(before) + 1 or ids[:-1] != before:
      raise ValueError(f"{word!r} is not a single piece of this tokenizer after a space.")
    return ids[-1]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Drops padding; special tokens other than pad are spelled out."""
    return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id])


# transformers' `LlamaTokenizer` defaults, where a directory names no special tokens.
_LLAMA_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {}


def _content(token) -> str | None:
  """A special token's text, whether written as a string or as an AddedToken's fields."""
  return token.get("content") if isinstance(token, dict) else token


class _TokenizerJson:
  """`tokenizer.json` through the `tokenizers` library, which splits out its own special
  tokens."""

  def __init__(self, path: pathlib.Path):
    from tokenizers import Tokenizer as FastTokenizer
    self._tok = FastTokenizer.from_file(str(path))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def add_special_tokens(self, tokens: list[str]) -> None:
    from tokenizers import AddedToken
    self._tok.add_special_tokens([AddedToken(t, special=True) for t in tokens])

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)


class _LlamaSentencePiece:
  """A LLaMA-family sentencepiece BPE `tokenizer.model` giving transformers' ids.

  transformers (5.x) reads such a file into its own BPE: the model's control, unknown
  and user-defined pieces and the directory's special tokens are split out of the text
  first, as single ids (tokens not in the vocabulary get the ids after it); the text
  between them gets no normalisation, its spaces become "▁", and it gets one more "▁"
  in front unless it starts with one: with `add_prefix_space` (default true)
  only at the very start of the input, or, with `legacy` true, before every run of text.
  Decoding removes one leading space when `add_prefix_space`. Here sentencepiece itself
  encodes the text between special tokens, with its own normalisation and prefix off.
  """

  def __init__(self, path: pathlib.Path, settings: dict):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    proto = model_pb2.ModelProto.FromString(path.read_bytes())
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
      raise ValueError(f"{path} is not a BPE sentencepiece model: only LLaMA-family "
                       "tokenizers are read without a tokenizer.json.")
    spec = proto.normalizer_spec
    spec.name, spec.precompiled_charsmap = "identity", b""
    spec.add_dummy_prefix = spec.remove_extra_whitespaces = False
    self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    piece = model_pb2.ModelProto.SentencePiece
    self._special = {p.piece: i for i, p in enumerate(proto.pieces)
                     if p.type in (piece.CONTROL, piece.UNKNOWN, piece.USER_DEFINED)}
    self._special |= {_content(t): int(i)
                      for i, t in settings.get("added_tokens_decoder", {}).items()}
    self.vocab_size = max([len(proto.pieces)] + [i + 1 for i in self._special.values()])
    named = [v for k, v in settings.items() if k.endswith("_token")]
    for key in ("additional_special_tokens", "extra_special_tokens"):
      named += settings[key] if isinstance(settings.get(key), list) else []
    self.add_special_tokens([t for t in map(_content, named) if isinstance(t, str)])
    prefix = settings.get("add_prefix_space") is not False  # None means true
    self._strip_space = prefix
    self._prepend = "never" if not prefix else "always" if settings.get("legacy") else "first"

  def token_to_id(self, token: str) -> int | None:
    if token in self._special:
      return self._special[token]
    i = self._sp.PieceToId(token)
    return i if self._sp.IdToPiece(i) == token else None

  def add_special_tokens(self, tokens: list[str]) -> None:
    for token in tokens:
      i = self.token_to_id(token)
      if i is None:
        i, self.vocab_size = self.vocab_size, self.vocab_size + 1
      self._special[token] = i
    # Longest first: at each position the longest special token matches, as in transformers.
    alternatives = sorted(self._special, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
    self._special_by_id = {i: t for t, i in self._special.items()}

  def encode(self, text: str) -> list[int]:
    ids = []
    for i, part in enumerate(self._split.split(text)):  # odd parts: the special tokens
      if i % 2:
        ids.append(self._special[part])
      elif part:
        prepend = self._prepend == "always" or (self._prepend == "first" and i == 0)
        if prepend and not part.startswith((" ", "\u2581")):
          part = " " + part
        ids += self._sp.EncodeAsIds(part)
    return ids

  def decode(self, ids: list[int]) -> str:
    parts, run = [], []
    for i in ids:
      if i in self._special_by_id:
        parts += [self._sp.DecodeIds(run), self._special_by_id[i]]
        run = []
      else:
        run.append(i)
    text = "".join(parts) + self._sp.DecodeIds(run)
    return text[1:] if self._strip_space and text.startswith(" ") else text


# Word-level tokenizers of the embedded worlds whose texts come from templates (findings,
# mammography): BERT's special tokens, ids 0 to 4.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def word_level_tokenizer(words: Sequence[str], punctuation: Sequence[str] = ()):
  """A BERT-style WordPiece tokenizer (lower-cased, split at spaces and punctuation) whose
  vocabulary is `SPECIAL_TOKENS`, `punctuation` and `words`, in that order: a text made of
  those words is whole words, never `[UNK]`."""
  from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
  from tokenizers import Tokenizer as HFTokenizerModel
  vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *punctuation, *words))}
  tokenizer = HFTokenizerModel(models.WordPiece(vocab, unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece()
  tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
  return tokenizer


def write_word_level_tokenizer(directory: str | pathlib.Path, tokenizer, *,
                               model_max_length: int) -> pathlib.Path:
  """Writes a `word_level_tokenizer`'s `tokenizer.json` and `tokenizer_config.json` ([CLS]
  as BOS, [SEP] as EOS, [PAD] id 0) into `directory`: what `HFTokenizer` reads."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(directory / "tokenizer.json"), pretty=True)
  names = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
  config = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True,
            "model_max_length": model_max_length, "bos_token": "[CLS]", "eos_token": "[SEP]",
            **dict(zip(names, SPECIAL_TOKENS, strict=True)),
            "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False,
                                              "rstrip": False, "normalized": False,
                                              "single_word": False}
                                     for i, t in enumerate(SPECIAL_TOKENS)}}
  (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return directory


def tokenizer_command(write, default_directory: pathlib.Path) -> None:
  """`python -m mmjax.data.<world> [--output=DIR]`: runs `write(directory)` (a world's
  `write_tokenizer`) into `--output` (default: the shipped one) and says what it wrote."""
  flags.DEFINE_string("output", str(default_directory), "Directory for the tokenizer files.")

  def main(argv):
    del argv
    from tokenizers import Tokenizer as HFTokenizerModel
    directory = pathlib.Path(write(flags.FLAGS.output))
    size = HFTokenizerModel.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    print(f"wrote {directory} ({size} tokens)")

  app.run(main)


def make_tokenizer(config) -> Tokenizer | HFTokenizer:
  """The tokenizer of a run: `HFTokenizer(config.tokenizer)`, or the embedded `Tokenizer`
  where `config.tokenizer` is unset or empty.

  Raises:
    ValueError: the tokenizer has no BOS or EOS token (every sequence needs both), or the
      config disagrees with it: `media_token_id`, `endofchunk_token_id` or `vocab_size`
      anywhere in `config.model` (a vocabulary larger than the tokenizer's is fine: its
      extra rows go unused, as in padded embeddings), or `config.tokens.pad/eos/bos`.
      The message names each field and the value to set.
  """
  path = config.get("tokenizer")
  tokenizer = HFTokenizer(path) if path else Tokenizer()
  name = f"tokenizer {path}" if path else "embedded tokenizer"
  if tokenizer.bos_id is None or tokenizer.eos_id is None:
    raise ValueError(f"The {name} has no BOS or EOS token (bos_token and eos_token in its "
                     "tokenizer_config.json); sequences start with BOS and end with EOS.")
  fixes = _disagreements(config, tokenizer)
  if fixes:
    raise ValueError(
        f"The config does not match the {name}: "
        + ", ".join(f"{k}={have} (the tokenizer's: {want})" for k, (have, want) in fixes.items())
        + ". Set " + " ".join(f"--config.{k}={want}" for k, (_, want) in fixes.items()) + ".")
  return tokenizer


def _disagreements(config, tokenizer: Tokenizer | HFTokenizer) -> dict[str, tuple[int, int]]:
  """`{config field: (its value, the tokenizer's)}` for each token id in `config` that
  `tokenizer` contradicts."""
  expected = {"media_token_id": tokenizer.media_id, "endofchunk_token_id": tokenizer.endofchunk_id}
  fixes = {}

  def visit(node: dict, prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, dict):
        visit(value, f"{prefix}{key}.")
      elif key in expected and value != expected[key]:
        fixes[prefix + key] = (value, expected[key])
      elif key == "vocab_size" and value < tokenizer.vocab_size:
        fixes[prefix + key] = (value, tokenizer.vocab_size)

  model = config.get("model") or {}
  visit(model.to_dict() if hasattr(model, "to_dict") else model, "model.")
  for key, value in (config.get("tokens") or {}).items():  # pad, eos, bos
    if value != getattr(tokenizer, f"{key}_id", value):
      fixes[f"tokens.{key}"] = (value, getattr(tokenizer, f"{key}_id"))
  return fixes


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
