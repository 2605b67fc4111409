"""webdataset / img2dataset tar shards read directly: pairs, interleaved documents, damage."""

import base64
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmjax.data import sources
from mmjax.data.pipeline import DataHealth, dataset_from_config, make_dataset
from mmjax.data.sequences import CorruptRecord, SequenceSpec
from mmjax.data.tokenizer import Tokenizer

TOK = Tokenizer()
SIZE = 8


def png(colour, height=12, width=16) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((height, width, 3), colour, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
  with tarfile.open(path, "w") as archive:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  return str(path)


def expected(colour) -> np.ndarray:
  return np.full((SIZE, SIZE, 3), colour, np.uint8)


def test_brace_patterns_expand_like_webdataset():
  assert sources.expand_braces("/d/{00008..00011}.tar") == [
      "/d/00008.tar", "/d/00009.tar", "/d/00010.tar", "/d/00011.tar"]
  assert sources.expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
  assert sources.expand_braces("plain.tar") == ["plain.tar"]


def img2dataset_shard(path, first: int, colours) -> str:
  """A shard as img2dataset writes it: `KEY.jpg` (here PNG data), `KEY.txt`, `KEY.json`."""
  members = []
  for i, colour in enumerate(colours):
    key = f"{first + i:09d}"
    members += [(f"{key}.jpg", png(colour)), (f"{key}.txt", f"colour {colour}".encode()),
                (f"{key}.json", json.dumps({"key": key, "caption": f"colour {colour}",
                                            "status": "success"}).encode())]
  return write_tar(path, members)


def test_pairs_from_img2dataset_shards(tmp_path):
  img2dataset_shard(tmp_path / "00000.tar", 0, [(200, 0, 0), (0, 200, 0)])
  img2dataset_shard(tmp_path / "00001.tar", 2, [(0, 0, 200)])
  dataset = dataset_from_config({"name": "laion", "source": {
      "kind": "webdataset_pairs", "paths": str(tmp_path / "{00000..00001}.tar"),
      "image_size": SIZE}})
  source = dataset.source
  assert len(source) == 3
  for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
    document = source[i]
    assert document["text"] == f"<image>colour {colour}<|endofchunk|>"
    np.testing.assert_array_equal(document["images"], expected(colour)[None])
  assert len(sources.WebDatasetPairs(str(tmp_path / "*.tar"), SIZE)) == 3
  with pytest.raises(FileNotFoundError, match="tar file .*00002.tar' does not exist"):
    sources.WebDatasetPairs(str(tmp_path / "{00000..00002}.tar"), SIZE)


def test_bad_samples_are_counted_by_reason(tmp_path, caplog):
  members = [("a/000.png", png((10, 20, 30))), ("a/000.json", b'{"caption": "from json"}'),
             ("a/001.jpg", b"\xff\xd8 not a jpeg"), ("a/001.txt", b"broken image"),
             ("a/002.png", png((1, 1, 1))),  # no caption
             ("a/003.png", png((1, 1, 1))), ("a/003.txt", b"\xff\xfe"),  # not UTF-8
             ("a/004.png", png((1, 1, 1))), ("a/004.json", b"[not json"),
             ("a/005.txt", b"no image"),
             ("a/006.png", png((1, 1, 1))), ("a/006.webp", png((1, 1, 1))),
             ("a/006.txt", b"two images")]
  source = sources.WebDatasetPairs(write_tar(tmp_path / "s.tar", members), SIZE)
  assert len(source) == 7
  assert source[0]["text"] == "<image>from json<|endofchunk|>"
  reasons = []
  for i in range(1, 7):
    with pytest.raises(CorruptRecord) as error:
      source[i]
    reasons.append(error.value.reason)
  assert reasons == ["bad_image", "empty_text", "bad_record", "bad_record", "image_count",
                     "image_count"]
  health = DataHealth()
  spec = SequenceSpec(seq_len=16, image_size=SIZE, mode="pair")
  iterator = iter(make_dataset([dataset_from_config({"name": "tars", "source": {
      "kind": "webdataset_pairs", "paths": str(tmp_path / "s.tar"), "image_size": SIZE}})],
      TOK, spec, batch_size=2, seed=0, health=health))
  batch = next(iterator)
  np.testing.assert_array_equal(batch["image"], [expected((10, 20, 30))] * 2)
  counts, read = health.counts(), health.records_read()["tars"]
  assert sum(counts.values()) == read - 2  # exactly the bad samples consumed
  assert set(counts) <= {f"tars/{r}" for r in ("bad_image", "empty_text", "bad_record",
                                                "image_count")}


def test_a_cut_shard_keeps_the_samples_before_the_damage(tmp_path, caplog):
  colours = [(i * 20, 0, 0) for i in range(6)]
  path = img2dataset_shard(tmp_path / "cut.tar", 0, colours)
  data = open(path, "rb").read()
  source = sources.WebDatasetPairs(path, SIZE)
  last_offset, _ = source._index.members(5)["jpg"]
  with open(path, "wb") as file:
    file.write(data[:last_offset + 10])  # inside the last sample's image
  source = sources.WebDatasetPairs(path, SIZE)
  assert len(source) == 6 and "cut short inside member '000000005.jpg'" in caplog.text
  np.testing.assert_array_equal(source[4]["images"][0], expected(colours[4]))
  with pytest.raises(CorruptRecord, match="bad_record: a member of .* is cut short"):
    source[5]
  with open(path, "r+b") as file:  # a damaged header in the middle of the shard
    file.seek(source._index.members(3)["jpg"][0] - 512 + 148)  # the header's checksum field
    file.write(b"garbage!")
  source = sources.WebDatasetPairs(path, SIZE)
  assert len(source) == 3 and "unreadable after sample '000000002'" in caplog.text
  (tmp_path / "other.tar").write_bytes(b"this is not a tar file" * 40)
  with pytest.raises(ValueError, match="other.tar is not a readable tar file"):
    sources.WebDatasetPairs(str(tmp_path / "other.tar"), SIZE)
  (tmp_path / "packed.tar.gz").write_bytes(b"")
  with pytest.raises(ValueError, match="compressed tar.*Decompress"):
    sources.WebDatasetPairs(str(tmp_path / "packed.tar.gz"), SIZE)


def test_documents_in_obelics_and_mmc4_layouts(tmp_path):
  red, blue = png((250, 0, 0)), png((0, 0, 250), 20, 10)
  obelics = {"texts": ["A page about colours.", None, "Red is warm.", None, "Blue is cold."],
             "images": [None, "0.png", None, "doc1.1.png", None]}
  mmc4 = {"text_list": ["Intro.", "The red one.", "Blue last."],
          "image_info": [{"matched_text_index": 2, "matched_sim": 0.3,
                          "image_base64": base64.b64encode(blue).decode()},
                         {"matched_text_index": 1, "matched_sim": 0.3,
                          "image_base64": base64.b64encode(red).decode()}]}
  path = write_tar(tmp_path / "docs.tar", [
      ("doc1.json", json.dumps(obelics).encode()), ("doc1.0.png", red), ("doc1.1.png", blue),
      ("doc2.json", json.dumps(mmc4).encode()),
      ("doc3.json", json.dumps({"texts": ["x", None], "images": [None, "9.png"]}).encode()),
      ("doc4.json", json.dumps({"something": "else"}).encode())])
  source = dataset_from_config({"name": "docs", "source": {
      "kind": "webdataset_documents", "paths": path, "image_size": SIZE}}).source
  first, second = source[0], source[1]
  assert first["text"] == ("A page about colours.<image>Red is warm.<|endofchunk|>"
                           "<image>Blue is cold.<|endofchunk|>")
  np.testing.assert_array_equal(first["images"], [expected((250, 0, 0)), expected((0, 0, 250))])
  assert second["text"] == ("Intro.<image>The red one.<|endofchunk|>"
                            "<image>Blue last.<|endofchunk|>")
  np.testing.assert_array_equal(second["images"], first["images"])
  with pytest.raises(CorruptRecord, match="missing_image: .*'9.png' is not a member"):
    source[2]
  with pytest.raises(CorruptRecord, match="bad_record: .*neither 'texts'/'images'"):
    source[3]
  spec = SequenceSpec(seq_len=48, max_images=3, image_size=SIZE)
  health = DataHealth()
  batch = next(iter(make_dataset([dataset_from_config({"name": "docs", "source": {
      "kind": "webdataset_documents", "paths": path, "image_size": SIZE}})], TOK, spec,
      batch_size=2, seed=0, health=health)))
  assert batch["images"].shape == (2, 3, 1, SIZE, SIZE, 3)
  np.testing.assert_array_equal(batch["num_images"], [2, 2])
