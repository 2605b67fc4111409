"""Segmentation on a video VQ-VAE's latents: heads, freezing, losses, the task and its
held-out evaluation, at toy shapes (16 px frames, a 16-wide encoder with one residual
layer, latents of stride 4)."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import losses
from mmjax.data import video as video_lib
from mmjax.evaluate import metrics
from mmjax.evaluate import run as run_lib
from mmjax.evaluate import segment as segment_eval
from mmjax.layers.embeddings import sinusoidal_positions_2d
from mmjax.models import seg_heads
from mmjax.models.segment import Segmenter, SegmenterConfig, make_head
from mmjax.models.vqvae import VQVAE, Encoder, VQVAEConfig, preprocess
from mmjax.tasks import get_task
from mmjax.tasks import segment as segment_task

SIZE = 16
ENCODER = {"n_hiddens": 16, "n_res_layers": 1, "num_heads": 2, "downsample": (2, 4, 4),
           "frames": 4, "resolution": SIZE, "embedding_dim": 8, "n_codes": 16}
# Initialisers' threefry draws compile once per shape, which dominates these tests' time;
# the hardware generator's compile in a fraction of it.
KEY = jax.random.key(0, impl="unsafe_rbg")
HEAD_WIDTHS = {"decoder_widths": (8,), "unet_width": 4, "num_heads": 2}


def model_dict(head: str, **overrides) -> dict:
  if head == "unet":
    return dict(head="unet", image_size=SIZE, unet_levels=2, **HEAD_WIDTHS, **overrides)
  return dict(encoder=ENCODER, head=head, frames=4, unet_levels=2, **HEAD_WIDTHS,
              **overrides)


def make_config(head: str = "conv", loss=None, **overrides) -> ml_collections.ConfigDict:
  """The fields of a segmentation recipe that the task and its evaluation read."""
  config = ml_collections.ConfigDict({
      "task": "segment", "seed": 0, "model": model_dict(head, **overrides),
      "data": {"mode": "segment", "batch_size": 4,
               "video": {"frames": 4, "resolution": SIZE, "noise": False},
               "eval_datasets": {"test": {"source": {"kind": "video_world_frames"}}}},
      "evaluate": {"episodes": -1, "batch_size": 4, "seed": 0, "shots": (0,)}})
  if loss is not None:
    config.loss = loss
  return config


def toy_batch(n: int = 4, seed: int = 0) -> dict:
  """Images with a bright square on noise, the square's mask (the last image's empty)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 100, (n, SIZE, SIZE, 3)).astype(np.uint8)
  masks = np.zeros((n, SIZE, SIZE), np.float32)
  for i in range(n - 1):
    y, x = rng.integers(0, SIZE - 6, 2)
    images[i, y:y + 6, x:x + 6] = 230
    masks[i, y:y + 6, x:x + 6] = 1
  return {"image": jnp.asarray(images), "mask": jnp.asarray(masks)}


@pytest.fixture(scope="module")
def encoded():
  """The toy encoder's variables and its "attention" latents of `toy_batch()`'s frames, as
  the segmenter makes them (initialised once: compiling its 3D convolutions is the slow
  part of these tests)."""
  video = jnp.repeat(toy_batch()["image"][:, None], 4, axis=1)
  out, variables = jax.jit(Encoder(VQVAEConfig(**ENCODER)).init_with_output)(KEY, video)
  return variables, out["attention"]


def init(config, encoded):
  """`(model, params, state)` of a segmenter: the encoder's from `encoded`, as a
  pretrained one grafts in, and a fresh head (the same tree as `model.init`'s)."""
  model = segment_task.build_model(config)
  (image,), _ = segment_task.init_inputs(config)
  expected = jax.eval_shape(model.init, KEY, image)
  variables, latents = encoded
  inputs = latents[:1] if model.config.encoder else preprocess(image)
  params = {"head": jax.jit(make_head(model.config).init)(KEY, inputs)["params"]}
  state = {}
  if model.config.encoder:
    params["encoder"] = variables["params"]
    state = {"batch_stats": {"encoder": variables["batch_stats"]}}
  assert jax.tree.structure({"params": params, **state}) == jax.tree.structure(expected)
  return model, params, state


@pytest.mark.parametrize("head", ["linear", "conv", "heavy", "attention", "unet"])
def test_each_head_gives_full_resolution_logits_and_fits_a_fixed_batch(head, encoded):
  """The head's own training, on the latents of a frozen encoder (what the segmenter's
  gradient reaches when the encoder is frozen)."""
  config = make_config(head)
  batch = toy_batch()
  model = segment_task.build_model(config)
  shapes = jax.eval_shape(lambda: model.init_with_output(KEY, batch["image"]))
  logits, variables = shapes
  assert logits.shape == (4, SIZE, SIZE) and logits.dtype == jnp.float32
  assert set(variables["params"]) == ({"head"} if head == "unet" else {"encoder", "head"})
  if head == "unet":
    inputs = preprocess(batch["image"])
  else:
    inputs = encoded[1]
  head_module = make_head(model.config)
  params = {"head": jax.jit(head_module.init)(KEY, inputs)["params"]}
  spec = losses.SegmentLoss("bce", pos_weight=2.0)
  tx = optax.adam(5e-2 if head == "linear" else 1e-2)  # the probe's loss surface is flat

  @jax.jit
  def step(params, opt):
    def f(p):
      total, count = losses.segment_loss(head_module.apply({"params": p}, inputs),
                                         batch["mask"], spec)
      return total / count
    loss, grads = jax.value_and_grad(f)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  params, opt = params["head"], tx.init(params["head"])
  first = None
  for _ in range(30):
    params, opt, loss = step(params, opt)
    first = loss if first is None else first
  assert float(loss) < 0.8 * float(first), (head, float(first), float(loss))


def _gradients_and_states(freeze: bool, encoded):
  """The gradients of the loss, the state before, after a train step and after an
  evaluation step, of a segmenter whose encoder is frozen or not."""
  model, params, state = init(make_config("conv", freeze_encoder=freeze), encoded)
  batch = toy_batch()

  @jax.jit
  def run(params):
    def f(params):
      total, count, _, new_state = segment_task.loss_terms(
          model, params, batch, jax.random.key(0), model_state=state, train=True)
      return total / count, new_state
    grads, trained = jax.grad(f, has_aux=True)(params)
    *_, evaluated = segment_task.loss_terms(model, params, batch, jax.random.key(0),
                                            model_state=state, train=False)
    return grads, trained, evaluated

  return state, *run(params)


def _any_nonzero(tree) -> bool:
  return any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(tree))


def _same(a, b) -> bool:
  return jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b))


def test_a_frozen_encoder_gets_no_gradient_and_keeps_its_batch_statistics(encoded):
  state, grads, trained, evaluated = _gradients_and_states(True, encoded)
  assert not _any_nonzero(grads["encoder"])
  assert _any_nonzero(grads["head"])
  assert _same(state, trained) and _same(state, evaluated)


def test_an_unfrozen_encoder_fine_tunes_and_updates_its_batch_statistics(encoded):
  state, grads, trained, evaluated = _gradients_and_states(False, encoded)
  assert _any_nonzero(grads["encoder"]["convs_0"]) and _any_nonzero(grads["head"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state, trained)
  assert all(jax.tree.leaves(changed)), changed  # every BatchNorm saw the batch
  assert _same(state, evaluated)  # evaluation leaves them


def test_the_unet_reads_pixels_and_has_no_encoder_nor_state():
  config = make_config("unet")
  batch = toy_batch()
  model = segment_task.build_model(config)
  variables = jax.eval_shape(model.init, KEY, batch["image"])
  assert list(variables) == ["params"] and list(variables["params"]) == ["head"]
  out = jax.eval_shape(lambda p: segment_task.loss_terms(model, p, batch, jax.random.key(0)),
                       variables["params"])
  assert len(out) == 3 and set(out[2]) == {"iou"}


def test_the_encoder_subtree_is_the_vqvaes():
  """A VQ-VAE run's params["encoder"] grafts in: the same paths and shapes."""
  video = jnp.zeros((1, 4, SIZE, SIZE, 3), jnp.uint8)
  vq = jax.eval_shape(lambda: VQVAE(VQVAEConfig(**ENCODER)).init(
      {"params": jax.random.key(0), "codebook": jax.random.key(1)}, video, train=False))
  model = segment_task.build_model(make_config("attention"))
  seg = jax.eval_shape(lambda: model.init(jax.random.key(0), video[:, 0]))
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(seg["params"]["encoder"]) == shapes(vq["params"]["encoder"])
  assert shapes(seg["batch_stats"]["encoder"]) == shapes(vq["batch_stats"]["encoder"])


@pytest.mark.parametrize("model,match", [
    ({"head": "unet", "encoder": ENCODER}, "takes no encoder"),
    ({"head": "conv"}, "reads an encoder"),
    ({"head": "conv", "encoder": ENCODER, "frames": 3}, "frames=3"),
    ({"head": "conv", "encoder": ENCODER, "image_size": 32}, "image_size=32"),
    ({"head": "mlp", "encoder": ENCODER}, "head='mlp'"),
])
def test_configs_that_cannot_work_are_refused_by_name(model, match):
  with pytest.raises(ValueError, match=match):
    SegmenterConfig(**{**model, "encoder": VQVAEConfig(**model["encoder"])
                       if "encoder" in model else None})


def test_a_stride_that_is_not_a_power_of_two_is_refused():
  head = seg_heads.LinearHead(24)  # latents 8 wide: a stride of 3
  with pytest.raises(ValueError, match="power-of-two"):
    head.init(KEY, jnp.zeros((1, 2, 8, 8, 4)))


def test_check_config_names_what_does_not_fit():
  assert segment_task.check_config(make_config()) == []
  config = make_config(loss={"kind": "focal"})
  config.data.mode = "video"
  config.data.video.resolution = 32
  found = segment_task.check_config(config)
  assert len(found) == 3, found
  assert "config.data.mode='video'" in found[0]
  assert "config.data.video.resolution=32" in found[1]
  assert "config.loss" in found[2] and "focal" in found[2]
  assert get_task("segment") is segment_task


# ---------------------------------------------------------------------------------------
# Losses and metrics against naive references.
# ---------------------------------------------------------------------------------------
def _cases():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 3, (4, 5, 6)).astype(np.float32)
  masks = (rng.random((4, 5, 6)) < 0.4).astype(np.float32)
  masks[1] = 0  # an empty mask
  logits[2] = -20.0  # nothing predicted
  masks[3] = 0
  logits[3] = -30.0  # both empty
  return logits, masks


def _sigmoid(x):
  return 1 / (1 + np.exp(-np.float64(x)))


def test_segmentation_losses_match_naive_references():
  logits, masks = _cases()
  weight = np.array([1.0, 0.5, 2.0, 0.0], np.float32)
  dice, jaccard, bce = [], [], []
  for x, y in zip(logits, masks, strict=True):
    p = _sigmoid(x).ravel()
    y = y.ravel()
    inter = sum(a * b for a, b in zip(p, y, strict=True))
    dice.append(1 - (2 * inter + 1) / (p.sum() + y.sum() + 1))
    jaccard.append(1 - (inter + 1) / (p.sum() + y.sum() - inter + 1))
    bce.append(np.mean([-(2.5 * b * np.log(a) + (1 - b) * np.log(1 - a))
                        for a, b in zip(p, y, strict=True)]))
  for kind, ref in (("dice", dice), ("jaccard", jaccard), ("bce", bce)):
    spec = losses.SegmentLoss(kind, pos_weight=2.5)
    total, count = losses.segment_loss(jnp.asarray(logits), jnp.asarray(masks), spec)
    np.testing.assert_allclose(total, np.sum(ref), rtol=1e-5, atol=1e-6, err_msg=kind)
    assert float(count) == 4
    total, count = losses.segment_loss(jnp.asarray(logits), jnp.asarray(masks), spec,
                                       jnp.asarray(weight))
    np.testing.assert_allclose(total, np.dot(ref, weight), rtol=1e-5, atol=1e-6)
    assert float(count) == weight.sum()
  # An empty mask predicted empty costs (almost) nothing under the smoothed ratios.
  assert dice[3] < 1e-6 and jaccard[3] < 1e-6
  with pytest.raises(ValueError, match="focal"):
    losses.SegmentLoss("focal")


def test_mask_metrics_match_naive_references():
  logits, masks = _cases()
  predicted, target = logits > 0, masks > 0.5
  ious, dices = [], []
  for p, t in zip(predicted, target, strict=True):
    ps = {i for i, v in enumerate(p.ravel()) if v}
    ts = {i for i, v in enumerate(t.ravel()) if v}
    ious.append(len(ps & ts) / len(ps | ts) if ps | ts else 1.0)
    dices.append(2 * len(ps & ts) / (len(ps) + len(ts)) if ps or ts else 1.0)
  np.testing.assert_allclose(metrics.mask_iou(predicted, target), ious)
  np.testing.assert_allclose(metrics.mask_dice(predicted, target), dices)
  scores = metrics.segmentation_scores(predicted, target)
  inter = sum(np.sum(p & t) for p, t in zip(predicted, target, strict=True))
  union = sum(np.sum(p | t) for p, t in zip(predicted, target, strict=True))
  assert scores["iou"] == pytest.approx(np.mean(ious))
  assert scores["iou_se"] == pytest.approx(np.std(ious, ddof=1) / 2)
  assert scores["dataset_iou"] == pytest.approx(inter / union)
  assert scores["dice"] == pytest.approx(np.mean(dices))
  assert scores["pixel_accuracy"] == pytest.approx(np.mean(predicted == target))
  assert scores["empty_union"] == 1 and scores["empty_target"] == 2  # 3; 1 and 3
  assert scores["images"] == 4
  nothing = np.zeros((2, 3, 3), bool)
  assert metrics.segmentation_scores(nothing, nothing)["dataset_iou"] == 1.0
  # The task's batch term is the dataset-wide IoU of its batch.
  assert float(segment_task.batch_iou(jnp.asarray(logits), jnp.asarray(masks))) == \
      pytest.approx(inter / union)


def test_sinusoidal_positions_are_sines_and_cosines_of_row_and_column():
  pos = np.asarray(sinusoidal_positions_2d(3, 5, 8))
  freqs = 10000.0 ** (-np.arange(2) / 2)
  for (r, c), row in zip(itertools.product(range(3), range(5)), pos, strict=True):
    ref = np.concatenate([np.sin(r * freqs), np.cos(r * freqs), np.sin(c * freqs),
                          np.cos(c * freqs)])
    np.testing.assert_allclose(row, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Held-out evaluation.
# ---------------------------------------------------------------------------------------
def test_held_out_evaluation_scores_the_models_thresholded_masks(monkeypatch, encoded):
  config = make_config("linear")
  batch = toy_batch(6, seed=1)
  documents = [{"image": np.asarray(batch["image"][i]), "mask": np.asarray(batch["mask"][i]),
                "id": f"frame{i}"} for i in range(6)]
  monkeypatch.setattr(segment_eval, "_source", lambda config: documents)
  model, params, state = init(config, encoded)
  results = run_lib.evaluate(config, params, model_state=state, progress=False)
  scores = results.scores["segment"][0]
  logits = model.apply({"params": params, **state}, batch["image"])
  reference = metrics.segmentation_scores(np.asarray(logits) > 0, np.asarray(batch["mask"]) > 0)
  for name, value in reference.items():
    assert scores[name] == pytest.approx(value, abs=1e-6), name
  predictions = results.predictions["segment"][0]
  assert [p["id"] for p in predictions] == [f"frame{i}" for i in range(6)]
  # episodes caps the images read; the noise control replaces the images, not the masks.
  drawn = []
  noise_image = video_lib.noise_image
  monkeypatch.setattr(video_lib, "noise_image",
                      lambda *args: drawn.append(args) or noise_image(*args))
  config.evaluate.episodes = 5
  config.data.video.noise = True
  noisy = run_lib.evaluate(config, params, model_state=state, progress=False)
  assert noisy.scores["segment"][0]["images"] == 5
  assert [index for _, index, _ in drawn] == list(range(5))
  assert noisy.scores["segment"][0]["empty_target"] == 0  # the masks are the frames'
  assert noisy.scores["segment"][0]["iou"] != pytest.approx(scores["iou"])
  with pytest.raises(Exception, match="held-out labelled frames"):
    run_lib.evaluate(config, params, model_state=state, tasks=["zeroshot"], progress=False)


@pytest.mark.parametrize("head", ["linear", "conv", "heavy", "attention", "unet"])
def test_the_papers_shapes_trace(head):
  """64 px frames repeated over 16 steps through the default VQ-VAE (latents 4 x 16 x 16 x
  240, stride 4), abstractly: only shapes are computed."""
  model = Segmenter(SegmenterConfig(None if head == "unet" else VQVAEConfig(), head=head,
                                    image_size=64 if head == "unet" else None))
  image = jnp.zeros((2, 64, 64, 3), jnp.uint8)
  logits, variables = jax.eval_shape(lambda: model.init_with_output(KEY, image))
  assert logits.shape == (2, 64, 64)
  if head == "linear":  # the probe: 4 * 240 channels -> a 4 x 4 block of logits per cell
    assert nn.unbox(variables)["params"]["head"]["linear"]["kernel"].shape == (960, 16)
