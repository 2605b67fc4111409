"""A trained model in one call, and its outputs in one more.

  import mmjax
  vlm = mmjax.load("/tmp/flamingo")  # a run's workdir, or `python -m mmjax.convert`'s output
  vlm.caption("photo.png")                                  # -> "a small red circle on the left."
  vlm.answer(image, "what colour is the circle?")           # -> "red"
  vlm.generate("<image>a red circle.<|endofchunk|><image>", [image_1, image_2])

  llava = mmjax.load("/tmp/llava")                          # a LLaVA run or converted model
  llava.chat(image, "what colour is the circle?")           # -> "red"
  chat = llava.conversation(image)                          # a chat that remembers its turns
  chat.ask("what colour is the circle?"); chat.ask("and the square?")
  for piece in chat.ask("describe the image.", stream=True):  # text as tokens arrive
    print(piece, end="", flush=True)

`load` reads the directory's `config.json` (the config a run was trained with, or a
converted checkpoint's `{"task", "model"}`) and its latest complete checkpoint, builds the
model the recipe's task builds and the tokenizer the run used (or, for a converted
checkpoint, the Hugging Face tokenizer directory passed as `tokenizer=`), and returns:

  FlamingoModel  (task "flamingo")  caption, answer, and generate from interleaved prompts
  TextModel      (task "lm")        generate from text prompts
  LlavaModel     (task "llava")     chat about an image: `chat`, `conversation`, `generate`

Images are PIL images, uint8 numpy arrays (`"h w 3"`, `"h w"` grey or `"h w 4"` RGBA) or
image file paths, prepared exactly as the training data were (`mmjax.data.sources`: RGB,
the shorter side resized to the model's image size and the centre square kept; the model
normalises pixels itself; a LLaVA run trained on images padded to squares,
`image_aspect_ratio="pad"`, pads them alike). Captioning and question prompts, zero- or
few-shot, are written as the evaluation writes them (`mmjax.evaluate.chunk_text`,
`few_shot_text`) and answers read as it reads them (`answer_text`), so these calls return
what `mmjax.evaluate` scores.

A list of prompts (or images) is one batch. Each distinct batch shape (prompts, longest
prompt in tokens, images per prompt, `max_new_tokens`) compiles once, in seconds on a CPU
for the embedded models, and is reused by later calls of that shape. The model
runs on the default device, unsharded: for models that do not fit one device, use the
lower-level `mmjax.models.flamingo.generate` under a mesh.

LLaVA conversations are rendered by the run's `mmjax.data.conversation.Format` (its
`config.data` template, system prompt and image tokens), so a prompt is token for token
what training built before each answer, and images are padded to squares where its
training data were (`image_aspect_ratio="pad"`). A converted checkpoint (no `config.data`)
gets LLaVA-1.5's: vicuna_v1 with its system prompt, images padded with CLIP's mean colour.
A `Conversation` holds one image and the `(role, text)` turns so far (`turns`; the first
question gets "<image>\\n" in front): each `ask` renders them with the new question,
generates until EOS and adds the answer; `reset` starts over, with the same or another
image. `stream=True` returns an iterator of text pieces instead, produced as the tokens
are: the prompt is run once into the KV cache, then a compiled one-token step is called
per token, and each piece is what the answer's decoded text gained (whole characters, and
words spaced as the tokenizer spells them); the pieces join to the answer `stream=False`
gives, and the answer joins the turns once the iterator is exhausted (or closed: then the
part produced). A run trained with `config.peft` LoRA loads with the LoRA updates folded
into its kernels.
"""

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from PIL import Image

from mmjax import checkpoints, decoding, evaluate, peft
from mmjax.cli import UserError
from mmjax.data import conversation as conversation_lib
from mmjax.data import sources
from mmjax.data.sequences import CorruptRecord, right_pad
from mmjax.data.shapes_world import MEDIA_TOKEN
from mmjax.data.sources import decode_image, resize_center_crop
from mmjax.data.tokenizer import HFTokenizer, Tokenizer, make_tokenizer
from mmjax.decoding import SamplingConfig
from mmjax.models import flamingo as flamingo_model
from mmjax.models import llava as llava_model
from mmjax.models import lm as lm_model
from mmjax.tasks import get_task

ImageLike = Image.Image | np.ndarray | str | os.PathLike
SERVED = {"flamingo": "captioning, question answering and generation from interleaved "
                      "text and images (FlamingoModel)",
          "lm": "text generation (TextModel)",
          "llava": "chat about an image (LlavaModel)"}
_DESCRIPTIONS = {"clip": "a CLIP dual encoder (image and text embeddings)",
                 "bert": "a BERT text encoder"}


# ---------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------
def load(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
         step: int | None = None) -> Union["FlamingoModel", "TextModel", "LlavaModel"]:
  """The model in `path` (a run's workdir or a converted checkpoint), ready to use.

  Args:
    path: a directory holding `config.json` and `checkpoints/<step>`.
    tokenizer: a Hugging Face tokenizer directory. Needed for converted checkpoints
      (their config names none: pass the directory of the model they were converted
      from); for a run, it replaces the tokenizer its config names. Either way it is
      checked against the model's token ids and vocabulary size.
    step: the checkpoint to load (default: the latest complete one).
  Raises:
    UserError: no config or checkpoint at `path`, a task this API does not serve, a
      tokenizer that does not fit the model, or parameters that do not fit its config.
  """
  path = pathlib.Path(path).expanduser()
  config = read_config(path)
  task = config.get("task")
  if task not in SERVED:
    what = _DESCRIPTIONS.get(task, f"a model of task {task!r}")
    raise UserError(
        f"{path} holds {what}; mmjax.load serves "
        + "; ".join(f"task '{k}': {v}" for k, v in SERVED.items())
        + ". For other tasks, build the model with mmjax.tasks.get_task(config.task)"
        ".build_model(config) and read its parameters with mmjax.checkpoints.load_params.")
  if tokenizer is not None:
    config.tokenizer = os.fspath(tokenizer)
  elif "tokenizer" not in config:
    raise UserError(
        f"{path / 'config.json'} names no tokenizer (a converted checkpoint keeps only the "
        "model): pass the Hugging Face tokenizer directory of the model it was converted "
        f"from, e.g. mmjax.load({str(path)!r}, tokenizer='/models/<that model>').")
  try:
    tok = make_tokenizer(config)
  except (ValueError, FileNotFoundError) as error:
    raise UserError(f"Tokenizer for {path}: {error}") from error
  try:
    model = build_model(config)
  except (TypeError, ValueError) as error:  # config_from_dict's unknown or missing fields
    raise UserError(f"{path / 'config.json'}: its model config does not build a {task} "
                    f"model: {error}") from error
  params = checkpoints.load_params(path, step)  # verified; UserError if there is none
  _check_params(params, model, path)
  model, params = _merged(model, params)
  if task == "llava":
    return LlavaModel(model, jax.device_put(params), tok, config, path,
                      _llava_format(config, model, tok, path), _llava_pad_colour(config, path))
  cls = FlamingoModel if task == "flamingo" else TextModel
  return cls(model, jax.device_put(params), tok, config, path)


def build_model(config) -> nn.Module:
  """The model a run of `config` trained: its task's, wrapped by `mmjax.peft` as
  `config.peft` says (the parameters then hold the LoRA or adapter leaves too)."""
  model = get_task(config.task).build_model(config)
  lora, adapters = peft.configs(config)
  return model if lora is None and adapters is None else peft.wrap(model, lora=lora,
                                                                    adapters=adapters)


def _merged(model: nn.Module, params: dict) -> tuple[nn.Module, dict]:
  """A LoRA-wrapped model as its base model with the LoRA updates folded into the kernels
  (the same function, at the base model's cost); other models as they are."""
  if not hasattr(model, "peft_base") or model.peft_adapters is not None:
    return model, params  # adapters add layers: they cannot be folded away
  return peft.unwrap(model), peft.merge(params, model.peft_lora)


def read_config(path: pathlib.Path) -> ml_collections.ConfigDict:
  """`path/config.json` as a ConfigDict; a `UserError` where there is none to read."""
  file = path / "config.json"
  if not path.is_dir():
    raise UserError(f"No directory {path}: expected a run's workdir or a converted "
                    "checkpoint (a directory with config.json and checkpoints/).")
  if not file.is_file():
    raise UserError(f"No config.json in {path}: expected a run's workdir (python -m "
                    "mmjax.train --workdir=...) or a converted checkpoint (python -m "
                    "mmjax.convert --output=...).")
  try:
    values = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{file} is not valid JSON ({error}).") from error
  if not isinstance(values, dict) or "model" not in values:
    raise UserError(f"{file} has no model config ('model'): not written by mmjax.train or "
                    "mmjax.convert.")
  return ml_collections.ConfigDict(values)


def _check_params(params: dict, model: nn.Module, path: pathlib.Path) -> None:
  """Raises, naming them, where the checkpoint's parameters are not the ones `model`'s
  `init` creates (names and shapes): a checkpoint written for another config."""
  if isinstance(model, flamingo_model.Flamingo):
    size = model.config.vision.image_size
    args = (jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 1, 1, size, size, 3), jnp.uint8))
  elif isinstance(model, llava_model.Llava):
    size = model.config.vision.image_size
    args = (jnp.zeros((1, 1, size, size, 3), jnp.uint8), jnp.zeros((1, 2), jnp.int32))
  else:
    args = (jnp.zeros((1, 2), jnp.int32),)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *args)["params"]))
  problems = checkpoints.param_mismatches(abstract, params)
  if problems:
    shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8
                                       else "")
    raise UserError(f"The checkpoint in {path} does not fit the model its config.json "
                    f"describes: {shown}. Was config.json replaced or edited?")


# ---------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------
def prepare_image(image: ImageLike, size: int,
                  pad_colour: Sequence[int] | None = None) -> np.ndarray:
  """uint8 `"size size 3"` of a PIL image, a uint8 array (`"h w 3"`, `"h w"`, `"h w 4"`)
  or an image file's path, prepared as training data are (`mmjax.data.sources`); with
  `pad_colour`, first padded to a square of that colour (LLaVA-1.5's `expand2square`)."""
  if isinstance(image, (str, os.PathLike)):
    file = pathlib.Path(image).expanduser()
    if not file.is_file():
      raise UserError(f"No image file {file}.")
    try:
      return decode_image(file.read_bytes(), size, pad_colour)
    except CorruptRecord as error:
      raise UserError(f"{file}: {error}") from error
  if isinstance(image, Image.Image):
    if pad_colour is not None:
      image = sources.expand_to_square(sources.to_rgb(image), pad_colour)
    return resize_center_crop(image, size)
  if isinstance(image, (np.ndarray, jax.Array)):
    array = np.asarray(image)
    if array.dtype != np.uint8:
      hint = (" Floats in [0, 1]: pass (x * 255).round().astype(np.uint8)."
              if np.issubdtype(array.dtype, np.floating) else "")
      raise UserError(f"Image arrays must be uint8 pixels (0-255), got {array.dtype}.{hint}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
      raise UserError(f"An image array must be 'h w 3' (RGB), 'h w 4' (RGBA) or 'h w' (grey),"
                      f" got shape {array.shape}.")
    return prepare_image(Image.fromarray(array), size, pad_colour)
  raise UserError(f"An image must be a PIL image, a uint8 numpy array or a file path, got "
                  f"{type(image).__name__}.")


def _image_list(images, what: str) -> list:
  """The images of one prompt as a list: a sequence, or an `"n h w c"` array."""
  if isinstance(images, (np.ndarray, jax.Array)) and np.ndim(images) == 4:
    return list(np.asarray(images))
  if isinstance(images, (list, tuple)):
    return list(images)
  raise UserError(f"{what} must be a list of images (or an 'n h w 3' array), got "
                  f"{type(images).__name__}.")


def _is_batch(images) -> bool:
  """A list of images, or an `"n h w c"` array, rather than one image."""
  return isinstance(images, (list, tuple)) or (
      isinstance(images, (np.ndarray, jax.Array)) and np.ndim(images) == 4)


# ---------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, repr=False)
class _Loaded:
  """A model, its parameters (on the default device), its tokenizer and config."""

  model: nn.Module
  params: Any
  tokenizer: Tokenizer | HFTokenizer
  config: ml_collections.ConfigDict
  path: pathlib.Path

  def __repr__(self) -> str:
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))
    return f"{type(self).__name__}({str(self.path)!r}, {count:,} parameters)"

  def _encode(self, texts: list[str], max_new_tokens: int, max_len: int | None
              ) -> tuple[jax.Array, jax.Array]:
    _check_new_tokens(max_new_tokens)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise UserError(f"Prompt {i} is a {type(text).__name__}; prompts are strings.")
    tokens, lengths = evaluate.encode_prompts(self.tokenizer, texts)
    if max_len is not None and tokens.shape[1] + max_new_tokens > max_len:
      raise UserError(
          f"The longest prompt has {tokens.shape[1]} tokens; with max_new_tokens="
          f"{max_new_tokens} that exceeds the {max_len} positions the model learned. "
          "Shorten the prompt or ask for fewer new tokens.")
    return jnp.asarray(tokens), jnp.asarray(lengths)

  def _rows(self, out) -> list[tuple[np.ndarray, int]]:
    """`(tokens, length)` of each generated row, the token that stopped it left out (a
    Hugging Face tokenizer would spell EOS out)."""
    stops = set(self._stop_ids)
    rows = []
    for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths), strict=True):
      n = int(n)
      rows.append((row, n - 1 if n and int(row[n - 1]) in stops else n))
    return rows

  def _texts(self, out) -> list[str]:
    """Each row's continuation decoded, without the token that stopped it."""
    return [self.tokenizer.decode(row[:n]) for row, n in self._rows(out)]

  @property
  def _stop_ids(self) -> tuple[int, ...]:
    return (self.tokenizer.endofchunk_id, self.tokenizer.eos_id)


def _check_new_tokens(max_new_tokens) -> None:
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")


def _sampling(temperature: float, top_k: int | None, top_p: float | None) -> SamplingConfig:
  try:
    return SamplingConfig(float(temperature), top_k, top_p)
  except ValueError as error:
    raise UserError(str(error)) from error


def _text(value, what: str) -> str:
  if not isinstance(value, str):
    raise UserError(f"A {what} must be a string, got {type(value).__name__}.")
  return value


def _pairs(examples, size: int, form: str) -> list[tuple]:
  """`examples` as a list of `size`-tuples, or a `UserError` naming the expected `form`."""
  if not isinstance(examples, (list, tuple)) or not all(
      isinstance(e, (list, tuple)) and len(e) == size for e in examples):
    raise UserError(f"examples must be a list of {form} tuples, got {examples!r:.100}.")
  return [tuple(e) for e in examples]


def _one_or_many(prompts) -> tuple[list, bool]:
  """`([prompt], True)` for one prompt, `(prompts, False)` for a list of them."""
  if isinstance(prompts, str):
    return [prompts], True
  if not isinstance(prompts, (list, tuple)) or not prompts:
    raise UserError(f"prompts must be a string or a non-empty list of strings, got "
                    f"{prompts!r:.80}.")
  return list(prompts), False


class FlamingoModel(_Loaded):
  """A Flamingo with its tokenizer: `caption`, `answer` and `generate`.

  Fields: `model` (`mmjax.models.flamingo.Flamingo`), `params` (its parameters, device
  arrays), `tokenizer`, `config` (the run's, a ConfigDict), `path`.
  """

  model: flamingo_model.Flamingo

  @property
  def image_size(self) -> int:
    return self.model.config.vision.image_size

  def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
    """uint8 `"n s s 3"` (s = `image_size`): the images as the model sees them."""
    images = _image_list(images, "images") if _is_batch(images) else [images]
    if not images:
      raise UserError("No images given: pass an image or a non-empty list of them.")
    return np.stack([prepare_image(x, self.image_size) for x in images])

  def generate(self, prompts: str | Sequence[str],
               images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None, *,
               max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0) -> str | list[str]:
    """Continues interleaved prompts until `<|endofchunk|>`, EOS or `max_new_tokens`.

    Args:
      prompts: one prompt, or a list of prompts decoded together as one batch. Each holds
        one `<image>` where each of its images goes, in order, and, as in training,
        `<|endofchunk|>` after the text that belongs to an image: e.g. few-shot
        "<image>a red circle.<|endofchunk|><image>".
      images: for one prompt, its images (a list, or an `"n h w 3"` array); for a list of
        prompts, a list with each prompt's images. None: the prompts have no images.
      max_new_tokens: the most tokens each continuation gets.
      temperature, top_k, top_p: sampling (`mmjax.decoding.SamplingConfig`); the default
        temperature 0 is greedy.
      seed: of the sampling.
    Returns:
      Each prompt's continuation as text, without the token that stopped it: a string for
      one prompt, a list for a list.
    """
    texts, single = _one_or_many(prompts)
    if images is None:
      images = [[] for _ in texts]
    elif single:
      images = [images]
    elif not isinstance(images, (list, tuple)) or len(images) != len(texts):
      raise UserError(f"{len(texts)} prompts need a list of {len(texts)} image lists (one "
                      f"per prompt), got {type(images).__name__}"
                      + (f" of {len(images)}" if isinstance(images, (list, tuple)) else "")
                      + ".")
    per_prompt = []
    for i, (text, row) in enumerate(zip(texts, images, strict=True)):
      row = _image_list(row, "The images of a prompt" if single else f"The images of prompt {i}")
      if not isinstance(text, str):
        raise UserError(f"Prompt {i} is a {type(text).__name__}; prompts are strings.")
      markers = text.count(MEDIA_TOKEN)
      if markers != len(row):
        raise UserError(f"Prompt {i} has {markers} {MEDIA_TOKEN} marker(s) but "
                        f"{len(row)} image(s); put one {MEDIA_TOKEN} where each image goes.")
      per_prompt.append([prepare_image(x, self.image_size) for x in row])
    out = self._generate(texts, per_prompt, max_new_tokens, _sampling(temperature, top_k, top_p),
                         seed)
    results = self._texts(out)
    return results[0] if single else results

  def caption(self, images: ImageLike | Sequence[ImageLike], *,
              examples: Sequence[tuple[ImageLike, str]] = (),
              max_new_tokens: int = 32) -> str | list[str]:
    """The greedy caption of an image (a string), or of each image of a list (a list).

    Prompted as the recipe trains and `mmjax.evaluate` scores captioning: `examples`,
    `(image, caption)` pairs shown before each query, make it few-shot; without them the
    model has only the image to say which kind of text it should continue with.
    """
    solved = [(image, evaluate.chunk_text("captioning", answer=_text(caption, "caption")))
              for image, caption in _pairs(examples, 2, "(image, caption)")]
    queries = [evaluate.chunk_text("captioning")] * self._count(images)
    return self._ask(images, queries, solved, "captioning", max_new_tokens)

  def answer(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str], *,
             examples: Sequence[tuple[ImageLike, str, str]] = (),
             max_new_tokens: int = 16) -> str | list[str]:
    """The greedy answer to a question about an image (a string), or to each question
    about the image at the same place of a list (a list).

    Asked as training documents ask ("question: <q> answer:"), so phrase questions as the
    training data do (the shapes world's are lower case: "what colour is the circle?").
    `examples`, `(image, question, answer)` triples shown before each query, make it
    few-shot.
    """
    single = isinstance(questions, str)
    if single == _is_batch(images):
      raise UserError("answer() takes one image and one question, or a list of images and "
                      "a list of questions of the same length.")
    questions = [questions] if single else list(questions)
    if len(questions) != self._count(images):
      raise UserError(f"{self._count(images)} images but {len(questions)} questions: pass "
                      "one question per image.")
    solved = [(image, evaluate.chunk_text("vqa", _text(q, "question"), _text(a, "answer")))
              for image, q, a in _pairs(examples, 3, "(image, question, answer)")]
    queries = [evaluate.chunk_text("vqa", _text(q, "question")) for q in questions]
    return self._ask(images, queries, solved, "vqa", max_new_tokens)

  def _count(self, images) -> int:
    return len(_image_list(images, "images")) if _is_batch(images) else 1

  def _ask(self, images, queries: list[str], solved: list[tuple[ImageLike, str]], task: str,
           max_new_tokens: int) -> str | list[str]:
    """Greedy answers, parsed as `mmjax.evaluate` parses them, to `queries` (the text after
    each image of `images`), each after the `solved` examples (image, text)."""
    batch = self.preprocess(images)
    support = [prepare_image(image, self.image_size) for image, _ in solved]
    texts = [evaluate.few_shot_text([text for _, text in solved], q) for q in queries]
    out = self._generate(texts, [support + [x] for x in batch], max_new_tokens,
                         SamplingConfig(), 0)
    answers = [evaluate.answer_text(self.tokenizer, row, n, task) for row, n in self._rows(out)]
    return answers if _is_batch(images) else answers[0]

  def _generate(self, texts: list[str], images: list[list[np.ndarray]], max_new_tokens: int,
                sampling: SamplingConfig, seed: int):
    """`decoding.Generated` for prompts and their prepared images (`"s s 3"` each)."""
    lm = self.model.config.lm
    tokens, lengths = self._encode(texts, max_new_tokens,
                                   lm.max_len if lm.position == "learned" else None)
    s = self.image_size
    slots = max(1, max(len(row) for row in images))  # a text-only batch still needs one
    batch = np.zeros((len(texts), slots, 1, s, s, 3), np.uint8)  # b T F h w c
    for i, row in enumerate(images):
      if row:
        batch[i, :len(row), 0] = np.stack(row)
    num_images = jnp.asarray([len(row) for row in images], jnp.int32)
    return flamingo_model.generate(
        self.model, self.params, tokens, lengths, jax.random.key(seed),
        images=jnp.asarray(batch), num_images=num_images, max_new_tokens=max_new_tokens,
        stop_ids=self._stop_ids, pad_id=self.tokenizer.pad_id, sampling=sampling)


class TextModel(_Loaded):
  """A language model with its tokenizer: `generate`. Fields as `FlamingoModel`'s."""

  model: lm_model.LanguageModel

  def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 32,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int = 0) -> str | list[str]:
    """Continues text prompts until `<|endofchunk|>`, EOS or `max_new_tokens`; arguments
    and result as `FlamingoModel.generate`'s, without images."""
    texts, single = _one_or_many(prompts)
    cfg = self.model.config
    tokens, lengths = self._encode(texts, max_new_tokens,
                                   cfg.max_len if cfg.position == "learned" else None)
    out = lm_model.generate(self.model, self.params, tokens, lengths, jax.random.key(seed),
                            max_new_tokens=max_new_tokens, stop_ids=self._stop_ids,
                            pad_id=self.tokenizer.pad_id,
                            sampling=_sampling(temperature, top_k, top_p))
    results = self._texts(out)
    return results[0] if single else results


# ---------------------------------------------------------------------------------------
# LLaVA.
# ---------------------------------------------------------------------------------------
Turns = Sequence[tuple[str, str]]
DEFAULT_ANSWER_TOKENS = 256


def _llava_format(config, model: llava_model.Llava, tok, path: pathlib.Path
                  ) -> conversation_lib.Format:
  """The run's conversation format (LLaVA-1.5's vicuna_v1 for a converted checkpoint),
  checked against the model's image tokens and the tokenizer's image token."""
  image_tokens = model.config.image_tokens
  if "data" in config:
    try:
      fmt = conversation_lib.format_of(config)
    except ValueError as error:
      raise UserError(f"{path / 'config.json'}: config.data: {error}") from error
  else:
    fmt = conversation_lib.Format("vicuna_v1", None, image_tokens)
  if fmt.image_tokens != image_tokens:
    raise UserError(f"{path / 'config.json'}: config.data.image_tokens={fmt.image_tokens}, "
                    f"but the model gives each image {image_tokens} features; set it to "
                    f"{image_tokens}.")
  if tok.media_id != model.config.image_token_id:
    raise UserError(f"The tokenizer's {MEDIA_TOKEN} is id {tok.media_id}, the model's image "
                    f"token id {model.config.image_token_id} ({path / 'config.json'}, "
                    "model.image_token_id): pass the tokenizer the model was trained or "
                    "converted with.")
  return fmt


def _llava_pad_colour(config, path: pathlib.Path) -> tuple[int, ...] | None:
  """The colour a run's images were padded to squares with (None: centre-cropped), read
  from its training mixture's most weighted source (`image_aspect_ratio`, `pad_colour`);
  LLaVA-1.5's for a converted checkpoint: padded with CLIP's mean colour."""
  if "data" not in config:
    return sources.CLIP_PAD_COLOUR
  entries = sorted((config.data.get("datasets") or {}).items())
  if not entries:
    return None
  _, entry = max(entries, key=lambda item: item[1].get("weight", 1.0))
  source = entry.get("source") or {}
  try:
    return sources._pad_colour_for(source.get("image_aspect_ratio", "crop"),
                                   source.get("pad_colour", sources.CLIP_PAD_COLOUR))
  except ValueError as error:
    raise UserError(f"{path / 'config.json'}: config.data.datasets: {error}") from error


def _cache_size(needed: int, lm) -> int:
  """KV cache positions for `needed`, rounded up to a multiple of 128 (within learned
  positions) so that the one-token step compiles once for many prompt lengths; slots past
  a row's position are never attended."""
  size = -(-needed // 128) * 128
  return max(needed, min(size, lm.max_len)) if lm.position == "learned" else size


@functools.partial(jax.jit, static_argnames=("model", "size"))
def _prefill(model: llava_model.Llava, params, images: jax.Array, prompt: jax.Array,
             length: jax.Array, *, size: int) -> tuple[jax.Array, Any]:
  """`(logits "b v" after each prompt's last token, the KV cache of `size` positions)` of
  prompts `"b t"` (right-padded to `length "b"`) about `images "b m h w c"`, as
  `mmjax.models.llava.generate` prefills."""
  b, t = prompt.shape
  features = model.apply({"params": params}, images,
                         method=llava_model.Llava.image_features)
  run, cache_for = llava_model.decode_fns(model, params, size)
  logits, cache = run(cache_for(b), prompt, jnp.broadcast_to(jnp.arange(t), (b, t)),
                      features)
  last = jnp.take_along_axis(logits, (length - 1)[:, None, None], axis=1)[:, 0]
  return last, cache


@functools.partial(jax.jit, static_argnames=("model", "sampling", "stop_ids", "pad_id"),
                   donate_argnames=("cache",))
def _step(model: llava_model.Llava, params, cache, logits: jax.Array, position: jax.Array,
          done: jax.Array, rng: jax.Array, *, sampling: SamplingConfig,
          stop_ids: tuple[int, ...], pad_id: int):
  """One iteration of `mmjax.decoding.generate`'s loop: the next token `"b"` from `logits
  "b v"` (the same key split, so the same tokens), then the model on it at `position
  "b"`. Returns `(token, logits, cache, done, rng)`."""
  rng, key = jax.random.split(rng)
  token = jnp.where(done, pad_id, decoding.sample_logits(logits, key, sampling))
  done = done | jnp.isin(token, jnp.asarray(stop_ids, jnp.int32))
  run, _ = llava_model.decode_fns(model, params, 0)  # the cache has its size already
  logits, cache = run(cache, token[:, None], position[:, None])
  return token, logits[:, 0], cache, done, rng


def _pieces(decode, tokens: Iterator[int]) -> Iterator[str]:
  """What the decoded text of `tokens` so far gains with each token: held back while it
  ends in an incomplete character (U+FFFD) or rewrites what was already given, so the
  pieces join to `decode(all tokens)` whenever that extends what was given."""
  ids, sent = [], ""
  for token in tokens:
    ids.append(token)
    text = decode(ids)
    if not text.endswith("\ufffd") and text.startswith(sent) and len(text) > len(sent):
      yield text[len(sent):]
      sent = text
  text = decode(ids)
  if text.startswith(sent) and len(text) > len(sent):
    yield text[len(sent):]


@dataclasses.dataclass(frozen=True, repr=False)
class LlavaModel(_Loaded):
  """A LLaVA with its tokenizer and conversation format: `chat`, `conversation` and
  `generate`. Fields as `FlamingoModel`'s, `format` (`mmjax.data.conversation.Format`),
  which renders every prompt, and `pad_colour`, that of the squares images are padded to
  (None: centre-cropped), both as the run's training data had them.
  """

  model: llava_model.Llava
  format: conversation_lib.Format
  pad_colour: tuple[int, ...] | None = None

  def preprocess(self, image: ImageLike) -> np.ndarray:
    """uint8 `"s s 3"` (s = `image_size`): the image as the model sees it (padded to a
    square of `pad_colour` first, where training padded)."""
    return prepare_image(image, self.image_size, self.pad_colour)

  @property
  def image_size(self) -> int:
    return self.model.config.vision.image_size

  @property
  def _stop_ids(self) -> tuple[int, ...]:
    return (self.tokenizer.eos_id,)

  def conversation(self, image: ImageLike) -> "Conversation":
    """A new chat about `image`; `ask` it questions."""
    return Conversation(self, image)

  def chat(self, image: ImageLike, text: str, *, stream: bool = False,
           **options) -> str | Iterator[str]:
    """The answer to one question about an image (a new conversation); options as
    `Conversation.ask`'s. For follow-up questions, use `conversation`."""
    return self.conversation(image).ask(text, stream=stream, **options)

  def prompt(self, turns: Turns) -> list[int]:
    """The token ids the model continues to answer the last user turn of `turns`
    (`[(role, text)]`, the first user turn holding `<image>`), as training renders them."""
    turns = _turns(turns)
    markers = sum(text.count(MEDIA_TOKEN) for _, text in turns)
    if markers != 1:
      raise UserError(f"A conversation holds one {MEDIA_TOKEN} (in its first question, where "
                      f"the image goes), got {markers}.")
    try:
      return self.format.prompt(turns, self.tokenizer)
    except (CorruptRecord, ValueError) as error:
      raise UserError(f"Cannot render the conversation: {error}") from error

  def generate(self, images: ImageLike | Sequence[ImageLike], prompts, *,
               max_new_tokens: int | None = None, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               stream: bool = False) -> str | list[str] | Iterator[str]:
    """Answers about images, decoded together as one batch.

    Args:
      images: one image, or a list with one image per prompt.
      prompts: a question (the image goes before it, as LLaVA places it), a conversation
        (`[(role, text)]` turns ending with the user's, "<image>" in the first), or a list
        of those, one per image.
      max_new_tokens: the most tokens an answer gets (default: 256, fewer where the
        model's learned positions end sooner).
      temperature, top_k, top_p, seed: sampling, as `FlamingoModel.generate`'s.
      stream: one prompt only: an iterator of the answer's text pieces, as produced.
    Returns:
      Each answer as text, without EOS: a string for one prompt, a list for a list.
    """
    single = isinstance(prompts, str) or _is_turns(prompts)
    if single:
      prompts, images = [prompts], [images]
    elif not isinstance(prompts, (list, tuple)) or not prompts:
      raise UserError(f"prompts must be a question, a conversation ([(role, text)]) or a "
                      f"non-empty list of them, got {prompts!r:.80}.")
    elif not _is_batch(images) or len(_image_list(images, "images")) != len(prompts):
      raise UserError(f"{len(prompts)} prompts need a list of {len(prompts)} images (one per "
                      "prompt).")
    ids = [self.prompt(_conversation_of(p)) for p in prompts]
    pixels = np.stack([self.preprocess(x)
                       for x in (images if single else _image_list(images, "images"))])
    sampling = _sampling(temperature, top_k, top_p)
    max_new_tokens = self._budget(ids, max_new_tokens)
    if stream:
      if not single:
        raise UserError("stream=True streams one answer: pass one prompt.")
      return self._stream(pixels, ids[0], max_new_tokens, sampling, seed)
    length = max(map(len, ids))
    tokens = np.stack([right_pad(np.asarray(i, np.int32), length, self.tokenizer.pad_id)
                       for i in ids])
    out = llava_model.generate(
        self.model, self.params, jnp.asarray(pixels[:, None]), jnp.asarray(tokens),
        jnp.asarray([len(i) for i in ids], jnp.int32), jax.random.key(seed),
        max_new_tokens=max_new_tokens, stop_ids=self._stop_ids, pad_id=self.tokenizer.pad_id,
        sampling=sampling)
    results = self._texts(out)
    return results[0] if single else results

  def _budget(self, ids: list[list[int]], max_new_tokens: int | None) -> int:
    """`max_new_tokens`, checked against the learned positions left after the longest
    prompt (and, when None, the default 256 cut to them)."""
    lm = self.model.config.lm
    left = lm.max_len - max(map(len, ids)) if lm.position == "learned" else None
    if max_new_tokens is None:
      max_new_tokens = DEFAULT_ANSWER_TOKENS if left is None else min(DEFAULT_ANSWER_TOKENS,
                                                                       left)
      if max_new_tokens < 1:
        raise UserError(f"The prompt has {max(map(len, ids))} tokens, all the {lm.max_len} "
                        "positions the model learned: start a new conversation.")
    _check_new_tokens(max_new_tokens)
    if left is not None and max_new_tokens > left:
      raise UserError(f"The longest prompt has {max(map(len, ids))} tokens; with "
                      f"max_new_tokens={max_new_tokens} that exceeds the {lm.max_len} "
                      "positions the model learned. Ask for fewer new tokens or start a new "
                      "conversation.")
    return max_new_tokens

  def _tokens(self, pixels: np.ndarray, ids: list[int], max_new_tokens: int,
              sampling: SamplingConfig, seed: int) -> Iterator[int]:
    """The answer's tokens one by one, EOS left out: the prompt prefilled into the KV
    cache, then `_step` per token, as `mmjax.models.llava.generate` decodes."""
    logits, cache = _prefill(self.model, self.params, jnp.asarray(pixels[:, None]),
                             jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32),
                             size=_cache_size(len(ids) + max_new_tokens, self.model.config.lm))
    position, done = jnp.asarray([len(ids)], jnp.int32), jnp.zeros((1,), bool)
    rng = jax.random.key(seed)
    for _ in range(max_new_tokens):
      token, logits, cache, done, rng = _step(
          self.model, self.params, cache, logits, position, done, rng, sampling=sampling,
          stop_ids=self._stop_ids, pad_id=self.tokenizer.pad_id)
      token = int(token[0])
      if token in self._stop_ids:
        return
      yield token
      position = position + 1

  def _stream(self, pixels, ids, max_new_tokens, sampling, seed) -> Iterator[str]:
    return _pieces(self.tokenizer.decode,
                   self._tokens(pixels, ids, max_new_tokens, sampling, seed))


def _is_turns(value) -> bool:
  """`[(role, text), ...]`: one conversation (rather than a list of prompts)."""
  return (isinstance(value, (list, tuple)) and bool(value)
          and all(isinstance(t, (list, tuple)) and len(t) == 2 and isinstance(t[0], str)
                  for t in value))


def _turns(value) -> list[tuple[str, str]]:
  if not _is_turns(value) or not all(isinstance(t[1], str) for t in value):
    raise UserError(f"A conversation is a list of (role, text) turns, got {value!r:.100}.")
  return [tuple(t) for t in value]


def _conversation_of(prompt) -> list[tuple[str, str]]:
  """A prompt as turns: a question becomes the first user turn, after the image."""
  if isinstance(prompt, str):
    return [("user", prompt if MEDIA_TOKEN in prompt else f"{MEDIA_TOKEN}\n{prompt}")]
  return _turns(prompt)


class Conversation:
  """A chat about one image with a `LlavaModel`: `ask` questions, each answered with the
  earlier turns before it, rendered by the model's `format`.

  Attributes:
    model: the LlavaModel.
    image: the image, as the model sees it (uint8 `"s s 3"`).
    turns: `[(role, text)]` so far; the first question holds "<image>" in front.
  """

  def __init__(self, model: LlavaModel, image: ImageLike):
    self.model = model
    self.turns: list[tuple[str, str]] = []
    self.image = model.preprocess(image)

  def __repr__(self) -> str:
    return f"Conversation({len(self.turns) // 2} answered, {self.model!r})"

  def reset(self, image: ImageLike | None = None) -> None:
    """Starts over: no turns, the same image or `image`."""
    if image is not None:
      self.image = self.model.preprocess(image)
    self.turns = []

  def prompt(self, text: str) -> list[int]:
    """The token ids the model would continue to answer `text` next."""
    return self.model.prompt(self._with(text))

  def ask(self, text: str, *, stream: bool = False, max_new_tokens: int | None = None,
          temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
          seed: int = 0) -> str | Iterator[str]:
    """The answer to `text` (a string; with `stream`, an iterator of its pieces), which
    joins the turns after the question. Options as `LlavaModel.generate`'s."""
    turns = self._with(text)
    result = self.model.generate(self.image, turns, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                 stream=stream)
    if not stream:
      self.turns = turns + [("assistant", result)]
      return result
    return self._recorded(turns, result)

  def _recorded(self, turns, pieces: Iterator[str]) -> Iterator[str]:
    answer = []
    try:
      for piece in pieces:
        answer.append(piece)
        yield piece
    finally:
      self.turns = turns + [("assistant", "".join(answer))]

  def _with(self, text: str) -> list[tuple[str, str]]:
    text = _text(text, "question")
    if MEDIA_TOKEN in text:
      raise UserError(f"A question holds no {MEDIA_TOKEN}: the conversation's image goes "
                      "before its first question by itself.")
    return self.turns + [("user", f"{MEDIA_TOKEN}\n{text}" if not self.turns else text)]
