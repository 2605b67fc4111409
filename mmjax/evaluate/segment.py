"""Held-out segmentation of a segment run: the "segment" task.

Every labelled frame of `config.data.eval_datasets.test` (documents `{"image" uint8
"h w 3", "mask" "h w" (0/1), "id"}`; at most `config.evaluate.episodes` unless it is -1)
is segmented, its mask thresholded at logit 0, and scored against its label
(`metrics.segmentation_scores`): the mean per-image IoU with its standard error, the
dataset-wide IoU (summed intersections over summed unions), Dice, pixel accuracy, and how
many images have an empty union (their IoU counts as 1) or an empty label. Frames are
built as the pipeline builds them (`mmjax.data.video.build_video`): with
`config.data.video.noise` (the noise-input control) each image is the pipeline's noise for
`(config.seed, its index)` and keeps its mask. Frames the pipeline cannot use are skipped
and counted by reason ("skipped/<reason>").
"""

from collections.abc import Callable

import jax
import numpy as np

from mmjax.cli import UserError
from mmjax.data import video as video_lib
from mmjax.evaluate import held_out, metrics

TASK = "segment"
SPLIT = "test"


def _source(config):
  return held_out.source(config, SPLIT, "held-out labelled frames")


def count(config) -> int:
  """How many frames `evaluate` reads: the test split's, capped at
  `config.evaluate.episodes` unless it is -1."""
  return held_out.limit(config, _source(config))


def segment_split(config, params, model_state, *,
                  step: Callable[[int, str], None] = lambda n, label: None
                  ) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, int]]:
  """`(predicted "n h w" bool, target "n h w" bool, ids, skipped by reason)` of the run's
  model on the test split's frames, built as the pipeline builds them (the noise control's
  images included), in batches of `config.evaluate.batch_size` (default 32)."""
  from mmjax.tasks import segment as segment_task  # here: the tasks import evaluate

  source = _source(config)
  model = segment_task.build_model(config)
  spec = video_lib.spec_of(config)
  variables = {"params": params, **(model_state or {})}
  targets, ids, skipped = [], [], {}

  @jax.jit
  def forward(batch):
    return segment_task.forward(model, variables, batch["image"])[0] > 0

  def examples():
    build = lambda document, index: video_lib.build_video(document, spec, "segment",
                                                          config.seed, index)[0]
    for index, document, example in held_out.built(config, source, build, skipped):
      targets.append(example["mask"] > 0.5)
      ids.append(str(document.get("id", index)))
      yield {"image": example["image"]}

  predicted = held_out.batched(forward, examples(), config.evaluate.get("batch_size", 32),
                               step=lambda n: step(n, TASK))
  if not ids:
    raise UserError(f"config.data.eval_datasets.{SPLIT} has no usable frame (skipped: "
                    f"{skipped}).")
  return np.concatenate(predicted), np.stack(targets), ids, skipped


def evaluate(config, params, model_state=None, *,
             step: Callable[[int, str], None] = lambda n, label: None
             ) -> tuple[dict[str, float], list[dict]]:
  """`(scores, predictions)` of a segment run's `params` (and BatchNorm statistics) on its
  held-out frames; each prediction has the frame's id, IoU, Dice and pixel counts."""
  predicted, target, ids, skipped = segment_split(config, params, model_state, step=step)
  scores = metrics.segmentation_scores(predicted, target)
  scores.update({f"skipped/{reason}": float(k) for reason, k in skipped.items()})
  overlaps = metrics.mask_overlaps(predicted, target)
  iou, dice = metrics.mask_iou(predicted, target), metrics.mask_dice(predicted, target)
  predictions = [{"id": ids[i], "iou": float(iou[i]), "dice": float(dice[i]),
                  **{k: int(v[i]) for k, v in overlaps.items()}} for i in range(len(ids))]
  return scores, predictions
