"""Zero-shot classification with a dual encoder: a classifier built from class names and
prompt templates, as CLIP defines it.

Each class's prompts (`template.format(name)` for every template) are embedded and
L2-normalised, averaged over the templates and normalised again: one unit vector per
class. An image is scored against every class by the dot product of its normalised
embedding with those vectors (open_clip multiplies by a fixed 100 before the softmax;
the ranking, and so accuracy, is the same). One template is the single-prompt classifier,
several the prompt ensemble.

Templates are data: `TEMPLATE_SETS` names the sets in `data/assets/prompt_templates.json`
(the 80 templates CLIP released for ImageNet, its 7-template subset, and the shapes
world's), and a file of one template per line (`{}` where the class name goes) is read
as well.

A contrastive run (`task: "clip"`, trained or converted) is evaluated here
(`mmjax.evaluate.evaluate` hands it to `Evaluation`) on two tasks, without
demonstrations:

  zeroshot   top-1 and top-5 accuracy (top-5 with more than 5 classes) of the zero-shot
             classifier: the shapes world's 60 classes (`shapes_world.CLASSES`, "small
             red circle") on `episodes` held-out images (`ShapesWorld.classification`),
             or, with `data_dir`, the class folders of `data_dir/imagenet/val/` (class
             names from `data_dir/imagenet/class_names.json` where it exists, else the
             folder names).
  retrieval  recall@1/5/10 from images to texts and from texts to images
             (`metrics.retrieval_recall`): `episodes` shapes-world eval image-caption
             pairs, among their distinct captions (a caption is right for every image it
             describes: the world repeats captions), or, with `data_dir`, the "test"
             split of Karpathy's `data_dir/coco/dataset_coco.json` (5,000 images and
             their 25,000 captions; an image is a hit when any of its 5 captions is).

A MedCLIP run (`task: "medclip"`) is evaluated on the same two tasks over held-out
studies of the findings world it trained on: `zeroshot` over its five CheXpert 5x200-style
classes (`findings_world.ZERO_SHOT_CLASSES`, each test image positive for exactly one),
with MedCLIP's classifier: each class's own prompts, `config.evaluate.prompts_per_class`
phrases composed from its severity x subtype x location words (`compose_prompts`, seeded)
and an image's class score the mean or max (`prompt_scoring`) of its logits against them
(`prompt_logits`); `retrieval` of whole reports. Its BatchNorm runs on its running
statistics.

The prompts: `config.evaluate.prompt` (one template: the single-prompt classifier), else
`config.evaluate.templates` (a named set or a file: the ensemble), else the data's own
set ("shapes_world" on the shapes world, "openai_imagenet" on class folders). Texts are
tokenised with the run's tokenizer as training tokenises pair texts (`BOS text EOS`, cut
to `config.data.seq_len` keeping EOS) and padded as the text tower pools: with its
`pad_id` for "last", with EOS for "eos" and "argmax". Images are read as training reads
them (`benchmarks.load_image`) at the image tower's size. Both towers run in jitted
batches of `config.evaluate.batch_size`. `episodes` -1 takes a benchmark's whole test
split; each trial draws its own test examples (`seed + trial`).
"""

import dataclasses
import functools
import itertools
import json
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mmjax.cli import UserError
from mmjax.data import findings_world as fw
from mmjax.data import shapes_world as sw
from mmjax.data.sequences import right_pad
from mmjax.data.tokenizer import make_tokenizer
from mmjax.evaluate import benchmarks, metrics
from mmjax.evaluate import protocol as protocol_lib
from mmjax.evaluate.tasks import Item
from mmjax.tasks import get_task, model_config

TEMPLATES_FILE = pathlib.Path(__file__).parent.parent / "data" / "assets" / "prompt_templates.json"
# CLIP's zero-shot logits: a fixed scale, not the learned one.
LOGIT_SCALE = 100.0

EncodeTexts = Callable[[Sequence[str]], np.ndarray]  # texts -> "n e" embeddings


@functools.cache
def _template_sets() -> dict[str, tuple[str, ...]]:
  with open(TEMPLATES_FILE, encoding="utf-8") as f:
    return {name: tuple(templates) for name, templates in json.load(f).items()}


def template_set_names() -> tuple[str, ...]:
  return tuple(_template_sets())


def load_templates(name_or_path: str | os.PathLike) -> tuple[str, ...]:
  """A named template set (`template_set_names()`: "openai_imagenet",
  "simple_imagenet", "shapes_world") or a text file of one template per line; each
  template has one `{}` where the class name goes."""
  sets = _template_sets()
  if str(name_or_path) in sets:
    templates = sets[str(name_or_path)]
    where = f"template set {name_or_path!r}"
  else:
    path = pathlib.Path(name_or_path)
    if not path.is_file():
      raise UserError(f"Prompt templates {str(name_or_path)!r} are neither a named set "
                      f"{template_set_names()} nor a file; give one of those names or a "
                      "file of one template per line with '{}' for the class name.")
    templates = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                      if line.strip())
    where = str(path)
  return check_templates(templates, where)


def check_templates(templates: Sequence[str], where: str = "templates") -> tuple[str, ...]:
  templates = tuple(templates)
  if not templates:
    raise UserError(f"{where}: no prompt templates.")
  bad = [t for t in templates if t.count("{}") != 1]
  if bad:
    raise UserError(f"{where}: every template needs exactly one '{{}}' for the class name; "
                    f"these do not: {bad[:5]}.")
  return templates


def normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def class_embeddings(encode_texts: EncodeTexts, class_names: Sequence[str],
                     templates: Sequence[str], classes_per_batch: int = 10) -> np.ndarray:
  """`"c e"`: for each class, its prompts' normalised embeddings averaged and normalised
  again. Underscores in class names become spaces (ImageNet folder names, CoOp)."""
  templates = check_templates(templates)
  if not class_names:
    raise UserError("class_embeddings: no class names.")
  names = [name.replace("_", " ") for name in class_names]
  weights = []
  for start in range(0, len(names), classes_per_batch):
    chunk = names[start:start + classes_per_batch]
    prompts = [template.format(name) for name in chunk for template in templates]
    embedded = normalise(encode_texts(prompts)).reshape(len(chunk), len(templates), -1)
    weights.append(normalise(embedded.mean(axis=1)))
  return np.concatenate(weights)


def logits(image_embeddings: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """`image_embeddings "b e"` (normalised here), `classes "c e"` -> `"b c"` zero-shot
  logits, `LOGIT_SCALE` times the cosine similarity."""
  return LOGIT_SCALE * normalise(image_embeddings) @ np.asarray(classes, np.float32).T


def compose_prompts(words: Mapping[str, Mapping[str, Sequence[str]]], count: int, seed: int
                    ) -> dict[str, tuple[str, ...]]:
  """MedCLIP's class prompts: for each class of `words` (`{class: {"severity": [...],
  "subtype": [...], "location": [...]}}`, "" allowed as a word), `count` of the
  severity x subtype x location phrases ("small left effusion"), drawn without
  replacement with `seed` (all of them if there are fewer), in a fixed order. MedCLIP
  draws them unseeded (`random.sample`), so its evaluation changes from run to run;
  here the seed fixes them."""
  if count < 1:
    raise UserError(f"compose_prompts: count={count} must be >= 1.")
  out = {}
  for index, (name, parts) in enumerate(words.items()):
    missing = [p for p in ("severity", "subtype", "location") if not parts.get(p)]
    if missing:
      raise UserError(f"Class {name!r} has no {' or '.join(missing)} words; each class needs "
                      "lists of severity, subtype and location words ('' for none).")
    phrases = [" ".join(w for w in combo if w) for combo in itertools.product(
        parts["severity"], parts["subtype"], parts["location"])]
    phrases = list(dict.fromkeys(p for p in phrases if p))  # distinct, in order
    rng = np.random.default_rng([seed, index])
    chosen = rng.choice(len(phrases), min(count, len(phrases)), replace=False)
    out[name] = tuple(phrases[i] for i in sorted(chosen))
  return out


def prompt_logits(image_embeddings: np.ndarray, prompt_embeddings: np.ndarray,
                  prompt_class: np.ndarray, num_classes: int, scoring: str) -> np.ndarray:
  """`"b c"`: each class's score as MedCLIP's `PromptClassifier` computes it, the mean
  ("mean", its ensemble) or the max ("max") over the class's prompts of `LOGIT_SCALE`
  times the image-prompt cosine. `prompt_class "p"` is each prompt's class."""
  if scoring not in ("mean", "max"):
    raise UserError(f"Prompt scoring must be 'mean' or 'max', got {scoring!r}.")
  per_prompt = LOGIT_SCALE * normalise(image_embeddings) @ normalise(prompt_embeddings).T
  reduce = np.mean if scoring == "mean" else np.max
  return np.stack([reduce(per_prompt[:, prompt_class == c], axis=1)
                   for c in range(num_classes)], axis=1)


def templates_of(evaluate: ml_collections.ConfigDict, default: str) -> tuple[str, ...]:
  """The templates `config.evaluate` asks for: its `prompt` alone (the single-prompt
  classifier) if set, else its `templates` (a named set or a file), else the set
  `default`."""
  prompt = evaluate.get("prompt") or ""
  if prompt:
    return check_templates([prompt], "config.evaluate.prompt")
  return load_templates(evaluate.get("templates") or default)


# ---------------------------------------------------------------------------------------
# The two towers.
# ---------------------------------------------------------------------------------------
class DualEncoder:
  """A contrastive model's towers (a CLIP-style `TwoTowers`, or `MedCLIP` with its
  BatchNorm statistics `model_state` in evaluation mode) as numpy functions:
  `encode_images(uint8 "b s s c") -> "b e"`, `encode_texts(texts) -> "n e"`, both
  L2-normalised. Inputs go through one jitted call per `batch_size` of them, the last
  batch padded: one compilation per tower."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, batch_size: int = 256,
               model_state: dict | None = None):
    if batch_size < 1:
      raise UserError(f"config.evaluate.batch_size={batch_size} must be >= 1.")
    self.config = model_config(get_task(config.task).MODEL_CONFIG, config)
    self.batch_size, self.seq_len = batch_size, config.data.seq_len
    self.tokenizer = _text_tokenizer(config)
    if self.config.text_pool == "eos" and self.tokenizer.eos_id != self.config.eos_id:
      raise UserError(f"The text tower pools at token {self.config.eos_id} (its eos_id), but "
                      f"the tokenizer ends texts with {self.tokenizer.eos_id}: pass the "
                      "tokenizer the model was trained or converted with (--tokenizer).")
    self._images, self._texts = _compiled_towers(config.task, self.config)
    self.variables = jax.device_put({"params": params, **(model_state or {})})

  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """int32 `"n seq_len"`: `BOS text EOS` cut to `seq_len` keeping EOS (as training
    tokenises pair texts), padded as `config.text_pool` expects: with `pad_id` for
    "last", with EOS for "eos" and "argmax" (the first EOS, or the highest id, is then
    the text's own EOS); MedCLIP's BERT rows are padded with `pad_id` and masked."""
    cfg, tok = self.config, self.tokenizer
    pad = tok.eos_id if cfg.text_pool in ("eos", "argmax") else cfg.pad_id
    rows = []
    for text in texts:
      ids = tok.encode(text, bos=True)[:self.seq_len - 1] + [tok.eos_id]
      problem = None
      if max(ids) >= cfg.text.vocab_size:
        problem = (f"has token ids up to {max(ids)}, beyond the text tower's vocabulary of "
                   f"{cfg.text.vocab_size}")
      elif cfg.text_pool not in ("eos", "argmax") and pad in ids:
        problem = f"contains the padding id {pad}, which the text tower's pooling skips"
      elif cfg.text_pool == "argmax" and max(ids) != tok.eos_id:
        problem = (f"has token id {max(ids)} above EOS ({tok.eos_id}), where the text "
                   "tower pools (text_pool='argmax')")
      if problem:
        raise UserError(f"The text {text!r} {problem}: is the tokenizer the model's own? "
                        "(pass --tokenizer=<the directory it was trained or converted with>)")
      rows.append(right_pad(ids, self.seq_len, pad))
    return np.stack(rows) if rows else np.zeros((0, self.seq_len), np.int32)

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    size = self.image_size
    channels = getattr(self.config.vision, "channels", 3)
    if images.ndim != 4 or images.shape[1:] != (size, size, channels):
      raise ValueError(f"Expected uint8 images 'b h w c' of shape (*, {size}, {size}, "
                       f"{channels}), got {images.shape}.")
    return self._batched(self._images, images)

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    return self._batched(self._texts, self.tokenize(texts))

  def _batched(self, fn: Callable, inputs: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(inputs), self.batch_size):
      batch = inputs[start:start + self.batch_size]
      padded = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - len(batch), 0)])
      out.append(np.asarray(fn(self.variables, padded), np.float32)[:len(batch)])
    return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)


@functools.lru_cache(maxsize=8)
def _compiled_towers(task: str, config) -> tuple[Callable, Callable]:
  """`(variables, images) -> "b e"` and `(variables, tokens) -> "b e"` of the task's dual
  encoder, jitted once per config (BatchNorm, if any, with its running statistics)."""
  model = get_task(task).MODEL(config)

  def compiled(method):
    return jax.jit(lambda variables, x: model.apply(variables, x, method=method))

  return compiled(type(model).encode_image), compiled(type(model).encode_text)


def _text_tokenizer(config: ml_collections.ConfigDict):
  """The run's tokenizer (`make_tokenizer`: `config.tokenizer`, else the embedded one),
  checked for BOS and EOS; the ids prompts use are checked against the text tower by
  `DualEncoder.tokenize` (the media tokens a Hugging Face tokenizer gains after a CLIP
  vocabulary never occur in them)."""
  try:
    return make_tokenizer(ml_collections.ConfigDict({"tokenizer": config.get("tokenizer") or ""}))
  except (ValueError, OSError) as error:
    raise UserError(f"Tokenizer of the contrastive model: {error}") from error


# ---------------------------------------------------------------------------------------
# The tasks.
# ---------------------------------------------------------------------------------------
TASKS = ("zeroshot", "retrieval")
SHAPES_STRIDE = 1_000_000  # trial seed s draws shapes-world examples from s * stride on

# `(seed, num_samples) -> test items`: a trial's examples.
Draw = Callable[[int, int], list[Item]]


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
  """Zero-shot classification: `draw`'s items have a class index as `target`. The
  classifier is CLIP's (`class_embeddings` of the names in `templates`) or, with
  `class_prompts` (each class's own prompts, `compose_prompts`), MedCLIP's
  (`prompt_logits` with `scoring`)."""

  name: str
  class_names: tuple[str, ...]
  templates: tuple[str, ...]
  draw: Draw
  source: str  # where the templates come from, for the report
  class_prompts: tuple[tuple[str, ...], ...] = ()
  scoring: str = "mean"

  @property
  def num_prompts(self) -> int:
    if self.class_prompts:
      return sum(len(p) for p in self.class_prompts)
    return len(self.class_names) * len(self.templates)


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
  """Image-text retrieval: `draw`'s items have their captions as `target`. With
  `identical_texts_match`, each distinct caption is one text, right for every image it
  describes (the shapes world repeats captions, and the model cannot tell copies apart);
  else every caption is a text, right for its own image only (COCO)."""

  name: str
  draw: Draw
  identical_texts_match: bool = False


def _sampled(items: Sequence[Item]) -> Draw:
  """Draws from a benchmark's split: `num_samples` of them at random (-1: all), in the
  split's order."""
  def draw(seed: int, num_samples: int) -> list[Item]:
    chosen = protocol_lib.subsample(len(items), num_samples, np.random.default_rng(seed))
    return [items[i] for i in np.sort(chosen)]
  return draw


def _stream(world: str, item: Callable[[int], Item]) -> Draw:
  """Draws from an embedded world's endless held-out stream: trial seed s takes the
  examples `item(index)` from index `s * SHAPES_STRIDE` on."""
  def draw(seed: int, num_samples: int) -> list[Item]:
    if num_samples < 1:
      raise UserError(f"The {world} is a stream without end: give the number of test "
                      f"examples (--episodes=N, N >= 1), not {num_samples}.")
    return [item(index) for index in range(seed * SHAPES_STRIDE,
                                           seed * SHAPES_STRIDE + num_samples)]
  return draw


def _shapes(world: sw.ShapesWorld, kind: str) -> Draw:
  def item(index: int) -> Item:
    if kind == "zeroshot":
      image, label = world.classification("eval", index)
      return Item(f"eval/{index}", lambda image=image: image, {}, sw.CLASSES[label], label)
    example = world.example("eval", index)
    return Item(f"eval/{index}", lambda image=example.image: image, {}, example.caption,
                [example.caption])
  return _stream("shapes world", item)


def _findings(config: ml_collections.ConfigDict, name: str, image_size: int
              ) -> ZeroShotTask | RetrievalTask:
  """A MedCLIP run's task on held-out studies of the findings world it trained on:
  `zeroshot` over `findings_world.ZERO_SHOT_CLASSES` (each image positive for exactly one,
  CheXpert 5x200's design) with each class's prompts composed from its words, or
  `retrieval` of whole reports."""
  e = config.evaluate
  if e.get("data_dir"):
    raise UserError("A MedCLIP run is evaluated on the findings world it trained on; "
                    "config.evaluate.data_dir is for CLIP's ImageNet and COCO layouts.")
  seeds = {d.source.get("seed", 0) for d in config.data.datasets.values()
           if d.source.kind == "findings_world"}
  world = fw.FindingsWorld(seed=min(seeds, default=0), image_size=image_size)
  classes = fw.ZERO_SHOT_CLASSES

  def item(index: int) -> Item:
    if name == "zeroshot":
      example, label = world.classification(index, classes)
      return Item(f"classification/{index}", lambda image=example.image: image, {},
                  classes[label], label)
    example = world.example("retrieval", index)
    report = example.study.report
    return Item(f"retrieval/{index}", lambda image=example.image: image, {}, report, [report])

  draw = _stream("findings world", item)
  if name == "retrieval":  # reports repeat: each distinct one is right for all its images
    return RetrievalTask(name, draw, identical_texts_match=True)
  count, scoring = e.get("prompts_per_class", 10), e.get("prompt_scoring", "mean")
  prompts = compose_prompts({c: fw.CLASS_PROMPT_WORDS[c] for c in classes}, count, e.seed)
  return ZeroShotTask(name, classes, (), draw,
                      f"{count} composed prompts per class, {scoring} logit",
                      tuple(prompts[c] for c in classes), scoring)


def make_task(config: ml_collections.ConfigDict, name: str, image_size: int
              ) -> ZeroShotTask | RetrievalTask:
  """Task `name` (`TASKS`) of a contrastive run: on the shapes world, or, with
  `config.evaluate.data_dir`, on `data_dir/imagenet` (zeroshot) or `data_dir/coco`
  (retrieval) in their published layouts (`benchmarks.LAYOUTS`)."""
  e = config.evaluate
  data_dir = e.get("data_dir") or ""
  if name not in TASKS:
    raise UserError(f"Unknown task {name!r} for a contrastive model: its tasks are {TASKS} "
                    "(on the shapes world, or with --data_dir on imagenet/ and coco/).")
  if config.task == "medclip":
    return _findings(config, name, image_size)
  if data_dir:
    benchmark = "imagenet" if name == "zeroshot" else "coco"
    split = benchmarks.read_test_split(benchmark, pathlib.Path(data_dir) / benchmark)
    if split.skipped:
      logging.warning("%s: left out %s.", name, split.skipped)
    draw = _sampled(benchmarks.split_items(split, benchmark, image_size))
    if name == "retrieval":
      return RetrievalTask(name, draw)
    default, class_names = "openai_imagenet", split.class_names
  else:
    world = sw.ShapesWorld(seed=e.seed, image_size=image_size)
    if name == "retrieval":
      return RetrievalTask(name, _shapes(world, name), identical_texts_match=True)
    default, class_names, draw = "shapes_world", sw.CLASSES, _shapes(world, name)
  source = (f"prompt {e.prompt!r}" if e.get("prompt") else
            str(e.get("templates") or default))
  return ZeroShotTask(name, tuple(class_names), templates_of(e, default), draw, source)


# ---------------------------------------------------------------------------------------
# Evaluating.
# ---------------------------------------------------------------------------------------
Step = Callable[[int, str], None]  # (images or texts encoded, label): progress, stopping
TOP_K = (1, 5)
RECALL_AT = (1, 5, 10)


class Evaluation:
  """A contrastive model's evaluation on `names` (`TASKS`): the tasks are read and each
  trial's test examples drawn here; `run` encodes and scores them.

  `size` is the number of images and texts `run` encodes (for progress). `run(step)`
  calls `step(n, label)` after each batch (which may raise to stop) and returns
  `(scores, predictions, info)` as `mmjax.evaluate.Results` holds them, under 0 shots.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any, names: Sequence[str],
               protocol: protocol_lib.Protocol, model_state: dict | None = None):
    if tuple(protocol.shots) != (0,):
      raise UserError(f"A contrastive model is evaluated zero-shot; got shots "
                      f"{tuple(protocol.shots)}: pass --shots=0 or leave it out.")
    self.encoder = DualEncoder(config, params, config.evaluate.get("batch_size", 256),
                               model_state)
    self.tasks = [make_task(config, name, self.encoder.image_size) for name in names]
    self.trials = [(task, seed, task.draw(seed, protocol.num_samples))
                   for task in self.tasks for seed in protocol.seeds()]

  @property
  def size(self) -> int:
    count = sum(t.num_prompts for t in self.tasks if isinstance(t, ZeroShotTask))
    for task, _, items in self.trials:
      count += len(items)  # images
      if isinstance(task, RetrievalTask):
        count += sum(len(item.target) for item in items)
    return count

  def run(self, step: Step = lambda n, label: None) -> tuple[dict, dict, dict]:
    scores, predictions = {}, {}
    info: dict[str, dict] = {"seconds": {}, "templates": {}}
    classifiers = {}
    by_task: dict[str, list] = {}
    for task, seed, items in self.trials:
      start = time.monotonic()
      if isinstance(task, ZeroShotTask):
        if task.name not in classifiers:
          classifiers[task.name] = self._classifier(task, step)
          info["templates"][task.name] = {
              "source": task.source,
              "count": (len(task.templates) if not task.class_prompts else
                        task.num_prompts / len(task.class_names))}
        result = self._classify(task, classifiers[task.name], items, seed, step)
      else:
        result = self._retrieve(task, items, seed, step)
      by_task.setdefault(task.name, []).append(result)
      seconds = info["seconds"].setdefault(task.name, {0: 0.0})
      seconds[0] += time.monotonic() - start
    for name, trials in by_task.items():
      per_example = {m: np.concatenate([np.asarray(t[1][m], np.float64) for t in trials])
                     for m in trials[0][1]}
      scores[name] = {0: protocol_lib.aggregate([t[0] for t in trials], per_example)}
      predictions[name] = {0: [record for t in trials for record in t[2]]}
    return scores, predictions, info

  def _classifier(self, task: ZeroShotTask, step: Step) -> Callable[[np.ndarray], np.ndarray]:
    """`image embeddings "b e" -> "b c"` logits of `task`'s zero-shot classifier."""
    encode = self._texts(step, f"{task.name} classes")
    if task.class_prompts:
      prompts = [p for class_prompts in task.class_prompts for p in class_prompts]
      owner = np.repeat(np.arange(len(task.class_prompts)),
                        [len(p) for p in task.class_prompts])
      embedded = np.concatenate([encode(prompts[i:i + self.encoder.batch_size])
                                 for i in range(0, len(prompts), self.encoder.batch_size)])
      return lambda images: prompt_logits(images, embedded, owner, len(task.class_names),
                                          task.scoring)
    classes = class_embeddings(
        encode, task.class_names, task.templates,
        classes_per_batch=max(1, self.encoder.batch_size // len(task.templates)))
    return lambda images: logits(images, classes)

  def _texts(self, step: Step, label: str) -> EncodeTexts:
    def encode(texts):
      out = self.encoder.encode_texts(texts)
      step(len(texts), label)
      return out
    return encode

  def _images(self, items: Sequence[Item], step: Step, label: str) -> np.ndarray:
    out = []
    for start in range(0, len(items), self.encoder.batch_size):
      batch = items[start:start + self.encoder.batch_size]
      out.append(self.encoder.encode_images(np.stack([item.image() for item in batch])))
      step(len(batch), label)
    return np.concatenate(out)

  def _classify(self, task: ZeroShotTask, classifier: Callable[[np.ndarray], np.ndarray],
                items: list[Item], seed: int, step: Step) -> tuple[dict, dict, list]:
    scores = classifier(self._images(items, step, f"{task.name} images"))
    labels = np.asarray([item.target for item in items])
    hits = {f"top{k}": metrics.top_k_hits(scores, labels, k) for k in TOP_K
            if k == 1 or len(task.class_names) > k}
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :max(TOP_K)]
    records = [{"trial_seed": seed, "id": item.id, "target": item.answer,
                "prediction": task.class_names[order[0]],
                "ranked": [task.class_names[c] for c in order],
                **{m: bool(h[j]) for m, h in hits.items()}}
               for j, (item, order) in enumerate(zip(items, ranked, strict=True))]
    return {m: float(h.mean()) for m, h in hits.items()}, hits, records

  def _retrieve(self, task: RetrievalTask, items: list[Item], seed: int, step: Step
                ) -> tuple[dict, dict, list]:
    images = self._images(items, step, f"{task.name} images")
    texts = [caption for item in items for caption in item.target]
    text_to_image = np.repeat(np.arange(len(items)), [len(item.target) for item in items])
    matches = None
    if task.identical_texts_match:  # each distinct text once, right for all its images
      first = {}
      for t, text in enumerate(texts):
        first.setdefault(text, text_to_image[t])
      texts, text_to_image = list(first), np.asarray(list(first.values()))
      matches = np.asarray([[text in item.target for text in texts] for item in items])
    similarity = images @ self._texts(step, f"{task.name} texts")(texts).T
    image_rank, text_rank = metrics.retrieval_ranks(similarity, text_to_image, matches)
    hits = {}
    for k in RECALL_AT:
      hits[f"image_to_text/R@{k}"] = image_rank < k
    for k in RECALL_AT:
      hits[f"text_to_image/R@{k}"] = text_rank < k
    best = similarity.argmax(axis=1)
    records = [{"trial_seed": seed, "id": item.id, "target": item.target,
                "prediction": texts[best[j]], "rank": int(image_rank[j])}
               for j, item in enumerate(items)]
    # Standard errors over each direction's own queries: images, or texts.
    return {m: float(h.mean()) for m, h in hits.items()}, hits, records
