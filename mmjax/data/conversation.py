"""Conversations about images -> training sequences and prompts (LLaVA's instruction data).

A conversation is LLaVA's JSON record, `{"id", "image", "conversations": [{"from":
"human" | "gpt", "value": str}, ...]}` (roles "user"/"assistant" are read as the same);
the first human turn holds `<image>` once per image. A template renders it as a list of
segments, each a text or special-token ids, trained (the assistant's answers and their
end-of-turn token) or not (everything else):

  plain      stage 1 (feature alignment): `<image>` then the caption; the question is
             dropped (LLaVA's `preprocess_plain`). LLaVA ends the caption with "\\n";
             mmjax with EOS, so that generation stops where a caption ends.
  vicuna_v1  `{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ...` (LLaVA-1.5).
  llama_2    `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ...`.
  chat_template  the Jinja template a Hugging Face tokenizer ships, rendered as
             transformers' `apply_chat_template` renders it; the trained spans are what
             each assistant message adds to the text rendered before it with the
             generation prompt, so a new LLM's format needs no code.

Labels are built by tokenising each segment on its own and concatenating the ids, never
by re-deriving lengths from a re-tokenised whole (LLaVA's "tokenization mismatch", which
silently zeroes a sample's loss): what is trained is exactly what the segments say. The
same segments, cut before the assistant's answer, are the prompt at inference, so train
and test tokenise alike. Each `<image>` becomes `image_tokens` image-token ids (the text on
either side tokenised separately, as LLaVA's `tokenizer_image_token` does); sequences are
truncated after that expansion, as in LLaVA. A sample left without a trained token is
skipped and counted by reason with its id (`no_trained_token`, `answer_truncated_away`);
one whose last answer was cut is kept and counted (`answer_truncated`).

LLaVA-1.6's anyres images (`mmjax.data.anyres`) take a number of image tokens that depends
on each image's size: `Format.image_tokens` is then an `anyres.AnyresTokens`, documents
carry `image_sizes "n 2"` (original width, height) with `images "n v s s 3"` (each
image's views), and the built example adds `image_sizes "m 2"` (0 0 where none).
"""

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmjax.data import anyres
from mmjax.data.sequences import CorruptRecord, right_pad
from mmjax.data.shapes_world import MEDIA_TOKEN

TEMPLATES = ("plain", "vicuna_v1", "llama_2", "chat_template")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to "
                  "understand the visual content that the user provides, and assist the user "
                  "with a variety of tasks using natural language.")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
BOS, EOS = "<bos>", "<eos>"  # segments naming the tokenizer's special tokens


@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of the rendered conversation: `text` (tokenised on its own; `BOS`/`EOS` name
  the special tokens) and whether its tokens are trained."""

  text: str
  trained: bool = False


def turns_of(conversations: Sequence[dict[str, Any]], where: str = "") -> list[tuple[str, str]]:
  """LLaVA's `conversations` -> `[(role, text)]`, roles "system", "user", "assistant"."""
  turns = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      raise CorruptRecord("bad_conversation", f"{where}turn {i} is {turn!r}; expected "
                          "{'from': 'human' | 'gpt', 'value': str}")
    role = ROLES.get(turn.get("from"))
    if role is None:
      raise CorruptRecord("bad_conversation", f"{where}turn {i} is from {turn.get('from')!r};"
                          f" expected one of {sorted(ROLES)}")
    turns.append((role, turn["value"]))
  return turns


def image_first(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
  """LLaVA's `preprocess_multimodal`: in a turn with `<image>`, the images move to its
  front, each followed by a newline."""
  out = []
  for role, text in turns:
    n = text.count(MEDIA_TOKEN)
    if n:
      text = (MEDIA_TOKEN + "\n") * n + text.replace(MEDIA_TOKEN, "").strip()
    out.append((role, text))
  return out


def segments(template: str, turns: Sequence[tuple[str, str]], *, system: str | None = None,
             chat_template: str | None = None, special: dict[str, str] | None = None,
             generation: bool = False) -> list[Segment]:
  """The conversation `turns` rendered by `template` as segments.

  Args:
    template: one of `TEMPLATES`.
    turns: `[(role, text)]`, alternating user and assistant, user first; a leading
      "system" turn replaces the template's system prompt.
    system: the system prompt (None: the template's; "" for none).
    chat_template, special: "chat_template" only: the Jinja source and the special
      tokens' text it may use (`bos_token`, `eos_token`).
    generation: `turns` end with a user turn, and the segments end with the prompt of
      the assistant's answer (inference).
  """
  turns = list(turns)
  if turns and turns[0][0] == "system":
    system = turns.pop(0)[1]
  roles = [r for r, _ in turns]
  expected = ["user", "assistant"] * (len(turns) // 2 + 1)
  if not turns or roles != expected[:len(turns)] or (len(turns) % 2 == 1) != generation:
    raise CorruptRecord("bad_conversation", f"roles {roles}: expected user and assistant "
                        "turns alternating, user first, " + (
                            "ending with the user" if generation else "ending with an answer"))
  pairs = [(turns[i][1], turns[i + 1][1] if i + 1 < len(turns) else None)
           for i in range(0, len(turns), 2)]
  if template == "chat_template":
    return _chat_template_segments(chat_template, turns, system, special or {}, generation)
  out = [Segment(BOS)]
  for k, (question, answer) in enumerate(pairs):
    if template == "plain":
      if len(pairs) != 1:
        raise CorruptRecord("bad_conversation", f"the plain template takes one question and "
                            f"its caption, got {len(pairs)} rounds")
      out.append(Segment(MEDIA_TOKEN * question.count(MEDIA_TOKEN)))
    elif template == "vicuna_v1":
      start = (VICUNA_SYSTEM if system is None else system) if k == 0 else ""
      out.append(Segment(f"{start + ' ' if start else ''}USER: {question} ASSISTANT:"))
    elif template == "llama_2":
      if k:
        out.append(Segment(BOS))
      sys_text = LLAMA_2_SYSTEM if system is None else system
      head = f"<<SYS>>\n{sys_text}\n<</SYS>>\n\n" if k == 0 and sys_text else ""
      out.append(Segment(f"[INST] {head}{question} [/INST]"))
    else:
      raise ValueError(f"Unknown conversation template {template!r}; expected one of "
                       f"{TEMPLATES}.")
    if answer is not None:
      out += [Segment(answer, trained=True), Segment(EOS, trained=True)]
  return out


@functools.lru_cache(maxsize=8)
def _jinja(source: str):
  import jinja2.sandbox  # noqa: PLC0415  (only conversations with a chat template need it)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = raise_exception
  return env.from_string(source)


def render_chat_template(source: str, messages: list[dict[str, str]], special: dict[str, str],
                         add_generation_prompt: bool) -> str:
  """`source` rendered as transformers' `apply_chat_template(tokenize=False)` renders it."""
  return _jinja(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **special)


def _chat_template_segments(source: str | None, turns, system, special, generation
                            ) -> list[Segment]:
  if not source:
    raise ValueError("The chat_template conversation template needs a tokenizer with a "
                     "chat template (its tokenizer_config.json `chat_template`, or "
                     "chat_template.jinja); set config.tokenizer to such a directory or "
                     "choose another config.data.template.")
  messages = [{"role": "system", "content": system}] if system else []
  out: list[Segment] = []
  done = ""

  def extend(text: str, trained: bool):
    nonlocal done
    if not text.startswith(done):
      raise ValueError("This chat template renders a conversation's beginning differently "
                       "once more turns follow, so its answers' spans are ambiguous; "
                       "choose config.data.template vicuna_v1 or llama_2.")
    out.append(Segment(text[len(done):], trained))
    done = text

  for role, text in turns:
    if role == "assistant":  # the generation prompt: not trained
      extend(render_chat_template(source, messages, special, True), False)
    messages.append({"role": role, "content": text})
    extend(render_chat_template(source, messages, special, False), role == "assistant")
  if generation:
    extend(render_chat_template(source, messages, special, True), False)
  return [s for s in out if s.text]


def encode_segment(segment: Segment, tokenizer, image_tokens) -> list[int]:
  """One segment's ids: `BOS`/`EOS` as the special ids; text split at each `<image>`,
  each piece tokenised on its own and `image_tokens` image-token ids between them (an
  int, or an iterator giving each image's count in turn)."""
  if segment.text == BOS:
    return [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  if segment.text == EOS:
    return [tokenizer.eos_id]
  ids: list[int] = []
  for i, piece in enumerate(segment.text.split(MEDIA_TOKEN)):
    if i:
      ids += [tokenizer.media_id] * (image_tokens if isinstance(image_tokens, int)
                                     else next(image_tokens))
    if piece:
      ids += tokenizer.encode(piece)
  return ids


def encode(parts: Sequence[Segment], tokenizer, image_tokens: int | Sequence[int]
           ) -> tuple[np.ndarray, np.ndarray]:
  """`(ids "n", trained "n" bool)` of the segments, concatenated; `image_tokens` per
  `<image>`, or each image's in order."""
  ids, trained = [], []
  if not isinstance(image_tokens, int):
    image_tokens = iter(image_tokens)
  for segment in parts:
    piece = encode_segment(segment, tokenizer, image_tokens)
    ids += piece
    trained += [segment.trained] * len(piece)
  return np.asarray(ids, np.int32), np.asarray(trained, bool)


@dataclasses.dataclass(frozen=True)
class Format:
  """How conversations become token ids: the template, its system prompt (None: the
  template's own), the image tokens per `<image>` (or, under anyres, an
  `anyres.AnyresTokens` counting each image's from its size), and the chat template's
  source."""

  template: str = "vicuna_v1"
  system: str | None = None
  image_tokens: int | anyres.AnyresTokens = 0
  chat_template: str | None = None

  def __post_init__(self):
    if self.template not in TEMPLATES:
      raise ValueError(f"Unknown conversation template {self.template!r}; expected one of "
                       f"{TEMPLATES}.")

  def segments(self, turns, tokenizer=None, generation: bool = False) -> list[Segment]:
    special = {}
    if tokenizer is not None and self.template == "chat_template":
      special = {f"{name}_token": tokenizer.decode([i]) for name, i in
                 (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id)) if i is not None}
    return segments(self.template, image_first(turns), system=self.system,
                    chat_template=self.chat_template, special=special, generation=generation)

  def counts(self, image_sizes=None) -> int | list[int]:
    """The image tokens of each `<image>`: `image_tokens`, or under anyres each image's of
    `image_sizes "n 2"` (original width, height)."""
    if isinstance(self.image_tokens, int):
      return self.image_tokens
    if image_sizes is None:
      raise ValueError("Anyres conversations need each image's original size "
                       "(image_sizes) to count its image tokens.")
    return [self.image_tokens(tuple(int(v) for v in size)) for size in image_sizes]

  def prompt(self, turns: Sequence[tuple[str, str]], tokenizer, image_sizes=None
             ) -> list[int]:
    """The ids a model continues to answer the last user turn of `turns` (`image_sizes`:
    under anyres, the original sizes of its images, in order)."""
    ids, _ = encode(self.segments(turns, tokenizer, generation=True), tokenizer,
                    self.counts(image_sizes))
    return ids.tolist()


def chat_template_of(path: str | pathlib.Path) -> str | None:
  """A Hugging Face tokenizer directory's chat template (`chat_template.jinja`, or
  `tokenizer_config.json`'s `chat_template`), None if it has none."""
  path = pathlib.Path(path)
  if (path / "chat_template.jinja").is_file():
    return (path / "chat_template.jinja").read_text()
  config = path / "tokenizer_config.json"
  if config.is_file():
    template = json.loads(config.read_text()).get("chat_template")
    return template if isinstance(template, str) else None
  return None


def format_of(config) -> Format:
  """A run's conversation format: `config.data`'s `template`, `system` and
  `image_tokens`, and the chat template of `config.tokenizer` (a Hugging Face directory)."""
  d = config.data
  tokenizer = config.get("tokenizer")
  image_tokens = d.get("image_tokens", 0)
  if d.get("grid_pinpoints"):  # anyres: `image_tokens` are the base view's, s * s
    image_tokens = anyres.AnyresTokens(d.grid_pinpoints, d.image_size,
                                       math.isqrt(image_tokens))
  return Format(d.get("template", "vicuna_v1"), d.get("system"), image_tokens,
                chat_template_of(tokenizer) if tokenizer else None)


def build_conversation(document: dict[str, Any], tokenizer, fmt: Format, seq_len: int,
                       max_images: int, image_shape: tuple[int, int, int]
                       ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """One conversation record -> fixed-shape arrays and per-record stats.

  Returns:
    ({"tokens": int32 "t", "targets": int32 "t", "loss_mask": float32 "t", "images":
      uint8 "m h w c", "num_images": int32}, stats), `t = seq_len`, `m = max_images`
    (zero images where the record has fewer; a text-only record has none). Under anyres
    (`fmt.image_tokens` an `AnyresTokens`): images `"m v h w c"` and `image_sizes`
    int32 `"m 2"` from the document's.
  Raises:
    CorruptRecord: a malformed conversation, images that do not match its `<image>`s, or
      no trained token (before or after truncation); the message names the record's id.
  """
  where = f"conversation {document.get('id', '?')!r}: "
  conversations = document.get("conversations")
  if not isinstance(conversations, list) or not conversations:
    raise CorruptRecord("bad_conversation", f"{where}no `conversations` list")
  turns = turns_of(conversations, where)
  images = document.get("images")
  tiled = not isinstance(fmt.image_tokens, int)
  if tiled:
    image_shape = (fmt.image_tokens.views, *image_shape)
  images = np.zeros((0, *image_shape), np.uint8) if images is None else np.asarray(images)
  if images.shape[1:] != image_shape or images.dtype != np.uint8:
    raise CorruptRecord("bad_image", f"{where}images must be uint8 'n "
                        f"{' '.join(map(str, image_shape))}', got {images.dtype} {images.shape}")
  sizes = np.asarray(document.get("image_sizes", np.zeros((0, 2))), np.int32).reshape(-1, 2)
  if tiled and len(sizes) != len(images):
    raise CorruptRecord("bad_image", f"{where}{len(sizes)} image_sizes for {len(images)} "
                        "anyres images; the source must give each image's original size")
  placeholders = sum(text.count(MEDIA_TOKEN) for _, text in turns)
  if placeholders != len(images):
    raise CorruptRecord("image_token_mismatch", f"{where}{placeholders} <image> placeholders "
                        f"for {len(images)} images")
  if len(images) > max_images:
    raise CorruptRecord("too_many_images", f"{where}{len(images)} images, more than "
                        f"data.max_images={max_images}")
  try:
    parts = fmt.segments(turns, tokenizer)
  except CorruptRecord as error:
    raise CorruptRecord(error.reason, where + str(error).split(": ", 1)[1]) from None
  ids, trained = encode(parts, tokenizer, fmt.counts(sizes))
  if not trained.any():
    raise CorruptRecord("no_trained_token", f"{where}no answer token to train on")
  stats = {}
  if len(ids) > seq_len + 1:
    last_trained = int(np.flatnonzero(trained)[-1])
    ids, trained = ids[:seq_len + 1], trained[:seq_len + 1]
    if not trained[1:].any():
      raise CorruptRecord("answer_truncated_away", f"{where}no answer left after truncation "
                          f"to seq_len={seq_len} (raise data.seq_len)")
    if last_trained > seq_len:
      stats["answer_truncated"] = 1
  padded = right_pad(ids, seq_len + 1, tokenizer.pad_id)
  mask = np.zeros(seq_len + 1, np.float32)
  mask[:len(trained)] = trained
  out_images = np.zeros((max_images, *image_shape), np.uint8)
  out_images[:len(images)] = images
  example = {"tokens": padded[:-1], "targets": padded[1:], "loss_mask": mask[1:],
             "images": out_images, "num_images": np.int32(len(images))}
  if tiled:
    example["image_sizes"] = np.zeros((max_images, 2), np.int32)
    example["image_sizes"][:len(sizes)] = sizes
  return example, stats
