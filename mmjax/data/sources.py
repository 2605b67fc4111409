"""Real data on disk: ArrayRecord shards (written by `mmjax.data.convert` or any tool
following the record format below), webdataset tar shards, and TFDS sources.

Record format (one ArrayRecord record, written with `group_size:1` for random access):
a msgpack map `{"v": 1, "content": [item, ...]}` where each item is either a `str`
(a piece of text) or `bytes` (one encoded image, JPEG or PNG, any size). An image-caption
pair is `[image, caption]`; an interleaved document lists its texts and images in reading
order, each image placed before the text it illustrates. msgpack keeps `str` and `bytes`
apart, so no schema beyond this is needed, and any language with a msgpack library can
read the shards. A record may name its `"kind"`: LLaVA conversations (`"conversation"`)
hold `[json, image, ...]`, the JSON text `{"id", "conversations"}` of the record followed
by its encoded images in `<image>` order; records without a kind are pairs or documents.
Each reader takes its own kind only, so a shard given to the wrong reader is counted
(`bad_record`), not misread.

Reading a record turns it into a pipeline document `{"images": uint8 "n s s 3", "text"}`
in the OpenFlamingo layout: text before the first image stays as leading text; each image
starts a chunk `<image>text ... <|endofchunk|>`; texts that follow an image (up to the
next image) join its chunk, separated by `text_separator`.

Images are decoded with Pillow at read time, turned upright (EXIF), made 8-bit RGB
(`to_rgb`: 16-bit scaled, transparent pixels over white) and brought to `image_size` the
way CLIP preprocesses: the shorter side is resized to `image_size` (bicubic) and the
centre square is kept. Records that cannot be read raise `CorruptRecord` ("bad_record",
"bad_image", "unsupported_image", "missing_image", "empty_text", "image_count"), which
the pipeline counts per reason; nothing is dropped silently.

The same holds for webdataset / img2dataset tar shards, read directly (`WebDatasetPairs`,
`WebDatasetDocuments`).

Labelled medical data (MedCLIP's): a CheXpert / MIMIC-CXR-style CSV of image paths and
label columns (`LabelledImages`), a sentence-label table (`LabelledSentences`), MedCLIP's
decoupled pairing of the two (`LabelledDecoupled`, `DecoupledPairs`) and CheXpert
5x200-style zero-shot classification (`LabelledClasses`). Label cells are 1, 0, -1 or
blank (NaN); any other value stops the source when it is made, naming the file, line and
column. Missing or undecodable images are counted skips, as above.

Mammograms as MMBCD reads them (`MammoFolder`): a CSV of image paths, clinical histories
and labels, full-resolution grey images and a detector's per-image box files, read as
documents `{"image": uint8 "h w", "boxes": float32 "n 5", "text", "label", "id"}`.

LLaVA's instruction data (`LlavaJson`): the JSON list or JSONL of `{"id", "image",
"conversations"}` records with an image folder, read as conversation documents
`{"id", "images": uint8 "n s s 3", "conversations"}` (`mmjax.data.conversation`), and the
same records converted to ArrayRecord (`ArrayRecordConversations`). Images are brought to
`image_size` as LLaVA does: "crop" as above (LLaVA's default, stage 1) or "pad" (LLaVA-1.5's
`expand2square`: padded to a centred square of `pad_colour`, the processor's mean colour,
then resized) or "anyres" (LLaVA-1.6: each image as its base view and tiles,
`mmjax.data.anyres.views`, `"n v s s 3"`, with its original size in `image_sizes "n 2"`).
"""

import base64
import dataclasses
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
from absl import logging
from array_record.python.array_record_data_source import ArrayRecordDataSource
from etils import epath
from PIL import Image, ImageOps

from mmjax.data import anyres
from mmjax.data.sequences import CorruptRecord
from mmjax.data.shapes_world import ENDOFCHUNK_TOKEN, MEDIA_TOKEN

RECORD_VERSION = 1
SHARD_PATTERN = re.compile(r"-(\d{5})-of-(\d{5})\.array_record$")


# ------------------------------------------------------------------------------------ records

CONVERSATION = "conversation"  # the record kind of LLaVA conversations


def encode_record(content: Sequence[str | bytes], kind: str | None = None) -> bytes:
  """Texts (`str`) and encoded images (`bytes`) in reading order -> one record; `kind`
  marks records that only their own reader takes (`CONVERSATION`)."""
  for i, item in enumerate(content):
    if not isinstance(item, (str, bytes)):
      raise TypeError(f"Record item {i} is a {type(item).__name__}; items must be str "
                      "(text) or bytes (an encoded image).")
  record = {"v": RECORD_VERSION, "content": list(content)}
  if kind is not None:
    record["kind"] = kind
  return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes, kind: str | None = None) -> list[str | bytes]:
  """One record of `kind` (None: pairs and documents) -> its content;
  `CorruptRecord("bad_record")` if it is no such record."""
  try:
    record = msgpack.unpackb(data, raw=False)
  except Exception as error:
    raise CorruptRecord("bad_record", f"not a msgpack record ({type(error).__name__}: "
                        f"{error})") from error
  if not isinstance(record, dict) or record.get("v") != RECORD_VERSION:
    version = record.get("v") if isinstance(record, dict) else None
    raise CorruptRecord("bad_record", f"expected a version-{RECORD_VERSION} mmjax record, got "
                        f"version {version!r}; re-convert the data with mmjax.data.convert")
  content = record.get("content")
  if not isinstance(content, list) or not all(isinstance(x, (str, bytes)) for x in content):
    raise CorruptRecord("bad_record", "'content' must be a list of str and bytes items")
  if record.get("kind") != kind:
    readers = {None: "arrayrecord_pairs or arrayrecord_documents",
               CONVERSATION: "arrayrecord_conversations"}
    raise CorruptRecord("bad_record", f"a record of kind {record.get('kind') or 'pair/document'!r}"
                        f", not {kind or 'pair/document'!r}; read it with source kind "
                        f"{readers.get(record.get('kind'), 'its own reader')}")
  return content


def interleave(content: Sequence[str | bytes],
               text_separator: str = " ") -> tuple[str, list[bytes]]:
  """Content items -> (text in the OpenFlamingo layout, the images in order)."""
  parts: list[str] = []
  images: list[bytes] = []
  texts: list[str] = []  # the texts of the current chunk (or the leading text)

  def flush():
    parts.append(text_separator.join(texts))
    texts.clear()

  for item in content:
    if isinstance(item, bytes):
      flush()
      if images:
        parts.append(ENDOFCHUNK_TOKEN)
      parts.append(MEDIA_TOKEN)
      images.append(item)
    elif item:
      texts.append(item)
  flush()
  if images:
    parts.append(ENDOFCHUNK_TOKEN)
  return "".join(parts), images


# ------------------------------------------------------------------------------------- images

class UnsupportedImage(ValueError):
  """A decodable image whose pixel values have no defined meaning as 8-bit RGB."""


BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over


def to_rgb(image: Image.Image) -> Image.Image:
  """An 8-bit RGB image with the same appearance as `image`, whatever its mode.

  - `1`, `L`, `RGB`, `CMYK`, `YCbCr`, palette `P`: Pillow's conversion (CMYK naively:
    `R = (255 - C) (255 - K) / 255`, no colour profile).
  - 16-bit and 32-bit integer (`I;16`, `I;16B`, `I;16L`, `I`, as 16-bit PNGs and TIFFs
    open): scaled from [0, 65535] to [0, 255] (`round(v / 257)`), not clipped to white;
    values outside [0, 65535] raise `UnsupportedImage`.
  - 32-bit float (`F`): values in [0, 1] are scaled by 255; any other range is ambiguous
    and raises `UnsupportedImage`.
  - Alpha (`RGBA`, `LA`, `PA`, premultiplied `RGBa`/`La`, and `P`/`L`/`RGB` with a
    transparent colour): composited over white (`BACKGROUND`); the colour of transparent
    pixels is arbitrary, often black, and must not show.
  """
  mode = image.mode
  if mode == "I" or mode.startswith("I;16"):
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
      raise UnsupportedImage(f"a {mode} image with values in [{values.min()}, {values.max()}] "
                             "outside the 16-bit range [0, 65535]")
    return Image.fromarray(np.round(values / 257).astype(np.uint8), "L").convert("RGB")
  if mode == "F":
    values = np.asarray(image, np.float64)
    if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0
                            and values.max() <= 1):
      raise UnsupportedImage(f"a 32-bit float image with values in [{np.nanmin(values)}, "
                             f"{np.nanmax(values)}]; float images must hold values in [0, 1]")
    return Image.fromarray(np.round(values * 255).astype(np.uint8), "L").convert("RGB")
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or image.has_transparency_data:
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, image).convert("RGB")
  return image.convert("RGB")


def open_image(data: bytes, draft_size: int | None = None) -> Image.Image:
  """Fully decoded image from encoded bytes, in its own mode; raises on any decoding
  problem.

  `draft_size` lets JPEG decoding downscale by a power of two while both sides stay at
  least that large: much faster for large photos, and the later resize still samples
  down from at least the target size.
  """
  image = Image.open(io.BytesIO(data))
  if draft_size is not None and image.format == "JPEG":
    image.draft("RGB", (draft_size, draft_size))
  image.load()  # decoding is lazy: truncated data fails here, not later
  return image


def load_image(data: bytes, draft_size: int | None = None) -> Image.Image:
  """Encoded image bytes -> upright (EXIF orientation applied) 8-bit RGB image.

  The one place where images are decoded, for the readers and for `mmjax.data.convert`.
  Raises `UnsupportedImage` (see `to_rgb`) or the decoder's error.
  """
  return to_rgb(ImageOps.exif_transpose(open_image(data, draft_size)))


def resize_center_crop(image: Image.Image, size: int,
                       resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
  """uint8 `"size size 3"`: shorter side resized to `size` (bicubic, or `resample`: nearest
  for masks), centre square kept."""
  image = to_rgb(image)  # a no-op for images from `load_image`
  width, height = image.size
  side = min(width, height)
  box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
  return np.asarray(image.resize((size, size), resample, box=box), np.uint8)


# CLIP's normalisation mean, and LLaVA-1.5's padding colour from it:
# `tuple(int(x * 255) for x in image_mean)`.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def mean_colour(image_mean: Sequence[float]) -> tuple[int, ...]:
  """An image processor's mean -> LLaVA's padding colour (truncated, as LLaVA does)."""
  return tuple(int(x * 255) for x in image_mean)


CLIP_PAD_COLOUR = mean_colour(CLIP_MEAN)  # (122, 116, 104)
ASPECT_RATIOS = ("crop", "pad", "anyres")


def expand_to_square(image: Image.Image, colour: Sequence[int]) -> Image.Image:
  """LLaVA-1.5's `expand2square`: `image` on a square of `colour` as wide as its longer
  side, centred (the odd pixel of padding after it: offset `(side - w) // 2`)."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  square = Image.new(image.mode, (side, side), tuple(colour))
  square.paste(image, ((side - width) // 2, (side - height) // 2))
  return square


def decode_image(data: bytes, size: int, pad_colour: Sequence[int] | None = None) -> np.ndarray:
  """Encoded image -> uint8 `"size size 3"`; with `pad_colour`, padded to a square of that
  colour first (`expand_to_square`). `CorruptRecord("bad_image")` if undecodable,
  `CorruptRecord("unsupported_image")` if its values have no 8-bit meaning (`to_rgb`).

  Padded images are decoded at full size: a JPEG drafted to a smaller scale would round
  the padding's offset at that scale and shift the image against LLaVA's.
  """
  try:
    image = load_image(data, draft_size=size if pad_colour is None else None)
    if pad_colour is not None:
      image = expand_to_square(image, pad_colour)
    return resize_center_crop(image, size)
  except UnsupportedImage as error:
    raise CorruptRecord("unsupported_image", f"{len(data)}-byte image: {error}") from error
  except Exception as error:
    raise CorruptRecord("bad_image", f"cannot decode a {len(data)}-byte image "
                        f"({type(error).__name__}: {error})") from error


def decode_full(data: bytes, grey: bool = False) -> np.ndarray:
  """Encoded image -> uint8 `"h w 3"` at full size (anyres tiles it), or `"h w"` with
  `grey` (mammograms: grey images are read exactly, 16-bit ones scaled as `to_rgb` does,
  colour ones by luma), with `decode_image`'s `CorruptRecord`s."""
  try:
    image = load_image(data)
    return np.asarray(image.convert("L") if grey else image, np.uint8)
  except UnsupportedImage as error:
    raise CorruptRecord("unsupported_image", f"{len(data)}-byte image: {error}") from error
  except Exception as error:
    raise CorruptRecord("bad_image", f"cannot decode a {len(data)}-byte image "
                        f"({type(error).__name__}: {error})") from error


def _stack(images: list[np.ndarray], size: int) -> np.ndarray:
  return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


# ------------------------------------------------------------------------------------- shards

def resolve_shards(paths: str | Sequence[str], kind: str = "ArrayRecord") -> list[str]:
  """Globs, brace patterns (`{000..009}`) or file names (local or any `etils.epath` file
  system) -> shard paths.

  Raises when a glob matches nothing, a named file is missing, or a glob matches an
  incomplete set of `NAME-iiiii-of-nnnnn.array_record` shards: a partly copied data set
  would otherwise train on a silent subset. Files named one by one are taken as given.
  """
  patterns = [paths] if isinstance(paths, str) else list(paths)
  if not patterns:
    raise ValueError(f"No {kind} paths given; pass a file, a glob or a list of them.")
  files: list[str] = []
  for pattern in (p for given in patterns for p in expand_braces(given)):
    path = epath.Path(pattern)
    if not any(c in pattern for c in "*?["):
      if not path.exists():
        raise FileNotFoundError(f"{kind} file {pattern!r} does not exist.")
      files.append(str(path))
      continue
    if any(c in str(path.parent) for c in "*?["):
      raise ValueError(f"Wildcards are supported in file names only, not in directories: "
                       f"{pattern!r}.")
    matches = sorted(str(p) for p in path.parent.glob(path.name))
    if not matches:
      hint = (", or write shards with `python -m mmjax.data.convert`" if kind == "ArrayRecord"
              else "")
      raise FileNotFoundError(f"No {kind} files match {pattern!r}; check the path{hint}.")
    _check_complete(pattern, matches)
    files.extend(matches)
  return files


def _check_complete(pattern: str, files: list[str]):
  sets: dict[tuple[str, int], set[int]] = {}
  for file in files:
    if match := SHARD_PATTERN.search(file):
      sets.setdefault((file[:match.start()], int(match[2])), set()).add(int(match[1]))
  for (prefix, count), found in sets.items():
    if len(found) != count:
      missing = sorted(set(range(count)) - found)
      raise FileNotFoundError(
          f"{pattern!r} matches only {len(found)} of the {count} shards of {prefix!r} (missing "
          f"shards {missing[:5]}{' ...' * (len(missing) > 5)}); copy the complete set.")


# ------------------------------------------------------------------------------------ sources

@dataclasses.dataclass(frozen=True)
class ArrayRecordDocuments:
  """Interleaved image-text documents from ArrayRecord shards (see the module docstring).

  Attributes:
    paths: a glob, a file, or a list of them.
    image_size: images come out `"image_size image_size 3"`.
    text_separator: joins consecutive texts of one chunk.
  """

  paths: str | tuple[str, ...]
  image_size: int
  text_separator: str = " "
  _records: ArrayRecordDataSource = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if not isinstance(self.paths, str):
      object.__setattr__(self, "paths", tuple(self.paths))
    if self.image_size <= 0:
      raise ValueError(f"image_size must be positive, got {self.image_size}.")
    object.__setattr__(self, "_records", ArrayRecordDataSource(resolve_shards(self.paths)))

  def __len__(self) -> int:
    return len(self._records)

  def content(self, index: int) -> list[str | bytes]:
    """Record `index` as stored: texts and encoded images."""
    return decode_record(self._records[index])

  def __getitem__(self, index: int) -> dict[str, Any]:
    return _document(self.content(index), self.image_size, self.text_separator)


@dataclasses.dataclass(frozen=True)
class ArrayRecordPairs(ArrayRecordDocuments):
  """Image-caption pairs from ArrayRecord shards, as one-chunk documents.

  Reads the same records as `ArrayRecordDocuments` but insists on exactly one image, so a
  documents shard given by mistake is reported (`image_count`) instead of training a
  contrastive model on multi-image records.
  """

  def content(self, index: int) -> list[str | bytes]:
    content = super().content(index)
    num_images = sum(isinstance(x, bytes) for x in content)
    if num_images != 1:
      raise CorruptRecord("image_count", f"a pair needs exactly one image, the record has "
                          f"{num_images}; is this a documents shard?")
    return content


def _lookup(example: dict[str, Any], key: str, name: str) -> Any:
  """`example["a"]["b"]` for `key="a/b"`, with an error that lists what is there."""
  value: Any = example
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      available = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise KeyError(f"TFDS dataset {name!r} has no feature {key!r} (at {part!r}: found "
                     f"{available}); set image_key / text_key.")
    value = value[part]
  return value


@dataclasses.dataclass(frozen=True)
class TfdsPairs:
  """Image-caption pairs from a prepared TFDS data set, read with `tfds.data_source`.

  The data set must have been prepared with `file_format="array_record"`: random access
  needs it, and reading it then needs no TensorFlow. Images are read as encoded bytes and
  decoded like ArrayRecord images. When the text feature holds several captions, record
  `i` takes caption `i % count`: deterministic, and every caption is used across records.

  Attributes:
    name: the TFDS name, optionally with config and version (`"coco_captions/2017:1.1.0"`).
    image_key: an Image feature; `"/"` reaches into nested features.
    text_key: a Text feature or a sequence of them (`"captions/text"`).
  """

  name: str
  image_size: int
  split: str = "train"
  data_dir: str | None = None
  image_key: str = "image"
  text_key: str = "caption"
  _source: Any = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    decoders: dict[str, Any] = {}
    node = decoders
    *parents, leaf = self.image_key.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = tfds.decode.SkipDecoding()
    try:
      source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                download=False, decoders=decoders)
    except Exception as error:
      raise ValueError(
          f"Cannot open TFDS data set {self.name!r} (split {self.split!r}, data_dir "
          f"{self.data_dir!r}). It must be prepared in data_dir with "
          "file_format='array_record' (e.g. `tfds build NAME --file_format=array_record "
          "--data_dir=DIR`); nothing is downloaded here. TFDS said: "
          f"{type(error).__name__}: {error}") from error
    object.__setattr__(self, "_source", source)
    if len(source):  # a wrong feature name fails here, not as endless unreadable records
      example = source[0]
      image = _lookup(example, self.image_key, self.name)
      if not isinstance(image, bytes):
        raise ValueError(f"TFDS feature {self.image_key!r} of {self.name!r} holds a "
                         f"{type(image).__name__}, not an encoded image; image_key must name "
                         "a tfds.features.Image.")
      _lookup(example, self.text_key, self.name)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    image = decode_image(_lookup(example, self.image_key, self.name), self.image_size)
    text = _lookup(example, self.text_key, self.name)
    if isinstance(text, (list, tuple, np.ndarray)):
      if len(text) == 0:
        raise CorruptRecord("empty_text", f"feature {self.text_key!r} holds no captions")
      text = text[index % len(text)]
    if isinstance(text, (bytes, np.bytes_)):
      text = bytes(text).decode("utf-8")
    if not isinstance(text, str) or not text.strip():
      raise CorruptRecord("empty_text", f"feature {self.text_key!r} is empty")
    return {"images": image[None], "text": f"{MEDIA_TOKEN}{text.strip()}{ENDOFCHUNK_TOKEN}"}



# -------------------------------------------------------------------------------- webdataset

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
  """`"a-{000..002}.tar"` -> `["a-000.tar", "a-001.tar", "a-002.tar"]`; `"{x,y}"` lists.

  The brace notation of webdataset and img2dataset: a numeric range keeps the width of
  its first bound (zero padding); several braces expand as a product.
  """
  match = _BRACES.search(pattern)
  if match is None:
    return [pattern]
  body = match[1]
  if (bounds := re.fullmatch(r"(\d+)\.\.(\d+)", body)) is not None:
    low, high = bounds[1], bounds[2]
    if int(low) > int(high):
      raise ValueError(f"Empty range {{{body}}} in {pattern!r}.")
    options = [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]
  else:
    options = body.split(",")
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _split_member(name: str) -> tuple[str, str]:
  """webdataset's rule: the key is the member path up to the first dot of its file name,
  the extension (lower-cased) is the rest: `"dir/000001.0.jpg"` -> `("dir/000001", "0.jpg")`."""
  folder, _, base = name.rpartition("/")
  stem, dot, extension = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


@dataclasses.dataclass(frozen=True)
class _TarIndex:
  """Where every member of every sample is: one row per member, grouped by sample.

  Attributes:
    shards: the tar files.
    keys: `"n"` sample keys.
    shard: int32 `"n"`, the shard of each sample.
    start: int64 `"n+1"`, each sample's first row (rows of sample i: start[i]:start[i+1]).
    extensions: `"m"` member extensions; offset, size: int64 `"m"` data offsets and sizes.
  """

  shards: tuple[str, ...]
  keys: np.ndarray
  shard: np.ndarray
  start: np.ndarray
  extensions: np.ndarray
  offset: np.ndarray
  size: np.ndarray
  problems: tuple[str, ...]

  @classmethod
  def build(cls, shards: Sequence[str]) -> "_TarIndex":
    """Reads the member headers of every shard once (no member data is read)."""
    keys, shard_ids, start, extensions, offsets, sizes, problems = [], [], [], [], [], [], []
    for shard_id, path in enumerate(shards):
      if re.search(r"\.(tgz|tar\.gz|tar\.bz2|tar\.xz|tar\.zst)$", path):
        raise ValueError(f"{path} is a compressed tar: its members cannot be read by offset. "
                         "Decompress the shards (e.g. `gunzip`) and read the .tar files.")
      previous = None
      length = os.path.getsize(path)
      try:
        with tarfile.open(path, "r:") as archive:
          for member in archive:
            if not member.isfile():
              continue
            if member.offset_data + member.size > length:
              # Indexed all the same: reading it fails, counted as the bad record it is.
              problems.append(f"{path}: cut short inside member {member.name!r}; the "
                              "shard is incomplete")
              logging.warning("Tar shard %s", problems[-1])
            key, extension = _split_member(member.name)
            if key != previous:  # webdataset keeps a sample's members together
              keys.append(key)
              shard_ids.append(shard_id)
              start.append(len(offsets))
              previous = key
            extensions.append(extension)
            offsets.append(member.offset_data)
            sizes.append(member.size)
          end = archive.offset
        # tarfile ends quietly at a damaged header; a whole shard ends in zero blocks.
        if not _only_zeros(path, end):
          raise tarfile.ReadError(f"a damaged member header at byte {end}")
      except tarfile.ReadError as error:
        if previous is None:
          raise ValueError(f"{path} is not a readable tar file ({error}).") from error
        # A cut or damaged shard: the samples before the damage are kept, the rest of the
        # shard is lost and said so (a sample cut short fails, counted, when read).
        problems.append(f"{path}: unreadable after sample {previous!r} ({error}); the rest "
                        "of the shard is skipped")
        logging.warning("Tar shard %s", problems[-1])
    start.append(len(offsets))
    return cls(tuple(shards), np.array(keys, object), np.array(shard_ids, np.int32),
               np.array(start, np.int64), np.array(extensions, object),
               np.array(offsets, np.int64), np.array(sizes, np.int64), tuple(problems))

  def __len__(self) -> int:
    return len(self.keys)

  def members(self, index: int) -> dict[str, tuple[int, int]]:
    """`{extension: (offset, size)}` of sample `index`."""
    rows = range(self.start[index], self.start[index + 1])
    return {self.extensions[r]: (int(self.offset[r]), int(self.size[r])) for r in rows}


def _only_zeros(path: str, start: int) -> bool:
  with open(path, "rb") as file:
    file.seek(start)
    while chunk := file.read(1 << 20):
      if chunk.count(0) != len(chunk):
        return False
  return True


_OPEN_SHARDS: dict[tuple[int, str], int] = {}  # (process id, path) -> file descriptor


def _read_member(path: str, offset: int, size: int) -> bytes:
  """`size` bytes at `offset` of `path`; `os.pread` leaves no shared file position, so
  Grain's reader threads can share one descriptor per shard and process."""
  key = (os.getpid(), path)
  if key not in _OPEN_SHARDS:
    _OPEN_SHARDS[key] = os.open(path, os.O_RDONLY)
  data = os.pread(_OPEN_SHARDS[key], size, offset)
  if len(data) != size:
    raise CorruptRecord("bad_record", f"a member of {path} at byte {offset} is cut short "
                        f"({len(data)} of {size} bytes)")
  return data


@dataclasses.dataclass(frozen=True)
class WebDatasetPairs:
  """Image-caption pairs read directly from webdataset / img2dataset tar shards.

  A sample is the tar members sharing a key (`000001.jpg`, `000001.txt`, `000001.json`):
  its image is the member with an image extension (`jpg`, `jpeg`, `png`, `webp`, ...), its
  caption the `.txt` member or, without one, `caption_key` of the `.json` member (as
  img2dataset writes them). An index of member offsets is built once when the source is
  made (member headers only), so reading is random access, as Grain needs. Tar files must
  be uncompressed. Samples without an image or a caption, undecodable images and damaged
  members are skipped and counted by the pipeline like other bad records.

  Attributes:
    paths: shard files, globs or webdataset brace patterns (`".../{00000..00009}.tar"`),
      or a list of them.
    image_size: images come out `"image_size image_size 3"`.
    caption_key: the caption field of `.json` members.
  """

  paths: str | tuple[str, ...]
  image_size: int
  caption_key: str = "caption"
  _index: _TarIndex = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if not isinstance(self.paths, str):
      object.__setattr__(self, "paths", tuple(self.paths))
    if self.image_size <= 0:
      raise ValueError(f"image_size must be positive, got {self.image_size}.")
    object.__setattr__(self, "_index", _TarIndex.build(resolve_shards(self.paths, "tar")))

  def __len__(self) -> int:
    return len(self._index)

  def members(self, index: int) -> dict[str, bytes]:
    """Sample `index` as stored: `{extension: bytes}`."""
    path = self._index.shards[self._index.shard[index]]
    return {extension: _read_member(path, offset, size)
            for extension, (offset, size) in self._index.members(index).items()}

  def _where(self, index: int) -> str:
    return (f"sample {self._index.keys[index]!r} of "
            f"{self._index.shards[self._index.shard[index]]}")

  def content(self, index: int) -> list[str | bytes]:
    members = self.members(index)
    images = [members[e] for e in members if e in IMAGE_EXTENSIONS]
    if len(images) != 1:
      raise CorruptRecord("image_count", f"{self._where(index)} has {len(images)} image "
                          f"members ({sorted(members)}); a pair needs exactly one")
    if "txt" in members:
      caption = _utf8(members["txt"], self._where(index))
    elif "json" in members:
      caption = _json(members["json"], self._where(index)).get(self.caption_key)
    else:
      raise CorruptRecord("empty_text", f"{self._where(index)} has no .txt or .json member "
                          f"({sorted(members)})")
    if not isinstance(caption, str) or not caption.strip():
      raise CorruptRecord("empty_text", f"{self._where(index)} has no caption "
                          f"({self.caption_key!r}: {caption!r})")
    return [images[0], caption.strip()]

  def __getitem__(self, index: int) -> dict[str, Any]:
    return _document(self.content(index), self.image_size, " ")


@dataclasses.dataclass(frozen=True)
class WebDatasetDocuments(WebDatasetPairs):
  """Interleaved documents read directly from tar shards: one `.json` member per sample.

  The `.json` holds one document in either layout (the images are in the same sample):
  - OBELICS: `{"texts": [str | null, ...], "images": [name | null, ...]}`, position `i`
    holding a text or an image in reading order; an image `name` is a member of the
    sample given by its extension (`"0.jpg"` for `000001.0.jpg`) or its full name.
  - MMC4, as OpenFlamingo's MMC4 shards hold it: `{"text_list": [sentence, ...],
    "image_info": [{"matched_text_index": i, "image_base64": ...} or {...,
    "image_name": name}, ...]}`; each image goes right before its matched sentence.
  A document becomes the OpenFlamingo layout as ArrayRecord documents do (see
  `interleave`). Any image that cannot be found or decoded skips the document, counted.

  Attributes:
    text_separator: joins consecutive texts of one chunk.
  """

  text_separator: str = " "

  def content(self, index: int) -> list[str | bytes]:
    members = self.members(index)
    where = self._where(index)
    if "json" not in members:
      raise CorruptRecord("bad_record", f"{where} has no .json document ({sorted(members)})")
    document = _json(members["json"], where)

    def image(reference: Any) -> bytes:
      if isinstance(reference, dict) and isinstance(reference.get("image_base64"), str):
        try:
          return base64.b64decode(reference["image_base64"], validate=True)
        except ValueError as error:
          raise CorruptRecord("bad_image", f"{where}: image_base64 is not base64") from error
      name = reference.get("image_name") if isinstance(reference, dict) else reference
      if isinstance(name, str):
        extension = name.lower()
        if name.startswith(f"{self._index.keys[index]}."):
          extension = _split_member(name)[1]
        if extension in members:
          return members[extension]
      raise CorruptRecord("missing_image", f"{where}: image {reference!r:.80} is not a member "
                          f"of the sample ({sorted(members)})")

    if "texts" in document and "images" in document:
      texts, images = document["texts"], document["images"]
      if not (isinstance(texts, list) and isinstance(images, list)
              and len(texts) == len(images)):
        raise CorruptRecord("bad_record", f"{where}: 'texts' and 'images' must be lists of "
                            "one length")
      content = []
      for text, reference in zip(texts, images, strict=True):
        if reference is not None:
          content.append(image(reference))
        elif isinstance(text, str):
          content.append(text.strip())
        elif text is not None:
          raise CorruptRecord("bad_record", f"{where}: a text is a {type(text).__name__}")
      return content
    if isinstance(document.get("text_list"), list) and isinstance(
        document.get("image_info"), list):
      sentences = document["text_list"]
      if not all(isinstance(s, str) for s in sentences):
        raise CorruptRecord("bad_record", f"{where}: 'text_list' holds a non-string")
      matched = []
      for info in document["image_info"]:
        position = info.get("matched_text_index") if isinstance(info, dict) else None
        if (not isinstance(position, int) or isinstance(position, bool)
            or not 0 <= position < len(sentences)):
          raise CorruptRecord("bad_record", f"{where}: matched_text_index {position!r} is "
                              f"not in [0, {len(sentences)})")
        matched.append((position, image(info)))
      return mmc4_order([s.strip() for s in sentences], matched)
    raise CorruptRecord("bad_record", f"{where}: the .json holds neither 'texts'/'images' "
                        f"(OBELICS) nor 'text_list'/'image_info' (MMC4): {sorted(document)}")

  def __getitem__(self, index: int) -> dict[str, Any]:
    return _document(self.content(index), self.image_size, self.text_separator)


def mmc4_order(sentences: Sequence[str], matched: Sequence[tuple[int, Any]]) -> list[Any]:
  """MMC4's layout in reading order: each image (given with its matched sentence index)
  right before its sentence, images matched to one sentence in their given order; empty
  sentences are left out."""
  before: dict[int, list[Any]] = {}
  for position, item in matched:
    before.setdefault(position, []).append(item)
  items: list[Any] = []
  for position, sentence in enumerate(sentences):
    items.extend(before.get(position, ()))
    if sentence:
      items.append(sentence)
  return items


def _utf8(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    raise CorruptRecord("bad_record", f"{where}: text is not UTF-8 ({error})") from error


def _json(data: bytes, where: str) -> dict[str, Any]:
  try:
    value = json.loads(_utf8(data, where))
  except json.JSONDecodeError as error:
    raise CorruptRecord("bad_record", f"{where}: the .json member is not JSON ({error})") \
        from error
  if not isinstance(value, dict):
    raise CorruptRecord("bad_record", f"{where}: the .json member is a {type(value).__name__}, "
                        "not an object")
  return value


def _document(content: Sequence[str | bytes], image_size: int,
              text_separator: str) -> dict[str, Any]:
  """Stored content -> a pipeline document `{"images": uint8 "n s s 3", "text"}`."""
  text, encoded = interleave(content, text_separator)
  images = []
  for i, data in enumerate(encoded):
    try:
      images.append(decode_image(data, image_size))
    except CorruptRecord as error:
      raise CorruptRecord(error.reason, f"image {i} of {len(encoded)}: {error}") from error
  if not text.replace(MEDIA_TOKEN, "").replace(ENDOFCHUNK_TOKEN, "").strip():
    raise CorruptRecord("empty_text", "the record holds no text")
  return {"images": _stack(images, image_size), "text": text}


# ---------------------------------------------------------------------- LLaVA conversations

def _check_image_options(source) -> None:
  """A conversation source's image settings checked and normalised in place (frozen
  dataclasses: `object.__setattr__`)."""
  if source.image_size <= 0:
    raise ValueError(f"image_size must be positive, got {source.image_size}.")
  object.__setattr__(source, "pad_colour", tuple(source.pad_colour))
  object.__setattr__(source, "_pad", _pad_colour_for(source.image_aspect_ratio,
                                                       source.pad_colour))
  object.__setattr__(source, "grid_pinpoints", _grid_for(
      source.image_aspect_ratio, source.grid_pinpoints, source.image_size))


def _pad_colour_for(image_aspect_ratio: str, pad_colour: Sequence[int]
                    ) -> tuple[int, ...] | None:
  """The colour `decode_image` pads with for `image_aspect_ratio` (None: no padding)."""
  if image_aspect_ratio not in ASPECT_RATIOS:
    raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r}; expected one of "
                     f"{ASPECT_RATIOS} (LLaVA's default 'square' is 'crop').")
  colour = tuple(int(c) for c in pad_colour)
  if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
    raise ValueError(f"pad_colour={tuple(pad_colour)} must be three 8-bit values (R, G, B); "
                     "`mean_colour(image_mean)` gives LLaVA's from a processor's mean.")
  return colour if image_aspect_ratio == "pad" else None


def _grid_for(image_aspect_ratio: str, grid_pinpoints, image_size: int
              ) -> tuple[tuple[int, int], ...] | None:
  """The anyres grid (None unless `image_aspect_ratio` is "anyres"), checked."""
  if image_aspect_ratio != "anyres":
    return None
  grid = tuple(tuple(int(v) for v in p) for p in grid_pinpoints or ())
  if not grid or any(len(p) != 2 or min(p) <= 0 or p[0] % image_size or p[1] % image_size
                     for p in grid):
    raise ValueError(f"image_aspect_ratio='anyres' needs grid_pinpoints, (width, height) "
                     f"multiples of image_size={image_size}; got {grid_pinpoints!r} (LLaVA-1.6: "
                     "[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]).")
  return grid


def conversation_document(record: Any, images: Sequence[bytes], image_size: int,
                          pad_colour: Sequence[int] | None, where: str,
                          grid_pinpoints: Sequence[tuple[int, int]] | None = None
                          ) -> dict[str, Any]:
  """A LLaVA record (`{"id", "conversations", ...}`) and its encoded images -> a
  conversation document `{"id", "images": uint8 "n s s 3", "conversations"}`; with
  `grid_pinpoints` (anyres), images `"n v s s 3"` (`anyres.views`) and `image_sizes`
  int32 `"n 2"` (original width, height).

  Raises `CorruptRecord` naming the record's id and `where` it is: "bad_record" (not an
  object), "bad_conversation" (no non-empty `conversations` list), or an image's reason.
  """
  if not isinstance(record, dict):
    raise CorruptRecord("bad_record", f"{where}: a JSON {type(record).__name__}, not an "
                        "object")
  name = str(record.get("id", where))
  conversations = record.get("conversations")
  if not isinstance(conversations, list) or not conversations:
    raise CorruptRecord("bad_conversation", f"record {name!r} ({where}): no `conversations` "
                        f"list (got {conversations!r:.60})")
  decoded, sizes = [], []
  for i, data in enumerate(images):
    try:
      if grid_pinpoints:
        image = decode_full(data)
        decoded.append(anyres.views(image, grid_pinpoints, image_size))
        sizes.append((image.shape[1], image.shape[0]))
      else:
        decoded.append(decode_image(data, image_size, pad_colour))
    except CorruptRecord as error:
      detail = str(error).removeprefix(f"{error.reason}: ")
      raise CorruptRecord(error.reason, f"record {name!r} ({where}), image {i}: {detail}") \
          from error
  if not grid_pinpoints:
    return {"id": name, "images": _stack(decoded, image_size), "conversations": conversations}
  views = anyres.max_tiles(grid_pinpoints, image_size) + 1
  return {"id": name, "conversations": conversations,
          "images": np.stack(decoded) if decoded else np.zeros(
              (0, views, image_size, image_size, 3), np.uint8),
          "image_sizes": np.asarray(sizes, np.int32).reshape(-1, 2)}


def image_names(record: dict[str, Any]) -> list[Any]:
  """A LLaVA record's image references: `"image"` absent or null (a text-only record), one
  path, or a list of paths (multi-image data)."""
  image = record.get("image")
  if image is None:
    return []
  return list(image) if isinstance(image, list) else [image]


def read_json_records(path: str) -> tuple[bytes, np.ndarray, np.ndarray, str]:
  """A JSON list or JSONL file -> `(blob, offsets "n+1", positions "n", unit)`: record i is
  `blob[offsets[i]:offsets[i+1]]` (its JSON text), found at `positions[i]` (a JSONL line
  number, or the list index: `unit` says which).

  A JSON list is parsed whole (`json.loads`: for LLaVA-1.5's 1 GB mix665k, a few GB of
  memory for the time it takes) and its records kept as compact JSON text, so the source
  holds one bytes object rather than millions of Python objects. A JSONL line is kept as
  it is and parsed when read, so a broken line costs that record only.
  """
  data = epath.Path(path).read_bytes()
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  pieces: list[bytes] = []
  positions: list[int] = []
  if data.lstrip()[:1] == b"[":
    try:
      records = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise ValueError(f"{path} starts as a JSON list but is not valid JSON ({error}); fix "
                       "it, or write it as JSONL (one record a line), where a broken line "
                       "costs only its record.") from error
    del data
    for i, record in enumerate(records):
      pieces.append(json.dumps(record, ensure_ascii=False, separators=(",", ":"))
                    .encode("utf-8", "surrogatepass"))
      positions.append(i)
    unit = "record"
  else:
    for number, line in enumerate(data.split(b"\n"), 1):
      if line.strip():
        pieces.append(line)
        positions.append(number)
    unit = "line"
  offsets = np.zeros(len(pieces) + 1, np.int64)
  np.cumsum([len(p) for p in pieces], out=offsets[1:])
  return b"".join(pieces), offsets, np.asarray(positions, np.int64), unit


@dataclasses.dataclass(frozen=True)
class LlavaJson:
  """LLaVA's instruction data as it is distributed: a JSON list (`llava_v1_5_mix665k.json`)
  or JSONL of `{"id", "image": path relative to image_folder (absent: text-only),
  "conversations": [{"from": "human" | "gpt", "value"}, ...]}` records.

  Documents: `{"id", "images": uint8 "n s s 3" (n: 0 or the record's images), "conversations"}`
  (anyres: images `"n v s s 3"` and `image_sizes "n 2"`).
  The file is indexed once, when the source is made (a JSON list is read whole, see
  `read_json_records`); images are read and decoded when a record is. A missing image
  file, an undecodable image, a record without conversations or a JSONL line that is not
  JSON raises `CorruptRecord` with the record's id, which the pipeline counts per reason.
  For long runs convert the data once (`python -m mmjax.data.convert --format=llava`) and
  read it with `ArrayRecordConversations`: the same documents, without one file per image.

  Attributes:
    path: the JSON or JSONL file.
    image_size: images come out `"image_size image_size 3"`.
    image_folder: where image paths start; default: the file's folder.
    image_aspect_ratio: "crop" (shorter side resized, centre kept: LLaVA's default, used
      in stage 1), "pad" (LLaVA-1.5's instruction tuning: padded to a square of
      `pad_colour` first, so nothing is cut off) or "anyres" (LLaVA-1.6: base view and
      tiles of `grid_pinpoints`).
    pad_colour: the padding's 8-bit RGB colour: the vision encoder's mean colour
      (`mean_colour(image_mean)`), CLIP's by default.
    grid_pinpoints: anyres only: the grid's resolutions `((width, height), ...)`.
  """

  path: str
  image_size: int
  image_folder: str = ""
  image_aspect_ratio: str = "crop"
  pad_colour: tuple[int, ...] = CLIP_PAD_COLOUR
  grid_pinpoints: tuple[tuple[int, int], ...] | None = None
  _blob: bytes = dataclasses.field(init=False, repr=False, compare=False)
  _offsets: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  _positions: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  _unit: str = dataclasses.field(init=False, repr=False, compare=False)
  _pad: tuple[int, ...] | None = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    _check_image_options(self)
    if not epath.Path(self.path).exists():
      raise FileNotFoundError(f"LLaVA data file {self.path!r} does not exist.")
    blob, offsets, positions, unit = read_json_records(self.path)
    for name, value in (("_blob", blob), ("_offsets", offsets), ("_positions", positions),
                        ("_unit", unit)):
      object.__setattr__(self, name, value)

  def __len__(self) -> int:
    return len(self._positions)

  def _where(self, index: int) -> str:
    return f"{self.path} {self._unit} {self._positions[index]}"

  def record(self, index: int) -> Any:
    """Record `index` as stored (parsed JSON); `CorruptRecord("bad_record")` for a JSONL
    line that is not JSON."""
    text = self._blob[self._offsets[index]:self._offsets[index + 1]]
    try:
      return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise CorruptRecord("bad_record", f"{self._where(index)}: not JSON ({error}): "
                          f"{text[:80]!r}") from error

  def __getitem__(self, index: int) -> dict[str, Any]:
    record, where = self.record(index), self._where(index)
    images = []
    if isinstance(record, dict):
      name = str(record.get("id", where))
      root = epath.Path(self.image_folder or epath.Path(self.path).parent)
      for reference in image_names(record):
        if not isinstance(reference, str) or not reference.strip():
          raise CorruptRecord("missing_image", f"record {name!r} ({where}): image path "
                              f"{reference!r}")
        file = root / reference
        try:
          images.append(file.read_bytes())
        except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
          raise CorruptRecord("missing_image", f"record {name!r} ({where}): cannot read "
                              f"{file} ({type(error).__name__}); check image_folder") \
              from error
    return conversation_document(record, images, self.image_size, self._pad, where,
                                 self.grid_pinpoints)


@dataclasses.dataclass(frozen=True)
class ArrayRecordConversations:
  """LLaVA conversations from ArrayRecord shards written by `mmjax.data.convert
  --format=llava` (records of kind `"conversation"`: the record's JSON, then its images):
  the documents `LlavaJson` gives for the same data, decoded with the same options.

  Attributes:
    paths: a glob, a file, or a list of them.
    image_size, image_aspect_ratio, pad_colour, grid_pinpoints: as `LlavaJson`'s.
  """

  paths: str | tuple[str, ...]
  image_size: int
  image_aspect_ratio: str = "crop"
  pad_colour: tuple[int, ...] = CLIP_PAD_COLOUR
  grid_pinpoints: tuple[tuple[int, int], ...] | None = None
  _records: ArrayRecordDataSource = dataclasses.field(init=False, repr=False, compare=False)
  _pad: tuple[int, ...] | None = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if not isinstance(self.paths, str):
      object.__setattr__(self, "paths", tuple(self.paths))
    _check_image_options(self)
    object.__setattr__(self, "_records", ArrayRecordDataSource(resolve_shards(self.paths)))

  def __len__(self) -> int:
    return len(self._records)

  def content(self, index: int) -> list[str | bytes]:
    """Record `index` as stored: its JSON text, then its encoded images."""
    return decode_record(self._records[index], CONVERSATION)

  def __getitem__(self, index: int) -> dict[str, Any]:
    content, where = self.content(index), f"record {index}"
    if not content or not isinstance(content[0], str) or not all(
        isinstance(item, bytes) for item in content[1:]):
      raise CorruptRecord("bad_record", f"{where}: a conversation record holds its JSON text "
                          "and then its images")
    try:
      record = json.loads(content[0])
    except json.JSONDecodeError as error:
      raise CorruptRecord("bad_record", f"{where}: the conversation is not JSON ({error})") \
          from error
    return conversation_document(record, content[1:], self.image_size, self._pad, where,
                                 self.grid_pinpoints)


# ---------------------------------------------------------------------- labelled (CheXpert)

# CheXpert's and MIMIC-CXR-JPG's 14 label columns, in their CSVs' order.
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                   "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                   "Support Devices")
_LABEL_VALUES = {"": np.nan, "1": 1.0, "0": 0.0, "-1": -1.0}


def _label_value(text: str) -> float | None:
  """A CSV cell -> 1, 0, -1 or NaN (blank); None if it is none of them ("1.0" is 1)."""
  text = text.strip()
  if text in _LABEL_VALUES:
    return _LABEL_VALUES[text]
  try:
    value = float(text)
  except ValueError:
    return None
  return value if value in (1.0, 0.0, -1.0) else np.nan if np.isnan(value) else None


def read_label_table(path: str, columns: Sequence[str], label_columns: Sequence[str]
                     ) -> tuple[dict[str, list[str]], np.ndarray]:
  """A CSV with a header -> (`{column: values}` of `columns`, float32 `"n l"` labels).

  Label cells must be 1, 0, -1 (also written 1.0, 0.0, -1.0) or blank (NaN: unmentioned).
  Raises ValueError naming the file, the row (as a line number) and the column of the
  first bad cell, or the missing columns.
  """
  import csv  # pylint: disable=import-outside-toplevel
  file = epath.Path(path)
  if not file.exists():
    raise FileNotFoundError(f"Label table {path!r} does not exist.")
  with io.StringIO(file.read_text(encoding="utf-8-sig"), newline="") as handle:
    reader = csv.DictReader(handle)
    header = reader.fieldnames or []
    missing = [c for c in (*columns, *label_columns) if c not in header]
    if missing:
      raise ValueError(f"{path} has no column(s) {missing}; its header is {header}. Set the "
                       "source's label_columns / path_column / text_column to match it.")
    values: dict[str, list[str]] = {c: [] for c in columns}
    labels = []
    for row in reader:
      line = reader.line_num
      vector = []
      for column in label_columns:
        cell = row[column] if row[column] is not None else ""
        value = _label_value(cell)
        if value is None:
          raise ValueError(f"{path} line {line}: column {column!r} holds {cell!r}; labels "
                           "must be 1, 0, -1 or blank.")
        vector.append(value)
      labels.append(vector)
      for column in columns:
        values[column].append(row[column] or "")
  return values, np.asarray(labels, np.float32).reshape(-1, len(label_columns))


def positive_classes(labels: np.ndarray, skip: int | None = 0) -> np.ndarray:
  """The columns of `labels "l"` that are positive, but for column `skip` (the "no
  finding" column)."""
  positive = np.asarray(labels) == 1.0
  if skip is not None:
    positive[skip] = False
  return np.flatnonzero(positive)


@dataclasses.dataclass(frozen=True)
class LabelledImages:
  """An image pool from a CheXpert / MIMIC-CXR-style CSV: a `path_column` of image files
  relative to `root` (by default the CSV's folder) and `label_columns` of 1 / 0 / -1 /
  blank. Labels are read (and checked) when the source is made; images when read: a
  missing or undecodable file raises `CorruptRecord` ("missing_image", "bad_image",
  "unsupported_image") naming the CSV line and the file, which the pipeline counts.
  """

  csv: str
  image_size: int
  root: str = ""
  path_column: str = "Path"
  label_columns: tuple[str, ...] = CHEXPERT_LABELS
  _paths: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
  _labels: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "label_columns", tuple(self.label_columns))
    if self.image_size <= 0:
      raise ValueError(f"image_size must be positive, got {self.image_size}.")
    values, labels = read_label_table(self.csv, [self.path_column], self.label_columns)
    object.__setattr__(self, "_paths", tuple(values[self.path_column]))
    object.__setattr__(self, "_labels", labels)

  @property
  def label_names(self) -> tuple[str, ...]:
    return self.label_columns

  def __len__(self) -> int:
    return len(self._paths)

  def labels(self, index: int) -> np.ndarray:
    return self._labels[index].copy()

  def image(self, index: int) -> np.ndarray:
    """uint8 `"s s 3"`: the row's image, decoded as every reader decodes images."""
    where = f"{self.csv} line {index + 2}"
    relative = self._paths[index]
    if not relative.strip():
      raise CorruptRecord("missing_image", f"{where}: empty {self.path_column!r}")
    root = epath.Path(self.root) if self.root else epath.Path(self.csv).parent
    return read_image_file(root / relative, where,
                           lambda data: decode_image(data, self.image_size))


def read_image_file(path: epath.Path, where: str, decode) -> np.ndarray:
  """`decode(the file's bytes)`; `CorruptRecord("missing_image")` if the file cannot be
  read, and `decode`'s `CorruptRecord`s, each naming `where` (e.g. a CSV line) and `path`."""
  try:
    data = path.read_bytes()
  except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
    raise CorruptRecord("missing_image", f"{where}: cannot read {path} "
                        f"({type(error).__name__})") from error
  try:
    return decode(data)
  except CorruptRecord as error:
    detail = str(error).removeprefix(f"{error.reason}: ")
    raise CorruptRecord(error.reason, f"{where}: {path}: {detail}") from error


@dataclasses.dataclass(frozen=True)
class LabelledSentences:
  """A text pool from a sentence-label table (MedCLIP's `sentence-label.csv`): a text
  column (`text_column`, by default `Reports` or else `sentence`) and the same label
  columns as the images. Rows with an empty text are left out when the table is read.

  `prompt_sentence` is MedCLIP's text for an image without a report: a sentence positive
  for one of the image's positive classes (of those that some sentence is positive for;
  the class drawn uniformly, then the sentence), or one positive for `no_finding` when the
  image has no positive class; with no such sentence the record is skipped, counted as
  "no_prompt_sentence".
  """

  csv: str
  text_column: str = ""
  label_columns: tuple[str, ...] = CHEXPERT_LABELS
  no_finding: str = "No Finding"
  _texts: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
  _labels: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  _positive: tuple[np.ndarray, ...] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "label_columns", tuple(self.label_columns))
    column = self.text_column
    if not column and epath.Path(self.csv).exists():
      header = _csv_header(self.csv)
      column = next((c for c in ("Reports", "sentence") if c in header), "Reports")
    values, labels = read_label_table(self.csv, [column], self.label_columns)
    keep = [i for i, text in enumerate(values[column]) if text.strip()]
    if not keep:
      raise ValueError(f"Sentence table {self.csv} has no non-empty {column!r} text.")
    labels = labels[keep]
    object.__setattr__(self, "_texts", tuple(values[column][i].strip() for i in keep))
    object.__setattr__(self, "_labels", labels)
    object.__setattr__(self, "_positive", tuple(np.flatnonzero(labels[:, c] == 1.0)
                                                for c in range(len(self.label_columns))))

  @property
  def label_names(self) -> tuple[str, ...]:
    return self.label_columns

  def __len__(self) -> int:
    return len(self._texts)

  def sentence(self, index: int) -> tuple[str, np.ndarray]:
    return self._texts[index], self._labels[index].copy()

  def prompt_sentence(self, labels: np.ndarray, rng: np.random.Generator
                      ) -> tuple[str, np.ndarray]:
    skip = (self.label_columns.index(self.no_finding) if self.no_finding in self.label_columns
            else None)
    positive = positive_classes(labels, skip)
    classes = [c for c in positive if len(self._positive[c])]
    if classes:
      rows = self._positive[classes[rng.integers(len(classes))]]
    elif not len(positive) and skip is not None and len(self._positive[skip]):
      rows = self._positive[skip]
    else:
      wanted = [self.label_columns[c] for c in positive] or [self.no_finding]
      raise CorruptRecord("no_prompt_sentence", f"{self.csv} has no sentence positive for "
                          f"any of {wanted}, the image's positive classes")
    return self.sentence(int(rows[rng.integers(len(rows))]))


def _csv_header(path: str) -> list[str]:
  import csv  # pylint: disable=import-outside-toplevel
  with epath.Path(path).open("r", encoding="utf-8-sig") as handle:
    return next(csv.reader([handle.readline()]), [])


@dataclasses.dataclass(frozen=True)
class DecoupledPairs:
  """MedCLIP's decoupled image-text sampling, deterministic and resumable.

  Example `index` draws, with a generator seeded by `(seed, index)`, an image of the
  image pool and, independently, a sentence of the text pool; with probability
  `prompt_fraction` the image instead gets a prompt sentence drawn by its own labels (the
  text pool's `prompt_sentence`), as MedCLIP gives images that have no report.

  Pools: `images` has `image(i)` (uint8 `"s s 3"`), `labels(i)` and `label_names`;
  `texts` has `sentence(i)` -> `(text, labels)`, `prompt_sentence(labels, rng)` and
  `label_names`, the same as the images'.

  Documents: `{"images": "1 s s 3", "text", "image_labels": float32 "l",
  "text_labels": float32 "l"}`.
  """

  images: Any
  texts: Any
  size: int = 0  # 0: as many examples as images
  seed: int = 0
  prompt_fraction: float = 0.0

  def __post_init__(self):
    if tuple(self.images.label_names) != tuple(self.texts.label_names):
      raise ValueError(f"The image pool's labels {tuple(self.images.label_names)} differ from "
                       f"the text pool's {tuple(self.texts.label_names)}; both must use the "
                       "same label columns in the same order.")
    if not 0 <= self.prompt_fraction <= 1:
      raise ValueError(f"prompt_fraction must be in [0, 1], got {self.prompt_fraction}.")
    if not len(self.images) or (not len(self.texts) and self.prompt_fraction < 1):
      raise ValueError(f"Decoupled pairs need images and texts: the pools hold "
                       f"{len(self.images)} images and {len(self.texts)} texts.")

  @property
  def label_names(self) -> tuple[str, ...]:
    return tuple(self.images.label_names)

  def __len__(self) -> int:
    return self.size or len(self.images)

  def draw(self, index: int) -> tuple[int, int | None, np.random.Generator]:
    """`(image index, text index or None for a prompt sentence, the generator to go on
    with)` of example `index`."""
    rng = np.random.default_rng([self.seed, 0x6d656463, index])
    image = int(rng.integers(len(self.images)))
    prompt = rng.random() < self.prompt_fraction
    text = None if prompt else int(rng.integers(len(self.texts)))
    return image, text, rng

  def __getitem__(self, index: int) -> dict[str, Any]:
    image_index, text_index, rng = self.draw(index)
    image_labels = np.asarray(self.images.labels(image_index), np.float32)
    if text_index is None:
      text, text_labels = self.texts.prompt_sentence(image_labels, rng)
    else:
      text, text_labels = self.texts.sentence(text_index)
    return {"images": self.images.image(image_index)[None], "text": text,
            "image_labels": image_labels, "text_labels": np.asarray(text_labels, np.float32)}


@dataclasses.dataclass(frozen=True)
class LabelledDecoupled:
  """`DecoupledPairs` of a CheXpert-style image CSV (`LabelledImages`) and a sentence-label
  table (`LabelledSentences`), with the arguments of both flat, as configs give them."""

  images_csv: str
  sentences_csv: str
  image_size: int
  root: str = ""
  path_column: str = "Path"
  text_column: str = ""
  label_columns: tuple[str, ...] = CHEXPERT_LABELS
  no_finding: str = "No Finding"
  size: int = 0
  seed: int = 0
  prompt_fraction: float = 0.0
  _pairs: DecoupledPairs = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    columns = tuple(self.label_columns)
    object.__setattr__(self, "label_columns", columns)
    images = LabelledImages(self.images_csv, self.image_size, self.root, self.path_column,
                            columns)
    texts = LabelledSentences(self.sentences_csv, self.text_column, columns, self.no_finding)
    object.__setattr__(self, "_pairs", DecoupledPairs(images, texts, self.size, self.seed,
                                                      self.prompt_fraction))

  @property
  def label_names(self) -> tuple[str, ...]:
    return self.label_columns

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._pairs[index]


@dataclasses.dataclass(frozen=True)
class LabelledClasses:
  """Zero-shot classification from a CheXpert-style image CSV, as CheXpert 5x200 is
  built: the rows positive for exactly one of `classes` (label columns), in CSV order,
  at most `per_class` of each (0: all). Documents carry the class index as `label`, the
  class name as text and the row's labels as `image_labels`."""

  csv: str
  image_size: int
  classes: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                              "Pleural Effusion")
  per_class: int = 0
  root: str = ""
  path_column: str = "Path"
  label_columns: tuple[str, ...] = CHEXPERT_LABELS
  _images: LabelledImages = dataclasses.field(init=False, repr=False, compare=False)
  _items: tuple[tuple[int, int], ...] = dataclasses.field(init=False, repr=False,
                                                          compare=False)

  def __post_init__(self):
    object.__setattr__(self, "classes", tuple(self.classes))
    missing = [c for c in self.classes if c not in self.label_columns]
    if missing:
      raise ValueError(f"classes {missing} are not label columns {tuple(self.label_columns)}.")
    images = LabelledImages(self.csv, self.image_size, self.root, self.path_column,
                            self.label_columns)
    columns = [self.label_columns.index(c) for c in self.classes]
    positive = images._labels[:, columns] == 1.0  # pylint: disable=protected-access
    items, taken = [], [0] * len(columns)
    for row in np.flatnonzero(positive.sum(1) == 1):
      label = int(np.argmax(positive[row]))
      if self.per_class == 0 or taken[label] < self.per_class:
        items.append((int(row), label))
        taken[label] += 1
    object.__setattr__(self, "_images", images)
    object.__setattr__(self, "_items", tuple(items))

  @property
  def label_names(self) -> tuple[str, ...]:
    return tuple(self.label_columns)

  def class_names(self) -> tuple[str, ...]:
    return self.classes

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    row, label = self._items[index]
    labels = self._images.labels(row)
    text_labels = np.full(len(self.label_columns), np.nan, np.float32)
    text_labels[self.label_columns.index(self.classes[label])] = 1.0
    return {"images": self._images.image(row)[None], "text": self.classes[label].lower(),
            "label": label, "image_labels": labels, "text_labels": text_labels}


# ----------------------------------------------------------------------------------- mammograms

def read_box_file(path: epath.Path, where: str) -> np.ndarray:
  """A detector's `<stem>_preds.txt` -> float32 `"n 5"` rows `(cx, cy, w, h, conf)` as
  written (YOLO-normalised; not checked, sorted or suppressed; `n` may be 0).
  `CorruptRecord("missing_boxes")` if the file cannot be read, `("bad_boxes")` if a line
  is not five numbers."""
  try:
    text = path.read_text()
  except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
    raise CorruptRecord("missing_boxes", f"{where}: cannot read the box file {path} "
                        f"({type(error).__name__})") from error
  rows = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = [float(value) for value in line.split()]
    except ValueError:
      row = []
    if len(row) != 5:
      raise CorruptRecord("bad_boxes", f"{where}: {path} line {number} is {line.strip()!r}; "
                          "expected five numbers 'cx cy w h conf'")
    rows.append(row)
  return np.asarray(rows, np.float32).reshape(-1, 5)


@dataclasses.dataclass(frozen=True)
class MammoFolder:
  """MMBCD's data on disk, as its code/data.py reads it: a CSV with one row per view (an
  image path relative to `root`, the clinical history, the label), the images (PNG or
  JPEG, read whole as grey), and per image a detector's box file `<path without its
  suffix><box_suffix>` under `boxes` (YOLO rows `cx cy w h conf`).

  Documents are `{"image": uint8 "h w", "boxes": float32 "n 5", "text", "label", "id"}`
  (`id`: the image path). The reference's leak rule holds: where `other_side_column` (the
  reference's `all_views_cancer`; "" when the CSV has none) says the other breast has
  cancer and this view's label is 0, the text is empty, so that a history written about
  the other breast cannot give this view's label away.

  The CSV is read when the source is made: a missing column, or a label or other-side
  cell that is not 0 or 1, is a ValueError naming the file (and line). Files are read per
  record: a missing box file (`missing_boxes`), a malformed one (`bad_boxes`), a missing
  image (`missing_image`) or an undecodable one (`bad_image`, `unsupported_image`) is a
  `CorruptRecord` the pipeline counts.

  Attributes:
    root: the image folder (default: the CSV's folder).
    boxes: the box-file folder, mirroring the image paths' sub-folders (default: `root`).
  """

  csv: str
  root: str = ""
  boxes: str = ""
  path_column: str = "im_path"
  text_column: str = "text"
  label_column: str = "cancer"
  other_side_column: str = "all_views_cancer"
  box_suffix: str = "_preds.txt"
  _paths: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
  _texts: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
  _labels: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)
  _hidden: tuple[bool, ...] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    flags = [self.label_column] + ([self.other_side_column] if self.other_side_column else [])
    values, table = read_label_table(self.csv, [self.path_column, self.text_column], flags)
    for column, cells in zip(flags, table.T, strict=True):
      bad = np.flatnonzero(~np.isin(cells, (0.0, 1.0)))
      if len(bad):
        raise ValueError(f"{self.csv} line {bad[0] + 2}: column {column!r} must be 0 or 1, "
                         f"got {'blank' if np.isnan(cells[bad[0]]) else cells[bad[0]]}.")
    labels = table[:, 0].astype(int)
    other = table[:, 1] if self.other_side_column else np.zeros(len(labels))
    object.__setattr__(self, "_paths", tuple(values[self.path_column]))
    object.__setattr__(self, "_texts", tuple(t.strip() for t in values[self.text_column]))
    object.__setattr__(self, "_labels", tuple(int(v) for v in labels))
    object.__setattr__(self, "_hidden", tuple(bool(o == 1 and v == 0)
                                              for o, v in zip(other, labels, strict=True)))

  @property
  def labels(self) -> tuple[int, ...]:
    return self._labels

  def texts(self) -> list[str]:
    """Every row's history as the CSV has it, hidden ones included: the corpus the
    reference fits its tf-idf keywords on (`text` of a document may be empty instead)."""
    return list(self._texts)

  def __len__(self) -> int:
    return len(self._paths)

  def box_path(self, index: int) -> epath.Path:
    relative = self._paths[index]
    stem = relative[:-len(os.path.splitext(relative)[1]) or None]
    return self._folder(self.boxes or self.root) / f"{stem}{self.box_suffix}"

  def _folder(self, folder: str) -> epath.Path:
    return epath.Path(folder) if folder else epath.Path(self.csv).parent

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f"Record {index} of a {len(self)}-row mammography CSV.")
    where, relative = f"{self.csv} line {index + 2}", self._paths[index]
    if not relative.strip():
      raise CorruptRecord("missing_image", f"{where}: empty {self.path_column!r}")
    boxes = read_box_file(self.box_path(index), where)
    image = read_image_file(self._folder(self.root) / relative, where,
                            lambda data: decode_full(data, grey=True))
    return {"image": image, "boxes": boxes, "text": "" if self._hidden[index] else
            self._texts[index], "label": self._labels[index], "id": relative}
