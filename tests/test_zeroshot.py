"""Zero-shot classification and retrieval of contrastive runs (`mmjax.evaluate.zeroshot`):
the classifier against a written-out reference, the templates against open_clip's, and the
two tasks end to end on a tiny randomly initialised CLIP run, on the shapes world and on
the ImageNet-folder and COCO layouts."""

import hashlib
import importlib.machinery
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from mmjax.cli import UserError
from mmjax.configs import clip as clip_recipe
from mmjax.convert import common
from mmjax.data import shapes_world as sw
from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluate import evaluate_workdir, metrics, zeroshot
from mmjax.evaluate.workdir import eval_config
from mmjax.tasks import clip as clip_task
from mmjax.tasks import model_config


# ---------------------------------------------------------------------------------------
# The classifier and the templates.
# ---------------------------------------------------------------------------------------
def fake_encoder(dim: int = 6):
  """Texts -> unnormalised vectors, a fixed function of each text (so of its row alone)."""
  def encode(texts):
    rows = []
    for text in texts:
      seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
      rows.append(np.random.default_rng(seed).normal(size=dim) * (1 + len(text)))
    return np.asarray(rows, np.float32)
  return encode


def test_class_embeddings_average_normalised_prompts_and_renormalise():
  encode = fake_encoder()
  names = ["tabby_cat", "goldfish", "great white shark", "tench", "cock", "hen", "ostrich"]
  templates = ["a photo of a {}.", "a bad photo of the {}.", "itap of a {}.", "{}"]
  reference = []
  for name in names:  # written out: normalise each prompt, average, renormalise
    prompts = [t.format(name.replace("_", " ")) for t in templates]
    embedded = encode(prompts)
    embedded /= np.linalg.norm(embedded, axis=1, keepdims=True)
    mean = embedded.mean(axis=0)
    reference.append(mean / np.linalg.norm(mean))
  got = zeroshot.class_embeddings(encode, names, templates, classes_per_batch=3)
  np.testing.assert_allclose(got, np.stack(reference), rtol=1e-5, atol=1e-6)
  # Averaging unnormalised prompts would weigh long prompts more: not what CLIP does.
  unnormalised = np.stack([encode([t.format(n.replace("_", " ")) for t in templates]).mean(0)
                           for n in names])
  unnormalised /= np.linalg.norm(unnormalised, axis=1, keepdims=True)
  assert not np.allclose(got, unnormalised, atol=1e-3)
  images = np.random.default_rng(0).normal(size=(5, 6))
  expected = 100 * (images / np.linalg.norm(images, axis=1, keepdims=True)) @ got.T
  np.testing.assert_allclose(zeroshot.logits(images, got), expected, rtol=1e-5)


def open_clip_metadata():
  """open_clip's `zero_shot_metadata` module, read from its file: the package's own
  `__init__` imports torchvision, which it does not need."""
  # Searched on sys.path: tests/test_siglip.py may have put a bare `open_clip` package
  # (without a spec) in sys.modules, which importlib.util.find_spec refuses.
  spec = importlib.machinery.PathFinder.find_spec("open_clip")
  assert spec is not None, "open_clip is the reference here: pip install --no-deps " \
                           "open_clip_torch==3.3.0"
  path = pathlib.Path(spec.submodule_search_locations[0]) / "zero_shot_metadata.py"
  module_spec = importlib.util.spec_from_file_location("open_clip_zero_shot_metadata", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def test_named_template_sets_are_open_clips():
  metadata = open_clip_metadata()
  for name, theirs in (("openai_imagenet", metadata.OPENAI_IMAGENET_TEMPLATES),
                       ("simple_imagenet", metadata.SIMPLE_IMAGENET_TEMPLATES)):
    ours = zeroshot.load_templates(name)
    assert len(ours) == len(theirs), name
    for c in ("goldfish", "great white shark"):
      assert [t.format(c) for t in ours] == [f(c) for f in theirs], name


def test_shapes_world_templates_say_what_captions_say():
  for region in sw.REGIONS[0] + sw.REGIONS[1] + sw.REGIONS[2]:
    scene = sw.Scene("circle", "red", "small", 1, ((0, 0),), region)
    assert sw.caption(scene) in [t.format("small red circle")
                                 for t in zeroshot.load_templates("shapes_world")]


def test_templates_from_a_file_and_bad_templates(tmp_path):
  file = tmp_path / "templates.txt"
  file.write_text("a photo of a {}.\n\n  a sketch of the {}.  \n")
  assert zeroshot.load_templates(file) == ("a photo of a {}.", "a sketch of the {}.")
  with pytest.raises(UserError, match="neither a named set .*openai_imagenet"):
    zeroshot.load_templates("imagenet_80")
  file.write_text("a photo of a {}.\na photo of a cat.\n")
  with pytest.raises(UserError, match=r"exactly one '\{\}'.*'a photo of a cat.'"):
    zeroshot.load_templates(file)
  with pytest.raises(UserError, match="no class names"):
    zeroshot.class_embeddings(fake_encoder(), [], ["{}"])


# ---------------------------------------------------------------------------------------
# A tiny CLIP run.
# ---------------------------------------------------------------------------------------
def tiny_config():
  config = clip_recipe.get_config()
  config.model.vision.update(image_size=32, patch_size=8, width=32, depth=1, num_heads=2,
                             output_dim=32)
  config.model.text.update(width=32, depth=1, num_heads=2)
  config.model.embed_dim = 32
  config.data.image_size = 32
  config.evaluate.update(batch_size=32, episodes=24)
  return config


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  """`(config, params, workdir)`: a tiny CLIP with random weights saved as a run (drawn
  here rather than by `init`, which would cost a compilation)."""
  config = tiny_config()
  model = clip_task.build_model(config)
  args, _ = clip_task.init_inputs(config)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
  workdir = tmp_path_factory.mktemp("clip")
  common.save(workdir, "clip", model_config(clip_task.MODEL_CONFIG, config), params)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  return config, params, workdir


def reference_embeddings(config, params, images, texts):
  """The model's own forward pass on every image and text at once; texts tokenised by
  hand as training does: BOS text EOS, right-padded with the pad id."""
  tokenizer = Tokenizer()
  tokens = np.zeros((len(texts), config.data.seq_len), np.int32)  # pad id 0
  for i, text in enumerate(texts):
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    tokens[i, :len(ids)] = ids
  image, text, _, _ = jax.jit(clip_task.build_model(config).apply)(
      {"params": params}, np.stack(images), tokens)
  return np.asarray(image), np.asarray(text)


def test_zeroshot_and_retrieval_of_a_run_on_the_shapes_world(clip_run, capsys):
  config, params, workdir = clip_run
  results = evaluate_workdir(workdir, tasks=["zeroshot", "retrieval"], progress=False)
  assert set(results.scores) == {"zeroshot", "retrieval"}
  zs, ret = results.scores["zeroshot"][0], results.scores["retrieval"][0]
  assert {"top1", "top5", "top1_se", "top5_se"} <= set(zs)
  assert {f"{d}/R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)} \
      <= set(ret)
  assert results.info["templates"]["zeroshot"] == {"source": "shapes_world", "count": 9}
  table = capsys.readouterr().out
  assert "image_to_text/R@10" in table and "top5" in table
  written = json.loads(next(workdir.glob("eval-0-*.json")).read_text())
  assert written["scores"]["zeroshot"]["0"]["top1"] == zs["top1"]

  # The reference: the held-out images and every prompt through the model at once.
  n = config.evaluate.episodes
  classified = [sw.ShapesWorld(0, 32).classification("eval", i) for i in range(n)]
  examples = [sw.ShapesWorld(0, 32).example("eval", i) for i in range(n)]
  templates = zeroshot.load_templates("shapes_world")
  prompts = [t.format(c) for c in sw.CLASSES for t in templates]
  image, text = reference_embeddings(
      config, params, [im for im, _ in classified] + [e.image for e in examples],
      prompts + [e.caption for e in examples])
  classes = text[:len(prompts)].reshape(len(sw.CLASSES), len(templates), -1)
  classes = classes.mean(axis=1)  # rows are unit vectors already
  classes /= np.linalg.norm(classes, axis=1, keepdims=True)
  scores = image[:n] @ classes.T
  labels = np.array([label for _, label in classified])
  records = results.predictions["zeroshot"][0]
  assert [r["id"] for r in records] == [f"eval/{i}" for i in range(n)]
  assert [r["target"] for r in records] == [sw.CLASSES[label] for label in labels]
  top = np.sort(scores, axis=1)[:, ::-1]
  for k in (1, 5):
    clear = top[:, k - 1] - top[:, k] > 1e-4  # no near tie at the k-th place
    assert clear.sum() > n // 2
    hits = (scores >= scores[np.arange(n), labels][:, None]).sum(1) <= k
    assert [r[f"top{k}"] for r, c in zip(records, clear) if c] == list(hits[clear])
  for r, row in zip(records, scores):
    assert row[sw.CLASSES.index(r["prediction"])] >= row.max() - 1e-4

  # Retrieval among the distinct captions (the shapes world repeats them), each right for
  # every image it describes. A query's rank counts the wrong candidates scoring at least
  # as high as its best right one, here within float noise.
  captions = [e.caption for e in examples]
  distinct = sorted(set(captions), key=captions.index)
  assert len(distinct) < n  # repeated captions occur
  similarity = image[n:] @ text[len(prompts):].T[:, [captions.index(c) for c in distinct]]
  right = np.array([[c == d for d in distinct] for c in captions])
  for direction, s, r in (("image_to_text", similarity, right),
                          ("text_to_image", similarity.T, right.T)):
    best = np.where(r, s, -np.inf).max(axis=1, keepdims=True)
    low = ((s > best + 1e-5) & ~r).sum(1)  # bounds of each query's rank
    high = ((s >= best - 1e-5) & ~r).sum(1)
    for k in (1, 5, 10):
      assert np.mean(low < k) >= ret[f"{direction}/R@{k}"] >= np.mean(high < k), (direction, k)
    if direction == "image_to_text":
      ranks = [record["rank"] for record in results.predictions["retrieval"][0]]
      assert (low <= ranks).all() and (ranks <= high).all()
  assert [r["target"] for r in results.predictions["retrieval"][0]] == [[c] for c in captions]


def test_retrieval_ranks_with_interchangeable_texts_against_a_loop():
  rng = np.random.default_rng(0)
  similarity = rng.integers(0, 4, size=(5, 8)).astype(np.float32)  # many ties
  text_to_image = np.array([0, 0, 1, 2, 3, 4, 4, 4])
  matches = np.zeros((5, 8), bool)
  matches[text_to_image, np.arange(8)] = True
  matches[1, 3] = matches[2, 2] = True  # texts 2 and 3 say the same
  image_rank, text_rank = metrics.retrieval_ranks(similarity, text_to_image, matches)
  for i in range(5):
    best = max(similarity[i, t] for t in range(8) if matches[i, t])
    assert image_rank[i] == sum(similarity[i, t] >= best for t in range(8) if not matches[i, t])
  for t in range(8):
    best = max(similarity[i, t] for i in range(5) if matches[i, t])
    assert text_rank[t] == sum(similarity[i, t] >= best for i in range(5) if not matches[i, t])
  own = metrics.retrieval_recall(similarity, text_to_image)
  assert own == metrics.retrieval_recall(similarity, text_to_image,
                                         matches=np.eye(5, dtype=bool)[text_to_image].T)
  with pytest.raises(UserError, match="include each text's own image"):
    metrics.retrieval_ranks(similarity, text_to_image, np.zeros((5, 8), bool))


def test_single_prompt_and_template_file_replace_the_ensemble(clip_run, tmp_path):
  _, _, workdir = clip_run
  single = evaluate_workdir(workdir, tasks=["zeroshot"], episodes=4, progress=False,
                            prompt="a photo of a {}.")
  assert single.info["templates"]["zeroshot"] == {"source": "prompt 'a photo of a {}.'",
                                                  "count": 1}
  file = tmp_path / "mine.txt"
  file.write_text("a {}.\nthe {}.\n")
  ensemble = evaluate_workdir(workdir, tasks=["zeroshot"], episodes=4, progress=False,
                              templates=str(file))
  assert ensemble.info["templates"]["zeroshot"] == {"source": str(file), "count": 2}


def test_bad_settings_are_named(clip_run):
  _, _, workdir = clip_run
  cases = [({"prompt": "a photo of a cat."}, r"config.evaluate.prompt=.*exactly one '\{\}'"),
           ({"templates": "imagenet_80"}, "config.evaluate.templates=.*neither a template set"),
           ({"tasks": ["vqa"]}, "Unknown task 'vqa' for a contrastive model"),
           ({"shots": ["4"]}, "evaluated zero-shot"),
           ({"episodes": -1}, "stream without end")]
  for settings, message in cases:
    with pytest.raises(UserError, match=message):
      evaluate_workdir(workdir, **{"tasks": ["zeroshot"], **settings}, progress=False)


def test_runs_without_evaluation_settings_and_converted_checkpoints(tmp_path):
  config = tiny_config()
  old = config.to_dict()
  del old["evaluate"]  # a run from before the recipe had them
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(json.dumps(old))
  assert tuple(eval_config(tmp_path / "run", None).evaluate.tasks) == zeroshot.TASKS
  (tmp_path / "converted").mkdir()
  (tmp_path / "converted" / "config.json").write_text(json.dumps(
      {"task": "clip", "model": config.model.to_dict()}))
  with pytest.raises(UserError, match="--tokenizer"):
    eval_config(tmp_path / "converted", None)
  converted = eval_config(tmp_path / "converted", "/models/clip")
  assert converted.tokenizer == "/models/clip"
  assert converted.data.image_size == 32 and converted.data.seq_len == 32  # text max_len


def test_padding_follows_the_text_towers_pooling(clip_run):
  _, params, _ = clip_run
  config = tiny_config()
  tokenizer = Tokenizer()
  encoder = zeroshot.DualEncoder(config, params, 4)
  rows = encoder.tokenize(["a red circle.", ""])
  ids = [tokenizer.bos_id, *tokenizer.encode("a red circle."), tokenizer.eos_id]
  assert list(rows[0]) == ids + [0] * (24 - len(ids))
  assert list(rows[1]) == [tokenizer.bos_id, tokenizer.eos_id] + [0] * 22
  long = encoder.tokenize(["a red circle " * 20])[0]
  assert long[-1] == tokenizer.eos_id and 0 not in long  # cut, keeping EOS
  with config.unlocked():
    config.model.update(text_pool="eos", eos_id=tokenizer.eos_id)
  assert list(zeroshot.DualEncoder(config, params, 4).tokenize(["a red circle."])[0]) == \
      ids + [tokenizer.eos_id] * (24 - len(ids))
  config.model.eos_id = 7
  with pytest.raises(UserError, match="pools at token 7"):
    zeroshot.DualEncoder(config, params, 4)
  config.model.update(text_pool="argmax", eos_id=None)  # the embedded EOS is id 1
  with pytest.raises(UserError, match="above EOS"):
    zeroshot.DualEncoder(config, params, 4).tokenize(["a red circle."])


# ---------------------------------------------------------------------------------------
# Real data layouts.
# ---------------------------------------------------------------------------------------
def write_image(path: pathlib.Path, colour, size=(48, 40)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, colour).save(path)


def test_imagenet_folders_and_coco_karpathy_through_the_tasks(clip_run, tmp_path):
  _, _, workdir = clip_run
  root = tmp_path / "imagenet"
  for i, folder in enumerate(("n0001", "n0002", "n0003")):
    for j in range(2):
      write_image(root / "val" / folder / f"{j}.JPEG", (80 * i, 40 * j, 200))
  (root / "class_names.json").write_text(json.dumps(
      {"n0001": "tabby_cat", "n0002": "goldfish", "n0003": "tench"}))
  images = []
  for i in range(4):
    images.append({"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg",
                   "cocoid": i, "split": "test" if i < 3 else "train",
                   "sentences": [{"raw": f"caption {j} of image {i}."} for j in range(5)]})
    write_image(tmp_path / "coco" / "val2014" / f"COCO_val2014_{i:012d}.jpg", (60 * i, 90, 30))
  (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images}))

  results = evaluate_workdir(workdir, tasks=["zeroshot", "retrieval"], episodes=-1,
                             data_dir=str(tmp_path), progress=False)
  records = results.predictions["zeroshot"][0]
  assert [r["id"] for r in records] == [f"n000{i}/{j}.JPEG" for i in (1, 2, 3) for j in (0, 1)]
  assert [r["target"] for r in records] == ["tabby_cat"] * 2 + ["goldfish"] * 2 + ["tench"] * 2
  assert {r["prediction"] for r in records} <= {"tabby_cat", "goldfish", "tench"}
  assert set(results.scores["zeroshot"][0]) == {"top1", "top1_se"}  # no top-5 of 3 classes
  assert results.info["templates"]["zeroshot"] == {"source": "openai_imagenet", "count": 80}
  retrieved = results.predictions["retrieval"][0]
  assert [r["id"] for r in retrieved] == ["0", "1", "2"]  # the test split only
  assert all(len(r["target"]) == 5 for r in retrieved)
  ret = results.scores["retrieval"][0]
  # 3 images, 15 captions: a text has 2 wrong images; an image any of 5 right captions.
  assert ret["text_to_image/R@5"] == 1.0
  assert ret["image_to_text/R@1"] in (0.0, 1 / 3, 2 / 3, 1.0)

  sampled = evaluate_workdir(workdir, tasks=["zeroshot"], episodes=4, data_dir=str(tmp_path),
                             progress=False)
  assert len(sampled.predictions["zeroshot"][0]) == 4

  (root / "class_names.json").write_text(json.dumps({"n0001": "tabby_cat", "n0002": "goldfish"}))
  with pytest.raises(UserError, match=r"names no class for the folders \['n0003'\]"):
    evaluate_workdir(workdir, tasks=["zeroshot"], data_dir=str(tmp_path), progress=False)
  (root / "class_names.json").unlink()
  with pytest.raises(UserError, match="coco.*dataset_coco.json"):
    evaluate_workdir(workdir, tasks=["retrieval"], data_dir=str(tmp_path / "imagenet"),
                     progress=False)


# ---------------------------------------------------------------------------------------
# A converted Hugging Face CLIP with its tokenizer.
# ---------------------------------------------------------------------------------------
def test_a_converted_transformers_clip_embeds_prompts_as_transformers_does(tmp_path):
  import torch
  import transformers
  from tokenizers import Tokenizer as FastTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers

  from mmjax import convert
  fast = FastTokenizer(models.BPE(unk_token="<unk>"))
  fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  fast.decoder = decoders.ByteLevel()
  # EOS id 1: pooled at the first EOS, as transformers' CLIP does for eos_token_id != 2.
  fast.train_from_iterator([f"a {c}." for c in sw.CLASSES] * 4, trainers.BpeTrainer(
      vocab_size=100, special_tokens=["<unk>", "</s>", "<s>", "<pad>"]))
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=fast, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
      pad_token="<pad>").save_pretrained(tmp_path / "tokenizer")
  torch.manual_seed(0)
  hf = transformers.CLIPModel(transformers.CLIPConfig(
      text_config={"vocab_size": 112, "hidden_size": 32, "intermediate_size": 48,
                   "num_hidden_layers": 1, "num_attention_heads": 2,
                   "max_position_embeddings": 16, "pad_token_id": 3, "bos_token_id": 2,
                   "eos_token_id": 1},
      vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32,
                     "intermediate_size": 48, "num_hidden_layers": 1,
                     "num_attention_heads": 2},
      projection_dim=16)).eval()
  hf.save_pretrained(tmp_path / "hf")
  common.save(tmp_path / "clip", "clip", *convert.convert_clip(tmp_path / "hf"))

  prompts = [f"a {c}." for c in sw.CLASSES[:12]]
  ids = [[2, *fast.encode(p, add_special_tokens=False).ids, 1] for p in prompts]
  tokens = np.full((len(ids), max(map(len, ids))), 3)  # padded with <pad>, masked
  for row, i in zip(tokens, ids):
    row[:len(i)] = i
  with torch.no_grad():
    expected = hf.get_text_features(input_ids=torch.tensor(tokens),
                                    attention_mask=torch.tensor((tokens != 3).astype(int)))
  expected = getattr(expected, "pooler_output", expected).numpy()
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  config = eval_config(tmp_path / "clip", str(tmp_path / "tokenizer"))
  assert config.data.seq_len == 16 and config.model.text_pool == "eos"
  from mmjax import checkpoints
  encoder = zeroshot.DualEncoder(config, checkpoints.load_params(tmp_path / "clip"), 8)
  np.testing.assert_allclose(encoder.encode_texts(prompts), expected, atol=1e-5)

  results = evaluate_workdir(tmp_path / "clip", tokenizer=str(tmp_path / "tokenizer"),
                             tasks=["zeroshot", "retrieval"], episodes=6, prompt="a {}.",
                             batch_size=8, progress=False)
  assert len(results.predictions["zeroshot"][0]) == 6
  assert "text_to_image/R@1" in results.scores["retrieval"][0]
