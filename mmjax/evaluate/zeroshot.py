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
"""

import functools
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from mmjax.cli import UserError

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
