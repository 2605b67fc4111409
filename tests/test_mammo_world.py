"""Mammography world and MMBCD's folder layout: determinism, lesions that are denser than
the tissue around them, a detector with the configured recall, histories whose words
tell the label imperfectly (and leak it in training only), the reader of real data."""

import csv
import re

import numpy as np
import pytest
from PIL import Image

from mmjax.data import findings_world, sources
from mmjax.data import mammo_world as mw
from mmjax.data.pipeline import (DataHealth, MammoWorldDocuments, UnusableSource,
                                 dataset_from_config, make_dataset)
from mmjax.data.sequences import CorruptRecord, SequenceSpec
from mmjax.data.tokenizer import HFTokenizer

SMALL = mw.MammoWorld(seed=0, image_size=256)
DOCUMENT_KEYS = {"image", "boxes", "text", "label", "id"}


def malignant(world: mw.MammoWorld, split: str, n: int) -> list[int]:
  return [i for i, label in enumerate(world.labels(split, n)) if label]


def iou(a: np.ndarray, b: np.ndarray) -> float:
  """Of two (cx, cy, w, h) boxes."""
  (ax0, ay0), (ax1, ay1) = a[:2] - a[2:4] / 2, a[:2] + a[2:4] / 2
  (bx0, by0), (bx1, by1) = b[:2] - b[2:4] / 2, b[:2] + b[2:4] / 2
  inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
  return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_an_example_is_a_function_of_seed_split_and_index():
  a, again = SMALL.example("train", 5), mw.MammoWorld(0, 256).example("train", 5)
  assert set(a) == DOCUMENT_KEYS | {"lesion_box"}
  assert a["image"].tobytes() == again["image"].tobytes() and a["text"] == again["text"]
  np.testing.assert_array_equal(a["boxes"], again["boxes"])
  assert a["image"].shape == (256, 256) and a["image"].dtype == np.uint8
  assert a["boxes"].dtype == np.float32 and a["boxes"].shape[1] == 5
  assert a["id"] == "mammo-train-5"
  others = [SMALL.example("train", 6), SMALL.example("test", 5),
            mw.MammoWorld(1, 256).example("train", 5)]
  assert all(o["image"].tobytes() != a["image"].tobytes() for o in others)
  n = 40
  labels = SMALL.labels("validation", n)
  assert labels == tuple(SMALL.example("validation", i)["label"] for i in range(n))
  assert SMALL.texts("validation", 3) == [SMALL.example("validation", i)["text"]
                                         for i in range(3)]
  with pytest.raises(ValueError, match="Unknown mammography-world split"):
    SMALL.example("eval", 0)
  with pytest.raises(ValueError, match="even"):
    mw.MammoWorld(image_size=255)


def test_classes_are_imbalanced_as_configured():
  labels = np.asarray(SMALL.labels("train", 3000))
  assert abs(labels.mean() - 0.28) < 0.03
  assert abs(np.mean(mw.MammoWorld(malignant_fraction=0.5).labels("test", 3000)) - 0.5) < 0.04


def lesion_contrast(image: np.ndarray, box: np.ndarray, layout: mw.Layout) -> float:
  """Mean grey level inside the lesion's core minus that of a ring around its box."""
  size = image.shape[0]
  lesion = layout.lesion
  yy, xx = np.mgrid[:size, :size] + 0.5
  r = np.hypot(xx - lesion.x * size, yy - lesion.y * size)
  core = r < 0.5 * lesion.radius * size
  ring = (r > box[2] / 2 * size * 1.2) & (r < box[2] / 2 * size * 1.8)
  return float(image[core].mean() - image[ring].mean())


def test_lesions_are_denser_than_the_tissue_around_them_and_inside_the_image():
  world = mw.MammoWorld(seed=3, image_size=512)
  contrasts = []
  for i in malignant(world, "train", 40)[:8]:
    example, layout = world.example("train", i), world.layout("train", i)
    (box,) = example["lesion_box"]
    assert np.all(box[:2] - box[2:] / 2 >= 0) and np.all(box[:2] + box[2:] / 2 <= 1)
    assert 40 <= box[2] * 1024 <= 110  # "a few dozen pixels", spicules included
    contrasts.append(lesion_contrast(example["image"], box, layout))
  assert len(contrasts) == 8 and min(contrasts) > 15 and np.mean(contrasts) > 30, contrasts
  for i in range(20):
    layout = world.layout("train", i)
    kinds = {s.kind for s in layout.structures}
    assert {"mass", "calcifications", "node"} <= kinds  # benign structures everywhere
    assert ("lesion" in kinds) == bool(world.labels("train", 20)[i])
  benign = world.example("train", world.labels("train", 20).index(0))
  assert benign["lesion_box"].shape == (0, 4)
  image = benign["image"]
  side = world.case("train", int(benign["id"].split("-")[-1])).side
  assert np.all(image[-1] == 0)  # black background beyond the breast
  assert np.all(image[:, 0 if side == "right" else -1] == 0)  # beyond the nipple
  assert 60 < image[image > 0].mean() < 200


def test_a_larger_image_is_the_same_case_at_a_higher_resolution():
  small, large = mw.MammoWorld(seed=1, image_size=1024), mw.MammoWorld(seed=1, image_size=2048)
  i = malignant(small, "test", 20)[0]
  a, b = small.example("test", i), large.example("test", i)
  assert b["image"].shape == (2048, 2048)
  np.testing.assert_array_equal(a["boxes"], b["boxes"])
  np.testing.assert_array_equal(a["lesion_box"], b["lesion_box"])
  assert lesion_contrast(b["image"], b["lesion_box"][0], large.layout("test", i)) > 15
  down = b["image"].reshape(1024, 2, 1024, 2).mean((1, 3))
  assert np.mean(np.abs(down - a["image"])) < 12


def lesion_found(world: mw.MammoWorld, split: str, indices) -> tuple[list[bool], list[bool]]:
  """Per malignant case: whether a box overlaps the lesion (IoU > 0.4), and whether that
  box has the top score."""
  found, top = [], []
  for i in indices:
    layout = world.layout(split, i)
    lesion = layout.lesion
    truth = np.array([lesion.x, lesion.y, 2 * lesion.extent, 2 * lesion.extent])
    boxes = world.boxes(split, i, layout)
    hits = [iou(row, truth) > 0.4 for row in boxes]
    found.append(any(hits))
    if any(hits):
      top.append(bool(hits[int(np.argmax(boxes[:, 4]))]))
  return found, top


@pytest.mark.parametrize("recall", [0.85, 0.5])
def test_the_detector_finds_the_lesion_at_the_configured_recall(recall):
  world = mw.MammoWorld(recall=recall, image_size=256)
  indices = malignant(world, "train", 1600)
  assert len(indices) > 350
  found, top = lesion_found(world, "train", indices)
  assert abs(np.mean(found) - recall) < 0.06, np.mean(found)
  assert 0.2 < np.mean(top) < 0.9, np.mean(top)  # often, not always, the top box


def test_detector_rows_are_raw_boxes_of_40_to_200_pixels_in_no_order():
  rows = np.concatenate([SMALL.boxes("train", i) for i in range(300)])
  counts = [len(SMALL.boxes("train", i)) for i in range(50)]
  assert min(counts) >= 2 and np.mean(counts) > 5
  assert np.all(np.isfinite(rows)) and np.all((rows >= 0) & (rows <= 1))
  assert np.all(rows[:, 2:4] <= mw.MAX_BOX + 1e-6)
  assert np.mean(rows[:, 2:4] >= mw.MIN_BOX - 1e-6) > 0.95  # smaller only where cut at an edge
  per_image = [SMALL.boxes("train", i)[:, 4] for i in range(50)]
  assert not all(np.all(np.diff(s) <= 0) for s in per_image if len(s) > 2)  # not sorted
  overlapping = sum(any(iou(a, b) > 0.1 for j, a in enumerate(boxes) for b in boxes[j + 1:])
                    for boxes in (SMALL.boxes("train", i) for i in range(50)))
  assert overlapping > 10  # what NMS is for


def test_broken_detector_outputs_come_at_the_configured_rate():
  world = mw.MammoWorld(image_size=256, broken_rate=0.2)
  outputs = [world.boxes("train", i) for i in range(300)]
  empty = np.mean([len(b) == 0 for b in outputs])
  assert 0.1 < empty < 0.3
  rows = np.concatenate(outputs)
  assert np.isnan(rows[:, 4]).any()
  assert ((rows[:, 2] == 0) | (rows[:, 3] == 0)).any()
  assert (np.abs(rows[:, :2]) > 1).any()
  assert 0.03 < np.mean(np.isnan(rows[:, 4]) | (rows[:, 2:4] == 0).any(1)
                        | (np.abs(rows[:, :2]) > 1).any(1)) < 0.4


def words(text: str) -> set[str]:
  return set(re.findall(r"[a-z]+", text))


def test_histories_tell_the_label_imperfectly_and_leak_it_in_training_only():
  world = mw.MammoWorld()
  train, test = world.texts("train", 3000), world.texts("test", 3000)
  y_train, y_test = np.asarray(world.labels("train", 3000)), np.asarray(world.labels("test", 3000))
  vocabulary = sorted(set().union(*map(words, train)))
  counts = np.asarray([[w in words(t) for w in vocabulary] for t in train], np.float64)
  log_odds = (np.log((counts[y_train == 1].sum(0) + 1) / ((y_train == 1).sum() + 2))
              - np.log((counts[y_train == 0].sum(0) + 1) / ((y_train == 0).sum() + 2)))
  index = {w: i for i, w in enumerate(vocabulary)}

  def auc(texts, y, drop=()):
    scores = np.asarray([sum(log_odds[index[w]] for w in words(t) - set(drop) if w in index)
                         for t in texts])
    ranks = np.argsort(np.argsort(scores)) + 1
    positives = y == 1
    return ((ranks[positives].sum() - positives.sum() * (positives.sum() + 1) / 2)
            / (positives.sum() * (~positives).sum()))

  train_auc, test_auc = auc(train, y_train), auc(test, y_test)
  assert 0.75 < train_auc < 0.97 and 0.6 < test_auc < 0.9, (train_auc, test_auc)
  # A text model that keeps the leak words does much worse on held-out data than on
  # training data; without them the gap mostly closes.
  dropped = auc(train, y_train, mw.LEAK_WORDS), auc(test, y_test, mw.LEAK_WORDS)
  assert train_auc - test_auc > 0.08 and dropped[0] - dropped[1] < 0.04, (train_auc, test_auc,
                                                                          dropped)

  def leak_rate(texts, y, label):
    return np.mean([bool(words(t) & set(mw.LEAK_WORDS)) for t, v in zip(texts, y) if v == label])

  assert leak_rate(train, y_train, 1) > 0.45
  assert leak_rate(test, y_test, 1) < 0.12 and leak_rate(test, y_test, 0) < 0.08
  assert 0.01 < np.mean([t == "" for t in train]) < 0.06  # some histories are missing
  # Leak words never end a sentence: whitespace-token deletion (the reference's masking)
  # removes them.
  assert all(not re.search(rf"\b{w}[.,]", t) for t in train for w in mw.LEAK_WORDS)


# ------------------------------------------------------------------------------------ sources

def test_mammo_world_source_gives_mmbcd_documents():
  source = dataset_from_config({"name": "mammo", "source": {
      "kind": "mammo_world", "split": "validation", "size": 30, "image_size": 256,
      "seed": 2}}).source
  assert isinstance(source, MammoWorldDocuments) and len(source) == 30
  document = source[4]
  assert set(document) == DOCUMENT_KEYS
  world = mw.MammoWorld(seed=2, image_size=256)
  assert document["text"] == world.case("validation", 4).history
  assert source.labels == world.labels("validation", 30)
  assert source.texts() == world.texts("validation", 30)
  with pytest.raises(IndexError):
    source[30]
  with pytest.raises(ValueError, match="rates must lie"):
    MammoWorldDocuments(recall=1.5)


def write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def write_folder(tmp_path, rows, boxes):
  """A CSV of `rows` (dicts), images and box files under tmp_path."""
  with open(tmp_path / "data.csv", "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  for relative, text in boxes.items():
    path = tmp_path / "boxes" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return str(tmp_path / "data.csv")


def test_the_folder_reader_follows_the_reference_layout(tmp_path):
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (40, 30), dtype=np.uint8)
  write_png(tmp_path / "images" / "p1" / "a.png", grey)
  write_png(tmp_path / "images" / "b.png", grey[:20])
  Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "images" / "c.jpg")
  (tmp_path / "images" / "d.png").write_bytes(b"\x89PNG not an image")
  rows = [{"im_path": "p1/a.png", "text": "lump in the left breast", "cancer": 1,
           "all_views_cancer": 1},
          {"im_path": "b.png", "text": "pain in the right breast", "cancer": 0,
           "all_views_cancer": 1},  # the other breast's cancer: the text is hidden
          {"im_path": "c.jpg", "text": "", "cancer": 0, "all_views_cancer": 0},
          {"im_path": "missing.png", "text": "screening", "cancer": 0, "all_views_cancer": 0},
          {"im_path": "d.png", "text": "screening", "cancer": 0, "all_views_cancer": 0},
          {"im_path": "e.png", "text": "screening", "cancer": 0, "all_views_cancer": 0}]
  boxes = {"p1/a_preds.txt": "0.5 0.5 0.2 0.1 0.9\n0.2 0.3 0.1 0.1 0.4\n",
           "b_preds.txt": "", "c_preds.txt": "0.5 0.5 0 0.1 nan\n",
           "missing_preds.txt": "0.5 0.5 0.1 0.1 0.5\n",
           "d_preds.txt": "0.5 0.5 0.1 0.1 0.5\n"}  # e.png has no box file
  path = write_folder(tmp_path, rows, boxes)
  source = dataset_from_config({"name": "mammo", "source": {
      "kind": "mammo_folder", "csv": path, "root": str(tmp_path / "images"),
      "boxes": str(tmp_path / "boxes")}}).source
  assert len(source) == 6 and source.labels == (1, 0, 0, 0, 0, 0)
  assert source.texts()[:3] == ["lump in the left breast", "pain in the right breast", ""]
  first = source[0]
  assert set(first) == DOCUMENT_KEYS and first["id"] == "p1/a.png"
  np.testing.assert_array_equal(first["image"], grey)  # grey PNGs are read exactly
  np.testing.assert_allclose(first["boxes"], [[0.5, 0.5, 0.2, 0.1, 0.9],
                                              [0.2, 0.3, 0.1, 0.1, 0.4]])
  assert first["boxes"].dtype == np.float32 and first["text"] == "lump in the left breast"
  second = source[1]
  assert second["text"] == "" and second["boxes"].shape == (0, 5)
  third = source[2]
  assert third["image"].shape == (40, 30) and third["image"].dtype == np.uint8
  assert np.abs(third["image"].astype(int) - grey).mean() < 20  # a lossy JPEG, as grey
  assert np.isnan(third["boxes"][0, 4]) and third["boxes"][0, 2] == 0  # rows as written
  for index, reason in ((3, "missing_image"), (4, "bad_image"), (5, "missing_boxes")):
    with pytest.raises(CorruptRecord) as error:
      source[index]
    assert error.value.reason == reason and "data.csv line" in str(error.value)

  # The pipeline counts a missing box file as a skip, with its reason.
  only_missing = write_folder(tmp_path, rows[5:], {})
  health = DataHealth()
  dataset = make_dataset(
      [dataset_from_config({"name": "mammo", "source": {
          "kind": "mammo_folder", "csv": only_missing, "root": str(tmp_path / "images"),
          "boxes": str(tmp_path / "boxes")}})],
      HFTokenizer(findings_world.TOKENIZER_DIR), SequenceSpec(seq_len=8, image_size=8,
                                                              mode="pair"),
      batch_size=1, seed=0, health=health)
  with pytest.raises(UnusableSource, match="missing_boxes 2"):
    next(iter(dataset))
  assert health.counts() == {"mammo/missing_boxes": 2}


def test_the_folder_reader_refuses_a_csv_it_cannot_read(tmp_path):
  row = {"im_path": "a.png", "text": "lump", "cancer": 1, "all_views_cancer": 0}
  path = write_folder(tmp_path, [{k: v for k, v in row.items() if k != "cancer"}], {})
  with pytest.raises(ValueError, match=r"no column\(s\) \['cancer'\].*header is \['im_path', "
                                       r"'text', 'all_views_cancer'\]"):
    sources.MammoFolder(path)
  path = write_folder(tmp_path, [row, {**row, "cancer": ""}], {})
  with pytest.raises(ValueError, match="line 3: column 'cancer' must be 0 or 1, got blank"):
    sources.MammoFolder(path)
  path = write_folder(tmp_path, [{k: v for k, v in row.items() if k != "all_views_cancer"}],
                      {"a_preds.txt": "0.5 0.5 0.1 0.1 0.9 7\n"})
  write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
  source = sources.MammoFolder(path, other_side_column="", boxes=str(tmp_path / "boxes"))
  with pytest.raises(CorruptRecord, match="expected five numbers") as error:
    source[0]
  assert error.value.reason == "bad_boxes"


def test_shipped_tokenizer_is_rebuilt_exactly_and_knows_every_history_word(tmp_path):
  mw.write_tokenizer(tmp_path)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / name).read_text() == (mw.TOKENIZER_DIR / name).read_text()
  tokenizer = HFTokenizer(mw.TOKENIZER_DIR)
  world = mw.MammoWorld(seed=3)
  for text in world.texts("train", 300) + world.texts("test", 100):
    ids = tokenizer.encode("Indication: " + text, bos=True, eos=True)
    assert 1 not in ids and len(ids) <= 48  # [UNK] is id 1
