"""Video data: clip and labelled-frame sources, and the pipeline modes "video" and "segment".

Documents:
  clips   `{"video": uint8 "t h w 3", "masks": uint8 "t h w" (1: arm; optional), "id"}`;
  frames  `{"image": uint8 "h w 3", "mask": uint8 "h w" (0/1), "id"}`.

Sources (config `source.kind`):
  "video_world"         `VideoWorldClips`: clips of the embedded world
                        (`mmjax.data.video_world`), masks included;
  "video_world_frames"  `VideoWorldFrames`: one labelled frame of each of its clips;
  "bair_folder"         `BairFolder`: BAIR-style frame folders and mask images on disk,
                        as clips or as labelled frames.

Modes (`SequenceSpec.mode`, built by `build_video`; no tokenizer):
  "video"    `{"video": uint8 "t h w 3"}`;
  "segment"  `{"image": uint8 "h w 3", "mask": float32 "h w"}`.
`VideoSpec` (config.data.video) gives the clip length and resolution; `noise=True` is the
control: every image (every frame of a clip) is replaced by uniform uint8 noise drawn from
(the dataset's seed, the record index), the same on every pass, and masks are kept, so
what a model learns from it is what it can learn without the pixels.
"""

import dataclasses
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from mmjax import cli
from mmjax.data import video_world
from mmjax.data.sequences import CorruptRecord
from mmjax.data.sources import decode_full, read_image_file, resize_center_crop

MODES = ("video", "segment")
_NOISE_TAG = 0x6e6f6973  # the noise control's random stream


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  """What the video modes build: clips of `frames` frames, frames `resolution` px square;
  `noise`: images replaced by noise (the control), masks kept."""

  frames: int = 16
  resolution: int = 64
  noise: bool = False

  def __post_init__(self):
    if self.frames < 1 or self.resolution < 1:
      raise ValueError(f"frames and resolution must be at least 1, got frames={self.frames}, "
                       f"resolution={self.resolution}.")


def spec_of(config) -> VideoSpec:
  """The `VideoSpec` of `config.data.video`; a bad field is a `UserError` naming it."""
  try:
    return VideoSpec(**dict(config.data.get("video") or {}))
  except (TypeError, ValueError) as e:
    raise cli.UserError(f"config.data.video: {e}") from e


def noise_image(seed: int, index: int, shape: tuple[int, ...]) -> np.ndarray:
  """uint8 uniform noise of `shape`, a pure function of (seed, record index)."""
  return np.random.default_rng([seed, _NOISE_TAG, index]).integers(0, 256, shape, np.uint8)


def build_video(document: dict[str, Any], spec: VideoSpec, mode: str, seed: int, index: int
                ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """One clip or frame document -> `(example, stats)` of mode "video" or "segment".

  A clip longer than `spec.frames` keeps its first frames (the rest counted as
  `frames_cut`). Raises `CorruptRecord`: "bad_video" (not uint8 `"t r r 3"` with
  `r = resolution` and `t >= frames`), "bad_image", "no_mask", "bad_mask".
  """
  r = spec.resolution
  if mode == "video":
    video = document.get("video")
    video = None if video is None else np.asarray(video)
    if (video is None or video.dtype != np.uint8 or video.ndim != 4
        or video.shape[1:] != (r, r, 3) or len(video) < spec.frames):
      got = "none" if video is None else f"{video.dtype} {video.shape}"
      raise CorruptRecord("bad_video", f"a clip must be uint8 '>={spec.frames} {r} {r} 3' "
                          f"(config.data.video frames and resolution), got {got}")
    stats = {"frames_cut": len(video) - spec.frames}
    video = video[:spec.frames]
    if spec.noise:
      video = noise_image(seed, index, video.shape)
    return {"video": video}, stats
  if mode != "segment":
    raise ValueError(f"Unknown video mode {mode!r}; expected one of {MODES}.")
  image, mask = document.get("image"), document.get("mask")
  image = None if image is None else np.asarray(image)
  if image is None or image.dtype != np.uint8 or image.shape != (r, r, 3):
    got = "none" if image is None else f"{image.dtype} {image.shape}"
    raise CorruptRecord("bad_image", f"a frame must be uint8 '{r} {r} 3' (config.data.video."
                        f"resolution), got {got}")
  if mask is None:
    raise CorruptRecord("no_mask", "the record has no mask")
  mask = np.asarray(mask)
  if mask.shape != (r, r):
    raise CorruptRecord("bad_mask", f"the mask is {mask.shape}, its image {image.shape[:2]}")
  if spec.noise:
    image = noise_image(seed, index, image.shape)
  return {"image": image, "mask": (mask > 0).astype(np.float32)}, {}


# ------------------------------------------------------------------------- the video world

@dataclasses.dataclass(frozen=True)
class VideoWorldClips:
  """Clips 0 to `size - 1` of the video world's `split` (`video_world.VideoWorld`)."""

  split: str = "train"
  size: int = 10_000
  seed: int = 0
  frames: int = 16
  resolution: int = 64
  max_objects: int = 3

  def __post_init__(self):
    video_world.split_id(self.split)
    if self.size < 1:
      raise ValueError(f"size must be at least 1, got {self.size}.")
    self.world()  # checks the world's settings now, not at the first record

  def world(self) -> video_world.VideoWorld:
    return video_world.VideoWorld(self.seed, self.frames, self.resolution, self.max_objects)

  def __len__(self) -> int:
    return self.size

  def _check(self, index: int):
    if not 0 <= index < self.size:
      raise IndexError(f"Record {index} of a {self.size}-record video-world source.")

  def __getitem__(self, index: int) -> dict[str, Any]:
    self._check(index)
    return self.world().clip(self.split, index)


@dataclasses.dataclass(frozen=True)
class VideoWorldFrames(VideoWorldClips):
  """Labelled frames: record `i` is frame `VideoWorld.frame_index(split, i)` of clip `i`."""

  def __getitem__(self, index: int) -> dict[str, Any]:
    self._check(index)
    return self.world().frame(self.split, index)


# -------------------------------------------------------------------------------- on disk

BAIR_LAYOUT = ("<root>/<trajectory>/<i>.png: frame i (any image format Pillow reads, i an "
               "integer) of each trajectory folder; masks <mask_root>/<trajectory>/<i>.png "
               "(grey 0-255 or 0/1, 1 or white on the arm)")
RECORDS = ("clips", "frames")


def _numbered(folder: epath.Path) -> dict[int, str]:
  """`{i: file name}` of the files `<i>.<ext>` in `folder` (others are ignored)."""
  out = {}
  for path in folder.iterdir():
    stem = path.name.split(".", 1)[0]
    if stem.isdigit() and "." in path.name and not path.is_dir():
      out[int(stem)] = path.name
  return out


def _trajectories(root: str) -> dict[str, dict[int, str]]:
  folder = epath.Path(root)
  if not folder.is_dir():
    return {}
  found = {}
  for path in sorted(folder.iterdir(), key=lambda p: p.name):
    if path.is_dir():
      numbered = _numbered(path)
      if numbered:
        found[path.name] = numbered
  return found


def _fit(image: Image.Image, size: int) -> np.ndarray:
  """uint8 `"size size 3"`: a frame brought to `size` square (`resize_center_crop`), as
  is when it already is."""
  if image.size == (size, size):
    return np.asarray(image)
  return resize_center_crop(image, size)


def _fit_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """uint8 0/1 `"size size"`: a 0/1 mask cropped and resized as its frame is (nearest)."""
  if mask.shape == (size, size):
    return mask
  rgb = Image.fromarray(mask * 255).convert("RGB")
  return (resize_center_crop(rgb, size, Image.Resampling.NEAREST)[..., 0] > 127).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class BairFolder:
  """BAIR-style frames on disk: `<root>/<trajectory>/<i>.png` (`BAIR_LAYOUT`).

  Records:
    "clips": every `frames` consecutive frames of a trajectory, starting at its first and
      moving by `stride` (default `frames`: clips do not overlap) while a whole clip fits:
      `{"video", "id": "<trajectory>/<first i>"}`, with `"masks"` when `mask_root` has a
      mask for each of its frames.
    "frames": each frame that has a mask: `{"image", "mask", "id": "<trajectory>/<i>"}`.
  Frames and masks are brought to `resolution` (bicubic, masks nearest) where they are
  another size; a mask (binarised at half its range: 0/1 masks at 1, 0-255 ones at 128)
  must be its frame's size. The folders are listed when the source is made; an empty
  root, or no mask at all for "frames", is a ValueError naming the path and the layout.
  Per record: a missing frame (a gap in the numbering) or unreadable file
  (`missing_image`, `bad_image`, `unsupported_image`) or a mask of another size
  (`mask_size`) is a `CorruptRecord` the pipeline counts.
  """

  root: str
  mask_root: str = ""
  records: str = "clips"
  frames: int = 16
  resolution: int = 64
  stride: int = 0
  _items: tuple[tuple[str, int], ...] = dataclasses.field(init=False, repr=False,
                                                          compare=False)
  _files: dict = dataclasses.field(init=False, repr=False, compare=False)
  _masks: dict = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if self.records not in RECORDS:
      raise ValueError(f"records={self.records!r}; expected one of {RECORDS}.")
    if self.frames < 1 or self.resolution < 1 or self.stride < 0:
      raise ValueError(f"frames and resolution must be at least 1 and stride at least 0; got "
                       f"frames={self.frames}, resolution={self.resolution}, "
                       f"stride={self.stride}.")
    files = _trajectories(self.root)
    if not files:
      raise ValueError(f"No frames found under {self.root!r}; expected {BAIR_LAYOUT}.")
    masks = _trajectories(self.mask_root) if self.mask_root else {}
    if self.records == "frames":
      if not masks:
        raise ValueError(f"records='frames' needs masks, and none were found under "
                         f"mask_root={self.mask_root!r}; expected {BAIR_LAYOUT}.")
      items = [(t, i) for t in sorted(masks) for i in sorted(masks[t])]
    else:
      stride = self.stride or self.frames
      items = [(t, start) for t in sorted(files)
               for start in range(min(files[t]), max(files[t]) - self.frames + 2, stride)]
      if not items:
        raise ValueError(f"No trajectory under {self.root!r} has {self.frames} frames for a "
                         f"clip (frames={self.frames}); expected {BAIR_LAYOUT}.")
    object.__setattr__(self, "_items", tuple(items))
    object.__setattr__(self, "_files", files)
    object.__setattr__(self, "_masks", masks)

  def __len__(self) -> int:
    return len(self._items)

  def _frame(self, trajectory: str, i: int) -> Image.Image:
    name = self._files.get(trajectory, {}).get(i)
    where = f"{self.root}/{trajectory}"
    if name is None:
      raise CorruptRecord("missing_image", f"{where}: no frame {i}")
    return Image.fromarray(read_image_file(epath.Path(where) / name, where, decode_full))

  def _mask(self, trajectory: str, i: int, size: tuple[int, int]) -> np.ndarray:
    where = f"{self.mask_root}/{trajectory}"
    grey = read_image_file(epath.Path(where) / self._masks[trajectory][i], where,
                           lambda data: decode_full(data, grey=True))
    if grey.shape[::-1] != size:
      raise CorruptRecord("mask_size", f"{where}: mask {i} is {grey.shape[1]}x{grey.shape[0]}, "
                          f"its frame {size[0]}x{size[1]}")
    binary = grey >= (1 if grey.max(initial=0) <= 1 else 128)
    return _fit_mask(binary.astype(np.uint8), self.resolution)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f"Record {index} of a {len(self)}-record BAIR folder.")
    trajectory, first = self._items[index]
    if self.records == "frames":
      frame = self._frame(trajectory, first)
      return {"image": _fit(frame, self.resolution),
              "mask": self._mask(trajectory, first, frame.size), "id": f"{trajectory}/{first}"}
    frames = [self._frame(trajectory, i) for i in range(first, first + self.frames)]
    clip = {"video": np.stack([_fit(f, self.resolution) for f in frames]),
            "id": f"{trajectory}/{first}"}
    labelled = self._masks.get(trajectory, {})
    if all(i in labelled for i in range(first, first + self.frames)):
      clip["masks"] = np.stack([self._mask(trajectory, first + k, f.size)
                                for k, f in enumerate(frames)])
    return clip
