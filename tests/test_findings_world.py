"""Findings world and labelled sources: determinism, labels that match the words and the
pixels, MedCLIP's decoupled sampling, CheXpert-style CSVs, the BERT-style tokenizer."""

import csv
import io
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.data import findings_world as fw
from mmjax.data import sources
from mmjax.data.pipeline import (DataHealth, Dataset, FindingsWorldPairs, ShapesWorldPairs,
                                 dataset_from_config, make_dataset)
from mmjax.data.sequences import SequenceSpec
from mmjax.data.tokenizer import HFTokenizer, make_tokenizer
from mmjax.evaluate.zeroshot import compose_prompts

TOK = HFTokenizer(fw.TOKENIZER_DIR)
SPEC = SequenceSpec(seq_len=32, image_size=32, mode="pair")
WORLD = fw.FindingsWorld(seed=0, image_size=32)
UNCERTAIN_CUES = ("possible", "cannot be excluded", "may represent", "questionable")


def source(**kwargs) -> FindingsWorldPairs:
  return dataset_from_config({"name": "fw", "source": {"kind": "findings_world",
                                                       "image_size": 32, **kwargs}}).source


def test_an_example_is_a_function_of_seed_split_and_index():
  a, again = WORLD.example("paired", 7), fw.FindingsWorld(0, 32).example("paired", 7)
  assert a.image.tobytes() == again.image.tobytes() and a.study.report == again.study.report
  np.testing.assert_array_equal(a.labels, again.labels)
  assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8
  assert np.array_equal(a.image[..., 0], a.image[..., 2])  # grey
  others = [WORLD.example("paired", 8), WORLD.example("images", 7),
            fw.FindingsWorld(1, 32).example("paired", 7)]
  assert all(o.image.tobytes() != a.image.tobytes() for o in others)
  assert fw.FindingsWorld(0, 64).example("paired", 7).image.shape == (64, 64, 3)
  with pytest.raises(ValueError, match="Unknown findings-world split"):
    WORLD.example("train", 0)


def check_sentence(sentence: fw.Sentence):
  """The sentence's label vector says what its words say."""
  text, labels = sentence.text, sentence.labels
  assert labels.dtype == np.float32 and labels.shape == (len(fw.LABELS),)
  named = {fw.LABELS[i]: labels[i] for i in np.flatnonzero(~np.isnan(labels))}
  assert named, text
  if fw.NO_FINDING in named:
    assert named == {fw.NO_FINDING: 1.0} and text in fw.NO_FINDING_SENTENCES
    return
  for finding, value in named.items():
    if value == fw.NEGATIVE:
      assert text.startswith(("no ", "there is no ")), text
      assert fw.NEGATIVE_NAME[finding] in text, text
    else:
      assert any(name in text for name in fw.SUBTYPE[finding]), text
      assert not text.startswith("no ") and "there is no" not in text, text
      assert any(cue in text for cue in UNCERTAIN_CUES) == (value == fw.UNCERTAIN), text
  if len(named) == 2:  # "no A or B"
    assert set(named.values()) == {fw.NEGATIVE}, text


def test_sentence_and_report_labels_match_their_wording_and_the_study():
  findings_seen, values_seen = set(), set()
  for i in range(150):
    study = WORLD.study("paired", i)
    for sentence in study.sentences:
      check_sentence(sentence)
    merged = np.full(len(fw.LABELS), np.nan, np.float32)
    for sentence in study.sentences:  # every label comes from exactly one sentence
      named = ~np.isnan(sentence.labels)
      assert np.all(np.isnan(merged[named]))
      merged[named] = sentence.labels[named]
    np.testing.assert_array_equal(merged, study.labels)
    assert study.report == ". ".join(s.text for s in study.sentences) + "."
    for finding, state in study.states.items():
      value = study.labels[fw.LABELS.index(finding)]
      if state.value != fw.NEGATIVE:
        assert value == state.value  # positives and uncertains are always reported
      elif not state.mentioned:
        assert np.isnan(value)
      findings_seen.add(finding)
      values_seen.add(float(value))
    assert (study.labels[0] == 1) == fw.no_finding(study.states)
  for i in range(100):
    check_sentence(WORLD.sentence(i))
  assert findings_seen == set(fw.FINDINGS)
  assert {1.0, 0.0, -1.0} <= values_seen


def test_prevalences_make_shared_findings_common():
  labels = np.stack([WORLD.study("images", i).labels for i in range(200)])
  positive = labels[:, 1:] == 1
  assert positive.sum(1).mean() > 1.5  # several findings co-occur
  assert 0.05 < (labels[:, 0] == 1).mean() < 0.4  # "no finding" exists, not dominant
  both = (labels == 1).astype(int)
  shared = (both @ both.T) > 0  # pairs with a positive label in common: false negatives
  assert shared[~np.eye(200, dtype=bool)].mean() > 0.3  # to InfoNCE


def test_signatures_are_visible_where_each_finding_lies():
  """Mean of the finding's region over images with it minus without it, in standard
  errors: clearly nonzero for every finding (darker for pneumothorax)."""
  size, n = 48, 240
  world = fw.FindingsWorld(seed=3, image_size=size)
  examples = [world.example("images", i) for i in range(n)]
  for finding in fw.FINDINGS:
    values, region = [], []
    for e in examples:
      state = e.study.states[finding]
      rows, cols = fw.finding_box(finding, state.side, size)
      values.append(state.value)
      region.append(e.image[rows, cols, 0].astype(np.float64).mean())
    values, region = np.array(values), np.array(region)
    pos, neg = region[values == fw.POSITIVE], region[values == fw.NEGATIVE]
    t = (pos.mean() - neg.mean()) / np.sqrt(pos.var() / len(pos) + neg.var() / len(neg))
    assert (-t if finding == "pneumothorax" else t) > 4, (finding, t)


def test_decoupled_examples_are_deterministic_and_draw_image_and_text_independently():
  pairs = source(part="decoupled", image_pool=10, text_pool=1000, size=300)
  again = source(part="decoupled", image_pool=10, text_pool=1000, size=300)
  assert len(pairs) == 300
  a, b = pairs[17], again[17]
  assert a["images"].tobytes() == b["images"].tobytes() and a["text"] == b["text"]
  np.testing.assert_array_equal(a["text_labels"], b["text_labels"])
  draws = [pairs.draw(i) for i in range(300)]
  images, texts = np.array([d[0] for d in draws]), np.array([d[1] for d in draws])
  assert abs(np.corrcoef(images, texts)[0, 1]) < 0.2
  for image in range(10):  # every image is seen with many different texts
    assert len(set(texts[images == image])) >= 0.8 * np.sum(images == image) > 5
  doc = pairs[3]
  image, text = draws[3]
  pool = fw.ImagePool(fw.FindingsWorld(0, 32), 10)
  assert doc["images"][0].tobytes() == pool.image(image).tobytes()
  np.testing.assert_array_equal(doc["image_labels"], pool.labels(image))
  assert doc["text"] == fw.FindingsWorld(0, 32).sentence(text).text
  # The image pool, text pool and held-out parts are separate streams.
  assert fw.FindingsWorld(0, 32).study("images", 0).report != WORLD.study("texts", 0).report


def test_prompt_sentences_are_drawn_by_the_image_labels():
  pairs = source(part="decoupled", image_pool=200, size=200, prompt_fraction=1.0)
  normal = 0
  for i in range(120):
    doc = pairs[i]
    check_sentence(fw.Sentence(doc["text"], doc["text_labels"]))
    named = np.flatnonzero(~np.isnan(doc["text_labels"]))
    assert len(named) == 1 and doc["text_labels"][named[0]] == 1
    positive = np.flatnonzero(doc["image_labels"][1:] == 1) + 1
    if len(positive):
      assert named[0] in positive
    else:
      assert named[0] == 0
      normal += 1
  assert 0 < normal < 120
  mixed = source(part="decoupled", image_pool=200, size=400, prompt_fraction=0.5)
  prompts = sum(mixed.draw(i)[1] is None for i in range(400))
  assert 140 < prompts < 260


def test_a_smaller_paired_fraction_is_a_prefix_of_the_full_set():
  full, tenth = source(part="paired", size=300), source(part="paired", size=300, fraction=0.1)
  assert len(full) == 300 and len(tenth) == 30
  for i in (0, 29):
    assert tenth[i]["images"].tobytes() == full[i]["images"].tobytes()
    assert tenth[i]["text"] == full[i]["text"] == WORLD.study("paired", i).report
  one = source(part="paired", text="sentence")[5]
  assert one["text"] in [s.text for s in WORLD.study("paired", 5).sentences]
  check_sentence(fw.Sentence(one["text"], one["text_labels"]))
  retrieval = source(part="retrieval", size=50)
  assert len(retrieval) == 50 and retrieval[0]["text"] == WORLD.study("retrieval", 0).report
  with pytest.raises(ValueError, match=r"does not use \['prompt_fraction'\]"):
    source(part="paired", prompt_fraction=0.5)
  with pytest.raises(ValueError, match="Unknown findings-world part"):
    source(part="unpaired")


def test_classification_images_are_positive_for_exactly_one_class():
  split = source(part="classification", size=50)
  assert split.class_names() == fw.ZERO_SHOT_CLASSES and len(split) == 50
  labels = []
  for i in range(50):
    doc = split[i]
    example, label = WORLD.classification(i)
    assert doc["label"] == label and doc["text"] == fw.ZERO_SHOT_CLASSES[label]
    values = [example.study.states[c].value for c in fw.ZERO_SHOT_CLASSES]
    assert values.count(fw.POSITIVE) == 1 and values[label] == fw.POSITIVE
    assert values.count(fw.NEGATIVE) == len(values) - 1
    columns = [fw.LABELS.index(c) for c in fw.ZERO_SHOT_CLASSES]
    assert np.sum(doc["image_labels"][columns] == 1) == 1
    labels.append(label)
  assert np.bincount(labels).tolist() == [10] * 5
  with pytest.raises(ValueError, match="not findings"):
    source(part="classification", classes=("edema", "flu"))


def test_pair_batches_carry_both_label_vectors():
  mixture = [Dataset("decoupled", source(part="decoupled", image_pool=50, prompt_fraction=0.3)),
             Dataset("paired", source(part="paired", fraction=0.1, text="sentence")),
             Dataset("shapes", ShapesWorldPairs(size=50, image_size=32))]
  batch = next(iter(make_dataset(mixture, TOK, SPEC, batch_size=12, seed=0)))
  assert batch["image"].shape == (12, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["tokens"].shape == (12, 32) and batch["tokens"].dtype == np.int32
  for key in ("image_labels", "text_labels"):
    assert batch[key].shape == (12, len(fw.LABELS)) and batch[key].dtype == np.float32
    unlabelled = batch["dataset_id"] == 2
    assert unlabelled.any() and np.isnan(batch[key][unlabelled]).all()
    assert not np.isnan(batch[key][~unlabelled]).all(1).any()
  assert (batch["tokens"][:, 0] == TOK.bos_id).all()
  plain = next(iter(make_dataset(mixture[2:], TOK, SPEC, batch_size=2, seed=0)))
  assert "image_labels" not in plain  # unlabelled mixtures are unchanged
  other = Dataset("other", OtherLabels())
  with pytest.raises(ValueError, match="label counts differ"):
    make_dataset([mixture[0], other], TOK, SPEC, batch_size=2, seed=0)


class OtherLabels:
  """A labelled source with another label vocabulary."""

  label_names = ("a", "b", "c")

  def __len__(self) -> int:
    return 3


# ------------------------------------------------------------------------------------- CSV

def png(value: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((20, 24), value, np.uint8), "L").save(buffer, format="PNG")
  return buffer.getvalue()


def write_csv(path, header, rows):
  with open(path, "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def chexpert_fixture(tmp_path, bad_value="1"):
  """Four image rows (one missing file, one undecodable) and a sentence table."""
  root = tmp_path / "data"
  (root / "p1").mkdir(parents=True)
  (root / "p1" / "a.png").write_bytes(png(40))
  (root / "p1" / "b.png").write_bytes(png(200))
  (root / "p1" / "broken.png").write_bytes(b"not a png")
  blank = [""] * len(sources.CHEXPERT_LABELS)

  def labels(**values):
    row = list(blank)
    for name, value in values.items():
      row[sources.CHEXPERT_LABELS.index(name.replace("_", " "))] = value
    return row

  images = write_csv(tmp_path / "train.csv", ["Path", "Sex", *sources.CHEXPERT_LABELS], [
      ["p1/a.png", "F", *labels(Cardiomegaly="1.0", Edema="0.0", Pleural_Effusion="-1.0")],
      ["p1/b.png", "M", *labels(No_Finding=bad_value)],
      ["p1/missing.png", "M", *labels(Edema="1")],
      ["p1/broken.png", "F", *labels(Atelectasis="1")]])
  sentences = write_csv(tmp_path / "sentences.csv", ["Reports", *sources.CHEXPERT_LABELS], [
      ["the heart is enlarged", *labels(Cardiomegaly="1")],
      ["no acute process", *labels(No_Finding="1")],
      ["", *labels(Edema="1")],
      ["mild edema", *labels(Edema="1")]])
  return images, sentences, str(root)


def test_chexpert_style_tables_read_as_labelled_pools(tmp_path):
  images_csv, sentences_csv, root = chexpert_fixture(tmp_path)
  images = sources.LabelledImages(images_csv, 16, root)
  assert len(images) == 4 and images.label_names == sources.CHEXPERT_LABELS
  labels = images.labels(0)
  assert labels[sources.CHEXPERT_LABELS.index("Cardiomegaly")] == 1
  assert labels[sources.CHEXPERT_LABELS.index("Edema")] == 0
  assert labels[sources.CHEXPERT_LABELS.index("Pleural Effusion")] == -1
  assert np.isnan(labels).sum() == 11
  image = images.image(1)
  assert image.shape == (16, 16, 3) and abs(int(image.mean()) - 200) <= 1
  with pytest.raises(sources.CorruptRecord, match="missing_image.*line 4"):
    images.image(2)
  with pytest.raises(sources.CorruptRecord, match="bad_image.*line 5"):
    images.image(3)
  texts = sources.LabelledSentences(sentences_csv)
  assert len(texts) == 3  # the empty sentence is left out
  rng = np.random.default_rng(0)
  assert texts.prompt_sentence(images.labels(0), rng)[0] == "the heart is enlarged"
  assert texts.prompt_sentence(images.labels(1), rng)[0] == "no acute process"
  assert texts.prompt_sentence(images.labels(2), rng)[0] == "mild edema"
  with pytest.raises(sources.CorruptRecord, match="no_prompt_sentence.*Atelectasis"):
    texts.prompt_sentence(images.labels(3), rng)


def test_bad_label_cells_and_missing_columns_are_named(tmp_path):
  images_csv, _, root = chexpert_fixture(tmp_path, bad_value="2")
  with pytest.raises(ValueError, match=r"train\.csv line 3: column 'No Finding' holds '2'"):
    sources.LabelledImages(images_csv, 16, root)
  with pytest.raises(ValueError, match="no column"):
    sources.LabelledImages(images_csv, 16, root, path_column="path")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.LabelledImages(str(tmp_path / "nothing.csv"), 16)


def test_csv_decoupled_pairs_count_unreadable_images_and_keep_going(tmp_path):
  images_csv, sentences_csv, root = chexpert_fixture(tmp_path)
  config = {"name": "cxr", "source": {"kind": "labelled_decoupled", "images_csv": images_csv,
                                      "sentences_csv": sentences_csv, "root": root,
                                      "image_size": 16, "size": 40, "prompt_fraction": 0.5}}
  pairs = dataset_from_config(config)
  health = DataHealth()
  spec = SequenceSpec(seq_len=16, image_size=16, mode="pair")
  batches = list(zip(range(5), make_dataset([pairs], TOK, spec, batch_size=4, seed=0,
                                            health=health), strict=False))
  batch = batches[-1][1]
  assert batch["image_labels"].shape == (4, 14) and batch["text_labels"].shape == (4, 14)
  counts = health.counts()  # row c's file is missing, row d's undecodable and, drawn a
  # prompt, has no sentence for its class
  assert set(counts) == {"cxr/missing_image", "cxr/bad_image", "cxr/no_prompt_sentence"}
  classes = dataset_from_config({"name": "zs", "source": {
      "kind": "labelled_classes", "csv": images_csv, "root": root, "image_size": 16}}).source
  assert len(classes) == 3  # rows a, c and d: one positive class each; b has none
  doc = classes[0]
  assert doc["label"] == 1 and classes.class_names()[1] == "Cardiomegaly"
  assert doc["text"] == "cardiomegaly" and doc["image_labels"].shape == (14,)
  with pytest.raises(sources.CorruptRecord, match="missing_image"):
    classes[1]


# ------------------------------------------------------------------------------ tokenizer

def test_the_shipped_tokenizer_is_what_the_script_writes(tmp_path):
  fw.write_tokenizer(tmp_path)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / name).read_text() == (fw.TOKENIZER_DIR / name).read_text()
  settings = json.loads((fw.TOKENIZER_DIR / "tokenizer_config.json").read_text())
  assert (settings["bos_token"], settings["eos_token"]) == ("[CLS]", "[SEP]")
  assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (0, 2, 3)
  config = ml_collections.ConfigDict({"tokenizer": str(fw.TOKENIZER_DIR),
                                      "model": {"vocab_size": TOK.vocab_size},
                                      "tokens": {"pad": 0, "bos": 2, "eos": 3}})
  assert make_tokenizer(config).vocab_size == TOK.vocab_size


def test_every_sentence_and_prompt_tokenizes_without_unknown_words():
  unk = 1
  texts = [p for prompts in compose_prompts(fw.CLASS_PROMPT_WORDS, 10_000, 0).values()
           for p in prompts]
  texts += [WORLD.study(split, i).report for split in ("paired", "texts") for i in range(150)]
  texts += [WORLD.prompt_sentence(np.ones(len(fw.LABELS)), np.random.default_rng(i)).text
            for i in range(50)]
  for text in texts:
    ids = TOK.encode(text, bos=True, eos=True)
    assert unk not in ids, text
    assert TOK.decode(ids) == f"[CLS] {text} [SEP]"


def test_class_prompts_follow_the_severity_subtype_location_structure():
  words = fw.CLASS_PROMPT_WORDS["pleural effusion"]
  assert set(words) == {"severity", "subtype", "location"}
  assert "small" in words["severity"] and "at the left base" in words["location"]
  every = compose_prompts({"effusion": words}, 10_000, 0)["effusion"]
  assert len(every) == len(set(every)) == np.prod([len(w) for w in words.values()])
  assert "small pleural effusion at the left base" in every
  assert "pleural effusion at the left base" in every  # severity may be empty
  assert set(fw.CLASS_PROMPT_WORDS) == set(fw.LABELS)
