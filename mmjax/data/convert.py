"""Convert image-text data as people have it into ArrayRecord shards for the pipeline.

  python -m mmjax.data.convert --format=pairs --input=captions.csv --image_key=file \\
      --text_key=caption --output=/data/cc/cc --num_shards=8 --max_image_size=256
  python -m mmjax.data.convert --format=mmc4 --input='/data/mmc4/docs_*.jsonl' \\
      --image_root=/data/mmc4/images --min_sim=0.24 --output=/data/mmc4/mmc4 --num_shards=64
  python -m mmjax.data.convert --format=obelics --input=obelics.jsonl --output=/data/obelics/ob
  python -m mmjax.data.convert --format=llava --input=llava_v1_5_mix665k.json \\
      --image_root=/data/llava --output=/data/llava/mix665k --num_shards=64

Input formats (JSONL may be plain, `.gz`, or a `.zip` holding one file):
  pairs: JSONL rows `{"image": path, "caption": str}`, or a CSV (`.csv`) / TSV (`.tsv`) file
    with a header row; `--image_key` and `--text_key` name the fields or columns.
  mmc4: JSONL rows `{"text_list": [sentence, ...], "image_info": [{"image_name": name,
    "matched_text_index": i, "matched_sim": s}, ...]}`. Each image goes right before its
    matched sentence (several images matched to one sentence keep their order);
    `--min_sim` leaves out weakly matched images.
  obelics: JSONL rows `{"texts": [str | null, ...], "images": [path | null, ...]}`: position
    `i` holds either a text or an image, in reading order.
  llava: LLaVA's instruction data, a JSON list (`llava_v1_5_mix665k.json`) or JSONL of
    `{"id", "image": path (absent: a text-only record) or a list of paths,
    "conversations": [{"from": "human" | "gpt", "value": str}, ...]}`. Each becomes a
    conversation record (`mmjax.data.sources`, read by `ArrayRecordConversations`): the
    JSON text `{"id", "conversations"}`, then the images in order. A record any of whose
    images cannot be used is skipped: its conversation is about that image.

A `.json` file whose text starts with `[` is read as one JSON list of rows (parsed whole);
other inputs as JSON lines. A list that is not valid JSON is read up to the error, and the
rest of it counted as one `bad_row`.

Image paths are absolute or relative to `--image_root` (default: the input file's own
directory). Nothing is downloaded: a URL counts as a missing image. Every image is decoded,
turned upright (EXIF), made RGB, shrunk so its shorter side is at most `--max_image_size`
(if given; the reader's centre crop still sees the whole image) and re-encoded as JPEG
(quality 95) or PNG. Records go round-robin to `OUTPUT-iiiii-of-nnnnn.array_record`, so the
shards are a pure function of the inputs and the flags, whatever `--num_workers` is.

Nothing is dropped silently, and no bad row stops a conversion: every input row is either
written or skipped and counted per reason, and the summary at the end lists every count
with its first case (`rows read = records written + rows skipped`). Row reasons:
  bad_row: not JSON, not an object, a CSV row with the wrong number of fields, or
    `texts`/`images` of different lengths;
  bad_encoding: bytes that are not UTF-8, or a JSON string holding a lone surrogate
    (`"\ud800"`), which is no text;
  bad_value: a value of the wrong type (a caption or sentence that is not a string, a
    `matched_sim` that is not a number, `texts`/`image_info` that are not lists);
  missing_key: a row without a field the format needs (if no row of the first 1000 has it,
    the key is taken to be misnamed and the conversion stops, naming the flag to set);
  unbalanced_quote: CSV/TSV only. A quoted field running over line breaks is taken to have
    swallowed rows when one of its lines after the first, parsed alone, has as many fields
    as the header: that row and each such line are counted (a genuine multi-line caption
    whose later lines look like complete rows is counted too, never written half-read);
  truncated_input: a compressed file that ends early (its last, partial line);
  empty_text, missing_image, bad_image, unsupported_image (pairs and conversations),
    no_images (documents with no usable image);
  bad_conversation (llava): `conversations` missing, empty, or not turns of `{"from":
    "human" | "gpt", "value": str}`; image_token_mismatch (llava): `<image>` placeholders
    in the conversation that do not match the record's images in number.
Images left out of kept documents are counted too: `missing_image`, `bad_image`,
`unsupported_image`, `low_similarity`, `bad_value` (a `matched_sim` that is not a number),
`bad_match` (a matched sentence index out of range). A UTF-8 byte order mark at the start
of a file is ignored. CSV fields may be of any size.

Progress (rows/s, images/s, records written, and the ETA from the input bytes read) is
printed to stderr at most once every `--progress_every` seconds.
"""

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import io
import itertools
import json
import multiprocessing
import pathlib
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from absl import flags, logging
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from mmjax import cli
from mmjax.data import conversation
from mmjax.data.sequences import CorruptRecord
from mmjax.data.shapes_world import MEDIA_TOKEN
from mmjax.data.sources import (CONVERSATION, SHARD_PATTERN, UnsupportedImage, encode_record,
                                image_names, load_image, mmc4_order)

FORMATS = ("pairs", "mmc4", "obelics", "llava")
IMAGE_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
JPEG_QUALITY = 95


class _BadRow(Exception):
  """A row that cannot become a record; `reason` is the counted category."""

  def __init__(self, detail: str, reason: str = "bad_row", key: str | None = None):
    super().__init__(detail)
    self.reason = reason
    self.key = key  # the missing field, for reason "missing_key"


class _ImageProblem(Exception):
  """An image that cannot be used; `reason` is the counted category."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class _Task:
  """One record to encode: texts (`str`) and image files (`Path`), in reading order."""

  location: str
  kind: Literal["pair", "document", "conversation"]
  items: tuple[str | pathlib.Path, ...]
  dropped: tuple[tuple[str, str], ...] = ()  # (reason, detail) of images already left out


@dataclasses.dataclass(frozen=True)
class _Result:
  """An encoded record, or why the row was skipped; plus images left out of it."""

  record: bytes | None = None
  skipped: tuple[str, str] | None = None
  dropped: tuple[tuple[str, str], ...] = ()
  rows: int = 1  # input rows this stands for (an unbalanced quote swallows several)
  images: int = 0  # images in the record


@dataclasses.dataclass
class ConversionReport:
  """What a conversion wrote and everything it left out, counted per reason."""

  shards: list[str]
  rows: int = 0
  written: int = 0
  images: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dropped_images: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first_case: dict[str, str] = dataclasses.field(default_factory=dict)

  def summary(self) -> str:
    lines = [f"Read {self.rows} rows. Wrote {self.written} records ({self.images} images) to "
             f"{len(self.shards)} shards ({self.shards[0]} ...)."]
    for title, counts, key in (("Rows skipped", self.skipped, "skipped"),
                               ("Images left out of kept documents", self.dropped_images,
                                "dropped")):
      lines.append(f"{title}: {sum(counts.values())}")
      for reason, count in sorted(counts.items()):
        lines.append(f"  {reason}: {count} (first: {self.first_case[f'{key}/{reason}']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- images

def _encode_image_file(path: pathlib.Path, max_image_size: int | None = None,
                      image_format: str = "jpeg") -> bytes:
  """An image file -> upright RGB image bytes, shorter side at most `max_image_size`."""
  if not path.is_file():
    raise _ImageProblem("missing_image", f"image file {path} does not exist")
  try:
    image = load_image(path.read_bytes(), max_image_size)
  except UnsupportedImage as error:
    raise _ImageProblem("unsupported_image", f"image file {path}: {error}") from error
  except Exception as error:
    raise _ImageProblem("bad_image", f"cannot decode image file {path} "
                        f"({type(error).__name__}: {error})") from error
  width, height = image.size
  if max_image_size and min(width, height) > max_image_size:
    scale = max_image_size / min(width, height)
    image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                         Image.Resampling.BICUBIC)
  buffer = io.BytesIO()
  if image_format == "jpeg":
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
  else:
    image.save(buffer, format=IMAGE_FORMATS[image_format])
  return buffer.getvalue()


def _encode(task: "_Task | _Result", max_image_size: int | None, image_format: str) -> _Result:
  """Loads a task's images; runs in worker processes, so it is a pure function."""
  if isinstance(task, _Result):
    return task
  content: list[str | bytes] = []
  dropped = list(task.dropped)
  for item in task.items:
    if isinstance(item, str):
      content.append(item)
      continue
    try:
      content.append(_encode_image_file(item, max_image_size, image_format))
    except _ImageProblem as problem:
      if task.kind in ("pair", "conversation"):
        return _Result(skipped=(problem.reason, f"{task.location}: {problem}"))
      dropped.append((problem.reason, f"{task.location}: {problem}"))
  images = sum(isinstance(item, bytes) for item in content)
  if task.kind == "conversation":
    return _Result(record=encode_record(content, CONVERSATION), images=images)
  if not images:
    return _Result(skipped=("no_images", f"{task.location}: no usable image"),
                   dropped=tuple(dropped))
  return _Result(record=encode_record(content), dropped=tuple(dropped), images=images)


# --------------------------------------------------------------------------------- input rows

class _Truncated(Exception):
  """A compressed input that ends (or breaks) before its end-of-stream marker."""


BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass
class _Input:
  """One input file, read as lines of bytes, and how far through it reading is.

  Lines are split here rather than by a text reader so that one line that is not UTF-8,
  or the broken end of a truncated `.gz`, costs that line only (`_Truncated` is raised
  after the last complete line). `done` / `total` measure progress in the units of the
  file on disk (compressed bytes of a `.gz`).
  """

  path: pathlib.Path
  total: int = 0
  done: int = 0

  def __post_init__(self):
    self.total = self.path.stat().st_size

  def lines(self) -> Iterator[bytes]:
    with open(self.path, "rb") as raw:
      if self.path.suffix == ".gz":
        chunks = self._gunzip(raw)
      elif self.path.suffix == ".zip":
        chunks = self._unzip(raw)
      else:
        chunks = self._plain(raw)
      pending = b""
      try:
        for chunk in chunks:
          *complete, pending = (pending + chunk).split(b"\n")
          for line in complete:
            yield line + b"\n"
      except _Truncated:
        if pending:
          raise _Truncated(f"the partial line {pending[:60]!r}...") from None
        raise _Truncated("the end of the file") from None
      if pending:
        yield pending

  def _plain(self, raw) -> Iterator[bytes]:
    while chunk := raw.read(1 << 20):
      self.done = raw.tell()
      yield chunk

  def _gunzip(self, raw) -> Iterator[bytes]:
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    while chunk := raw.read(1 << 20):
      self.done = raw.tell()
      while chunk:
        try:
          yield decompressor.decompress(chunk)
        except zlib.error as error:
          raise _Truncated(str(error)) from error
        chunk = decompressor.unused_data  # a concatenated (multi-member) gzip goes on
        if decompressor.eof:
          decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16) if chunk else decompressor
          if not chunk:
            break
    if not decompressor.eof:
      raise _Truncated("the compressed stream ends early")

  def _unzip(self, raw) -> Iterator[bytes]:
    archive = zipfile.ZipFile(raw)
    members = [info for info in archive.infolist() if not info.is_dir()]
    if len(members) != 1:
      raise cli.UserError(f"{self.path} holds {len(members)} files; a zipped input must hold "
                          "exactly one JSONL file.")
    read = 0
    with archive.open(members[0]) as member:
      while True:
        try:
          chunk = member.read(1 << 20)
        except (EOFError, zipfile.BadZipFile, zlib.error) as error:
          raise _Truncated(str(error)) from error
        if not chunk:
          return
        read += len(chunk)
        self.done = round(self.total * read / max(1, members[0].file_size))
        yield chunk


def _input_format(path: pathlib.Path) -> str:
  suffixes = [s for s in path.suffixes if s not in (".gz", ".zip")]
  suffix = suffixes[-1] if suffixes else ""
  formats = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
  if suffix not in formats:
    raise cli.UserError(f"Cannot tell the format of {path} from its name; name it .jsonl, "
                        ".csv or .tsv (optionally .gz, or .zip for JSONL).")
  return formats[suffix]


@dataclasses.dataclass(frozen=True)
class _Row:
  """An input row: its fields, or why it has none (`(reason, detail)`)."""

  location: str
  fields: dict[str, Any] | None
  problem: tuple[str, str] | None = None
  rows: int = 1


def _decoded(lines: Iterator[bytes]) -> Iterator[str]:
  """UTF-8 text lines; undecodable bytes become lone surrogates (`surrogateescape`), which
  `_check_text` reports for the row that holds them."""
  for number, line in enumerate(lines):
    if number == 0 and line.startswith(BOM):
      line = line[len(BOM):]
    yield line.decode("utf-8", "surrogateescape")


def _check_text(value: Any, location: str):
  """Raises `_BadRow("bad_encoding")` if any string in `value` is not valid Unicode text."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as error:
      bad = value[error.start:error.end]
      what = ("bytes that are not UTF-8" if all(0xdc80 <= ord(c) <= 0xdcff for c in bad)
              else "a lone surrogate (an escape such as \\ud800 that is no text)")
      raise _BadRow(f"{location}: holds {what}: {value[max(0, error.start - 20):error.end + 20]!a}",
                    "bad_encoding") from None
  elif isinstance(value, dict):
    for key, item in value.items():
      _check_text(key, location)
      _check_text(item, location)
  elif isinstance(value, list):
    for item in value:
      _check_text(item, location)


def _rows(source: _Input, required: dict[str, str]) -> Iterator[_Row]:
  """The rows of one input file; a row that cannot be read is a `_Row` with a problem."""
  path = source.path
  if _input_format(path) != "jsonl":
    yield from _csv_rows(source, "," if _input_format(path) == "csv" else "\t", required)
    return
  if _is_json_list(path):
    yield from _json_list_rows(source)
    return
  lines = source.lines()
  number = 0
  while True:
    try:
      line = next(lines)
    except StopIteration:
      return
    except _Truncated as error:
      yield _Row(f"{path}:{number + 1}", None, ("truncated_input", f"{path} ends early at "
                                               f"line {number + 1} ({error})"))
      return
    number += 1
    location = f"{path}:{number}"
    if number == 1 and line.startswith(BOM):
      line = line[len(BOM):]
    text = line.decode("utf-8", "surrogateescape")  # bad bytes: reported by _check_text
    if not text.strip():
      continue
    try:
      row = json.loads(text)
      _check_text(row, location)
    except json.JSONDecodeError as error:
      yield _Row(location, None, ("bad_row", f"{location}: not valid JSON ({error})"))
      continue
    except _BadRow as bad:
      yield _Row(location, None, (bad.reason, str(bad)))
      continue
    if isinstance(row, dict):
      yield _Row(location, row)
    else:
      yield _Row(location, None, ("bad_row", f"{location}: a JSON {type(row).__name__}, "
                                  "not an object"))


def _is_json_list(path: pathlib.Path) -> bool:
  """A plain `.json` file whose text starts with `[` (after a byte order mark, spaces)."""
  if path.suffix != ".json":
    return False
  with open(path, "rb") as file:
    start = file.read(1 << 12).removeprefix(BOM).lstrip()
  return start[:1] == b"["


def _json_list_rows(source: _Input) -> Iterator[_Row]:
  """The rows of a file holding one JSON list, parsed whole, read element by element so
  that a syntax error costs only the rest of the list (counted as one `bad_row`)."""
  path = source.path
  text = b"".join(source.lines()).removeprefix(BOM).decode("utf-8", "surrogateescape")
  decoder = json.JSONDecoder()
  position = text.index("[") + 1
  number = 0
  while True:
    while position < len(text) and text[position] in " \t\r\n":
      position += 1
    if number and text.startswith(",", position):
      position += 1
      while position < len(text) and text[position] in " \t\r\n":
        position += 1
    if text.startswith("]", position):
      return
    location = f"{path}#{number}"
    try:
      row, position = decoder.raw_decode(text, position)
    except json.JSONDecodeError as error:
      yield _Row(location, None, ("bad_row", f"{location}: not valid JSON ({error}); the "
                                  "rest of the list cannot be read"))
      return
    number += 1
    try:
      _check_text(row, location)
    except _BadRow as bad:
      yield _Row(location, None, (bad.reason, str(bad)))
      continue
    if isinstance(row, dict):
      yield _Row(location, row)
    else:
      yield _Row(location, None, ("bad_row", f"{location}: a JSON {type(row).__name__}, "
                                  "not an object"))


def _csv_rows(source: _Input, delimiter: str, required: dict[str, str]) -> Iterator[_Row]:
  """CSV/TSV rows as dicts keyed by the header; `required` maps columns to their flags."""
  path = source.path
  truncated: list[str] = []

  def text_lines():
    try:
      yield from _decoded(source.lines())
    except _Truncated as error:
      truncated.append(str(error))

  reader = csv.reader(text_lines(), delimiter=delimiter)
  limit = csv.field_size_limit()
  csv.field_size_limit(2**31 - 1)  # any caption length (the C long of every platform)
  try:
    header = next(reader, None)
    if header is None:
      return
    for key, flag in required.items():
      if key not in header:
        raise cli.UserError(f"{path}: the header has no column {key!r} (it has {header}); "
                            f"name the right one with --{flag}.")
    first_line = reader.line_num + 1
    for fields in reader:
      location = f"{path}:{first_line}"
      lines = reader.line_num - first_line + 1
      first_line = reader.line_num + 1
      if lines > 1 and (swallowed := _swallowed_rows(fields, len(header), delimiter)):
        yield _Row(location, None, ("unbalanced_quote", f"{location}: a quoted field runs "
                                    f"over {lines} lines, {swallowed} of which look like "
                                    "rows: is a quote unbalanced?"), rows=1 + swallowed)
        continue
      try:
        _check_text(fields, location)
      except _BadRow as bad:
        yield _Row(location, None, (bad.reason, str(bad)))
        continue
      if not fields or fields == [""]:
        continue  # a blank line
      elif len(fields) != len(header):
        yield _Row(location, None, ("bad_row", f"{location}: {len(fields)} fields, the header "
                                    f"has {len(header)}"))
      else:
        yield _Row(location, dict(zip(header, fields, strict=True)))
  finally:
    csv.field_size_limit(limit)
  if truncated:
    yield _Row(f"{path}:{first_line}", None, ("truncated_input", f"{path} ends early at "
                                              f"line {first_line} ({truncated[0]})"))


def _swallowed_rows(fields: list[str], width: int, delimiter: str) -> int:
  """How many lines inside `fields` (after each field's first line) parse as a full row."""
  if width < 2:
    return 0
  return sum(len(next(csv.reader([line], delimiter=delimiter), [])) == width
             for field in fields for line in field.split("\n")[1:] if line)


def _field(row: dict[str, Any], key: str, location: str, flag: str) -> Any:
  if key not in row:
    raise _BadRow(f"{location}: the row has no field {key!r} (it has {sorted(row)[:10]}); "
                  f"if it is misnamed, name the right one with --{flag}", "missing_key", key)
  return row[key]


def _list(row: dict[str, Any], key: str, location: str) -> list[Any]:
  value = _field(row, key, location, "format")
  if not isinstance(value, list):
    raise _BadRow(f"{location}: {key!r} is a {type(value).__name__}, not a list", "bad_value")
  return value


def _image_path(name: Any, root: pathlib.Path) -> pathlib.Path:
  if not isinstance(name, str) or not name.strip():
    raise _ImageProblem("missing_image", f"no image path given ({name!r})")
  if "://" in name:
    raise _ImageProblem("missing_image", f"{name} is a URL; images are not downloaded: fetch "
                        "them and give local paths")
  path = pathlib.Path(name)
  return path if path.is_absolute() else root / path


def _text(value: Any, location: str, what: str) -> str:
  """A stripped text; `_BadRow("bad_value")` for a value that is not a string."""
  if not isinstance(value, str):
    raise _BadRow(f"{location}: {what} is of type {type(value).__name__} "
                  f"({repr(value)[:40]}), not a string", "bad_value")
  return value.strip()


# ------------------------------------------------------------------------- rows -> records

def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

def _pair_task(location: str, row: dict[str, Any], root: pathlib.Path, image_key: str,
               text_key: str) -> "_Task | _Result":
  caption = _text(_field(row, text_key, location, "text_key"), location, repr(text_key))
  if not caption:
    return _Result(skipped=("empty_text", f"{location}: empty {text_key!r}"))
  try:
    image = _image_path(_field(row, image_key, location, "image_key"), root)
  except _ImageProblem as problem:
    return _Result(skipped=(problem.reason, f"{location}: {problem}"))
  return _Task(location, "pair", (image, caption))


def _mmc4_task(location: str, row: dict[str, Any], root: pathlib.Path, image_key: str,
               min_sim: float | None) -> "_Task | _Result":
  sentences = [_text(s, location, f"sentence {i}")
               for i, s in enumerate(_list(row, "text_list", location))]
  if not any(sentences):
    return _Result(skipped=("empty_text", f"{location}: no sentence has text"))
  matched: list[tuple[int, pathlib.Path]] = []
  dropped = []
  for number, info in enumerate(_list(row, "image_info", location)):
    where = f"{location}: image {number}"
    info = info if isinstance(info, dict) else {}
    index, sim = info.get("matched_text_index"), info.get("matched_sim")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(sentences):
      dropped.append(("bad_match", f"{where}: matched_text_index {index!r} is not in "
                      f"[0, {len(sentences)})"))
    elif min_sim is not None and not _is_number(sim):
      dropped.append(("bad_value", f"{where}: matched_sim {sim!r} is not a number"))
    elif min_sim is not None and sim < min_sim:
      dropped.append(("low_similarity", f"{where}: matched_sim {sim!r} < {min_sim}"))
    else:
      try:
        matched.append((index, _image_path(info.get(image_key), root)))
      except _ImageProblem as problem:
        dropped.append((problem.reason, f"{where}: {problem}"))
  return _Task(location, "document", tuple(mmc4_order(sentences, matched)), tuple(dropped))


def _obelics_task(location: str, row: dict[str, Any], root: pathlib.Path) -> "_Task | _Result":
  texts, images = _list(row, "texts", location), _list(row, "images", location)
  if len(texts) != len(images):
    return _Result(skipped=("bad_row", f"{location}: {len(texts)} texts but {len(images)} "
                            "images; each position holds one text or one image"))
  items: list[str | pathlib.Path] = []
  dropped = []
  for position, (text, image) in enumerate(zip(texts, images, strict=True)):
    if text is not None and image is not None:
      return _Result(skipped=("bad_row", f"{location}: position {position} holds both a text "
                              "and an image"))
    if image is not None:
      try:
        items.append(_image_path(image, root))
      except _ImageProblem as problem:
        dropped.append((problem.reason, f"{location}: position {position}: {problem}"))
    elif text is not None and (text := _text(text, location, f"text {position}")):
      items.append(text)
  if not any(isinstance(item, str) for item in items):
    return _Result(skipped=("empty_text", f"{location}: no text"), dropped=tuple(dropped))
  return _Task(location, "document", tuple(items), tuple(dropped))


def _llava_task(location: str, row: dict[str, Any], root: pathlib.Path, image_key: str
                ) -> "_Task | _Result":
  name = row.get("id", location)
  where = f"{location} (id {name!r})"
  conversations = _field(row, "conversations", location, "format")
  try:
    if not isinstance(conversations, list) or not conversations:
      raise CorruptRecord("bad_conversation", f"{where}: `conversations` is "
                          f"{conversations!r:.60}, not a non-empty list of turns")
    turns = conversation.turns_of(conversations, f"{where}: ")
  except CorruptRecord as error:
    return _Result(skipped=(error.reason, str(error).removeprefix(f"{error.reason}: ")))
  references = image_names({"image": row.get(image_key)})
  placeholders = sum(text.count(MEDIA_TOKEN) for _, text in turns)
  if placeholders != len(references):
    return _Result(skipped=("image_token_mismatch", f"{where}: {placeholders} {MEDIA_TOKEN} "
                            f"placeholders for {len(references)} images"))
  images = []
  for reference in references:
    try:
      images.append(_image_path(reference, root))
    except _ImageProblem as problem:
      return _Result(skipped=(problem.reason, f"{where}: {problem}"))
  text = json.dumps({"id": name, "conversations": conversations}, ensure_ascii=False)
  return _Task(where, "conversation", (text, *images))


# ------------------------------------------------------------------------------------ writing

def shard_paths(output: str, num_shards: int) -> list[str]:
  return [f"{output}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def _encoded(tasks: Iterator["_Task | _Result"], encode, num_workers: int) -> Iterator[_Result]:
  """Encodes in order; workers take bounded windows so memory stays flat on huge inputs."""
  if num_workers <= 0:
    yield from map(encode, tasks)
    return
  # spawn, not fork: the caller may hold JAX or other threads that fork would copy broken.
  # An executor (unlike multiprocessing.Pool) fails instead of hanging if a worker dies.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as executor:
    while window := list(itertools.islice(tasks, 64 * num_workers)):
      yield from executor.map(encode, window, chunksize=4)


def convert(format: str, inputs: str | Sequence[str], output: str, *,
            image_root: str | None = None, image_key: str | None = None,
            text_key: str = "caption", min_sim: float | None = None, num_shards: int = 1,
            max_image_size: int | None = None, image_format: str = "jpeg",
            num_workers: int = 0, overwrite: bool = False,
            progress_every: float | None = 30.0) -> ConversionReport:
  """Converts `inputs` (files or globs) to `OUTPUT-iiiii-of-nnnnn.array_record` shards.

  Args:
    format: "pairs", "mmc4", "obelics" or "llava" (see the module docstring).
    image_root: where relative image paths start; default: each input file's directory.
    image_key: the image field: default "image" (pairs, llava) or "image_name" (mmc4).
    text_key: the caption field of pairs.
    min_sim: MMC4 images matched with a lower `matched_sim` are left out.
    num_shards: output files; records go round-robin.
    max_image_size: cap on the stored images' shorter side.
    image_format: "jpeg" or "png".
    num_workers: processes decoding and encoding images (0: this process).
    overwrite: replace existing shards of `output`; otherwise they are an error.
    progress_every: seconds between progress lines on stderr; None: none.
  Returns:
    The report; `report.summary()` is what the command line prints.
  """
  if format not in FORMATS:
    raise ValueError(f"Unknown format {format!r}; expected one of {FORMATS}.")
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"Unknown image format {image_format!r}; expected one of "
                     f"{sorted(IMAGE_FORMATS)}.")
  if num_shards < 1:
    raise ValueError(f"num_shards must be at least 1, got {num_shards}.")
  files = _input_files(inputs)
  image_key = image_key or ("image_name" if format == "mmc4" else "image")
  output_path = pathlib.Path(output)
  existing = sorted(p for p in output_path.parent.glob(f"{output_path.name}-*")
                    if SHARD_PATTERN.fullmatch(p.name[len(output_path.name):]))
  if existing and not overwrite:
    raise FileExistsError(f"{len(existing)} shards of {output!r} exist already (e.g. "
                          f"{existing[0]}); remove them or pass overwrite=True (--overwrite).")
  output_path.parent.mkdir(parents=True, exist_ok=True)

  inputs_read = [_Input(file) for file in files]
  required = {image_key: "image_key", text_key: "text_key"} if format == "pairs" else {}
  missing_keys: collections.Counter = collections.Counter()
  present_keys: set[str] = set()

  def tasks() -> Iterator["_Task | _Result"]:
    for source in inputs_read:
      root = pathlib.Path(image_root or source.path.parent).absolute()
      for row in _rows(source, required):
        try:
          if row.fields is None:
            task = _Result(skipped=row.problem, rows=row.rows)
          elif format == "pairs":
            task = _pair_task(row.location, row.fields, root, image_key, text_key)
          elif format == "mmc4":
            task = _mmc4_task(row.location, row.fields, root, image_key, min_sim)
          elif format == "llava":
            task = _llava_task(row.location, row.fields, root, image_key)
          else:
            task = _obelics_task(row.location, row.fields, root)
        except _BadRow as bad:
          task = _Result(skipped=(bad.reason, str(bad)))
          if bad.key is not None:
            missing_keys[bad.key] += 1
            _check_key_exists(bad, missing_keys[bad.key], present_keys)
        if row.fields is not None:
          present_keys.update(row.fields)
        yield task

  encode = functools.partial(_encode, max_image_size=max_image_size, image_format=image_format)
  report = ConversionReport(shard_paths(output, num_shards))
  progress = _Progress(inputs_read, progress_every)
  temporary = [f"{path}.incomplete" for path in report.shards]
  writers = [ArrayRecordWriter(path, "group_size:1") for path in temporary]
  try:
    for result in _encoded(tasks(), encode, num_workers):
      _count(report, result)
      if result.record is not None:
        writers[report.written % num_shards].write(result.record)
        report.written += 1
        report.images += result.images
      progress.update(report)
  except BaseException:
    for writer, path in zip(writers, temporary, strict=True):
      writer.close()
      pathlib.Path(path).unlink(missing_ok=True)
    raise
  for writer in writers:
    writer.close()
  for path in existing:
    path.unlink()
  for source, target in zip(temporary, report.shards, strict=True):
    pathlib.Path(source).replace(target)  # complete shards only ever appear under their name
  return report


MISSING_KEY_PATIENCE = 1000


def _check_key_exists(bad: "_BadRow", missing: int, present: set[str]):
  """Stops a conversion whose first `MISSING_KEY_PATIENCE` rows all lack a key that no row
  had: the key is misnamed, and converting the rest would only count more of them."""
  if missing >= MISSING_KEY_PATIENCE and bad.key not in present:
    raise cli.UserError(f"None of the first {missing} rows has the field {bad.key!r}; "
                        f"first case: {bad}.")


class _Progress:
  """At most one line every `every` seconds on stderr: rows/s, images/s and, from the input
  bytes read, the share done and the ETA."""

  def __init__(self, inputs: Sequence["_Input"], every: float | None,
               write: Callable[[str], None] | None = None):
    self._inputs = inputs
    self._every = every
    self._write = write or (lambda line: print(line, file=sys.stderr, flush=True))
    self._start = time.monotonic()
    self._next = self._start + (every or 0)

  def update(self, report: ConversionReport):
    now = time.monotonic()
    if self._every is None or now < self._next:
      return
    self._next = now + self._every
    self._write(self.line(report, now - self._start))

  def line(self, report: ConversionReport, elapsed: float) -> str:
    total = sum(source.total for source in self._inputs)
    done = sum(source.done for source in self._inputs)
    fraction = done / total if total else 0.0
    eta = (f"ETA {cli.duration(elapsed * (1 - fraction) / fraction)}" if fraction > 0
           else "ETA unknown")
    elapsed = max(elapsed, 1e-9)
    return (f"{report.rows:,} rows ({report.rows / elapsed:,.0f}/s), {report.written:,} "
            f"records, {report.images:,} images ({report.images / elapsed:,.1f}/s), "
            f"{sum(report.skipped.values()):,} rows skipped; {100 * fraction:.1f}% of the "
            f"input read, {cli.duration(elapsed)} so far, {eta}")


def _input_files(inputs: str | Sequence[str]) -> list[pathlib.Path]:
  patterns = [inputs] if isinstance(inputs, str) else list(inputs)
  files: list[pathlib.Path] = []
  for pattern in patterns:
    path = pathlib.Path(pattern)
    matches = (sorted(path.parent.glob(path.name)) if any(c in pattern for c in "*?[")
               else [path] if path.exists() else [])
    if not matches:
      raise FileNotFoundError(f"No input file matches {pattern!r}.")
    files.extend(matches)
  return files


def _count(report: ConversionReport, result: _Result):
  report.rows += result.rows
  problems = [("skipped", *result.skipped)] if result.skipped else []
  problems += [("dropped", reason, detail) for reason, detail in result.dropped]
  for kind, reason, detail in problems:
    (report.skipped if kind == "skipped" else report.dropped_images)[reason] += (
        result.rows if kind == "skipped" else 1)
    if f"{kind}/{reason}" not in report.first_case:
      report.first_case[f"{kind}/{reason}"] = detail
      logging.warning("%s (%s; further ones are only counted)", detail, reason)


# ------------------------------------------------------------------------------- command line

def _define_flags():
  """Flags exist only when run as a program, so importing the library defines none.

  They may override same-named flags of modules imported on the way (the tokenizer's
  `--output`): when this module is the program, its flags are the ones that mean something.
  """
  define = {"allow_override": True}
  flags.DEFINE_enum("format", None, FORMATS, "Input format (see the module docstring).",
                    **define)
  flags.DEFINE_list("input", None, "Input files or globs, comma-separated.", **define)
  flags.DEFINE_string("output", None, "Output prefix: writes PREFIX-iiiii-of-nnnnn.array_record.",
                      **define)
  flags.DEFINE_string("image_root", None, "Where relative image paths start (default: each "
                      "input file's directory).", **define)
  flags.DEFINE_string("image_key", None, "Image field: default 'image' (pairs, llava), "
                      "'image_name' (mmc4).", **define)
  flags.DEFINE_string("text_key", "caption", "Caption field of pairs.", **define)
  flags.DEFINE_float("min_sim", None, "mmc4: leave out images with a lower matched_sim.",
                     **define)
  flags.DEFINE_integer("num_shards", 1, "Number of output shards.", **define)
  flags.DEFINE_integer("max_image_size", None, "Cap on the stored images' shorter side.",
                       **define)
  flags.DEFINE_enum("image_format", "jpeg", sorted(IMAGE_FORMATS), "Stored image encoding.",
                    **define)
  flags.DEFINE_integer("num_workers", 0, "Image encoding processes (0: this one).", **define)
  flags.DEFINE_bool("overwrite", False, "Replace existing shards of --output.", **define)
  flags.DEFINE_float("progress_every", 30.0, "Seconds between progress lines (rows/s, "
                     "images/s, ETA) on stderr.", **define)
  for name in ("format", "input", "output"):
    flags.mark_flag_as_required(name)


def main(argv: Sequence[str]):
  if len(argv) > 1:
    raise cli.UserError(f"Unexpected arguments {argv[1:]}; everything is a --flag.")
  f = flags.FLAGS
  try:
    report = convert(f.format, f.input, f.output, image_root=f.image_root,
                     image_key=f.image_key, text_key=f.text_key, min_sim=f.min_sim,
                     num_shards=f.num_shards, max_image_size=f.max_image_size,
                     image_format=f.image_format, num_workers=f.num_workers,
                     overwrite=f.overwrite, progress_every=f.progress_every)
  except (FileNotFoundError, FileExistsError) as error:
    raise cli.UserError(str(error)) from error
  print(report.summary())
  if report.written == 0:
    raise cli.UserError("Nothing was written: every row was skipped (the counts and first "
                        "cases are above).")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
