"""Converter: pairs (JSONL, CSV), MMC4 and OBELICS documents -> shards the sources read back."""

import csv
import gzip
import io
import json
import pathlib
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from absl import flags
from PIL import Image

from mmjax.data import convert, sources

ROOT = pathlib.Path(__file__).parent.parent
SIZE = 8
COLOURS = {"red": (250, 0, 0), "green": (0, 250, 0), "blue": (0, 0, 250), "grey": (90, 90, 90)}


@pytest.fixture
def images(tmp_path) -> dict[str, np.ndarray]:
  """`images/<colour>.png` (JPEG for grey), plus `images/broken.jpg` that is no image."""
  folder = tmp_path / "images"
  folder.mkdir()
  arrays = {}
  for i, (name, colour) in enumerate(COLOURS.items()):
    array = np.zeros((12 + 2 * i, 20, 3), np.uint8)
    array[:] = colour
    array[:2] = 255 - array[:2]  # a stripe, so orientation and cropping show
    arrays[name] = array
    Image.fromarray(array).save(folder / f"{name}.{'jpg' if name == 'grey' else 'png'}")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  return arrays


def write_jsonl(path: pathlib.Path, rows: list, opener=open) -> str:
  with opener(path, "wt", encoding="utf-8") as file:
    for row in rows:
      file.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


def expected(array: np.ndarray) -> np.ndarray:
  return sources.resize_center_crop(Image.fromarray(array), SIZE)


def test_pairs_from_jsonl_round_trip_and_every_skip_is_reported(tmp_path, images):
  rows = [{"image": "images/red.png", "caption": "a red thing."},
          {"image": str(tmp_path / "images/green.png"), "caption": " a green thing. "},
          {"image": "images/missing.png", "caption": "gone."},
          {"image": "images/blue.png", "caption": "a blue thing."},
          {"image": "images/broken.jpg", "caption": "broken."},
          {"image": "images/red.png", "caption": "   "},
          "{not json",
          {"image": "https://example.com/a.jpg", "caption": "remote."},
          {"image": "images/grey.jpg", "caption": "a grey thing."}]
  report = convert.convert("pairs", write_jsonl(tmp_path / "pairs.jsonl", rows),
                           str(tmp_path / "out/pairs"), num_shards=2, image_format="png")
  assert report.written == 4
  assert report.skipped == {"missing_image": 2, "bad_image": 1, "empty_text": 1, "bad_row": 1}
  summary = report.summary()
  assert "Read 9 rows. Wrote 4 records (4 images) to 2 shards" in summary
  assert "Rows skipped: 5" in summary
  assert f"missing_image: 2 (first: {tmp_path}/pairs.jsonl:3: image file " in summary
  assert "pairs.jsonl:5: cannot decode image file" in summary
  assert "bad_row: 1 (first: " in summary and "not valid JSON" in summary

  source = sources.ArrayRecordPairs(str(tmp_path / "out/pairs-*.array_record"), SIZE)
  names = ["red", "blue", "green", "grey"]  # round-robin: shard 0 holds records 0 and 2
  assert [source[i]["text"] for i in range(4)] == [
      f"<image>a {name} thing.<|endofchunk|>" for name in names]
  for i, name in enumerate(names[:3]):  # PNG is lossless: exactly the original, preprocessed
    np.testing.assert_array_equal(source[i]["images"], expected(images[name])[None])
  assert np.abs(source[3]["images"][0].astype(int) - expected(images["grey"])).mean() < 3


def test_pairs_from_csv_with_an_image_root_and_a_size_cap(tmp_path, images):
  with open(tmp_path / "captions.csv", "w", newline="", encoding="utf-8") as file:
    writer = csv.writer(file)
    writer.writerow(["file", "text"])
    writer.writerows([["red.png", "a red, striped thing."], ["blue.png", "a blue thing."]])
  report = convert.convert("pairs", str(tmp_path / "*.csv"), str(tmp_path / "cc"),
                           image_root=str(tmp_path / "images"), image_key="file",
                           text_key="text", max_image_size=6)
  assert report.written == 2 and not report.skipped
  source = sources.ArrayRecordPairs(str(tmp_path / "cc-00000-of-00001.array_record"), SIZE)
  assert source[0]["text"] == "<image>a red, striped thing.<|endofchunk|>"
  stored = Image.open(io.BytesIO(source.content(0)[0]))
  assert stored.format == "JPEG" and min(stored.size) == 6  # 12x20 shrunk to 6x10
  with pytest.raises(ValueError, match=r"no column 'caption' \(it has \['file', 'text'\]\).*"
                     "--text_key"):
    convert.convert("pairs", str(tmp_path / "captions.csv"), str(tmp_path / "x"),
                    image_key="file")


def test_mmc4_documents_put_each_image_before_its_matched_sentence(tmp_path, images):
  def info(name, index, sim=0.3):
    return {"image_name": name, "raw_url": f"https://example.com/{name}",
            "matched_text_index": index, "matched_sim": sim}

  rows = [{"text_list": ["Intro.", "The red one.", "Then blue and grey.", "Unmatched.",
                         "Green last."],
           "image_info": [info("green.png", 4), info("red.png", 1), info("blue.png", 2),
                          info("grey.jpg", 2), info("missing.png", 3),
                          info("red.png", 0, sim=0.1), info("red.png", 9)]},
          {"text_list": ["Nothing usable."], "image_info": [info("broken.jpg", 0)]},
          {"text_list": ["", "  "], "image_info": [info("red.png", 0)]},
          {"text_list": "not a list", "image_info": []}]
  inputs = write_jsonl(tmp_path / "docs.jsonl.gz", rows, opener=gzip.open)
  report = convert.convert("mmc4", inputs, str(tmp_path / "mmc4"),
                           image_root=str(tmp_path / "images"), min_sim=0.2, image_format="png")
  assert report.written == 1
  assert report.skipped == {"no_images": 1, "empty_text": 1, "bad_value": 1}
  assert report.dropped_images == {"missing_image": 1, "low_similarity": 1, "bad_match": 1,
                                   "bad_image": 1}
  assert "matched_text_index 9 is not in [0, 5)" in report.summary()
  doc = sources.ArrayRecordDocuments(str(tmp_path / "mmc4-*.array_record"), SIZE)[0]
  assert doc["text"] == ("Intro.<image>The red one.<|endofchunk|><image><|endofchunk|>"
                         "<image>Then blue and grey. Unmatched.<|endofchunk|>"
                         "<image>Green last.<|endofchunk|>")
  for i, name in enumerate(("red", "blue", "grey", "green")):  # grey is a JPEG: near enough
    assert np.abs(doc["images"][i].astype(int) - expected(images[name])).mean() < 3, name

def test_obelics_documents_keep_reading_order(tmp_path, images):
  rows = [{"texts": ["A page about colours.", None, "Red is warm.", None, "  ", "Blue is cold."],
           "images": [None, "images/red.png", None, "images/blue.png", None, None]},
          {"texts": ["a", None], "images": [None]},
          {"texts": ["both"], "images": ["images/red.png"]},
          {"texts": ["remote", None], "images": [None, "https://example.com/x.png"]}]
  jsonl = write_jsonl(tmp_path / "obelics.jsonl", rows)
  with zipfile.ZipFile(tmp_path / "obelics.jsonl.zip", "w") as archive:
    archive.write(jsonl, "obelics.jsonl")
  report = convert.convert("obelics", str(tmp_path / "obelics.jsonl.zip"),
                           str(tmp_path / "ob"), image_format="png")
  assert report.written == 1
  assert report.skipped == {"bad_row": 2, "no_images": 1}
  assert report.dropped_images == {"missing_image": 1}
  assert "is a URL; images are not downloaded" in report.summary()
  doc = sources.ArrayRecordDocuments(str(tmp_path / "ob-*.array_record"), SIZE)[0]
  assert doc["text"] == ("A page about colours.<image>Red is warm.<|endofchunk|>"
                         "<image>Blue is cold.<|endofchunk|>")
  np.testing.assert_array_equal(doc["images"], [expected(images["red"]),
                                                expected(images["blue"])])


def test_shards_are_a_function_of_the_inputs_and_never_mixed_with_old_ones(tmp_path, images):
  del images
  rows = [{"image": f"images/{name}.png", "caption": f"{name} {i}"}
          for i in range(12) for name in ("red", "green", "blue")]
  inputs = write_jsonl(tmp_path / "pairs.jsonl", rows)
  convert.convert("pairs", inputs, str(tmp_path / "a/p"), num_shards=3)
  convert.convert("pairs", inputs, str(tmp_path / "b/p"), num_shards=3, num_workers=2)
  for path in sorted((tmp_path / "a").iterdir()):
    assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
  with pytest.raises(FileExistsError, match="3 shards of .* exist already.*--overwrite"):
    convert.convert("pairs", inputs, str(tmp_path / "a/p"), num_shards=2)
  (tmp_path / "a/p-extra-00000-of-00001.array_record").write_bytes(b"another data set")
  convert.convert("pairs", inputs, str(tmp_path / "a/p"), num_shards=2, overwrite=True)
  assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
      "p-00000-of-00002.array_record", "p-00001-of-00002.array_record",
      "p-extra-00000-of-00001.array_record"]


def test_command_line(tmp_path, images):
  del images
  assert "num_shards" not in flags.FLAGS  # importing the library defines no flags
  inputs = write_jsonl(tmp_path / "pairs.jsonl", [
      {"img": "images/red.png", "text": "red."}, {"img": "images/nope.png", "text": "x"}])

  def run(*args):
    return subprocess.run([sys.executable, "-m", "mmjax.data.convert", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)

  done = run("--format=pairs", f"--input={inputs}", f"--output={tmp_path}/cli/p",
             "--image_key=img", "--text_key=text", "--num_shards=2")
  assert done.returncode == 0, done.stderr
  assert "Wrote 1 records (1 images) to 2 shards" in done.stdout
  assert "missing_image: 1" in done.stdout
  assert len(sources.ArrayRecordPairs(f"{tmp_path}/cli/p-*.array_record", SIZE)) == 1
  failed = run("--format=pairs", f"--input={inputs}", f"--output={tmp_path}/cli/q",
               "--image_key=img", "--text_key=text", "--max_image_size=4",
               f"--image_root={tmp_path}/nowhere")
  assert failed.returncode != 0 and "Nothing was written" in failed.stderr


def jsonl_bytes(rows) -> bytes:
  return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n"
                  for row in rows)


def assert_every_row_accounted(report, rows: int):
  assert report.rows == rows == report.written + sum(report.skipped.values()), report.summary()


def test_bad_jsonl_rows_are_counted_and_the_conversion_goes_on(tmp_path, images):
  del images
  good = {"image": "images/red.png", "caption": "a red thing."}
  rows = [
      good,  # first, after a byte order mark: must not become a bad row
      b'{"image": "images/red.png", "caption": "caf\xe9 latin-1"}',  # not UTF-8
      b'{"image": "images/red.png", "caption": "lone \\ud800 surrogate"}',
      {"image": "images/red.png"},  # no caption
      {"image": "images/red.png", "caption": 42},  # not a string
      {"image": "images/red.png", "caption": ["a", "list"]},
      b"[1, 2]",
      good]
  path = tmp_path / "pairs.jsonl"
  path.write_bytes(convert.BOM + jsonl_bytes(rows))
  report = convert.convert("pairs", str(path), str(tmp_path / "out/p"))
  assert report.written == 2
  assert report.skipped == {"bad_encoding": 2, "missing_key": 1, "bad_value": 2, "bad_row": 1}
  assert_every_row_accounted(report, 8)
  summary = report.summary()
  assert "pairs.jsonl:2: holds bytes that are not UTF-8" in summary
  assert "'caption' is of type int (42), not a string" in summary
  assert "has no field 'caption'" in summary and "--text_key" in summary
  (tmp_path / "surrogate.jsonl").write_bytes(rows[2] + b"\n" + jsonl_bytes([good]))
  report = convert.convert("pairs", str(tmp_path / "surrogate.jsonl"), str(tmp_path / "s/p"))
  assert report.written == 1 and report.skipped == {"bad_encoding": 1}
  assert "holds a lone surrogate" in report.summary()


def test_a_key_no_row_has_stops_the_conversion_early(tmp_path, monkeypatch):
  monkeypatch.setattr(convert, "MISSING_KEY_PATIENCE", 5)
  path = tmp_path / "pairs.jsonl"
  path.write_bytes(jsonl_bytes([{"image": "x.png", "text": f"t{i}"} for i in range(20)]))
  with pytest.raises(ValueError, match=r"None of the first 5 rows has the field 'caption'"):
    convert.convert("pairs", str(path), str(tmp_path / "out/p"))


def test_a_truncated_gzip_keeps_its_complete_rows_and_counts_the_cut_one(tmp_path, images):
  del images
  rows = [{"image": "images/red.png", "caption": f"red number {i}."} for i in range(300)]
  data = gzip.compress(jsonl_bytes(rows))
  cut = data[:len(data) * 2 // 3]
  complete = zlib.decompressobj(31).decompress(cut).count(b"\n")
  assert 0 < complete < 300
  (tmp_path / "cut.jsonl.gz").write_bytes(cut)
  # Concatenated gzip members (as `cat a.gz b.gz` makes) are one stream, read whole.
  (tmp_path / "two.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(rows[:2])) +
                                          gzip.compress(jsonl_bytes(rows[2:5])))
  report = convert.convert("pairs", [str(tmp_path / "cut.jsonl.gz"),
                                     str(tmp_path / "two.jsonl.gz")], str(tmp_path / "out/p"))
  assert report.written == complete + 5
  assert report.skipped == {"truncated_input": 1}
  assert_every_row_accounted(report, complete + 6)
  assert f"cut.jsonl.gz ends early at line {complete + 1}" in report.summary()


def test_bad_csv_rows_are_counted_and_the_conversion_goes_on(tmp_path, images):
  del images
  long_caption = "a very long caption " * 10_000  # 200 000 characters: over csv's limit
  assert len(long_caption) > csv.field_size_limit()
  lines = [b"file,text",  # after a byte order mark
           b"red.png,a red thing.",
           b'blue.png,"an unbalanced quote',  # swallows the next two rows
           b"green.png,a green thing.",
           b'grey.jpg,"a grey ""quoted"" thing."',
           b"blue.png,a blue thing.",
           b"red.png,caf\xe9",  # not UTF-8
           b"red.png,three,fields",
           b'blue.png,"a caption',
           b'over two lines"',  # a genuine multi-line field: kept
           f"green.png,{long_caption}".encode()]
  (tmp_path / "captions.csv").write_bytes(convert.BOM + b"\n".join(lines) + b"\n")
  report = convert.convert("pairs", str(tmp_path / "captions.csv"), str(tmp_path / "cc"),
                           image_root=str(tmp_path / "images"), image_key="file",
                           text_key="text", image_format="png")
  assert report.skipped == {"unbalanced_quote": 3, "bad_encoding": 1, "bad_row": 1}
  assert report.written == 4
  assert_every_row_accounted(report, 9)
  assert "captions.csv:3: a quoted field runs over 3 lines, 2 of which look like rows" in (
      report.summary())
  source = sources.ArrayRecordPairs(str(tmp_path / "cc-00000-of-00001.array_record"), SIZE)
  assert [source[i]["text"][len("<image>"):][:30] for i in range(4)] == [
      "a red thing.<|endofchunk|>", "a blue thing.<|endofchunk|>",
      "a caption\nover two lines<|endo", long_caption.strip()[:30]]


def test_wrong_types_in_documents_are_counted(tmp_path, images):
  del images
  def info(name, index, sim):
    return {"image_name": name, "matched_text_index": index, "matched_sim": sim}

  mmc4 = [{"text_list": ["Red.", "Blue."], "image_info": [info("red.png", 0, "0.3"),
                                                          info("blue.png", 1, 0.3)]},
          {"text_list": ["Red.", 7], "image_info": [info("red.png", 0, 0.3)]},
          {"text_list": ["Red."], "image_info": [info("red.png", True, 0.3)]}]
  path = tmp_path / "mmc4.jsonl"
  path.write_bytes(jsonl_bytes(mmc4))
  report = convert.convert("mmc4", str(path), str(tmp_path / "m"),
                           image_root=str(tmp_path / "images"), min_sim=0.2)
  assert report.written == 1 and report.skipped == {"bad_value": 1, "no_images": 1}
  assert report.dropped_images == {"bad_value": 1, "bad_match": 1}
  assert "matched_sim '0.3' is not a number" in report.summary()
  assert_every_row_accounted(report, 3)
  obelics = [{"texts": ["Red.", None, {"not": "text"}], "images": [None, "images/red.png", None]},
             {"texts": ["Red.", None], "images": [None, "images/red.png"]}]
  path = tmp_path / "obelics.jsonl"
  path.write_bytes(jsonl_bytes(obelics))
  report = convert.convert("obelics", str(path), str(tmp_path / "o"))
  assert report.written == 1 and report.skipped == {"bad_value": 1}
  assert "text 2 is of type dict ({'not': 'text'})" in report.summary()


def test_progress_shows_rates_and_an_eta_without_flooding(tmp_path, images, capsys):
  del images
  path = tmp_path / "pairs.jsonl"
  path.write_bytes(jsonl_bytes([{"image": "images/red.png", "caption": "red."}] * 3))
  convert.convert("pairs", str(path), str(tmp_path / "a"), progress_every=None)
  assert capsys.readouterr().err == ""
  convert.convert("pairs", str(path), str(tmp_path / "b"), progress_every=3600)
  assert capsys.readouterr().err == ""  # nothing before the first interval has passed
  convert.convert("pairs", str(path), str(tmp_path / "c"), progress_every=0)
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 3 and lines[-1].startswith("3 rows (")
  assert "3 records, 3 images (" in lines[-1] and "100.0% of the input read" in lines[-1]

  class Half:
    total, done = 1000, 250

  report = convert.ConversionReport(["x"], rows=400, written=300, images=600)
  line = convert._Progress([Half()], 30).line(report, elapsed=120.0)
  assert line == ("400 rows (3/s), 300 records, 600 images (5.0/s), 0 rows skipped; 25.0% of "
                  "the input read, 2m00s so far, ETA 6m00s")
