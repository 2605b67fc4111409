"""Benchmark data sets in their published layouts, read from local paths into `Example`s
that few-shot evaluation draws demonstrations and queries from.

  COCO captions  `read_coco_karpathy`: Karpathy's split file (`dataset_coco.json`, also
                 `dataset_flickr30k.json`) and the image folders it names.
  VQAv2, OK-VQA  `read_vqa`: the questions file and, where published, the annotations file
                 of the official VQA format; images `COCO_<set>_<image_id:012d>.jpg`.
  ImageNet       `read_image_folder`: `root/<class folder>/<images>`, labels indexing the
                 sorted class folders (or the sorted keys of a class-name file).
  Hateful Memes  `read_hateful_memes`: the JSONL files (`{"id", "img", "label", "text"}`).

Every reader checks what it reads and raises `mmjax.cli.UserError` naming the file, the
entry (or line) and what was expected. Entries whose image file is absent are left out,
counted in `Split.skipped` and logged with the first few paths, never dropped silently;
when no image at all is found the image folder is wrong, and the reader raises. Images
are read only when asked for (`load_image`), decoded and sized as training data are
(`mmjax.data.sources.decode_image`: RGB, shorter side resized, centre square kept).
"""

import collections
import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from mmjax.cli import UserError
from mmjax.data.sequences import CorruptRecord
from mmjax.data.sources import IMAGE_EXTENSIONS, decode_image
from mmjax.evaluate import metrics
from mmjax.evaluate.prompts import FORMATS
from mmjax.evaluate.tasks import FewShotTask, Item

PathLike = str | os.PathLike
CAPTION_SPLITS = ("train", "restval", "val", "test")
VQA_IMAGE_SETS = ("train2014", "val2014", "test2015")
HATEFUL_MEMES_CLASSES = ("no", "yes")  # label 0 and 1, as the answers of the prompt
MAX_LISTED = 5  # missing files named in a warning or an error


@dataclasses.dataclass(frozen=True)
class Example:
  """One benchmark item; fields a benchmark does not have keep their defaults.

  Attributes:
    id: unique within its split: the COCO image id (`cocoid`; for Flickr30k the file name
      without extension), the VQA `question_id`, the image's path relative to the class
      folders' root (`"n01440764/x.JPEG"`), the Hateful Memes `id`.
    image_path: the image file.
    captions: the reference captions, in the file's order (captioning).
    question: the question (VQA).
    answers: the human answers in the file's order, ten for VQAv2 and OK-VQA; empty for
      a split published without annotations.
    text: the text written on the image (Hateful Memes).
    label: the class index into `Split.class_names` (classification, Hateful Memes).
  """

  id: str
  image_path: str
  captions: tuple[str, ...] = ()
  question: str = ""
  answers: tuple[str, ...] = ()
  text: str = ""
  label: int | None = None


@dataclasses.dataclass(frozen=True)
class Split:
  """The usable examples of one benchmark split, and what was left out.

  Attributes:
    examples: in the file's order (class folders: sorted by class, then by path).
    skipped: `{reason: count}` of entries left out: "missing_image" (the image file is
      absent), "not_an_image" (a file in the class folders without an image extension).
    class_names: label `i` is `class_names[i]` (classification, Hateful Memes); empty for
      other benchmarks.
  """

  examples: tuple[Example, ...]
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  class_names: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.examples)

  def __iter__(self) -> Iterator[Example]:
    return iter(self.examples)

  def __getitem__(self, index: int) -> Example:
    return self.examples[index]


# ---------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------
def load_image(example: Example, image_size: int) -> np.ndarray:
  """uint8 `"image_size image_size 3"` of the example's image, prepared as training images
  are (`mmjax.data.sources.decode_image`).

  Raises:
    CorruptRecord: "missing_image" if the file is gone, "bad_image" or
      "unsupported_image" if it cannot be decoded; the message names the file, and the
      reason lets an evaluation count such examples as the data pipeline does.
  """
  path = pathlib.Path(example.image_path)
  try:
    data = path.read_bytes()
  except OSError as error:
    raise CorruptRecord("missing_image", f"{path} (example {example.id}): cannot be read "
                        f"({error.strerror or error})") from error
  try:
    return decode_image(data, image_size)
  except CorruptRecord as error:
    detail = str(error).removeprefix(f"{error.reason}: ")
    raise CorruptRecord(error.reason, f"{path} (example {example.id}): {detail}") from error


def load_images(examples: Sequence[Example], image_size: int) -> np.ndarray:
  """uint8 `"b image_size image_size 3"` of the examples' images (`load_image`)."""
  if not examples:
    return np.zeros((0, image_size, image_size, 3), np.uint8)
  return np.stack([load_image(e, image_size) for e in examples])


# ---------------------------------------------------------------------------------------
# Checking what is read.
# ---------------------------------------------------------------------------------------
def _read_json(path: PathLike, what: str) -> Any:
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"No {what} file {path}: check the path.")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{path} is not a JSON file ({error}); expected the {what}.") from error


def _type_names(kind: type | tuple[type, ...]) -> str:
  kinds = kind if isinstance(kind, tuple) else (kind,)
  names = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
  return " or ".join(names.get(k, k.__name__) for k in kinds)


def _field(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
  """`entry[key]`, which must be of type `kind`; a `UserError` saying where and what."""
  if not isinstance(entry, dict):
    raise UserError(f"{where} is {_type_names(type(entry))}, expected an object with "
                    f"{key!r}.")
  if key not in entry:
    raise UserError(f"{where} has no {key!r} (it has {sorted(entry)}); expected "
                    f"{_type_names(kind)} there.")
  value = entry[key]
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if isinstance(value, bool) or not isinstance(value, kinds):
    raise UserError(f"{where}: {key!r} is {value!r:.80}, expected {_type_names(kind)}.")
  return value


def _list_field(document: Any, key: str, path: PathLike, what: str) -> list:
  if not isinstance(document, dict) or not isinstance(document.get(key), list):
    found = sorted(document) if isinstance(document, dict) else _type_names(type(document))
    raise UserError(f"{path} has no list {key!r} (found {found}); expected the {what}.")
  return document[key]


def _unique_ids(examples: list[Example], path: PathLike, what: str) -> None:
  counts = collections.Counter(e.id for e in examples)
  repeated = [i for i, n in counts.items() if n > 1]
  if repeated:
    raise UserError(f"{path}: {what} {repeated[:MAX_LISTED]} occur more than once; each "
                    "must identify one entry.")


def _present(examples: list[Example], source: str, image_root: PathLike,
             skipped: dict[str, int] | None = None) -> Split:
  """The examples whose image file exists; the others counted and the first few named.
  Raises when none exists: the image folder given is then the wrong one."""
  exists: dict[str, bool] = {}
  for e in examples:
    if e.image_path not in exists:
      exists[e.image_path] = os.path.isfile(e.image_path)
  missing = [p for p, ok in exists.items() if not ok]
  skipped = dict(skipped or {})
  if examples and len(missing) == len(exists):
    raise UserError(f"None of the {len(exists)} images that {source} names exists under "
                    f"{image_root} (the first expected: {missing[0]}); check the image folder.")
  if missing:
    kept = [e for e in examples if exists[e.image_path]]
    skipped["missing_image"] = len(examples) - len(kept)
    logging.warning("%s: skipping %d entries whose %d image files are missing, e.g. %s.",
                    source, len(examples) - len(kept), len(missing),
                    ", ".join(missing[:MAX_LISTED]))
    examples = kept
  return Split(tuple(examples), skipped)


# ---------------------------------------------------------------------------------------
# COCO / Flickr30k captions, Karpathy split.
# ---------------------------------------------------------------------------------------
def read_coco_karpathy(annotations: PathLike, image_root: PathLike, split: str) -> Split:
  """Captioning examples of Karpathy's split file (`dataset_coco.json`).

  The file holds `{"images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
  "cocoid": 391895, "split": "test", "sentences": [{"raw": caption}, ...]}, ...]}`; the
  image is `image_root/filepath/filename` (COCO's `train2014/` and `val2014/` folders side
  by side). Flickr30k's `dataset_flickr30k.json` has no `filepath` or `cocoid`: its images
  are `image_root/filename`, identified by the file name without extension.

  Args:
    annotations: the split file.
    image_root: the folder holding the image folders (COCO) or the images (Flickr30k).
    split: "train", "restval", "val" or "test", or several joined with "+". OpenFlamingo
      draws demonstrations from "train" alone (82,783 COCO images; "restval" is left out)
      and evaluates on "test" (5,000); Karpathy's training set is "train+restval".
  """
  wanted = split.split("+")
  unknown = [s for s in wanted if s not in CAPTION_SPLITS]
  if unknown:
    raise UserError(f"Caption split {split!r}: {unknown} are not among Karpathy's splits "
                    f"{CAPTION_SPLITS}; join several with '+', e.g. 'train+restval'.")
  entries = _list_field(_read_json(annotations, "Karpathy split"), "images", annotations,
                        "Karpathy split's image entries")
  examples, found = [], set()
  for i, entry in enumerate(entries):
    where = f"{annotations}, images[{i}]"
    entry_split = _field(entry, "split", str, where)
    found.add(entry_split)
    if entry_split not in wanted:
      continue
    filename = _field(entry, "filename", str, where)
    folder = _field(entry, "filepath", str, where) if "filepath" in entry else ""
    image_id = (_field(entry, "cocoid", int, where) if "cocoid" in entry
                else pathlib.PurePath(filename).stem)
    sentences = _field(entry, "sentences", list, where)
    if not sentences:
      raise UserError(f"{where}: 'sentences' is empty; expected the reference captions.")
    captions = tuple(_field(s, "raw", str, f"{where}, sentences[{j}]")
                     for j, s in enumerate(sentences))
    examples.append(Example(id=str(image_id), captions=captions,
                            image_path=os.path.join(image_root, folder, filename)))
  if not examples:
    raise UserError(f"{annotations} has no entries of split {split!r}; its splits are "
                    f"{sorted(found)}.")
  _unique_ids(examples, annotations, "image ids")
  return _present(examples, str(annotations), image_root)


# ---------------------------------------------------------------------------------------
# VQAv2 / OK-VQA.
# ---------------------------------------------------------------------------------------
def read_vqa(questions: PathLike, image_dir: PathLike, annotations: PathLike | None = None,
             *, image_set: str | None = None) -> Split:
  """Question-answering examples of the official VQA format (VQAv2, OK-VQA).

  Questions: `{"questions": [{"image_id", "question", "question_id"}, ...]}`; annotations:
  `{"annotations": [{"question_id", "image_id", "answers": [{"answer": ...}, ...]}, ...]}`,
  matched to the questions by `question_id`. The image of a question is
  `image_dir/COCO_<image_set>_<image_id:012d>.jpg`, as OpenFlamingo finds them.

  Args:
    questions: the questions file (`v2_OpenEnded_mscoco_val2014_questions.json`,
      `OpenEnded_mscoco_val2014_questions.json`).
    image_dir: the COCO image folder (`.../val2014`).
    annotations: the annotations file; None for a split published without answers.
    image_set: the COCO image set in the file names ("train2014", "val2014",
      "test2015"); by default the name of `image_dir`.
  """
  image_set = image_set or pathlib.Path(image_dir).name
  if image_set not in VQA_IMAGE_SETS:
    raise UserError(f"VQA images: {image_dir} is not named after a COCO image set "
                    f"{VQA_IMAGE_SETS}, which the image file names contain; pass image_set.")
  entries = _list_field(_read_json(questions, "VQA questions"), "questions", questions,
                        "VQA questions")
  answers: dict[int, tuple[int, tuple[str, ...]]] = {}  # question id -> (image id, answers)
  if annotations is not None:
    for i, entry in enumerate(_list_field(_read_json(annotations, "VQA annotations"),
                                          "annotations", annotations, "VQA annotations")):
      where = f"{annotations}, annotations[{i}]"
      question_id = _field(entry, "question_id", int, where)
      given = _field(entry, "answers", list, where)
      answers[question_id] = (_field(entry, "image_id", int, where), tuple(
          _field(a, "answer", str, f"{where}, answers[{j}]") for j, a in enumerate(given)))
  examples = []
  for i, entry in enumerate(entries):
    where = f"{questions}, questions[{i}]"
    question_id = _field(entry, "question_id", int, where)
    image_id = _field(entry, "image_id", int, where)
    example = Example(
        id=str(question_id), question=_field(entry, "question", str, where),
        image_path=os.path.join(image_dir, f"COCO_{image_set}_{image_id:012d}.jpg"))
    if annotations is not None:
      if question_id not in answers:
        raise UserError(f"{where}: question {question_id} has no annotation in "
                        f"{annotations}; are the two files of the same split?")
      annotated_image, example_answers = answers[question_id]
      if annotated_image != image_id:
        raise UserError(f"{where}: question {question_id} is about image {image_id}, its "
                        f"annotation in {annotations} about image {annotated_image}.")
      example = dataclasses.replace(example, answers=example_answers)
    examples.append(example)
  _unique_ids(examples, questions, "question ids")
  return _present(examples, str(questions), image_dir)


# ---------------------------------------------------------------------------------------
# ImageNet-style class folders.
# ---------------------------------------------------------------------------------------
def _class_name_file(path: PathLike) -> dict[str, str]:
  """`{folder: name}` from `{folder: name}` or Keras's `{"0": [folder, name], ...}`."""
  mapping = _read_json(path, "class names")
  if not isinstance(mapping, dict) or not mapping:
    raise UserError(f"{path}: expected a non-empty JSON object {{folder: class name}} or "
                    '{"0": [folder, class name], ...}.')
  names = {}
  for key, value in mapping.items():
    if isinstance(value, str):
      names[key] = value
    elif (isinstance(value, list) and len(value) == 2
          and all(isinstance(v, str) for v in value)):
      names[value[0]] = value[1]
    else:
      raise UserError(f"{path}, entry {key!r}: {value!r:.80} is neither a class name nor a "
                      "[folder, class name] pair.")
  return names


def read_image_folder(root: PathLike, class_names: PathLike | None = None) -> Split:
  """Classification examples from class folders, `root/<class>/<image files>` (ImageNet's
  `val/n01440764/ILSVRC2012_val_00000293.JPEG`).

  Label `i` is the `i`-th class folder in sorted order (ImageNet's usual class indices),
  or, with a class-name file, the `i`-th of its sorted folder names: the labels then stay
  the same for a split that lacks some classes. Files in subfolders of a class folder
  belong to it; files with another extension than an image's are counted as
  "not_an_image".

  Args:
    root: the folder holding one folder per class.
    class_names: a JSON file of `{folder: class name}` or Keras's
      `imagenet_class_index.json` (`{"0": [folder, class name], ...}`); without it the
      folder names are the class names.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise UserError(f"No folder {root}: expected a folder of class folders.")
  folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not folders:
    raise UserError(f"{root} holds no class folders; expected root/<class>/<images>.")
  if class_names is None:
    classes, names = folders, folders
  else:
    mapping = _class_name_file(class_names)
    unnamed = [f for f in folders if f not in mapping]
    if unnamed:
      raise UserError(f"{class_names} names no class for the folders {unnamed[:MAX_LISTED]} "
                      f"of {root} ({len(unnamed)} in all); is it the file for this data set?")
    classes = sorted(mapping)
    names = [mapping[c] for c in classes]
  extensions = {f".{e}" for e in IMAGE_EXTENSIONS}
  examples, others = [], 0
  for label, folder in enumerate(classes):
    if not (root / folder).is_dir():
      continue
    for directory, subdirectories, files in os.walk(root / folder, followlinks=True):
      subdirectories.sort()
      for file in sorted(files):
        path = pathlib.Path(directory, file)
        if path.suffix.lower() not in extensions:
          others += 1
          continue
        examples.append(Example(id=path.relative_to(root).as_posix(), image_path=str(path),
                                label=label))
  if not examples:
    raise UserError(f"The class folders of {root} hold no image files (extensions "
                    f"{sorted(extensions)}).")
  if others:
    logging.warning("%s: %d files in the class folders are not images and are skipped.",
                    root, others)
  return Split(tuple(examples), {"not_an_image": others} if others else {}, tuple(names))


# ---------------------------------------------------------------------------------------
# Hateful Memes.
# ---------------------------------------------------------------------------------------
def read_hateful_memes(annotations: PathLike, image_root: PathLike | None = None) -> Split:
  """Hateful Memes examples of one JSONL file (`train.jsonl`, `dev_seen.jsonl`, ...).

  Each line is `{"id": 42953, "img": "img/42953.png", "label": 0 or 1, "text": ...}`; the
  image is `image_root/img`. Label 1 (hateful) is class "yes", 0 is "no", the answers the
  prompt asks for.

  Args:
    annotations: the JSONL file.
    image_root: the folder `img` is relative to; by default that of `annotations`, as the
      data set is published.
  """
  annotations = pathlib.Path(annotations)
  image_root = annotations.parent if image_root is None else pathlib.Path(image_root)
  if not annotations.is_file():
    raise UserError(f"No Hateful Memes file {annotations}: check the path.")
  try:
    lines = annotations.read_text(encoding="utf-8").split("\n")
  except UnicodeDecodeError as error:
    raise UserError(f"{annotations} is not UTF-8 text ({error}); expected JSON lines.") \
        from error
  examples = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{annotations}, line {number}"
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as error:
      raise UserError(f"{where} is not a JSON object ({error}).") from error
    label = _field(entry, "label", int, where)
    if label not in (0, 1):
      raise UserError(f"{where}: 'label' is {label}, expected 0 (not hateful) or 1.")
    examples.append(Example(
        id=str(_field(entry, "id", (int, str), where)), label=label,
        text=_field(entry, "text", str, where),
        image_path=str(image_root / _field(entry, "img", str, where))))
  if not examples:
    raise UserError(f"{annotations} holds no entries.")
  _unique_ids(examples, annotations, "ids")
  split = _present(examples, str(annotations), image_root)
  return dataclasses.replace(split, class_names=HATEFUL_MEMES_CLASSES)


# ---------------------------------------------------------------------------------------
# Few-shot tasks on the benchmarks, as OpenFlamingo evaluates them.
# ---------------------------------------------------------------------------------------
# Where each benchmark's files are, under `config.evaluate.data_dir/<task>/`: its own
# published names. Demonstrations come from the first split, test examples from the second.
LAYOUTS = {
    "coco": "dataset_coco.json (Karpathy's split file), train2014/, val2014/",
    "vqav2": "v2_OpenEnded_mscoco_{train,val}2014_questions.json, "
             "v2_mscoco_{train,val}2014_annotations.json, train2014/, val2014/",
    "okvqa": "OpenEnded_mscoco_{train,val}2014_questions.json, "
             "mscoco_{train,val}2014_annotations.json, train2014/, val2014/",
    "imagenet": "train/<class>/<images>, val/<class>/<images>, optional class_names.json",
    "hateful_memes": "train.jsonl, dev_seen.jsonl, img/",
}


def read_task_splits(name: str, root: PathLike) -> tuple[Split, Split]:
  """`(support, test)` splits of benchmark `name` in `root` (laid out as `LAYOUTS` says)."""
  root = pathlib.Path(root)
  if name == "coco":
    file = root / "dataset_coco.json"
    return read_coco_karpathy(file, root, "train"), read_coco_karpathy(file, root, "test")
  if name in ("vqav2", "okvqa"):
    prefix = "v2_" if name == "vqav2" else ""
    return tuple(read_vqa(root / f"{prefix}OpenEnded_mscoco_{s}2014_questions.json",
                          root / f"{s}2014", root / f"{prefix}mscoco_{s}2014_annotations.json")
                 for s in ("train", "val"))
  if name == "imagenet":
    names = _class_names_beside(root)
    return read_image_folder(root / "train", names), read_image_folder(root / "val", names)
  if name == "hateful_memes":
    return read_hateful_memes(root / "train.jsonl"), read_hateful_memes(root / "dev_seen.jsonl")
  raise UserError(f"Unknown evaluation task {name!r}; the benchmarks are {sorted(LAYOUTS)}, "
                  "the shapes-world tasks naming, vqa and captioning (contrastive runs: "
                  "zeroshot and retrieval).")


def _class_names_beside(root: pathlib.Path) -> pathlib.Path | None:
  names = root / "class_names.json"
  return names if names.is_file() else None


def read_test_split(name: str, root: PathLike) -> Split:
  """The test split alone of benchmark `name` in `root`, for evaluations without
  demonstrations (a contrastive model's zero-shot classification and retrieval):
  "imagenet": `root/val/<class>/<images>` (class names from `root/class_names.json` when
  it exists); "coco": the "test" split of `root/dataset_coco.json`."""
  root = pathlib.Path(root)
  if name == "imagenet":
    return read_image_folder(root / "val", _class_names_beside(root))
  if name == "coco":
    return read_coco_karpathy(root / "dataset_coco.json", root, "test")
  raise UserError(f"No test-split reader for {name!r}; expected 'imagenet' or 'coco'.")


def split_items(split: Split, name: str, image_size: int) -> list[Item]:
  """The examples of benchmark `name`'s split as `Item`s whose images are read when asked
  for: captions as targets (COCO), answers (VQA), class indices (classification)."""
  items = []
  for e in split:
    image = lambda e=e: load_image(e, image_size)
    if name == "coco":
      items.append(Item(e.id, image, {}, e.captions[0], list(e.captions)))
    elif name in ("vqav2", "okvqa"):
      items.append(Item(e.id, image, {"question": e.question}, e.answers[0] if e.answers
                        else "", list(e.answers), image_key=e.image_path))
    elif name == "hateful_memes":
      items.append(Item(e.id, image, {"ocr": e.text}, HATEFUL_MEMES_CLASSES[e.label], e.label))
    else:
      items.append(Item(e.id, image, {}, split.class_names[e.label], e.label))
  return items


def make_task(name: str, data_dir: PathLike, image_size: int):
  """The few-shot task of benchmark `name` read from `data_dir/<name>`: OpenFlamingo's
  prompt, answer length and post-processing (`mmjax.evaluate.prompts.FORMATS`)."""
  if not data_dir:
    raise UserError(f"Evaluating {name!r} needs its files: --data_dir=DIR (or "
                    f"config.evaluate.data_dir) with {name}/ holding {LAYOUTS.get(name)}.")
  support, test = read_task_splits(name, pathlib.Path(data_dir) / name)
  for split, role in ((support, "demonstrations"), (test, "test")):
    if split.skipped:
      logging.warning("%s %s: left out %s.", name, role, split.skipped)
  items = lambda split: split_items(split, name, image_size)
  if name == "coco":
    return FewShotTask(name, "captioning", items(support), items(test),
                       FORMATS["openflamingo_captioning"], max_new_tokens=20,
                       postprocess=metrics.postprocess_caption_generation)
  if name in ("vqav2", "okvqa"):
    if not all(e.answers for e in test):
      raise UserError(f"{name}: the test questions need their annotations file.")
    return FewShotTask(name, "vqa", items(support), items(test), FORMATS["openflamingo_vqa"],
                       max_new_tokens=5, postprocess=metrics.postprocess_vqa_generation)
  if name == "hateful_memes":
    return FewShotTask(name, "classification", items(support), items(test),
                       FORMATS["openflamingo_hateful_memes"], classes=HATEFUL_MEMES_CLASSES,
                       positive=1)
  return FewShotTask(name, "classification", items(support), items(test),
                     FORMATS["openflamingo_classification"], classes=test.class_names)
