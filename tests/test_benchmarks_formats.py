"""The benchmark readers on tiny copies of each published layout: what they read, which
split and which image each example gets, and the errors for malformed files."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from mmjax.cli import UserError
from mmjax.data.sequences import CorruptRecord
from mmjax.evaluate import benchmarks


def write_image(path, colour=(200, 30, 10), size=(12, 8), mode="RGB"):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, colour).save(path)
  return path


def write_json(path, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value))
  return path


# ---------------------------------------------------------------------------------------
# COCO Karpathy.
# ---------------------------------------------------------------------------------------
def karpathy_entry(cocoid, split, folder="val2014", captions=("a cat.", "a dog.")):
  return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid,
          "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions],
          "imgid": cocoid, "sentids": [0, 1]}


@pytest.fixture
def coco(tmp_path):
  entries = [karpathy_entry(1, "train", "train2014"), karpathy_entry(2, "restval"),
             karpathy_entry(3, "val"), karpathy_entry(4, "test", captions=("red.", "blue.")),
             karpathy_entry(5, "test"), karpathy_entry(6, "train", "train2014")]
  for e in entries:
    write_image(tmp_path / "coco" / e["filepath"] / e["filename"])
  return write_json(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"})


def test_coco_splits_follow_openflamingo(coco, tmp_path):
  root = tmp_path / "coco"
  train = benchmarks.read_coco_karpathy(coco, root, "train")
  assert [e.id for e in train] == ["1", "6"]  # restval is not among the demonstrations
  assert train[0].image_path == str(root / "train2014" / "COCO_train2014_000000000001.jpg")
  test = benchmarks.read_coco_karpathy(coco, root, "test")
  assert [e.id for e in test] == ["4", "5"] and test.skipped == {}
  assert test[0].captions == ("red.", "blue.") and test[0].label is None
  assert test[0].image_path == str(root / "val2014" / "COCO_val2014_000000000004.jpg")
  assert [e.id for e in benchmarks.read_coco_karpathy(coco, root, "train+restval")] == \
      ["1", "2", "6"]


def test_flickr_layout_has_no_filepath_or_cocoid(tmp_path):
  write_image(tmp_path / "flickr" / "1000092795.jpg")
  file = write_json(tmp_path / "dataset_flickr30k.json", {"images": [
      {"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": "men."}]}]})
  (example,) = benchmarks.read_coco_karpathy(file, tmp_path / "flickr", "test")
  assert example.id == "1000092795" and example.captions == ("men.",)
  assert example.image_path == str(tmp_path / "flickr" / "1000092795.jpg")


def test_missing_images_are_counted_and_named(coco, tmp_path, caplog):
  (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000005.jpg").unlink()
  with caplog.at_level(logging.WARNING):
    test = benchmarks.read_coco_karpathy(coco, tmp_path / "coco", "test")
  assert [e.id for e in test] == ["4"] and test.skipped == {"missing_image": 1}
  assert "COCO_val2014_000000000005.jpg" in caplog.text
  with pytest.raises(UserError, match=r"None of the 2 images .* check the image folder"):
    benchmarks.read_coco_karpathy(coco, tmp_path / "elsewhere", "train")


def test_coco_errors_name_file_entry_and_expectation(coco, tmp_path):
  root = tmp_path / "coco"
  with pytest.raises(UserError, match=r"'validation'.*'train\+restval'"):
    benchmarks.read_coco_karpathy(coco, root, "validation")
  entries = json.loads(coco.read_text())["images"]
  del entries[3]["sentences"]
  bad = write_json(tmp_path / "bad.json", {"images": entries})
  with pytest.raises(UserError, match=r"bad\.json, images\[3\] has no 'sentences'.*a list"):
    benchmarks.read_coco_karpathy(bad, root, "test")
  entries[3]["sentences"] = [{"raw": 7}]
  write_json(bad, {"images": entries})
  with pytest.raises(UserError, match=r"images\[3\], sentences\[0\]: 'raw' is 7, expected a "
                     "string"):
    benchmarks.read_coco_karpathy(bad, root, "test")
  write_json(bad, {"annotations": []})
  with pytest.raises(UserError, match=r"no list 'images' \(found \['annotations'\]\)"):
    benchmarks.read_coco_karpathy(bad, root, "test")
  write_json(bad, {"images": [karpathy_entry(1, "train")]})
  with pytest.raises(UserError, match=r"no entries of split 'test'; its splits are \['train'\]"):
    benchmarks.read_coco_karpathy(bad, root, "test")
  bad.write_text("{not json")
  with pytest.raises(UserError, match="is not a JSON file"):
    benchmarks.read_coco_karpathy(bad, root, "test")
  with pytest.raises(UserError, match="No Karpathy split file"):
    benchmarks.read_coco_karpathy(tmp_path / "absent.json", root, "test")


# ---------------------------------------------------------------------------------------
# VQAv2 / OK-VQA.
# ---------------------------------------------------------------------------------------
def vqa_files(tmp_path, image_set="val2014"):
  questions = [{"image_id": 42, "question": "What colour?", "question_id": 420},
               {"image_id": 42, "question": "How many?", "question_id": 421},
               {"image_id": 7, "question": "Is it red?", "question_id": 70}]
  # The annotations in another order than the questions: they are matched by question id.
  annotations = [
      {"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
       "multiple_choice_answer": f"a{q['question_id']}", "answer_type": "other",
       "answers": [{"answer": f"a{q['question_id']}-{j}", "answer_confidence": "yes",
                    "answer_id": j + 1} for j in range(10)]}
      for q in reversed(questions)]
  for image_id in (42, 7):
    write_image(tmp_path / image_set / f"COCO_{image_set}_{image_id:012d}.jpg")
  return (write_json(tmp_path / "questions.json", {"questions": questions, "license": {}}),
          write_json(tmp_path / "annotations.json", {"annotations": annotations}))


def test_vqa_reads_questions_answers_and_coco_image_names(tmp_path):
  questions, annotations = vqa_files(tmp_path)
  split = benchmarks.read_vqa(questions, tmp_path / "val2014", annotations)
  assert [e.id for e in split] == ["420", "421", "70"]
  assert split[1].question == "How many?"
  assert split[1].answers == tuple(f"a421-{j}" for j in range(10))
  assert split[2].image_path == str(tmp_path / "val2014" / "COCO_val2014_000000000007.jpg")
  unanswered = benchmarks.read_vqa(questions, tmp_path / "val2014")
  assert unanswered[0].answers == () and unanswered[0].question == "What colour?"


def test_vqa_image_set_comes_from_the_folder_or_is_given(tmp_path):
  questions, annotations = vqa_files(tmp_path, "train2014")
  assert benchmarks.read_vqa(questions, tmp_path / "train2014", annotations)[0].image_path \
      .endswith("train2014/COCO_train2014_000000000042.jpg")
  (tmp_path / "train2014").rename(tmp_path / "images")
  with pytest.raises(UserError, match=r"images is not named after a COCO image set .* pass "
                     "image_set"):
    benchmarks.read_vqa(questions, tmp_path / "images", annotations)
  split = benchmarks.read_vqa(questions, tmp_path / "images", annotations,
                              image_set="train2014")
  assert len(split) == 3


def test_vqa_errors(tmp_path):
  questions, annotations = vqa_files(tmp_path)
  images = tmp_path / "val2014"
  entries = json.loads(annotations.read_text())["annotations"]
  write_json(annotations, {"annotations": entries[1:]})  # question 70's annotation is gone
  with pytest.raises(UserError, match=r"questions\.json, questions\[2\]: question 70 has no "
                     "annotation.*same split"):
    benchmarks.read_vqa(questions, images, annotations)
  entries[0]["image_id"] = 8
  write_json(annotations, {"annotations": entries})
  with pytest.raises(UserError, match="question 70 is about image 7, its annotation .* about "
                     "image 8"):
    benchmarks.read_vqa(questions, images, annotations)
  entries[0]["image_id"], entries[0]["answers"][3] = 7, {"text": "x"}
  write_json(annotations, {"annotations": entries})
  with pytest.raises(UserError, match=r"annotations\[0\], answers\[3\] has no 'answer'"):
    benchmarks.read_vqa(questions, images, annotations)
  write_json(questions, {"questions": [{"image_id": "42", "question": "?", "question_id": 1}]})
  with pytest.raises(UserError, match=r"questions\[0\]: 'image_id' is '42', expected an "
                     "integer"):
    benchmarks.read_vqa(questions, images)
  write_json(questions, {"questions": [{"image_id": 42, "question": "?", "question_id": 1}] * 2})
  with pytest.raises(UserError, match=r"question ids \['1'\] occur more than once"):
    benchmarks.read_vqa(questions, images)


def test_vqa_missing_images_are_counted(tmp_path):
  questions, annotations = vqa_files(tmp_path)
  (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
  split = benchmarks.read_vqa(questions, tmp_path / "val2014", annotations)
  assert [e.id for e in split] == ["70"] and split.skipped == {"missing_image": 2}


# ---------------------------------------------------------------------------------------
# Class folders.
# ---------------------------------------------------------------------------------------
@pytest.fixture
def imagenet(tmp_path):
  root = tmp_path / "val"
  write_image(root / "n02" / "b.JPEG")
  write_image(root / "n02" / "a.png")
  write_image(root / "n01" / "c.jpg")
  write_image(root / "n03" / "deeper" / "d.jpeg")
  (root / "n01" / "notes.txt").write_text("not an image")
  return root


def test_image_folder_labels_index_sorted_folders(imagenet):
  split = benchmarks.read_image_folder(imagenet)
  assert split.class_names == ("n01", "n02", "n03")
  assert [(e.id, e.label) for e in split] == [
      ("n01/c.jpg", 0), ("n02/a.png", 1), ("n02/b.JPEG", 1), ("n03/deeper/d.jpeg", 2)]
  assert split[1].image_path == str(imagenet / "n02" / "a.png")
  assert split.skipped == {"not_an_image": 1}


def test_image_folder_class_names_from_a_file(imagenet, tmp_path):
  names = write_json(tmp_path / "names.json",
                     {"n03": "goldfish", "n01": "tench", "n02": "shark", "n00": "absent"})
  split = benchmarks.read_image_folder(imagenet, names)
  # Labels index the sorted names of the file, so a split without some classes keeps them.
  assert split.class_names == ("absent", "tench", "shark", "goldfish")
  assert [e.label for e in split] == [1, 2, 2, 3]
  keras = write_json(tmp_path / "imagenet_class_index.json",
                     {"0": ["n01", "tench"], "1": ["n02", "shark"], "2": ["n03", "goldfish"]})
  assert benchmarks.read_image_folder(imagenet, keras).class_names == \
      ("tench", "shark", "goldfish")


def test_image_folder_errors(imagenet, tmp_path):
  names = write_json(tmp_path / "names.json", {"n01": "tench"})
  with pytest.raises(UserError, match=r"names no class for the folders \['n02', 'n03'\]"):
    benchmarks.read_image_folder(imagenet, names)
  write_json(names, {"n01": 3})
  with pytest.raises(UserError, match=r"names\.json, entry 'n01': 3 is neither"):
    benchmarks.read_image_folder(imagenet, names)
  with pytest.raises(UserError, match="holds no class folders"):
    benchmarks.read_image_folder(imagenet / "n01")
  with pytest.raises(UserError, match="No folder"):
    benchmarks.read_image_folder(tmp_path / "absent")


# ---------------------------------------------------------------------------------------
# Hateful Memes.
# ---------------------------------------------------------------------------------------
def memes_file(tmp_path, lines):
  for line in lines:
    if isinstance(line, dict) and "img" in line:
      write_image(tmp_path / "hm" / line["img"])
  file = tmp_path / "hm" / "dev_seen.jsonl"
  file.write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                            for line in lines) + "\n")
  return file


def test_hateful_memes(tmp_path):
  file = memes_file(tmp_path, [
      {"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character"},
      "",
      {"id": "01235", "img": "img/01235.png", "label": 1, "text": "look at\u2028this"}])
  split = benchmarks.read_hateful_memes(file)
  assert [(e.id, e.label, e.text) for e in split] == [
      ("42953", 0, "its their character"), ("01235", 1, "look at\u2028this")]
  assert split[0].image_path == str(tmp_path / "hm" / "img" / "42953.png")
  assert split.class_names == ("no", "yes") and split.skipped == {}


def test_hateful_memes_errors(tmp_path):
  good = {"id": 1, "img": "img/1.png", "label": 0, "text": "t"}
  file = memes_file(tmp_path, [good, {**good, "id": 2, "label": 2}])
  with pytest.raises(UserError, match=r"dev_seen\.jsonl, line 2: 'label' is 2, expected 0"):
    benchmarks.read_hateful_memes(file)
  file = memes_file(tmp_path, [good, "{oops"])
  with pytest.raises(UserError, match=r"line 2 is not a JSON object"):
    benchmarks.read_hateful_memes(file)
  file = memes_file(tmp_path, [{k: v for k, v in good.items() if k != "text"}])
  with pytest.raises(UserError, match=r"line 1 has no 'text' .* expected a string"):
    benchmarks.read_hateful_memes(file)
  file = memes_file(tmp_path, [{**good, "label": True}])
  with pytest.raises(UserError, match=r"'label' is True, expected an integer"):
    benchmarks.read_hateful_memes(file)
  file = memes_file(tmp_path, [good, {**good, "id": 2, "img": "img/2.png"}])
  (tmp_path / "hm" / "img" / "2.png").unlink()
  assert benchmarks.read_hateful_memes(file).skipped == {"missing_image": 1}


# ---------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------
def test_load_image_prepares_as_training_does(tmp_path):
  from mmjax.data.sources import decode_image
  path = write_image(tmp_path / "a.png", (0, 0, 0, 0), (20, 10), "RGBA")
  example = benchmarks.Example(id="a", image_path=str(path))
  image = benchmarks.load_image(example, 8)
  assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
  np.testing.assert_array_equal(image, decode_image(path.read_bytes(), 8))
  assert (image == 255).all()  # transparent over white, as training images are
  assert benchmarks.load_images([example, example], 8).shape == (2, 8, 8, 3)


def test_load_image_reports_unreadable_files_with_a_reason(tmp_path):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not a jpeg")
  with pytest.raises(CorruptRecord, match=r"bad_image: .*bad\.jpg \(example b\): cannot decode"):
    benchmarks.load_image(benchmarks.Example(id="b", image_path=str(bad)), 8)
  with pytest.raises(CorruptRecord, match=r"missing_image: .*gone\.jpg \(example c\)") as error:
    benchmarks.load_image(benchmarks.Example(id="c", image_path=str(tmp_path / "gone.jpg")), 8)
  assert error.value.reason == "missing_image"
