"""On-disk sources: record layout, CLIP-style image preprocessing, bad records, TFDS."""

import io
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from mmjax.data import sources
from mmjax.data.pipeline import DataHealth, Dataset, dataset_from_config, make_dataset
from mmjax.data.sequences import CorruptRecord, SequenceSpec
from mmjax.data.tokenizer import Tokenizer

TOK = Tokenizer()
SIZE = 16


def encoded(array: np.ndarray, image_format: str = "PNG") -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=image_format)
  return buffer.getvalue()


def solid(colour, height: int = 24, width: int = 32) -> np.ndarray:
  return np.broadcast_to(np.array(colour, np.uint8), (height, width, 3)).copy()


def write_shard(path, records: list[bytes]) -> str:
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  return str(path)


def test_interleave_follows_the_openflamingo_layout():
  a, b, c = b"A", b"B", b"C"
  assert sources.interleave([a, "a red circle."]) == ("<image>a red circle.<|endofchunk|>", [a])
  text, images = sources.interleave(["Intro.", "More intro.", a, "First.", "Aside.", b, c,
                                     "Third."])
  assert text == ("Intro. More intro.<image>First. Aside.<|endofchunk|>"
                  "<image><|endofchunk|><image>Third.<|endofchunk|>")
  assert images == [a, b, c]
  assert sources.interleave(["only text"]) == ("only text", [])
  assert sources.interleave(["x", a, "y"], text_separator="\n")[0] == "x<image>y<|endofchunk|>"


def test_records_round_trip_and_bad_ones_are_named():
  content = ["text", b"\x89PNG...", "ünïcode"]
  assert sources.decode_record(sources.encode_record(content)) == content
  with pytest.raises(TypeError, match="item 1 is a int"):
    sources.encode_record(["a", 3])
  for data in (b"\xc1", b"\x00", b"\x81\xa1v\x02"):  # invalid msgpack, an int, version 2
    with pytest.raises(CorruptRecord) as error:
      sources.decode_record(data)
    assert error.value.reason == "bad_record"


def test_images_are_resized_on_the_shorter_side_and_centre_cropped():
  # A wide image: red | green | blue thirds. The centre square is all green.
  wide = np.concatenate([solid((255, 0, 0), 30, 30), solid((0, 255, 0), 30, 30),
                         solid((0, 0, 255), 30, 30)], axis=1)
  out = sources.decode_image(encoded(wide), SIZE)
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[:, 2:-2], solid((0, 255, 0), SIZE, SIZE - 4))
  # Tall JPEG with a dark top and a bright bottom: the crop keeps both halves.
  tall = np.concatenate([solid((20, 20, 20), 40, 40), solid((230, 230, 230), 40, 40)])
  out = sources.decode_image(encoded(tall, "JPEG"), SIZE).astype(int)
  assert abs(out[:SIZE // 2 - 2].mean() - 20) < 10 and abs(out[SIZE // 2 + 2:].mean() - 230) < 10
  # Transparent pixels become white, grey stays grey.
  rgba = np.zeros((8, 8, 4), np.uint8)
  assert np.all(sources.decode_image(encoded(rgba), 4) == 255)
  grey = sources.decode_image(encoded(np.full((8, 8), 100, np.uint8)), 4)
  assert grey.shape == (4, 4, 3) and np.all(grey == 100)
  with pytest.raises(CorruptRecord, match="bad_image: cannot decode a 12-byte image"):
    sources.decode_image(b"not an image", SIZE)
  with pytest.raises(CorruptRecord, match="bad_image"):
    sources.decode_image(encoded(tall, "JPEG")[:200], SIZE)  # truncated


def saved(image: Image.Image, image_format: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=image_format)
  return buffer.getvalue()


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  alpha = alpha.astype(float)[..., None] / 255
  return np.round(colour.astype(float) * alpha + 255 * (1 - alpha))


def image_modes():
  """`(mode, encoded file written by PIL, the naive 8-bit RGB it should become)`."""
  rng = np.random.default_rng(0)
  shape = (6, 10)
  grey = rng.integers(0, 256, shape, dtype=np.uint8)
  rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
  alpha = rng.integers(0, 256, shape, dtype=np.uint8)
  alpha[0] = 0  # fully transparent: their colour must not show
  sixteen = rng.integers(0, 65536, shape).astype(np.uint16)
  sixteen[0, :3] = (0, 65535, 257)
  scaled = np.round(sixteen / 257)[..., None].repeat(3, -1)
  floats = rng.random(shape).astype(np.float32)
  cmyk = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
  palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
  indices = rng.integers(0, 4, shape, dtype=np.uint8)
  bits = rng.random(shape) > 0.5

  def p_image(transparent: bool) -> Image.Image:
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.flatten().tolist())
    if transparent:
      image.info["transparency"] = 2
    return image

  big_endian = Image.frombytes("I;16B", shape[::-1], sixteen.astype(">u2").tobytes())
  c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
  with_hole = palette[indices].astype(float)
  with_hole[indices == 2] = 255
  return [
      ("L", saved(Image.fromarray(grey), "PNG"), grey[..., None].repeat(3, -1)),
      ("1", saved(Image.fromarray(bits), "PNG"), (bits * 255)[..., None].repeat(3, -1)),
      ("RGB", saved(Image.fromarray(rgb), "PNG"), rgb),
      ("I;16", saved(Image.fromarray(sixteen), "PNG"), scaled),
      ("I;16B", saved(big_endian, "TIFF"), scaled),
      ("I", saved(Image.fromarray(sixteen.astype(np.int32)), "TIFF"), scaled),
      ("F", saved(Image.fromarray(floats), "TIFF"),
       np.round(floats * 255)[..., None].repeat(3, -1)),
      ("CMYK", saved(Image.fromarray(cmyk, "CMYK"), "TIFF"),
       np.round((255 - c) * (255 - k) / 255)),
      ("P", saved(p_image(False), "PNG"), palette[indices]),
      ("P", saved(p_image(True), "PNG"), with_hole),
      ("LA", saved(Image.fromarray(np.stack([grey, alpha], -1), "LA"), "PNG"),
       over_white(grey[..., None].repeat(3, -1), alpha)),
      ("RGBA", saved(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"),
       over_white(rgb, alpha)),
  ]


@pytest.mark.parametrize("case", range(len(image_modes())))
def test_every_image_mode_becomes_the_rgb_it_shows(case):
  mode, data, expected_rgb = image_modes()[case]
  assert Image.open(io.BytesIO(data)).mode == mode  # the file really is of that mode
  image = sources.load_image(data)
  assert image.mode == "RGB"
  # Pillow rounds alpha compositing in integers: one level off at most.
  np.testing.assert_allclose(np.asarray(image), expected_rgb, atol=1)
  out = sources.decode_image(data, 6)  # and through the reader's resize
  assert out.shape == (6, 6, 3) and out.dtype == np.uint8


def test_images_without_an_8_bit_meaning_are_refused_with_a_reason():
  for image, match in (
      (Image.fromarray(np.array([[0.0, 2.5]], np.float32)), r"float image .*\[0.0, 2.5\]"),
      (Image.fromarray(np.array([[0.0, np.nan]], np.float32)), "float image"),
      (Image.fromarray(np.array([[-1, 70000]], np.int32)), "outside the 16-bit range")):
    with pytest.raises(CorruptRecord, match=f"unsupported_image: .*{match}") as error:
      sources.decode_image(saved(image, "TIFF"), 4)
    assert error.value.reason == "unsupported_image"


def test_exif_orientation_is_applied_when_reading():
  tall = np.zeros((20, 10, 3), np.uint8)
  tall[:5] = 255  # white top
  exif = Image.Exif()
  exif[0x0112] = 6  # stored rotated: display needs a 90-degree turn
  buffer = io.BytesIO()
  Image.fromarray(tall).save(buffer, format="PNG", exif=exif)
  upright = np.asarray(sources.load_image(buffer.getvalue()))
  assert upright.shape == (10, 20, 3)


def test_shard_sets_must_be_complete(tmp_path):
  record = sources.encode_record([encoded(solid((1, 2, 3))), "x"])
  for i in (0, 2):
    write_shard(tmp_path / f"d-0000{i}-of-00003.array_record", [record])
  with pytest.raises(FileNotFoundError, match=r"only 2 of the 3 shards .*missing shards \[1\]"):
    sources.ArrayRecordPairs(str(tmp_path / "d-*.array_record"), image_size=SIZE)
  with pytest.raises(FileNotFoundError, match="No ArrayRecord files match"):
    sources.ArrayRecordPairs(str(tmp_path / "e-*.array_record"), image_size=SIZE)
  one = sources.ArrayRecordPairs([str(tmp_path / "d-00000-of-00003.array_record")], SIZE)
  assert len(one) == 1 and one.paths == (str(tmp_path / "d-00000-of-00003.array_record"),)


def test_bad_records_in_a_shard_are_counted_by_reason(tmp_path, caplog):
  good = [sources.encode_record([encoded(solid((10 * i, 0, 0))), f"a red circle {i}."])
          for i in range(6)]
  jpeg = encoded(solid((0, 0, 200), 64, 64), "JPEG")
  bad = [sources.encode_record([b"\xff\xd8 corrupt jpeg", "a blue square."]),
         sources.encode_record([jpeg[:len(jpeg) // 2], "a blue square."]),
         b"\x92\x01\x02",  # msgpack, but not a record
         sources.encode_record([encoded(solid((0, 9, 0))), encoded(solid((0, 9, 0))), "two."]),
         sources.encode_record([encoded(solid((0, 9, 0))), "  "])]
  path = write_shard(tmp_path / "mixed.array_record", good + bad)
  source = sources.ArrayRecordPairs(path, image_size=SIZE)
  with pytest.raises(CorruptRecord, match="image 0 of 1: bad_image"):
    source[6]
  health = DataHealth()
  spec = SequenceSpec(seq_len=16, image_size=SIZE, mode="pair")
  dataset = make_dataset([Dataset("cc", source)], TOK, spec, batch_size=4, seed=0,
                         health=health)
  iterator = iter(dataset)
  batches = [next(iterator) for _ in range(6)]  # every record is read at least once
  assert all(b["image"].shape == (4, SIZE, SIZE, 3) for b in batches)
  counts = health.counts()
  assert counts["cc/bad_image"] >= 2 and counts["cc/bad_record"] >= 1, counts
  assert counts["cc/image_count"] >= 1 and counts["cc/empty_text"] >= 1, counts
  assert "cc/unreadable" not in counts, counts  # every problem has its own reason
  assert "Skipping record of dataset 'cc'" in caplog.text


def test_documents_train_through_the_pipeline_with_flamingo_masks(tmp_path):
  red, blue = encoded(solid((250, 0, 0))), encoded(solid((0, 0, 250), 40, 20))
  docs = [sources.encode_record(["a green triangle.", red, "a red circle.", blue,
                                 "a blue square.", "on the left."]) for _ in range(4)]
  write_shard(tmp_path / "docs-00000-of-00001.array_record", docs)
  paths = str(tmp_path / "docs-*.array_record")
  dataset = dataset_from_config({"name": "docs", "source": {
      "kind": "arrayrecord_documents", "paths": paths, "image_size": SIZE}})
  assert dataset.source == sources.ArrayRecordDocuments(paths, SIZE)
  doc = dataset.source[0]
  assert doc["text"] == ("a green triangle.<image>a red circle.<|endofchunk|><image>"
                         "a blue square. on the left.<|endofchunk|>")
  np.testing.assert_array_equal(doc["images"][:, SIZE // 2, SIZE // 2],
                                [[250, 0, 0], [0, 0, 250]])
  spec = SequenceSpec(seq_len=48, max_images=3, image_size=SIZE)
  batch = next(iter(make_dataset([dataset], TOK, spec, batch_size=2, seed=0)))
  assert batch["images"].shape == (2, 3, 1, SIZE, SIZE, 3)
  np.testing.assert_array_equal(batch["num_images"], [2, 2])
  for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"],
                                   strict=True):
    first_image = int(np.flatnonzero(tokens == TOK.media_id)[0])
    assert not mask[:first_image].any()  # leading text is context only
    assert mask[first_image] == 1  # the first word after <image> is trained
    assert np.all(mask[targets == TOK.media_id] == 0)
    assert np.all(mask[targets == TOK.endofchunk_id] == 1)
    assert np.all(mask[targets == TOK.pad_id] == 0)


def test_tfds_pairs_read_an_array_record_dataset_without_tensorflow(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  images = [solid((40 * i, 0, 0), 20 + i, 30) for i in range(4)]

  with tfds.core.registered.skip_registration():  # read back from files, as in real use
    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "id": np.int32}), disable_shuffling=True)

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i, image in enumerate(images):  # encoded bytes: encoding arrays needs TensorFlow
          yield i, {"image": encoded(image), "captions": [f"caption {i} a", f"caption {i} b"],
                    "id": i}

    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()

  dataset = dataset_from_config({"name": "tiny", "source": {
      "kind": "tfds", "name": "tiny_captions", "data_dir": str(tmp_path), "image_size": SIZE,
      "text_key": "captions"}})
  source = dataset.source
  assert len(source) == 4
  for i in range(4):
    example = source[i]
    assert example["text"] == f"<image>caption {i} {'ab'[i % 2]}<|endofchunk|>"
    np.testing.assert_array_equal(example["images"][0], solid((40 * i, 0, 0), SIZE, SIZE))
  assert "tensorflow" not in sys.modules
  with pytest.raises(KeyError, match=r"no feature 'caption' .*'captions', 'id', 'image'"):
    sources.TfdsPairs("tiny_captions", SIZE, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="holds a int, not an encoded image"):
    sources.TfdsPairs("tiny_captions", SIZE, data_dir=str(tmp_path), image_key="id",
                      text_key="captions")
  with pytest.raises(ValueError,
                     match="Cannot open TFDS data set 'missing_set'.*array_record.*not found"):
    sources.TfdsPairs("missing_set", SIZE, data_dir=str(tmp_path))
