"""A trained model in one call, and its outputs in one more.

  import mmjax
  vlm = mmjax.load("/tmp/flamingo")  # a run's workdir, or `python -m mmjax.convert`'s output
  vlm.caption("photo.png")                                  # -> "a small red circle on the left."
  vlm.answer(image, "what colour is the circle?")           # -> "red"
  vlm.generate("<image>a red circle.<|endofchunk|><image>", [image_1, image_2])

`load` reads the directory's `config.json` (the config a run was trained with, or a
converted checkpoint's `{"task", "model"}`) and its latest complete checkpoint, builds the
model the recipe's task builds and the tokenizer the run used (or, for a converted
checkpoint, the Hugging Face tokenizer directory passed as `tokenizer=`), and returns:

  FlamingoModel  (task "flamingo")  caption, answer, and generate from interleaved prompts
  TextModel      (task "lm")        generate from text prompts

Images are PIL images, uint8 numpy arrays (`"h w 3"`, `"h w"` grey or `"h w 4"` RGBA) or
image file paths, prepared exactly as the training data were (`mmjax.data.sources`: RGB,
the shorter side resized to the model's image size and the centre square kept; the model
normalises pixels itself). Captioning and question prompts, zero- or few-shot, are
written as the evaluation writes them (`mmjax.evaluate.chunk_text`, `few_shot_text`) and
answers read as it reads them (`answer_text`), so these calls return what
`mmjax.evaluate` scores.

A list of prompts (or images) is one batch. Each distinct batch shape (prompts, longest
prompt in tokens, images per prompt, `max_new_tokens`) compiles once, in seconds on a CPU
for the embedded models, and is reused by later calls of that shape. The model
runs on the default device, unsharded: for models that do not fit one device, use the
lower-level `mmjax.models.flamingo.generate` under a mesh.
"""

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from PIL import Image

from mmjax import checkpoints
from mmjax import evaluate, peft
from mmjax.cli import UserError
from mmjax.data.sequences import CorruptRecord
from mmjax.data.shapes_world import MEDIA_TOKEN
from mmjax.data.sources import decode_image, resize_center_crop
from mmjax.data.tokenizer import HFTokenizer, Tokenizer, make_tokenizer
from mmjax.decoding import SamplingConfig
from mmjax.models import flamingo as flamingo_model
from mmjax.models import lm as lm_model
from mmjax.tasks import get_task

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]
SERVED = {"flamingo": "captioning, question answering and generation from interleaved "
                      "text and images (FlamingoModel)",
          "lm": "text generation (TextModel)"}
_DESCRIPTIONS = {"clip": "a CLIP dual encoder (image and text embeddings)",
                 "bert": "a BERT text encoder"}


# ---------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------
def load(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
         step: int | None = None) -> Union["FlamingoModel", "TextModel"]:
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
    model = peft.from_config(config, get_task(task).build_model(config))
  except (TypeError, ValueError) as error:  # config_from_dict's unknown or missing fields
    raise UserError(f"{path / 'config.json'}: its model config does not build a {task} "
                    f"model: {error}") from error
  params = checkpoints.load_params(path, step)  # verified; UserError if there is none
  _check_params(params, model, path)
  cls = FlamingoModel if task == "flamingo" else TextModel
  return cls(model, jax.device_put(params), tok, config, path)


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
def prepare_image(image: ImageLike, size: int) -> np.ndarray:
  """uint8 `"size size 3"` of a PIL image, a uint8 array (`"h w 3"`, `"h w"`, `"h w 4"`)
  or an image file's path, prepared as training data are (`mmjax.data.sources`)."""
  if isinstance(image, (str, os.PathLike)):
    file = pathlib.Path(image).expanduser()
    if not file.is_file():
      raise UserError(f"No image file {file}.")
    try:
      return decode_image(file.read_bytes(), size)
    except CorruptRecord as error:
      raise UserError(f"{file}: {error}") from error
  if isinstance(image, Image.Image):
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
    return resize_center_crop(Image.fromarray(array), size)
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
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
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
