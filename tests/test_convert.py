"""Converter: pairs (JSONL, CSV), MMC4 and OBELICS documents -> shards the sources read back."""

import csv
import gzip
import io
import json
import pathlib
import subprocess
import sys
import zipfile

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
  assert "Wrote 4 records to 2 shards" in summary and "Records skipped: 5" in summary
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
  with pytest.raises(ValueError, match=r"no field 'caption' \(it has \['file', 'text'\]\).*"
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
  assert report.skipped == {"no_images": 1, "empty_text": 1, "bad_row": 1}
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
  assert "Wrote 1 records to 2 shards" in done.stdout and "missing_image: 1" in done.stdout
  assert len(sources.ArrayRecordPairs(f"{tmp_path}/cli/p-*.array_record", SIZE)) == 1
  failed = run("--format=pairs", f"--input={inputs}", f"--output={tmp_path}/cli/q",
               "--image_key=img", "--text_key=text", "--max_image_size=4",
               f"--image_root={tmp_path}/nowhere")
  assert failed.returncode != 0 and "Nothing was written" in failed.stderr
