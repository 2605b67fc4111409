"""Few-shot evaluation: prompt formats, the protocol's rules, class ranking with a reused
cache against a naive forward pass, the naming task, and whole evaluations of toy models
on the shapes world and on benchmark files in their published layouts."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flamingo_config, random_gates
from PIL import Image

from mmjax import evaluate
from mmjax.configs import clip as clip_recipe
from mmjax.configs import flamingo as flamingo_recipe
from mmjax.configs import lm as lm_recipe
from mmjax.data import shapes_world as sw
from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluate import prompts, protocol, scoring, shapes
from mmjax.evaluate.tasks import FewShotTask, Item
from mmjax.models.flamingo import Flamingo
from mmjax.tasks import get_task

IMG, EOC = sw.MEDIA_TOKEN, sw.ENDOFCHUNK_TOKEN
WORLD = sw.ShapesWorld(seed=0, image_size=16)


def test_openflamingo_prompt_formats():
  vqa = prompts.FORMATS["openflamingo_vqa"]
  assert vqa.solved(question="what?", answer="red") == "Question:what? Short answer:red"
  assert vqa.query(question="what?") == "Question:what? Short answer:"
  memes = prompts.FORMATS["openflamingo_hateful_memes"]
  assert memes.query(ocr="hi") == "is an image with: 'hi' written on it. Is it hateful? Answer:"
  shapes_vqa = prompts.FORMATS["shapes_vqa"]
  assert shapes_vqa.query(question="q?") == "question: q? answer:"  # the answer's space is
  assert shapes_vqa.solved(question="q?", answer="red") == "question: q? answer: red"  # its own
  with pytest.raises(ValueError, match="must end with"):
    prompts.PromptFormat("{answer} trailing")
  text = prompts.few_shot_text(["a", "b"], "q", separator="\n")
  assert text == f"{IMG}a{EOC}\n{IMG}b{EOC}\n{IMG}q"
  assert prompts.few_shot_text(["a", "b"], "q", text_only=True) == f"a{EOC}b{EOC}{IMG}q"


def _items(n, prefix):
  return [Item(f"{prefix}{i}", lambda i=i: np.full((4, 4, 3), i, np.uint8), {"question": f"q{i}"},
               f"a{i}", [f"a{i}"] * 10) for i in range(n)]


def test_protocol_draws_own_demos_per_test_example_and_zero_shot_is_two_text_demos():
  task = FewShotTask("t", "vqa", _items(50, "s"), _items(20, "t"), prompts.FORMATS["shapes_vqa"])
  proto = protocol.Protocol(shots=(0, 4), trials=2, seed=3, num_samples=8, query_set_size=30)
  cells = task.cells(proto)
  assert [(c.seed, c.shots) for c in cells] == [(3, 0), (3, 4), (4, 0), (4, 4)]
  zero, four = cells[0], cells[1]
  for p in zero.prompts:  # two demonstrations without their images, then the query's
    assert p.text.count(IMG) == 1 == len(p.images) and p.text.count(EOC) == 2
  demo_sets = []
  for p, test_id in zip(four.prompts, four.ids, strict=True):
    assert p.text.count(IMG) == 5 == len(p.images)
    demos = [item.id for item in p.items[:-1]]
    assert len(set(demos)) == 4 and p.items[-1].id == test_id
    demo_sets.append(tuple(demos))
  assert len(set(demo_sets)) == len(demo_sets)  # each example its own
  # The query set: demonstrations of a trial come from its 30 drawn training examples.
  used = {d for s in demo_sets for d in s}
  assert len(used) <= 30
  assert len(set(four.ids)) == 8  # test examples without repeats
  assert cells[3].ids != four.ids  # another trial, other test examples


def test_aggregate_reports_mean_std_over_trials_and_standard_error():
  out = protocol.aggregate([{"acc": 0.5}, {"acc": 0.7}], {"acc": [1, 0, 1, 1]})
  assert out["acc"] == pytest.approx(0.6)
  assert out["acc_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  assert out["acc_se"] == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
  assert "acc_std" not in protocol.aggregate([{"acc": 0.5}])


def test_naming_support_colours_are_independent_so_more_shots_show_more_names():
  task = shapes.NamingTask(WORLD, ways=4)
  cells = task.cells(protocol.Protocol(shots=(0, 1, 2, 4, 8), num_samples=400))
  ceilings = [task.score(c, [""] * len(c.prompts))[0]["ceiling"] for c in cells]
  expected = [1 - (3 / 4) ** k for k in (0, 1, 2, 4, 8)]
  np.testing.assert_allclose(ceilings, expected, atol=0.06)
  # Nested supports: a query whose colour k shots show is shown it by every larger k.
  shown = [[e.answer in e.support_names for e in c.targets] for c in cells]
  assert all(a <= b for fewer, more in zip(shown, shown[1:]) for a, b in zip(fewer, more))
  assert all(c.ids == cells[0].ids for c in cells)  # the same queries at every shot count
  for cell in cells:
    for p, ep in zip(cell.prompts, cell.targets, strict=True):
      assert p.text.endswith(f"{IMG}this is a") and p.text.count(IMG) == len(p.images)
      for colour, name in zip(ep.support_colours, ep.support_names, strict=True):
        assert f"this is a {colour} {name}." in p.text  # the episode's binding
  right = [f"{e.query_colour} {e.answer}" for e in cells[3].targets]
  scores, per_example = task.score(cells[3], right)
  assert scores["accuracy"] == scores["colour"] == 1.0 and per_example["accuracy"][0] == 1.0
  scores, _ = task.score(cells[3], [f"{e.query_colour} zzz" for e in cells[3].targets])
  assert scores["accuracy"] == 0.0 and scores["colour"] == 1.0
  assert 0 < scores["chance"] < scores["ceiling"]


@pytest.fixture(scope="module")
def toy_flamingo():
  tokenizer = Tokenizer()
  config = flamingo_config()
  model = Flamingo(dataclasses.replace(
      config, lm=dataclasses.replace(config.lm, vocab_size=tokenizer.vocab_size),
      media_token_id=tokenizer.media_id, endofchunk_token_id=tokenizer.endofchunk_id))
  images = jnp.zeros((1, 2, 1, 16, 16, 3), jnp.uint8)
  params = random_gates(nn.unbox(jax.jit(model.init)(
      jax.random.key(1), jnp.ones((1, 8), jnp.int32), images, jnp.ones((1,), jnp.int32)
  )["params"]))
  return model, params, tokenizer


def test_class_ranking_reuses_the_prompt_cache_and_equals_a_full_forward_pass(toy_flamingo):
  model, params, tokenizer = toy_flamingo
  task = shapes.example_task(WORLD, "vqa", protocol.Protocol(shots=(2,), num_samples=3,
                                                             query_set_size=10))
  cell = task.cells(protocol.Protocol(shots=(2,), num_samples=3, query_set_size=10))[0]
  classes = ["red", "blue square", "circle"]
  rank = scoring.make_rank_fn(model, tokenizer)
  scores = rank(params, cell.prompts, 0, 3, classes, " answer:", normalize=False)
  normalized = rank(params, cell.prompts, 40, 4, classes, " answer:")  # padded: the same
  ids, lengths = scoring.continuation_ids(tokenizer, " answer:", classes)
  np.testing.assert_allclose(normalized, scores / lengths, atol=1e-4)
  forward = jax.jit(model.apply)  # compiled per length: much faster than op by op
  for b, p in enumerate(cell.prompts):  # naive: each prompt + class in one forward pass
    for c in range(len(classes)):
      prompt = tokenizer.encode(p.text, bos=True)
      full = jnp.asarray([prompt + list(ids[c, :lengths[c]])])
      logits = forward({"params": params}, full, p.images[None, :, None])
      logp = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1])
      expected = float(sum(logp[i, ids[c, i]] for i in range(lengths[c])))
      assert scores[b, c] == pytest.approx(expected, abs=1e-3)


def test_padded_prompts_and_images_give_the_answers_of_unpadded_ones(toy_flamingo):
  """Every cell of an evaluation is padded to one shape so that it compiles once; padding
  tokens and images must not change a single answer."""
  model, params, tokenizer = toy_flamingo
  task = shapes.example_task(WORLD, "vqa", protocol.Protocol(shots=(1,), num_samples=4,
                                                             query_set_size=10))
  cell = task.cells(protocol.Protocol(shots=(1,), num_samples=4, query_set_size=10))[0]
  answer = scoring.make_answer_fn(model, tokenizer, max_new_tokens=5)
  unpadded = answer(params, cell.prompts, 0, 2)
  assert unpadded == answer(params, cell.prompts, 40, 4)
  assert any(unpadded)  # a random model still says something


def _toy_config(**evaluate_settings):
  config = flamingo_recipe.get_config()
  model_cfg = config.model.to_dict()
  model_cfg["vision"].update(image_size=16, patch_size=8, width=32, depth=1, num_heads=2)
  model_cfg["resampler"].update(depth=1, num_heads=2, head_dim=16, num_latents=2)
  model_cfg["lm"].update(width=32, depth=2, num_heads=2, max_len=256)
  model_cfg["xattn"].update(num_heads=2, head_dim=16)
  config.model = model_cfg
  config.data.image_size = 16
  config.evaluate.update(shots=(0, 2), episodes=3, max_new_tokens=4, query_set_size=16,
                         batch_size=4, **evaluate_settings)
  task = get_task("flamingo")
  args, _ = task.init_inputs(config)
  params = nn.unbox(jax.jit(task.build_model(config).init)(jax.random.key(0), *args)["params"])
  return config, params


def test_evaluation_of_a_toy_model_on_the_shapes_world(tmp_path):
  config, params = _toy_config(trials=2, formats={"vqa": "openflamingo_vqa"})
  results = evaluate.evaluate(config, params, progress=False)
  assert results.predictions["vqa"][2][0]["prompt"].endswith(" Short answer:")  # by name
  assert set(results.scores) == {"naming", "vqa", "captioning"}
  assert set(results.scores["naming"]) == {0, 2}
  assert results.scores["naming"][0]["chance"] == 0.0
  assert {"accuracy", "accuracy_std", "accuracy_se"} <= set(results.scores["vqa"][2])
  assert {"CIDEr", "BLEU-4"} <= set(results.scores["captioning"][2])
  assert len(results.predictions["vqa"][2]) == 2 * 3  # trials x test examples
  table = evaluate.format_table(results.scores)
  assert "0-shot" in table and "naming" in table and "±" in table
  evaluate.report(results, tmp_path)
  written = json.loads((tmp_path / "eval.json").read_text())
  record = written["predictions"]["captioning"]["2"][0]
  assert {"prompt", "prediction", "target", "CIDEr", "trial_seed"} <= set(record)
  assert written["info"]["protocol"]["trials"] == 2
  assert written["info"]["caption_tokenizer"]["captioning"] in ("ptb", "simple")


def test_a_language_model_is_scored_on_recalling_names_from_prompt_text():
  config = lm_recipe.get_config()
  config.model.update(width=32, depth=1, num_heads=2)
  config.evaluate.update(shots=(0, 2), episodes=6)
  task = get_task("lm")
  args, _ = task.init_inputs(config)
  params = nn.unbox(jax.jit(task.build_model(config).init)(jax.random.key(0), *args)["params"])
  results = evaluate.evaluate(config, params, progress=False)
  assert set(results.scores) == {"naming"} and set(results.scores["naming"]) == {0, 2}
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in results.scores["naming"].values())
  assert results.scores["naming"][0]["chance"] == 0.0
  for record in results.predictions["naming"][2]:  # the query's colour is written out
    assert re.search(r"this is a (red|green|blue|yellow|purple|orange)$", record["prompt"])


def _image(path, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(path)


def _benchmarks(root):
  """Tiny copies of the benchmarks in their published layouts."""
  coco = root / "coco"
  entries = []
  for i in range(8):
    split = "train" if i < 5 else "test"
    folder = "train2014" if split == "train" else "val2014"
    name = f"COCO_{folder}_{i:012d}.jpg"
    _image(coco / folder / name, 30 * i)
    entries.append({"filepath": folder, "filename": name, "cocoid": i, "split": split,
                    "sentences": [{"raw": f"a photo number {i}."}, {"raw": "A photo."}]})
  (coco / "dataset_coco.json").write_text(json.dumps({"images": entries}))
  vqa = root / "vqav2"
  for s, ids in (("train", range(4)), ("val", range(4, 7))):
    questions, annotations = [], []
    for i in ids:
      _image(vqa / f"{s}2014" / f"COCO_{s}2014_{i:012d}.jpg", 20 * i)
      questions.append({"image_id": i, "question": f"what is {i}?", "question_id": 100 + i})
      annotations.append({"image_id": i, "question_id": 100 + i,
                          "answers": [{"answer": "two"}] * 10})
    (vqa / f"v2_OpenEnded_mscoco_{s}2014_questions.json").write_text(
        json.dumps({"questions": questions}))
    (vqa / f"v2_mscoco_{s}2014_annotations.json").write_text(
        json.dumps({"annotations": annotations}))
  for s in ("train", "val"):
    for c, value in (("cat", 10), ("dog", 200)):
      for i in range(3):
        _image(root / "imagenet" / s / c / f"{i}.JPEG", value + i)
  memes = root / "hateful_memes"
  for s, n in (("train", 4), ("dev_seen", 4)):
    lines = []
    for i in range(n):
      _image(memes / "img" / f"{s}{i}.png", 40 * i)
      lines.append(json.dumps({"id": f"{s}{i}", "img": f"img/{s}{i}.png", "label": i % 2,
                               "text": f"meme {i}"}))
    (memes / f"{s}.jsonl").write_text("\n".join(lines) + "\n")


def test_benchmarks_in_their_layouts_with_random_and_retrieved_demonstrations(
    tmp_path, monkeypatch):
  monkeypatch.setenv("MMJAX_CACHE", str(tmp_path / "cache"))
  _benchmarks(tmp_path / "data")
  config, params = _toy_config(data_dir=str(tmp_path / "data"), trials=1)
  config.evaluate.update(shots=(0, 2), episodes=-1)
  tasks = ["coco", "vqav2", "imagenet", "hateful_memes"]
  results = evaluate.evaluate(config, params, tasks=tasks, progress=False)
  assert set(results.scores["coco"][2]) >= {"CIDEr", "BLEU-4"}
  assert 0 <= results.scores["vqav2"][2]["accuracy"] <= 1
  assert set(results.scores["imagenet"][0]) >= {"top1"}
  assert 0 <= results.scores["hateful_memes"][2]["roc_auc"] <= 1
  assert len(results.predictions["coco"][2]) == 3  # the test split, whole
  config.evaluate.demos = "rices"
  retrieved = evaluate.evaluate(config, params, tasks=["imagenet"], progress=False)
  for record in retrieved.predictions["imagenet"][2]:
    # The most similar training image is last: the query's own class, nearest value.
    assert record["prompt"].endswith(f"Output:{record['target'] and 'dog' or 'cat'}{EOC}"
                                     f"{IMG}Output:")
  assert list((tmp_path / "cache" / "rices").glob("rices-*.npy"))


def test_unknown_or_missing_benchmarks_are_named(tmp_path):
  config, params = _toy_config()
  with pytest.raises(ValueError, match="--data_dir"):
    evaluate.evaluate(config, params, tasks=["coco"], progress=False)
  config.evaluate.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="Unknown evaluation task 'cocoo'"):
    evaluate.evaluate(config, params, tasks=["cocoo"], progress=False)


def test_recipes_agree_on_the_backbone_shapes():
  """Flamingo's frozen towers must graft onto the CLIP and LM recipes' parameters."""
  flamingo = flamingo_recipe.get_config()
  shapes_ = {}
  for name, config in (("flamingo", flamingo), ("clip", clip_recipe.get_config()),
                       ("lm", lm_recipe.get_config())):
    task = get_task(config.task)
    args, _ = task.init_inputs(config)
    model = task.build_model(config)
    shapes_[name] = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
  same = lambda a, b: jax.tree_util.tree_map(lambda x, y: x.shape == y.shape, a, b)
  assert all(jax.tree_util.tree_leaves(same(shapes_["flamingo"]["vision"],
                                            shapes_["clip"]["image"])))
  lm = {k: v for k, v in shapes_["flamingo"]["lm"].items() if not k.startswith("xattn_")}
  assert all(jax.tree_util.tree_leaves(same(lm, shapes_["lm"])))
  assert {target: init.recipe for target, init in flamingo.init.items()} == {
      "vision": "clip", "lm": "lm"}


def test_the_command_line_names_a_missing_run_in_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "mmjax.evaluate", f"--workdir={tmp_path}"],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2
  assert out.stderr.startswith("error: ") and "config.json" in out.stderr, out.stderr
