"""MedCLIP: the semantic matching loss against a written-out reference of MedCLIP's
(`ImageTextContrastiveLoss`: raw dot-product label similarity, softmax soft targets,
soft cross-entropy both ways), uncertain and missing labels, and the InfoNCE fallback."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _softmax(x):
  return np.exp(_log_softmax(x))


def reference_loss(image, text, scale, image_labels, text_labels, cosine=False):
  """MedCLIP's loss, written out in numpy with its convention: missing labels are 0."""
  image_labels = np.nan_to_num(image_labels, nan=0.0)
  text_labels = np.nan_to_num(text_labels, nan=0.0)
  if cosine:
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    image_labels, text_labels = unit(image_labels), unit(text_labels)
  logits = scale * image @ text.T
  sim = image_labels @ text_labels.T
  soft_xent = lambda x, t: -(t * _log_softmax(x)).sum() / x.shape[0]
  return (soft_xent(logits, _softmax(sim)) + soft_xent(logits.T, _softmax(sim.T))) / 2


def _embeddings(rng, b, e=8):
  x = rng.normal(size=(2, b, e))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_semantic_matching_loss_equals_medclips(similarity):
  rng = np.random.default_rng(0)
  b, num_labels = 6, 5
  image, text = _embeddings(rng, b)
  # Positive, negative, uncertain (-1) and missing (NaN) entries, rows without any label
  # information left out (they have their own rule, tested below).
  image_labels = rng.choice([1.0, 0.0, -1.0, np.nan], size=(b, num_labels))
  text_labels = rng.choice([1.0, 0.0, -1.0, np.nan], size=(b, num_labels))
  image_labels[:, 0] = text_labels[:, 0] = 1.0
  got = losses.semantic_matching_loss(jnp.asarray(image), jnp.asarray(text), 14.3,
                                      jnp.asarray(image_labels), jnp.asarray(text_labels),
                                      similarity)
  want = reference_loss(image, text, 14.3, image_labels, text_labels,
                        cosine=similarity == "cosine")
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_same_findings_are_positives_not_negatives():
  """Images 0 and 1 have the same findings: matching each to the other's text costs the
  semantic loss nothing, while InfoNCE counts the swap as two false negatives."""
  labels = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  sim = losses.label_similarity(jnp.asarray(labels), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(sim), labels @ labels.T)
  image, paired = np.eye(3), np.eye(3)
  swapped = np.eye(3)[[1, 0, 2]]
  semantic = lambda text: float(losses.semantic_matching_loss(image, text, 10.0, labels,
                                                              labels))
  infonce = lambda text: float(losses.contrastive_loss(jnp.asarray(image), jnp.asarray(text),
                                                       10.0))
  np.testing.assert_allclose(semantic(swapped), semantic(paired), rtol=1e-6)
  assert infonce(swapped) > infonce(paired) + 5


def test_without_labels_it_is_infonce():
  rng = np.random.default_rng(1)
  image, text = _embeddings(rng, 5)
  missing = np.full((5, 4), np.nan)
  got = losses.semantic_matching_loss(image, text, 7.0, missing, missing)
  want = losses.contrastive_loss(jnp.asarray(image), jnp.asarray(text), 7.0)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_unlabelled_rows_keep_their_pair():
  """Image 2 has no labels: its target is its own text; the labelled rows spread theirs
  over the labelled texts only."""
  rng = np.random.default_rng(2)
  image, text = _embeddings(rng, 3)
  image_labels = np.array([[1.0, 0.0], [1.0, -1.0], [np.nan, np.nan]])
  text_labels = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, np.nan]])
  logits = 5.0 * image @ text.T
  sim = np.nan_to_num(image_labels) @ np.nan_to_num(text_labels).T
  image_targets = np.zeros((3, 3))
  image_targets[:2, :2] = _softmax(sim[:2, :2])
  image_targets[2, 2] = 1.0
  text_targets = np.zeros((3, 3))
  text_targets[:2, :2] = _softmax(sim.T[:2, :2])
  text_targets[2, 2] = 1.0
  soft_xent = lambda x, t: -(t * _log_softmax(x)).sum() / x.shape[0]
  want = (soft_xent(logits, image_targets) + soft_xent(logits.T, text_targets)) / 2
  got = losses.semantic_matching_loss(image, text, 5.0, image_labels, text_labels)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  grads = jax.grad(lambda i: losses.semantic_matching_loss(i, text, 5.0, image_labels,
                                                           text_labels))(jnp.asarray(image))
  assert np.all(np.isfinite(np.asarray(grads)))


# ---------------------------------------------------------------------------------------
# The recipe: BatchNorm statistics as trainer state, resumption, sharding, evaluation.
# ---------------------------------------------------------------------------------------
def medclip_config(method: str = "semantic", steps: int = 4, evaluate: bool = False):
  """The MedCLIP recipe at toy size: 32 px findings-world images, a 4-wide ResNet, a
  one-layer BERT."""
  from mmjax.configs import medclip as medclip_recipe
  config = medclip_recipe.get_config(method)
  if not evaluate:
    with config.unlocked():
      del config["evaluate"]
  else:
    config.evaluate.update(episodes=20, prompts_per_class=3, batch_size=16)
  config.model.vision.update(image_size=32, width=4, output_dim=16)
  config.model.text.update(width=32, depth=2, num_heads=2, mlp_dim=64)
  config.model.embed_dim = 16
  config.data.update(image_size=32, batch_size=16, seq_len=32)
  for entry in (*config.data.datasets.values(), *config.data.eval_datasets.values()):
    entry.source.image_size = 32
  config.train.update(steps=steps, log_every=2, checkpoint_every=2, eval_every=0)
  return config


def _tree_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step run of the toy recipe (checkpoints at steps 2 and 4) and its final
  zero-shot and retrieval evaluation."""
  from test_train import run
  config = medclip_config(steps=4, evaluate=True)
  workdir = tmp_path_factory.mktemp("medclip")
  return config, workdir, run(config, workdir)


def test_a_resumed_run_continues_exactly_with_its_batch_norm_statistics(trained, tmp_path):
  """Resumed from its step-2 checkpoint, the run reaches the uninterrupted run's step 4
  bit for bit: parameters and BatchNorm statistics (saved, restored, carried)."""
  from test_train import run

  from mmjax import checkpoints
  config, workdir, _ = trained
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  (resumed / "finished.json").unlink()
  run(config, resumed)
  whole, again = checkpoints.load(workdir), checkpoints.load(resumed)
  assert whole.step == again.step == 4
  _tree_equal(whole.params, again.params)
  _tree_equal(whole.model_state, again.model_state)
  # The statistics are the model's, moved by training: not their initial 0 and 1.
  stats = checkpoints.flat_params(whole.model_state["batch_stats"])
  means = [v for k, v in stats.items() if k.endswith("mean")]
  assert means and max(float(np.abs(m).max()) for m in means) > 1e-3


def test_the_sharded_step_equals_one_device_with_its_statistics():
  """BatchNorm's batch statistics span the global batch under the one `jit`: on a 2x2x2
  mesh the loss, the update and the new running statistics are the 1-device ones (the
  mesh where XLA's partitioner needed the ResNet's constraint, `mmjax.models.resnet`)."""
  from test_sharding import LOSS_RTOL, PARAM_ATOL, _sharded
  from test_train import _lm_batch, _one_step
  config = medclip_config()
  config.data.batch_size = 8
  # Adam's eps as the other recipes' (MedCLIP's 1e-8 makes the first update lr * sign(g)
  # even for gradients at float32 reduction-order noise; see tests/test_sharding.py).
  config.optim.eps = 1e-6
  batch = _lm_batch(config)
  assert batch["image_labels"].shape == batch["text_labels"].shape == (8, 11)
  ref_state, ref_metrics, _ = _one_step(config, batch)
  state, metrics, _ = _one_step(_sharded(config, dict(data=2, fsdp=2, tensor=2), "fsdp_tensor"),
                                batch, jax.devices())
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=LOSS_RTOL)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL)
  jax.tree_util.tree_map(close, state["params"], ref_state["params"])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         state["model_state"], ref_state["model_state"])


def test_evaluation_uses_the_running_statistics(trained):
  """Zero-shot and retrieval at the end of training and again through `python -m
  mmjax.evaluate`'s path: BatchNorm in evaluation mode, so an image's embedding does not
  depend on the other images of its batch."""
  from mmjax import checkpoints
  from mmjax.evaluate import evaluate_workdir, zeroshot
  config, workdir, metrics = trained
  scores = metrics["few_shot"]
  assert 0 <= scores["zeroshot"][0]["top1"] <= 1 and "top5" not in scores["zeroshot"][0]
  assert "image_to_text/R@1" in scores["retrieval"][0]
  again = evaluate_workdir(workdir, progress=False)
  assert again.scores["zeroshot"][0]["top1"] == scores["zeroshot"][0]["top1"]
  loaded = checkpoints.load(workdir)
  encoder = zeroshot.DualEncoder(config, loaded.params, 4, loaded.model_state)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  alone = encoder.encode_images(images[:1])
  mixed = encoder.encode_images(images)[:1]
  np.testing.assert_allclose(alone, mixed, atol=1e-6)
  assert np.abs(alone - encoder.encode_images(images[1:2])).max() > 1e-4


# ---------------------------------------------------------------------------------------
# Zero-shot with composed prompts.
# ---------------------------------------------------------------------------------------
WORDS = {"effusion": {"severity": ["", "small", "large"], "subtype": ["effusion", "fluid"],
                      "location": ["at the left base", "at the right base"]},
         "edema": {"severity": ["mild"], "subtype": ["edema"], "location": [""]}}


def test_prompts_are_composed_from_severity_subtype_location_with_a_seed():
  from mmjax.evaluate.zeroshot import compose_prompts
  every = compose_prompts(WORDS, 100, seed=0)
  assert len(every["effusion"]) == 12 and every["edema"] == ("mild edema",)
  assert "effusion at the left base" in every["effusion"]  # an empty severity
  assert "large fluid at the right base" in every["effusion"]
  drawn = compose_prompts(WORDS, 5, seed=3)
  assert len(drawn["effusion"]) == 5 and set(drawn["effusion"]) <= set(every["effusion"])
  assert drawn == compose_prompts(WORDS, 5, seed=3)
  assert any(compose_prompts(WORDS, 5, seed=s) != drawn for s in range(4, 8))


@pytest.mark.parametrize("scoring", ["mean", "max"])
def test_class_scores_are_the_mean_or_max_of_their_prompts_logits(scoring):
  from mmjax.evaluate.zeroshot import LOGIT_SCALE, prompt_logits
  rng = np.random.default_rng(0)
  images, prompts = rng.normal(size=(4, 6)), rng.normal(size=(5, 6))
  owner = np.array([0, 0, 1, 1, 1])
  got = prompt_logits(images, prompts, owner, 2, scoring)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  cos = LOGIT_SCALE * unit(images) @ unit(prompts).T
  reduce = np.mean if scoring == "mean" else np.max
  want = np.stack([reduce(cos[:, :2], axis=1), reduce(cos[:, 2:], axis=1)], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_the_paper_shape_counts_medclips_parameters():
  """ResNet-50 with its fc a bias-free 2048 -> 512 projection, Bio_ClinicalBERT's
  BertModel (BERT-base, cased vocabulary) without its pooler, which MedCLIP never uses,
  the bias-free 768 -> 512 text projection and the logit scale."""
  import flax.linen as nn

  from mmjax.configs import medclip as medclip_recipe
  from mmjax.summary import model_and_inputs, param_table
  config = medclip_recipe.get_config("paper")
  model, inputs, _, _ = model_and_inputs(config, jax.random.key(0))
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *inputs)["params"]))
  total = sum(count for _, count, _ in param_table(shapes, config.trainable))
  resnet50, fc = 25_557_032, 2048 * 1000 + 1000  # torchvision's resnet50() and its fc
  bert_base_cased, pooler = 108_310_272, 768 * 768 + 768
  assert total == resnet50 - fc + 2048 * 512 + bert_base_cased - pooler + 768 * 512 + 1
