"""Held-out segmentation of a segment run: the "segment" task.

Every labelled frame of `config.data.eval_datasets.test` (documents `{"image" uint8
"h w 3", "mask" "h w" (0/1), "id"}`; at most `config.evaluate.episodes` unless it is -1)
is segmented, its mask thresholded at logit 0, and scored against its label
(`metrics.segmentation_scores`): the mean per-image IoU with its standard error, the
dataset-wide IoU (summed intersections over summed unions), Dice, pixel accuracy, and how
many images have an empty union (their IoU counts as 1) or an empty label. With
`config.data.video.noise` (the noise-input control) each image is replaced by uniform
noise drawn from `(config.seed, its index)` and keeps its mask, as in training.
"""

from collections.abc import Callable, Sequence

import jax
import numpy as np

from mmjax.cli import UserError
from mmjax.data.pipeline import dataset_from_config
from mmjax.evaluate import metrics

TASK = "segment"
SPLIT = "test"


def _source(config):
  datasets = config.data.get("eval_datasets") or {}
  if SPLIT not in datasets:
    raise UserError(f"The segment evaluation needs config.data.eval_datasets.{SPLIT} "
                    f"(held-out labelled frames); the config has {sorted(datasets)}.")
  return dataset_from_config({"name": SPLIT, **datasets[SPLIT]}).source


def image_count(config, source=None) -> int:
  """How many images `evaluate` reads: the test split's, capped at
  `config.evaluate.episodes` unless it is -1."""
  source = _source(config) if source is None else source
  limit = config.evaluate.get("episodes", -1)
  return len(source) if limit < 0 else min(limit, len(source))


def noise_image(seed: int, index: int, shape: Sequence[int]) -> np.ndarray:
  """The noise-input control's image of record `index`: uniform uint8 noise."""
  return np.random.default_rng((seed, index)).integers(0, 256, tuple(shape), np.uint8)


def segment_documents(config, params, model_state, documents: Sequence[dict], *,
                      step: Callable[[int, str], None] = lambda n, label: None
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """`(predicted "n h w" bool, target "n h w" bool, ids)` of the run's model on
  `documents`, in fixed-size batches (`config.evaluate.batch_size`, default 32)."""
  from mmjax.tasks import segment as segment_task  # here: the tasks import evaluate

  model = segment_task.build_model(config)
  size = model.config.resolution
  noise = bool((config.data.get("video") or {}).get("noise", False))
  batch_size = config.evaluate.get("batch_size", 32)
  variables = {"params": params, **(model_state or {})}

  @jax.jit
  def forward(images):
    return segment_task.forward(model, variables, images)[0]

  predicted, targets, ids, images = [], [], [], []

  def flush():
    rows = images + [images[-1]] * (batch_size - len(images))  # one compiled shape
    logits = np.asarray(forward(np.stack(rows)))[:len(images)]
    predicted.append(logits > 0)
    step(len(images), TASK)
    images.clear()

  for index, document in enumerate(documents):
    image, mask = np.asarray(document["image"]), np.asarray(document["mask"])
    if image.shape != (size, size, 3) or mask.shape != (size, size):
      raise UserError(f"Held-out frame {index} ({document.get('id', index)!r}) has an image "
                      f"{image.shape} and mask {mask.shape}; the model segments "
                      f"{size}x{size} images (config.data.eval_datasets.{SPLIT}.source's "
                      "resolution must match the model's).")
    images.append(noise_image(config.seed, index, image.shape) if noise
                  else image.astype(np.uint8))
    targets.append(mask > 0.5)
    ids.append(str(document.get("id", index)))
    if len(images) == batch_size:
      flush()
  if images:
    flush()
  if not ids:
    raise UserError(f"config.data.eval_datasets.{SPLIT} has no frame to evaluate.")
  return np.concatenate(predicted), np.stack(targets), ids


def evaluate(config, params, model_state=None, *,
             step: Callable[[int, str], None] = lambda n, label: None
             ) -> tuple[dict[str, float], list[dict]]:
  """`(scores, predictions)` of a segment run's `params` (and BatchNorm statistics) on its
  held-out frames; each prediction has the frame's id, IoU, Dice and pixel counts."""
  source = _source(config)
  documents = (source[i] for i in range(image_count(config, source)))
  predicted, target, ids = segment_documents(config, params, model_state, documents,
                                             step=step)
  scores = metrics.segmentation_scores(predicted, target)
  overlaps = metrics.mask_overlaps(predicted, target)
  iou, dice = metrics.mask_iou(predicted, target), metrics.mask_dice(predicted, target)
  predictions = [{"id": ids[i], "iou": float(iou[i]), "dice": float(dice[i]),
                  **{k: int(v[i]) for k, v in overlaps.items()}} for i in range(len(ids))]
  return scores, predictions
