"""Mammograms with detector boxes -> fixed-shape region examples (MMBCD).

A document is `{"image": uint8 "H W" (or "H W 3"), "boxes": float32 "n 5" (cx, cy, w, h,
score) normalised to [0, 1] as the detector wrote them, "text": str, "label": int, "id":
str}`. Building its example (`build_regions`):

1. validate the rows: rows with a NaN or infinite value, a non-positive width or height, or
   lying entirely outside [0, 1] are dropped, each counted by reason (`boxes_nonfinite`,
   `boxes_degenerate`, `boxes_outside`); rows partly outside are clipped to the image
   (`boxes_clipped`). No row left: the record is skipped (`CorruptRecord("no_boxes")`), or,
   with `empty="whole_image"`, the whole image is its one region
   (`no_boxes_whole_image`);
2. sort by score, descending and stable (the detector's files are already sorted, and keep
   their order);
3. greedy non-maximum suppression: in that order each kept box drops every later box whose
   IoU with it exceeds `nms_iou` (MMBCD iterates its pass to a fixed point, which one pass
   already is: no two boxes a pass keeps overlap by more than the threshold);
4. the first `num_regions` boxes; fewer are padded with zero boxes masked out
   (`pad="mask"`), or, as MMBCD does, with duplicates of kept boxes drawn with
   replacement by the caller's generator (`pad="duplicate"`, every region real);
5. `crop="pipeline"`: each box cropped from the full-resolution image at MMBCD's pixel
   coordinates (`pixel_boxes`) and resized to `region_size` square with PIL bilinear
   (aspect ratio not kept, as torchvision's `Resize((s, s))` does), grey replicated to 3
   channels. `crop="device"`: the image on a `canvas_size` square canvas (resized to it if
   it differs) and the same pixel boxes in canvas coordinates, for a fixed-shape
   crop-and-resize on the accelerator.

`whole_image=True` (the image-only baseline) ignores the boxes: one region, the whole
image. The text becomes `<s> text </s>`, right-padded; a longer one is cut keeping EOS
(`text_truncated`).
"""

import dataclasses
from typing import Any, Literal

import numpy as np
from PIL import Image

from mmjax import cli
from mmjax.data.sequences import CorruptRecord, right_pad

CROPS = ("pipeline", "device")
PADS = ("mask", "duplicate")
EMPTY = ("skip", "whole_image")


@dataclasses.dataclass(frozen=True)
class RegionSpec:
  """How a document's boxes become regions (see the module docstring).

  Attributes:
    num_regions: K, the regions per example (MMBCD's `topk`: 8 in its training script).
    region_size: s, the side of each resized crop (the vision tower's input).
    crop: "pipeline" (crops here, `regions "k s s 3"`) or "device" (`image "S S 1"` and
      `boxes "k 4"` for the model to crop).
    canvas_size: S, the side of the device-crop canvas.
    nms_iou: boxes overlapping a kept one by more than this IoU are dropped.
    pad: "mask" (zero regions, `region_mask` False) or "duplicate" (MMBCD).
    empty: a record with no valid box is skipped ("skip") or is one whole-image region
      ("whole_image").
    whole_image: one region, the whole image (the boxes are not read).
    prompt: the text the model reads around the history, `{text}` where it goes
      (MMBCD's code/data.py: "Indication: {text}"; an empty history leaves
      "Indication:"). Keyword masking applies to the history before it.
  """

  num_regions: int = 8
  region_size: int = 224
  crop: Literal["pipeline", "device"] = "pipeline"
  canvas_size: int = 1024
  nms_iou: float = 0.1
  pad: Literal["mask", "duplicate"] = "duplicate"
  empty: Literal["skip", "whole_image"] = "skip"
  whole_image: bool = False
  prompt: str = "Indication: {text}"

  def __post_init__(self):
    for name, value, allowed in (("crop", self.crop, CROPS), ("pad", self.pad, PADS),
                                 ("empty", self.empty, EMPTY)):
      if value not in allowed:
        raise ValueError(f"RegionSpec.{name}={value!r}; expected one of {allowed}.")
    for name in ("num_regions", "region_size", "canvas_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"RegionSpec.{name} must be >= 1, got {getattr(self, name)}.")
    if not 0 <= self.nms_iou <= 1:
      raise ValueError(f"RegionSpec.nms_iou must be in [0, 1], got {self.nms_iou}.")
    if self.prompt.count("{text}") != 1:
      raise ValueError(f"RegionSpec.prompt={self.prompt!r} must hold '{{text}}' once, where "
                       "the history goes.")

  @property
  def regions_per_example(self) -> int:
    """k: 1 for the whole-image baseline, else `num_regions`."""
    return 1 if self.whole_image else self.num_regions


def spec_of(config) -> RegionSpec:
  """The `RegionSpec` of a run's `config.data.regions` (the trainer's and its evaluation's);
  a bad field is a `UserError` naming it."""
  try:
    return RegionSpec(**dict(config.data.get("regions") or {}))
  except (TypeError, ValueError) as e:
    raise cli.UserError(f"config.data.regions: {e}") from e


WHOLE_IMAGE_ROW = np.array([[0.5, 0.5, 1.0, 1.0, 0.0]], np.float32)  # no detector score


def valid_boxes(boxes: Any) -> tuple[np.ndarray, dict[str, int]]:
  """Detector rows -> the usable ones (float32 `"m 5"`, in their order) and per-reason
  counts of the rows dropped or clipped.

  Raises:
    CorruptRecord("bad_boxes"): rows that are not `"n 5"` numbers.
  """
  try:
    rows = np.asarray(boxes if boxes is not None else np.zeros((0, 5)), np.float32)
  except (TypeError, ValueError) as e:
    raise CorruptRecord("bad_boxes", f"boxes are not numbers: {e}") from e
  if rows.size == 0:
    rows = rows.reshape(0, 5)
  if rows.ndim != 2 or rows.shape[1] != 5:
    raise CorruptRecord("bad_boxes", f"boxes must be float32 'n 5' (cx, cy, w, h, score), "
                        f"got shape {rows.shape}")
  finite = np.isfinite(rows).all(axis=1)
  cx, cy, w, h = (rows[:, i].astype(np.float64) for i in range(4))
  with np.errstate(invalid="ignore"):
    sized = finite & (w > 0) & (h > 0)
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    inside = sized & (x1 > 0) & (x0 < 1) & (y1 > 0) & (y0 < 1)
    partial = inside & ((x0 < 0) | (x1 > 1) | (y0 < 0) | (y1 > 1))
  stats = {"boxes_nonfinite": int(np.sum(~finite)),
           "boxes_degenerate": int(np.sum(finite & ~sized)),
           "boxes_outside": int(np.sum(sized & ~inside)),
           "boxes_clipped": int(np.sum(partial))}
  rows = rows.copy()
  if partial.any():  # only these change: the others keep the detector's exact values
    x0, x1 = np.clip(x0, 0, 1), np.clip(x1, 0, 1)
    y0, y1 = np.clip(y0, 0, 1), np.clip(y1, 0, 1)
    clipped = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1)
    rows[partial, :4] = clipped[partial]
  return rows[inside], stats


def iou_with(box: np.ndarray, others: np.ndarray) -> np.ndarray:
  """IoU of one `(cx, cy, w, h, ...)` row with each of `others "n >=4"`, float64 `"n"`,
  computed as MMBCD computes it (corners from centre minus half size)."""
  b = box[:4].astype(np.float64)
  o = others[:, :4].astype(np.float64)
  bx, by = b[0] - b[2] / 2, b[1] - b[3] / 2
  ox, oy = o[:, 0] - o[:, 2] / 2, o[:, 1] - o[:, 3] / 2
  inter_w = np.maximum(0, np.minimum(bx + b[2], ox + o[:, 2]) - np.maximum(bx, ox))
  inter_h = np.maximum(0, np.minimum(by + b[3], oy + o[:, 3]) - np.maximum(by, oy))
  inter = inter_w * inter_h
  return inter / (b[2] * b[3] + o[:, 2] * o[:, 3] - inter)


def nms(rows: np.ndarray, iou: float) -> np.ndarray:
  """Greedy non-maximum suppression in the given order: int `"m"`, the kept rows' indices
  (ascending). Each kept row drops every later row whose IoU with it exceeds `iou`."""
  alive = np.ones(len(rows), bool)
  keep = []
  for i in range(len(rows)):
    if not alive[i]:
      continue
    keep.append(i)
    later = i + 1 + np.flatnonzero(alive[i + 1:])
    if len(later):
      alive[later[iou_with(rows[i], rows[later]) > iou]] = False
  return np.asarray(keep, np.int64)


def select_boxes(rows: np.ndarray, spec: RegionSpec, rng: np.random.Generator | None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Valid rows -> (float32 `"k 5"` the regions' rows, bool `"k"` which are real): sorted
  by score (stable), suppressed, the top `num_regions`, padded by `spec.pad`."""
  k = spec.num_regions
  rows = rows[np.argsort(-rows[:, 4], kind="stable")]
  rows = rows[nms(rows, spec.nms_iou)][:k]
  n = len(rows)
  mask = np.ones(k, bool)
  if n < k and spec.pad == "duplicate":
    if rng is None:
      raise ValueError("pad='duplicate' needs a random generator to draw the duplicates.")
    rows = np.concatenate([rows, rows[rng.integers(0, n, k - n)]])
  elif n < k:
    rows = np.concatenate([rows, np.zeros((k - n, 5), np.float32)])
    mask[n:] = False
  return rows, mask


def pixel_boxes(rows: np.ndarray, height: int, width: int) -> np.ndarray:
  """Normalised `(cx, cy, w, h, ...)` rows -> int64 `"n 4"` (x0, y0, x1, y1) pixel edges:
  MMBCD's `int((cx - w / 2) * W)` etc. (float64 from the float32 rows), kept inside the
  image and at least one pixel wide and high."""
  r = rows[:, :4].astype(np.float64)
  x0 = np.trunc((r[:, 0] - r[:, 2] / 2) * width)
  x1 = np.trunc((r[:, 0] + r[:, 2] / 2) * width)
  y0 = np.trunc((r[:, 1] - r[:, 3] / 2) * height)
  y1 = np.trunc((r[:, 1] + r[:, 3] / 2) * height)
  x0, y0 = np.clip(x0, 0, width - 1), np.clip(y0, 0, height - 1)
  x1, y1 = np.clip(np.maximum(x1, x0 + 1), 1, width), np.clip(np.maximum(y1, y0 + 1), 1, height)
  return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def _image(document: dict[str, Any]) -> np.ndarray:
  image = document.get("image")
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not (
      image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))) or min(
          image.shape[:2]) < 1:
    described = (f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray)
                 else type(image).__name__)
    raise CorruptRecord("bad_image", f"the image must be uint8 'H W' or 'H W 3', got "
                        f"{described}")
  return image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image


def crop_regions(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
  """uint8 `"k s s 3"`: each pixel box `(x0, y0, x1, y1)` of `image` ("H W" or "H W 3")
  resized to `size` square with PIL bilinear; grey replicated to 3 channels."""
  pil = Image.fromarray(image)
  crops = np.stack([np.asarray(pil.crop(tuple(int(v) for v in box)).resize(
      (size, size), Image.BILINEAR)) for box in boxes])
  return np.repeat(crops[..., None], 3, axis=-1) if crops.ndim == 3 else crops


def canvas(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 `"S S 1"`: the image in grey, resized (PIL bilinear) to `size` square if it is
  not already that size."""
  pil = Image.fromarray(image)
  if pil.mode != "L":
    pil = pil.convert("L")
  if pil.size != (size, size):
    pil = pil.resize((size, size), Image.BILINEAR)
  return np.asarray(pil)[..., None]


def canvas_boxes(boxes: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
  """Pixel boxes `(x0, y0, x1, y1)` of an "H W" image -> float32 `"k 4"` `(y0, x0, y1, x1)`
  on the `size` square canvas the image is resized to."""
  sy, sx = size / height, size / width
  return np.stack([boxes[:, 1] * sy, boxes[:, 0] * sx, boxes[:, 3] * sy, boxes[:, 2] * sx],
                  axis=1).astype(np.float32)


def text_tokens(text: str, tokenizer, seq_len: int) -> tuple[np.ndarray, int]:
  """int32 `"t"`: `BOS text EOS` right-padded to `seq_len`, cut keeping EOS; and 1 if it
  was cut, else 0."""
  ids = tokenizer.encode(text, bos=True, eos=True)
  truncated = int(len(ids) > seq_len)
  if truncated:
    ids = ids[:seq_len - 1] + [tokenizer.eos_id]
  return right_pad(ids, seq_len, tokenizer.pad_id), truncated


def build_regions(document: dict[str, Any], tokenizer, spec: RegionSpec, seq_len: int,
                  rng: np.random.Generator | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """One document -> a fixed-shape example and per-record stats.

  Args:
    document: `{"image", "boxes", "text", "label", "id"}` (module docstring).
    rng: draws `pad="duplicate"`'s duplicates; seed it by record and epoch for a
      deterministic, resumable stream.

  Returns:
    ({"tokens": int32 "t", "label": int32, "region_mask": bool "k", "region_scores":
      float32 "k", and "regions": uint8 "k s s 3" (crop="pipeline") or "image": uint8
      "S S 1" with "boxes": float32 "k 4" (y0, x0, y1, x1) canvas pixels
      (crop="device")}, stats) with `t = seq_len`, `k = spec.regions_per_example`.
  Raises:
    CorruptRecord: a missing or ill-typed image, label or text, malformed boxes, or
      (`empty="skip"`) no valid box.
  """
  name = document.get("id", "?")
  image = _image(document)
  label = document.get("label")
  if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
    raise CorruptRecord("bad_label", f"record {name!r}: label must be an int, got {label!r}")
  text = document.get("text")
  text = "" if text is None else text
  if not isinstance(text, str):
    raise CorruptRecord("bad_text", f"record {name!r}: text must be a str, got "
                        f"{type(text).__name__}")
  stats: dict[str, int] = {}
  if spec.whole_image:
    rows, mask = WHOLE_IMAGE_ROW, np.ones(1, bool)
  else:
    rows, stats = valid_boxes(document.get("boxes"))
    if not len(rows):
      if spec.empty == "skip":
        raise CorruptRecord("no_boxes", f"record {name!r} has no valid detector box "
                            f"({sum(stats.values()) - stats['boxes_clipped']} rows dropped: "
                            f"{ {k: v for k, v in stats.items() if v} }); set "
                            "data.regions.empty='whole_image' to use the whole image")
      stats["no_boxes_whole_image"] = 1
      rows = WHOLE_IMAGE_ROW
    rows, mask = select_boxes(rows, spec, rng)
  height, width = image.shape[:2]
  pixels = pixel_boxes(rows, height, width)
  tokens, stats["text_truncated"] = text_tokens(spec.prompt.replace("{text}", text).strip(),
                                                tokenizer, seq_len)
  example = {"tokens": tokens, "label": np.int32(label), "region_mask": mask,
             "region_scores": np.where(mask, rows[:, 4], 0).astype(np.float32)}
  if spec.crop == "pipeline":
    regions = np.zeros((len(mask), spec.region_size, spec.region_size, 3), np.uint8)
    regions[mask] = crop_regions(image, pixels[mask], spec.region_size)
    example["regions"] = regions
  else:
    example["image"] = canvas(image, spec.canvas_size)
    example["boxes"] = np.where(mask[:, None], canvas_boxes(
        pixels, height, width, spec.canvas_size), 0).astype(np.float32)
  return example, stats
