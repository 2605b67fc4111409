"""MMBCD's inputs: detector boxes -> regions, keyword masking, class-balanced sampling."""

import json
import math

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax import cli, train
from mmjax import config as config_lib
from mmjax.data.keywords import KeywordMask, top_keywords
from mmjax.data.pipeline import (DataHealth, Dataset, balanced_order, class_weights,
                                 dataset_from_config, make_dataset)
from mmjax.data.regions import (RegionSpec, build_regions, nms, pixel_boxes, select_boxes,
                                valid_boxes)
from mmjax.data.sequences import CorruptRecord, SequenceSpec
from mmjax.data.tokenizer import Tokenizer

TOK = Tokenizer()


def document(rng, index=0, num_boxes=3, label=0, text="a mass in the left breast",
             size=(48, 32)):
  """A hand-made MMBCD document: a random grey image and detector rows sorted by score."""
  centres = rng.uniform(0.2, 0.8, (num_boxes, 2))
  sizes = rng.uniform(0.1, 0.4, (num_boxes, 2))
  scores = np.sort(rng.uniform(0.1, 1, (num_boxes, 1)), axis=0)[::-1]
  return {"image": rng.integers(0, 256, size, dtype=np.uint8),
          "boxes": np.concatenate([centres, sizes, scores], axis=1).astype(np.float32),
          "text": text, "label": label, "id": f"case-{index}"}


class Documents:
  """An in-memory MMBCD source."""

  def __init__(self, docs):
    self.docs = list(docs)

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, index):
    return dict(self.docs[index])

  @property
  def labels(self):
    return tuple(d["label"] for d in self.docs)

  def texts(self):
    return [d["text"] for d in self.docs]


# ---------------------------------------------------------------------------------------
# Non-maximum suppression: MMBCD's iterated greedy pass, written out naively.
# ---------------------------------------------------------------------------------------
def reference_iou(a, b):
  ax, ay, aw, ah = (float(v) for v in a[:4])
  bx, by, bw, bh = (float(v) for v in b[:4])
  ax, ay, bx, by = ax - aw / 2, ay - ah / 2, bx - bw / 2, by - bh / 2
  inter_w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
  inter_h = max(0, min(ay + ah, by + bh) - max(ay, by))
  inter = inter_w * inter_h
  return inter / (aw * ah + bw * bh - inter)


def reference_nms(rows, threshold):
  """Passes of greedy suppression in file order, repeated until a pass keeps every row."""
  rows = [tuple(r) for r in rows]
  while True:
    kept, dropped = [], set()
    for i in range(len(rows)):
      if i in dropped:
        continue
      kept.append(i)
      for j in range(i + 1, len(rows)):
        if j not in dropped and reference_iou(rows[i], rows[j]) > threshold:
          dropped.add(j)
    if len(kept) == len(rows):
      return rows
    rows = [rows[i] for i in kept]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.1, 0.3])
def test_nms_matches_the_references_iterated_pass_on_random_boxes(seed, threshold):
  rng = np.random.default_rng(seed)
  rows = document(rng, num_boxes=60)["boxes"]
  kept = rows[nms(rows, threshold)]
  np.testing.assert_array_equal(kept, np.asarray(reference_nms(rows, threshold), np.float32))
  assert 1 < len(kept) < len(rows)  # the case suppresses some boxes, not all


def test_nms_lets_a_suppressed_box_suppress_nothing():
  # b overlaps a (IoU 0.25) and c (IoU 0.21); a and c are apart; d nearly is a. b goes
  # for a, so c stays: a suppressed box suppresses nothing.
  rows = np.array([[0.3, 0.5, 0.2, 0.2, 0.9], [0.42, 0.5, 0.2, 0.2, 0.8],
                   [0.55, 0.5, 0.2, 0.2, 0.7], [0.31, 0.5, 0.2, 0.2, 0.6]], np.float32)
  assert reference_iou(rows[0], rows[2]) == 0
  assert reference_iou(rows[0], rows[1]) > 0.1 and reference_iou(rows[1], rows[2]) > 0.1
  assert nms(rows, 0.1).tolist() == [0, 2]
  np.testing.assert_array_equal(rows[[0, 2]], np.asarray(reference_nms(rows, 0.1)))
  assert nms(rows, 0.3).tolist() == [0, 1, 2] and nms(rows, 0.99).tolist() == [0, 1, 2, 3]


def test_boxes_are_sorted_by_score_stably_then_cut_to_k():
  rows = np.array([[0.1, 0.1, 0.1, 0.1, 0.5], [0.3, 0.3, 0.1, 0.1, 0.9],
                   [0.5, 0.5, 0.1, 0.1, 0.5], [0.7, 0.7, 0.1, 0.1, 0.2],
                   [0.9, 0.9, 0.1, 0.1, 0.5]], np.float32)
  chosen, mask = select_boxes(rows, RegionSpec(num_regions=3), None)
  np.testing.assert_array_equal(chosen, rows[[1, 0, 2]])  # ties keep the file's order
  assert mask.all()
  sorted_rows = rows[[1, 0, 2, 4, 3]]  # pre-sorted input keeps its order
  np.testing.assert_array_equal(select_boxes(sorted_rows, RegionSpec(num_regions=5), None)[0],
                                sorted_rows)


def test_fewer_boxes_than_k_are_padded_by_mask_or_by_duplicates():
  rows = np.array([[0.2, 0.2, 0.1, 0.1, 0.9], [0.6, 0.6, 0.1, 0.1, 0.8]], np.float32)
  chosen, mask = select_boxes(rows, RegionSpec(num_regions=5, pad="mask"), None)
  np.testing.assert_array_equal(chosen[:2], rows)
  assert not chosen[2:].any() and mask.tolist() == [True, True, False, False, False]

  spec = RegionSpec(num_regions=6, pad="duplicate")
  chosen, mask = select_boxes(rows, spec, np.random.default_rng([0, 1]))
  assert mask.all()
  np.testing.assert_array_equal(chosen[:2], rows)
  assert all(any((r == k).all() for k in rows) for r in chosen[2:])
  again, _ = select_boxes(rows, spec, np.random.default_rng([0, 1]))
  np.testing.assert_array_equal(again, chosen)
  draws = {select_boxes(rows, spec, np.random.default_rng([0, e]))[0].tobytes()
           for e in range(8)}
  assert len(draws) > 1  # another epoch's generator draws other duplicates
  with pytest.raises(ValueError, match="random generator"):
    select_boxes(rows, spec, None)


def test_each_bad_box_is_dropped_and_counted_by_reason():
  rows = np.array([
      [0.5, 0.5, 0.2, 0.2, 0.9],      # fine
      [np.nan, 0.5, 0.2, 0.2, 0.8],   # nonfinite
      [0.5, 0.5, 0.2, 0.2, np.inf],   # nonfinite score
      [0.5, 0.5, 0.0, 0.2, 0.7],      # zero width
      [0.5, 0.5, 0.2, -0.1, 0.7],     # negative height
      [1.5, 0.5, 0.2, 0.2, 0.6],      # entirely right of the image
      [0.5, -0.2, 0.2, 0.2, 0.6],     # entirely above
      [0.5, 1.1, 0.2, 0.2, 0.6],      # touches the bottom edge only: outside
      [0.95, 0.5, 0.2, 0.4, 0.5],     # partly outside: clipped to x in [0.85, 1]
  ], np.float32)
  kept, stats = valid_boxes(rows)
  assert stats == {"boxes_nonfinite": 2, "boxes_degenerate": 2, "boxes_outside": 3,
                   "boxes_clipped": 1}
  np.testing.assert_array_equal(kept[0], rows[0])
  np.testing.assert_allclose(kept[1], [0.925, 0.5, 0.15, 0.4, 0.5], atol=1e-6)
  with pytest.raises(CorruptRecord, match="n 5"):
    valid_boxes(np.zeros((3, 4), np.float32))


def test_a_record_without_a_valid_box_is_skipped_by_name_or_becomes_the_whole_image():
  doc = document(np.random.default_rng(0), index=7)
  doc["boxes"] = np.array([[np.nan] * 5, [0.5, 0.5, 0, 0, 1]], np.float32)
  with pytest.raises(CorruptRecord, match="case-7") as caught:
    build_regions(doc, TOK, RegionSpec(num_regions=2, region_size=8), 16)
  assert caught.value.reason == "no_boxes"
  doc["boxes"] = np.zeros((0, 5), np.float32)
  example, stats = build_regions(doc, TOK, RegionSpec(num_regions=2, region_size=8,
                                                      empty="whole_image", pad="mask"), 16)
  assert stats["no_boxes_whole_image"] == 1 and example["region_mask"].tolist() == [True, False]
  whole = np.asarray(Image.fromarray(doc["image"]).resize((8, 8), Image.BILINEAR))
  np.testing.assert_array_equal(example["regions"][0], np.repeat(whole[..., None], 3, -1))


def test_zero_boxes_are_counted_skips_in_the_pipeline_and_the_run_goes_on():
  rng = np.random.default_rng(0)
  docs = [document(rng, i, num_boxes=0 if i % 3 == 0 else 4, label=i % 2) for i in range(12)]
  health = DataHealth()
  spec = SequenceSpec(seq_len=16, mode="regions",
                      regions=RegionSpec(num_regions=3, region_size=8))
  iterator = iter(make_dataset([Dataset("mammo", Documents(docs))], TOK, spec, batch_size=2,
                               seed=0, health=health))
  batches = [next(iterator) for _ in range(12)]
  assert health.counts()["mammo/no_boxes"] > 0
  assert health.records_read()["mammo"] == 24 + health.counts()["mammo/no_boxes"]
  b = batches[-1]
  assert b["regions"].shape == (2, 3, 8, 8, 3) and b["regions"].dtype == np.uint8
  assert b["tokens"].shape == (2, 16) and b["label"].dtype == np.int32
  assert b["region_mask"].all() and b["region_scores"].shape == (2, 3)


# ---------------------------------------------------------------------------------------
# Crops.
# ---------------------------------------------------------------------------------------
def test_a_bright_square_fills_the_crop_of_its_box():
  image = np.zeros((256, 512), np.uint8)
  image[64:128, 128:256] = 255
  doc = {"image": image, "boxes": np.array([[0.375, 0.375, 0.25, 0.25, 0.9]], np.float32),
         "text": "", "label": 1, "id": "square"}
  assert pixel_boxes(doc["boxes"], 256, 512).tolist() == [[128, 64, 256, 128]]
  example, _ = build_regions(doc, TOK, RegionSpec(num_regions=1, region_size=16), 8)
  assert example["regions"].shape == (1, 16, 16, 3) and (example["regions"] == 255).all()
  # A box twice as wide as the square (aspect ratio not kept): the square fills the middle.
  doc["boxes"] = np.array([[0.375, 0.375, 0.5, 0.25, 0.9]], np.float32)
  crop = build_regions(doc, TOK, RegionSpec(num_regions=1, region_size=16), 8)[0]["regions"]
  assert (crop[0, :, 5:11] == 255).all() and (crop[0, :, :3] == 0).all()


def test_pixel_boxes_follow_the_references_arithmetic():
  rows = document(np.random.default_rng(3), num_boxes=50)["boxes"]
  height, width = 977, 613
  expected = [[int((cx - w / 2) * width), int((cy - h / 2) * height),
               int((cx + w / 2) * width), int((cy + h / 2) * height)]
              for cx, cy, w, h in rows[:, :4].astype(np.float64)]
  assert pixel_boxes(rows, height, width).tolist() == expected


def test_pipeline_crops_are_pil_bilinear_resizes_of_the_pixel_boxes():
  doc = document(np.random.default_rng(1), num_boxes=4, size=(90, 60))
  spec = RegionSpec(num_regions=4, region_size=12, nms_iou=1.0)
  example, _ = build_regions(doc, TOK, spec, 8, np.random.default_rng(0))
  pil = Image.fromarray(doc["image"]).convert("RGB")  # as the reference reads the image
  for crop, box in zip(example["regions"], pixel_boxes(doc["boxes"], 90, 60), strict=True):
    want = np.asarray(pil.crop(tuple(box.tolist())).resize((12, 12), Image.BILINEAR))
    np.testing.assert_array_equal(crop, want)


def test_device_crop_boxes_map_back_to_the_same_pixels():
  doc = document(np.random.default_rng(2), num_boxes=5, size=(300, 200))
  spec = RegionSpec(num_regions=5, crop="device", canvas_size=64, nms_iou=1.0)
  example, _ = build_regions(doc, TOK, spec, 8, np.random.default_rng(0))
  assert example["image"].shape == (64, 64, 1) and example["boxes"].dtype == np.float32
  want = np.asarray(Image.fromarray(doc["image"]).resize((64, 64), Image.BILINEAR))
  np.testing.assert_array_equal(example["image"][..., 0], want)
  y0, x0, y1, x1 = (example["boxes"][:, i] for i in range(4))
  back = np.round(np.stack([x0 * 200 / 64, y0 * 300 / 64, x1 * 200 / 64, y1 * 300 / 64],
                           axis=1)).astype(int)
  np.testing.assert_array_equal(back, pixel_boxes(doc["boxes"], 300, 200))
  # On a canvas of the image's own size, the image is unchanged and boxes are its pixels.
  square = document(np.random.default_rng(2), num_boxes=2, size=(64, 64))
  spec = RegionSpec(num_regions=2, crop="device", canvas_size=64, nms_iou=1.0, pad="mask")
  example, _ = build_regions(square, TOK, spec, 8)
  np.testing.assert_array_equal(example["image"][..., 0], square["image"])
  np.testing.assert_array_equal(example["boxes"][:, [1, 0, 3, 2]],
                                pixel_boxes(square["boxes"], 64, 64))


def test_whole_image_baseline_and_text_tokens():
  doc = document(np.random.default_rng(4), size=(40, 30), text="word " * 40)
  doc["boxes"] = np.zeros((0, 5), np.float32)  # the baseline does not read boxes
  example, stats = build_regions(doc, TOK, RegionSpec(whole_image=True, region_size=8), 12)
  assert example["regions"].shape == (1, 8, 8, 3) and example["region_mask"].tolist() == [True]
  tokens = example["tokens"]
  assert stats["text_truncated"] == 1 and tokens[0] == TOK.bos_id and tokens[-1] == TOK.eos_id
  # The history inside the reference's prompt, or bare with prompt "{text}".
  doc["text"] = "mass"
  for prompt, text in (("Indication: {text}", "Indication: mass"), ("{text}", "mass")):
    tokens, stats = (lambda e: (e[0]["tokens"], e[1]))(build_regions(
        doc, TOK, RegionSpec(whole_image=True, region_size=8, prompt=prompt), 32))
    ids = TOK.encode(text, bos=True, eos=True)
    assert stats["text_truncated"] == 0 and tokens[:len(ids)].tolist() == ids
    assert (tokens[len(ids):] == TOK.pad_id).all()
  doc["text"] = ""  # a hidden history still reads the prompt
  tokens = build_regions(doc, TOK, RegionSpec(whole_image=True, region_size=8), 32)[0]["tokens"]
  ids = TOK.encode("Indication:", bos=True, eos=True)
  assert tokens[:len(ids)].tolist() == ids
  with pytest.raises(ValueError, match="prompt"):
    RegionSpec(prompt="Indication:")


# ---------------------------------------------------------------------------------------
# Keyword masking.
# ---------------------------------------------------------------------------------------
def test_keywords_rank_by_summed_tfidf_computed_by_hand():
  texts = ["mass mass calcification", "the mass is benign", "benign cyst", None]
  counts = [{"mass": 2, "calcification": 1}, {"mass": 1, "benign": 1},
            {"benign": 1, "cyst": 1}]  # "the" and "is" are stop words; None is left out
  n = len(counts)
  idf = {w: math.log((1 + n) / (1 + sum(w in c for c in counts))) + 1
         for w in ("mass", "calcification", "benign", "cyst")}
  sums = dict.fromkeys(idf, 0.0)
  for c in counts:
    norm = math.sqrt(sum((k * idf[w]) ** 2 for w, k in c.items()))
    for w, k in c.items():
      sums[w] += k * idf[w] / norm
  want = sorted(sums, key=lambda w: (-sums[w], w))
  words, scores = top_keywords(texts, top=3)
  assert words == tuple(want[:3])
  np.testing.assert_allclose(scores, [sums[w] for w in want[:3]], rtol=1e-9)
  assert top_keywords(["the", ""]) == ((), ())


def test_fixed_masking_deletes_the_same_drawn_words_in_every_epoch():
  mask = KeywordMask("fixed", ("mass", "cyst", "benign", "lump", "pain"),
                     (5.0, 1.0, 1.0, 1.0, 1.0), rate=0.4, seed=3)
  drawn = mask.drawn()
  assert len(drawn) == 2 and set(drawn) == mask.masked
  assert drawn == KeywordMask("fixed", mask.words, mask.weights, 0.4, 3).drawn()
  text = "Mass: mass  mass, cyst benign lump pain mass"
  outs = {mask.apply(text, i, e) for i in range(3) for e in range(3)}
  assert len(outs) == 1  # not per record, not per epoch
  want = " ".join(t for t in text.split() if t not in mask.masked)
  assert outs == {want}
  assert "Mass:" in want and "mass," in want  # exact, case-sensitive token matches
  firsts = {KeywordMask("fixed", mask.words, mask.weights, 0.2, s).drawn()[0]
            for s in range(40)}
  assert "mass" in firsts and len(firsts) > 1  # weighted, but not only the heaviest word


def test_random_masking_is_deterministic_by_seed_and_differs_across_epochs():
  mask = KeywordMask("random", ("mass", "cyst"), (1.0, 1.0), rate=0.5, seed=0)
  text = " ".join(["mass", "cyst", "left"] * 30)
  first = mask.apply(text, 4, 0)
  assert first == KeywordMask("random", ("mass", "cyst"), (1.0, 1.0), 0.5, 0).apply(text, 4, 0)
  assert first != mask.apply(text, 4, 1) and first != mask.apply(text, 5, 0)
  assert first != KeywordMask("random", mask.words, mask.weights, 0.5, 1).apply(text, 4, 0)
  kept = first.split()
  assert kept.count("left") == 30 and 15 < kept.count("mass") + kept.count("cyst") < 45
  assert KeywordMask("random", mask.words, mask.weights, 0.0).apply(text, 0, 0) == text
  assert set(KeywordMask("random", mask.words, mask.weights, 1.0).apply(
      text, 0, 0).split()) == {"left"}


def test_only_the_training_mixture_is_masked(monkeypatch):
  docs = [document(np.random.default_rng(i), i, text=t) for i, t in
          enumerate(["mass mass left", "mass cyst", "cyst benign"])]
  config = ml_collections.ConfigDict({
      "seed": 0, "data": {"seq_len": 16, "batch_size": 2, "mode": "regions",
                          "regions": {"num_regions": 2, "region_size": 8},
                          "keyword_mask": {"mode": "fixed", "top": 2, "rate": 1.0}}})
  given = {}
  monkeypatch.setattr(train, "datasets", lambda c, field="datasets": [
      Dataset(field, Documents(docs))])
  monkeypatch.setattr(train, "make_tokenizer", lambda c: TOK)
  monkeypatch.setattr(train, "make_dataset", lambda ds, tok, spec, **kw: given.update(
      {ds[0].name: (spec, kw["keyword_mask"])}))
  train.make_data(config, seed=0, health=DataHealth())
  train.make_data(config, "eval_datasets", seed=0, health=DataHealth())
  spec, mask = given["datasets"]
  assert spec.regions == RegionSpec(num_regions=2, region_size=8) and spec.seq_len == 16
  assert mask.words == top_keywords([d["text"] for d in docs], 2)[0]
  assert given["eval_datasets"][1] is None
  config.data.regions.crop = "gpu"
  with pytest.raises(cli.UserError, match="config.data.regions: .*crop='gpu'"):
    train.sequence_spec(config)
  config.data.regions.crop = "device"
  config.data.keyword_mask.mode = "none"
  assert train.keyword_mask(config, [Dataset("d", Documents(docs))]) is None
  data_schema = config_lib.SCHEMA.fields["data"].fields
  assert not config_lib._check(data_schema["regions"], config.data.regions, "r", None)
  assert config_lib._check(data_schema["regions"], {"crop": "gpu"}, "r", None)
  assert config_lib._check(data_schema["keyword_mask"], {"mode": "all"}, "k", None)


# ---------------------------------------------------------------------------------------
# Class-balanced sampling.
# ---------------------------------------------------------------------------------------
def test_class_weights():
  assert class_weights(True, [0, 1, 1]).tolist() == [1.0, 1.0]
  assert class_weights([0.3, 0.7], [0, 1]).tolist() == [0.3, 0.7]
  with pytest.raises(ValueError, match="no records"):
    class_weights([0.5, 0.5], [0, 0])
  with pytest.raises(ValueError, match="one per class"):
    class_weights([1.0], [0, 1])


def test_balanced_sampling_draws_half_and_half_from_a_10_90_source_and_resumes():
  rng = np.random.default_rng(0)
  docs = [document(rng, i, num_boxes=1, label=int(i < 10), size=(16, 16)) for i in range(100)]
  entry = {"name": "d", "source": {"kind": "shapes_world_pairs", "size": 4}}
  assert dataset_from_config(entry).balance is False
  assert dataset_from_config({**entry, "balance": [0.3, 0.7]}).balance == (0.3, 0.7)
  spec = SequenceSpec(seq_len=8, mode="regions",
                      regions=RegionSpec(num_regions=1, region_size=4))
  dataset = make_dataset([Dataset("mammo", Documents(docs), balance=True)], TOK, spec,
                         batch_size=50, seed=1)
  iterator = iter(dataset)
  labels = np.concatenate([next(iterator)["label"] for _ in range(20)])
  assert abs(labels.mean() - 0.5) < 0.05  # 1000 draws; unbalanced the mean would be 0.1
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(2)]
  resumed = iter(dataset)
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(2)], strict=True):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  order = balanced_order([d["label"] for d in docs], [0.2, 0.8], seed=5)
  draws = [order[i] for i in range(2000)]
  assert draws[:50] == [balanced_order([d["label"] for d in docs], [0.2, 0.8], 5)[i]
                        for i in range(50)]
  assert abs(np.mean(np.asarray(draws) < 10) - 0.8) < 0.04
  assert len(set(draws) - set(range(10))) > 60  # class 0 records drawn uniformly
