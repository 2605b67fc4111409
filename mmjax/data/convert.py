"""Convert image-text data as people have it into ArrayRecord shards for the pipeline.

  python -m mmjax.data.convert --format=pairs --input=captions.csv --image_key=file \\
      --text_key=caption --output=/data/cc/cc --num_shards=8 --max_image_size=256
  python -m mmjax.data.convert --format=mmc4 --input='/data/mmc4/docs_*.jsonl' \\
      --image_root=/data/mmc4/images --min_sim=0.24 --output=/data/mmc4/mmc4 --num_shards=64
  python -m mmjax.data.convert --format=obelics --input=obelics.jsonl --output=/data/obelics/ob

Input formats (JSONL may be plain, `.gz`, or a `.zip` holding one file):
  pairs: JSONL rows `{"image": path, "caption": str}`, or a CSV (`.csv`) / TSV (`.tsv`) file
    with a header row; `--image_key` and `--text_key` name the fields or columns.
  mmc4: JSONL rows `{"text_list": [sentence, ...], "image_info": [{"image_name": name,
    "matched_text_index": i, "matched_sim": s}, ...]}`. Each image goes right before its
    matched sentence (several images matched to one sentence keep their order);
    `--min_sim` leaves out weakly matched images.
  obelics: JSONL rows `{"texts": [str | null, ...], "images": [path | null, ...]}`: position
    `i` holds either a text or an image, in reading order.

Image paths are absolute or relative to `--image_root` (default: the input file's own
directory). Nothing is downloaded: a URL counts as a missing image. Every image is decoded,
turned upright (EXIF), made RGB, shrunk so its shorter side is at most `--max_image_size`
(if given; the reader's centre crop still sees the whole image) and re-encoded as JPEG
(quality 95) or PNG. Records go round-robin to `OUTPUT-iiiii-of-nnnnn.array_record`, so the
shards are a pure function of the inputs and the flags, whatever `--num_workers` is.

Nothing is dropped silently. Records are skipped, counted per reason: `bad_row` (not JSON,
or `texts`/`images` of different lengths), `empty_text`, `missing_image` and `bad_image`
(pairs), `no_images` (documents with no usable image). Images left out of kept documents
are counted too: `missing_image`, `bad_image`, `low_similarity`, `bad_match` (a matched
sentence index out of range). The summary at the end lists every count with its first case.
"""

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import gzip
import io
import itertools
import json
import multiprocessing
import pathlib
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from absl import app, flags, logging
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from mmjax.data.sources import SHARD_PATTERN, UnsupportedImage, encode_record, load_image

FORMATS = ("pairs", "mmc4", "obelics")
IMAGE_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
JPEG_QUALITY = 95


class _BadRow(Exception):
  """A row of the right format whose content is malformed."""


class _ImageProblem(Exception):
  """An image that cannot be used; `reason` is the counted category."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class _Task:
  """One record to encode: texts (`str`) and image files (`Path`), in reading order."""

  location: str
  kind: Literal["pair", "document"]
  items: tuple[str | pathlib.Path, ...]
  dropped: tuple[tuple[str, str], ...] = ()  # (reason, detail) of images already left out


@dataclasses.dataclass(frozen=True)
class _Result:
  """An encoded record, or why the row was skipped; plus images left out of it."""

  record: bytes | None = None
  skipped: tuple[str, str] | None = None
  dropped: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class ConversionReport:
  """What a conversion wrote and everything it left out, counted per reason."""

  shards: list[str]
  written: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dropped_images: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first_case: dict[str, str] = dataclasses.field(default_factory=dict)

  def summary(self) -> str:
    lines = [f"Wrote {self.written} records to {len(self.shards)} shards "
             f"({self.shards[0]} ...)."]
    for title, counts, key in (("Records skipped", self.skipped, "skipped"),
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
      if task.kind == "pair":
        return _Result(skipped=(problem.reason, f"{task.location}: {problem}"))
      dropped.append((problem.reason, f"{task.location}: {problem}"))
  if not any(isinstance(item, bytes) for item in content):
    return _Result(skipped=("no_images", f"{task.location}: no usable image"),
                   dropped=tuple(dropped))
  return _Result(record=encode_record(content), dropped=tuple(dropped))


# --------------------------------------------------------------------------------- input rows

def _open_text(path: pathlib.Path, stack: contextlib.ExitStack) -> io.TextIOBase:
  if path.suffix == ".gz":
    return stack.enter_context(gzip.open(path, "rt", encoding="utf-8"))
  if path.suffix == ".zip":
    archive = stack.enter_context(zipfile.ZipFile(path))
    members = [name for name in archive.namelist() if not name.endswith("/")]
    if len(members) != 1:
      raise ValueError(f"{path} holds {len(members)} files; a zipped input must hold exactly "
                       "one JSONL file.")
    return stack.enter_context(io.TextIOWrapper(archive.open(members[0]), encoding="utf-8"))
  return stack.enter_context(open(path, encoding="utf-8", newline=""))


def _input_format(path: pathlib.Path) -> str:
  suffixes = [s for s in path.suffixes if s not in (".gz", ".zip")]
  suffix = suffixes[-1] if suffixes else ""
  formats = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
  if suffix not in formats:
    raise ValueError(f"Cannot tell the format of {path} from its name; name it .jsonl, "
                     ".csv or .tsv (optionally .gz or .zip for JSONL).")
  return formats[suffix]


def _rows(path: pathlib.Path) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
  """`(location, row, "")`, or `(location, None, problem)` for an unparsable row."""
  input_format = _input_format(path)
  with contextlib.ExitStack() as stack:
    file = _open_text(path, stack)
    if input_format != "jsonl":
      reader = csv.DictReader(file, delimiter="," if input_format == "csv" else "\t")
      for row in reader:
        yield f"{path}:{reader.line_num}", row, ""
      return
    for number, line in enumerate(file, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        yield f"{path}:{number}", None, f"not valid JSON ({error})"
        continue
      if isinstance(row, dict):
        yield f"{path}:{number}", row, ""
      else:
        yield f"{path}:{number}", None, f"a JSON {type(row).__name__}, not an object"


def _field(row: dict[str, Any], key: str, location: str, flag: str) -> Any:
  if key not in row:
    raise ValueError(f"{location}: the row has no field {key!r} (it has {sorted(row)}); "
                     f"name the right one with --{flag}.")
  return row[key]


def _list(row: dict[str, Any], key: str, location: str) -> list[Any]:
  value = _field(row, key, location, "format")
  if not isinstance(value, list):
    raise _BadRow(f"{location}: {key!r} is a {type(value).__name__}, not a list")
  return value


def _image_path(name: Any, root: pathlib.Path) -> pathlib.Path:
  if not isinstance(name, str) or not name.strip():
    raise _ImageProblem("missing_image", f"no image path given ({name!r})")
  if "://" in name:
    raise _ImageProblem("missing_image", f"{name} is a URL; images are not downloaded: fetch "
                        "them and give local paths")
  path = pathlib.Path(name)
  return path if path.is_absolute() else root / path


def _text(value: Any) -> str:
  return value.strip() if isinstance(value, str) else ""


# ------------------------------------------------------------------------- rows -> records

def _pair_task(location: str, row: dict[str, Any], root: pathlib.Path, image_key: str,
               text_key: str) -> "_Task | _Result":
  caption = _text(_field(row, text_key, location, "text_key"))
  if not caption:
    return _Result(skipped=("empty_text", f"{location}: empty {text_key!r}"))
  try:
    image = _image_path(_field(row, image_key, location, "image_key"), root)
  except _ImageProblem as problem:
    return _Result(skipped=(problem.reason, f"{location}: {problem}"))
  return _Task(location, "pair", (image, caption))


def _mmc4_task(location: str, row: dict[str, Any], root: pathlib.Path, image_key: str,
               min_sim: float | None) -> "_Task | _Result":
  sentences = [_text(s) for s in _list(row, "text_list", location)]
  if not any(sentences):
    return _Result(skipped=("empty_text", f"{location}: no sentence has text"))
  images_before: dict[int, list[pathlib.Path]] = collections.defaultdict(list)
  dropped = []
  for number, info in enumerate(_list(row, "image_info", location)):
    where = f"{location}: image {number}"
    info = info if isinstance(info, dict) else {}
    index, sim = info.get("matched_text_index"), info.get("matched_sim")
    if not isinstance(index, int) or not 0 <= index < len(sentences):
      dropped.append(("bad_match", f"{where}: matched_text_index {index!r} is not in "
                      f"[0, {len(sentences)})"))
    elif min_sim is not None and (sim is None or sim < min_sim):
      dropped.append(("low_similarity", f"{where}: matched_sim {sim!r} < {min_sim}"))
    else:
      try:
        images_before[index].append(_image_path(info.get(image_key), root))
      except _ImageProblem as problem:
        dropped.append((problem.reason, f"{where}: {problem}"))
  items: list[str | pathlib.Path] = []
  for index, sentence in enumerate(sentences):
    items.extend(images_before[index])
    if sentence:
      items.append(sentence)
  return _Task(location, "document", tuple(items), tuple(dropped))


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
    elif _text(text):
      items.append(_text(text))
  if not any(isinstance(item, str) for item in items):
    return _Result(skipped=("empty_text", f"{location}: no text"), dropped=tuple(dropped))
  return _Task(location, "document", tuple(items), tuple(dropped))


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
            num_workers: int = 0, overwrite: bool = False) -> ConversionReport:
  """Converts `inputs` (files or globs) to `OUTPUT-iiiii-of-nnnnn.array_record` shards.

  Args:
    format: "pairs", "mmc4" or "obelics" (see the module docstring).
    image_root: where relative image paths start; default: each input file's directory.
    image_key: the image field: default "image" (pairs) or "image_name" (mmc4).
    text_key: the caption field of pairs.
    min_sim: MMC4 images matched with a lower `matched_sim` are left out.
    num_shards: output files; records go round-robin.
    max_image_size: cap on the stored images' shorter side.
    image_format: "jpeg" or "png".
    num_workers: processes decoding and encoding images (0: this process).
    overwrite: replace existing shards of `output`; otherwise they are an error.
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

  def tasks() -> Iterator["_Task | _Result"]:
    for file in files:
      root = pathlib.Path(image_root or file.parent).absolute()
      for location, row, problem in _rows(file):
        try:
          if row is None:
            raise _BadRow(f"{location}: {problem}")
          if format == "pairs":
            task = _pair_task(location, row, root, image_key, text_key)
          elif format == "mmc4":
            task = _mmc4_task(location, row, root, image_key, min_sim)
          else:
            task = _obelics_task(location, row, root)
        except _BadRow as bad:
          task = _Result(skipped=("bad_row", str(bad)))
        yield task

  encode = functools.partial(_encode, max_image_size=max_image_size, image_format=image_format)
  report = ConversionReport(shard_paths(output, num_shards))
  temporary = [f"{path}.incomplete" for path in report.shards]
  writers = [ArrayRecordWriter(path, "group_size:1") for path in temporary]
  try:
    for result in _encoded(tasks(), encode, num_workers):
      _count(report, result)
      if result.record is not None:
        writers[report.written % num_shards].write(result.record)
        report.written += 1
        if report.written % 10_000 == 0:
          logging.info("Converted %d records.", report.written)
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
  problems = [("skipped", *result.skipped)] if result.skipped else []
  problems += [("dropped", reason, detail) for reason, detail in result.dropped]
  for kind, reason, detail in problems:
    (report.skipped if kind == "skipped" else report.dropped_images)[reason] += 1
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
  flags.DEFINE_string("image_key", None, "Image field: default 'image' (pairs), 'image_name' "
                      "(mmc4).", **define)
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
  for name in ("format", "input", "output"):
    flags.mark_flag_as_required(name)


def main(argv: Sequence[str]):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; everything is a --flag.")
  f = flags.FLAGS
  report = convert(f.format, f.input, f.output, image_root=f.image_root,
                   image_key=f.image_key, text_key=f.text_key, min_sim=f.min_sim,
                   num_shards=f.num_shards, max_image_size=f.max_image_size,
                   image_format=f.image_format, num_workers=f.num_workers,
                   overwrite=f.overwrite)
  print(report.summary())
  if report.written == 0:
    raise SystemExit("Nothing was written: every record was skipped (see above).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
