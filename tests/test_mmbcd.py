"""MMBCD's model: region cropping on the device against PIL, the fusion attention against
torch's MultiheadAttention, and the padding rules (padded regions change nothing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax.models.bert import BertConfig
from mmjax.models.mmbcd import MMBCD, MMBCDConfig, RegionAttention, crop_and_resize
from mmjax.models.resnet import BatchNorm
from mmjax.models.vit import ViTConfig

VISION = ViTConfig(image_size=16, patch_size=8, width=32, depth=2, num_heads=2,
                   activation="gelu", output_dim=None, pre_norm=False, patch_bias=True,
                   token_norm=True, norm_eps=1e-6)
TEXT = BertConfig(vocab_size=50, width=32, depth=2, num_heads=2, max_len=40,
                  type_vocab_size=1, pooler=False)


def _model(**kw) -> MMBCD:
  return MMBCD(MMBCDConfig(vision=VISION, text=TEXT, embed_dim=16, pad_id=1, **kw))


def _inputs(seed=0, b=2, k=3):
  rng = np.random.default_rng(seed)
  regions = jnp.asarray(rng.integers(0, 256, (b, k, 16, 16, 1)), jnp.uint8)
  tokens = jnp.asarray([[0, 5, 6, 2, 1], [0, 7, 2, 1, 1]][:b])
  mask = jnp.asarray([[True, True, False], [True, True, True]][:b])
  return regions, tokens, mask


@pytest.mark.parametrize("box", [(10, 20, 74, 60), (0, 0, 100, 120), (37, 5, 45, 93),
                                 (3, 50, 11, 58)])
def test_crop_and_resize_is_pils_crop_then_bilinear_resize(box):
  """Integer boxes: the device crop equals PIL's `crop(box).resize((s, s), BILINEAR)`
  (antialiased when shrinking, a triangle filter when growing) to uint8 rounding."""
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (100, 120), np.uint8)
  image[30:50, 40:70] = 255  # structure, so that a misplaced crop shows
  y0, x0, y1, x1 = box
  want = np.asarray(Image.fromarray(image).crop((x0, y0, x1, y1)).resize(
      (24, 24), Image.BILINEAR), np.float32)
  got = np.asarray(crop_and_resize(jnp.asarray(image)[None, ..., None],
                                   jnp.asarray([[box]], jnp.float32), 24))[0, 0, ..., 0]
  np.testing.assert_allclose(got, want, atol=1.0)


def test_region_attention_matches_torch_multihead_attention():
  torch = pytest.importorskip("torch")
  e, k = 16, 5
  rng = np.random.default_rng(0)
  query, keys = rng.normal(size=(3, e)).astype(np.float32), rng.normal(
      size=(3, k, e)).astype(np.float32)
  mask = np.ones((3, k), bool)
  mask[0, 3:] = False
  mha = torch.nn.MultiheadAttention(e, num_heads=1, batch_first=True, dropout=0.3).eval()
  with torch.no_grad():
    mha.in_proj_bias.normal_()
  w, b = mha.in_proj_weight.detach().numpy(), mha.in_proj_bias.detach().numpy()
  proj = lambda i: {"kernel": w[i * e:(i + 1) * e].T[:, None, :],
                    "bias": b[i * e:(i + 1) * e][None]}
  params = {"query": proj(0), "key": proj(1), "value": proj(2),
            "out": {"kernel": mha.out_proj.weight.detach().numpy().T[None],
                    "bias": mha.out_proj.bias.detach().numpy()}}
  layer = RegionAttention(e, 0.3)
  for key_mask in (None, mask):
    out, weights = layer.apply({"params": params}, jnp.asarray(query), jnp.asarray(keys),
                               None if key_mask is None else jnp.asarray(key_mask), False)
    with torch.no_grad():
      ref, ref_w = mha(torch.tensor(query)[:, None], torch.tensor(keys), torch.tensor(keys),
                       key_padding_mask=None if key_mask is None
                       else torch.tensor(~key_mask))
    np.testing.assert_allclose(np.asarray(out), ref[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(weights), ref_w[:, 0].numpy(), atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_padded_regions_change_nothing(train):
  """What a padded region holds reaches neither the logits nor, in training, the
  BatchNorm statistics."""
  model = _model()
  regions, tokens, mask = _inputs()
  variables = model.init(jax.random.key(0), regions, tokens, region_mask=mask)
  noisy = regions.at[0, 2].set(255 - regions[0, 2])
  run = lambda r: model.apply(variables, r, tokens, region_mask=mask, train=train,
                              mutable=["batch_stats"] if train else False,
                              rngs={"dropout": jax.random.key(3)})
  a, b = run(regions), run(noisy)
  if train:
    (a, sa), (b, sb) = a, b
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), sa, sb)
  np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-6)
  assert float(a["attention"][0, 2]) == 0.0
  np.testing.assert_allclose(np.asarray(a["attention"]).sum(-1), 1.0, rtol=1e-6)


def test_unmasked_attention_is_the_references_and_sees_padding():
  model = _model(mask_regions=False)
  regions, tokens, mask = _inputs()
  variables = model.init(jax.random.key(0), regions, tokens, region_mask=mask)
  out = model.apply(variables, regions, tokens, region_mask=mask)
  assert float(out["attention"][0, 2]) > 0.0


def test_masked_batchnorm_uses_only_real_rows():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
  mask = jnp.asarray([1, 1, 0, 1, 0, 1], bool)
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x, False)
  y, state = bn.apply(variables, x, False, mask, mutable=["batch_stats"])
  real = np.asarray(x)[np.asarray(mask)]
  np.testing.assert_allclose(np.asarray(y)[np.asarray(mask)],
                             (real - real.mean(0)) / np.sqrt(real.var(0) + 1e-5), rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"],
                             0.9 + 0.1 * real.var(0, ddof=1), rtol=1e-5)


@pytest.mark.parametrize("fusion,width", [("vision", 16), ("concat", 32), ("attention", 48)])
def test_fusions_feed_the_head_their_parts(fusion, width):
  model = _model(fusion=fusion)
  regions, tokens, mask = _inputs()
  variables = model.init(jax.random.key(0), regions, tokens, region_mask=mask)
  out = model.apply(variables, regions, tokens, region_mask=mask)
  assert out["features"].shape == (2, width) and out["logits"].shape == (2, 2)
  assert ("text" in variables["params"]) == (fusion != "vision")
  emb = np.asarray(out["regions"])
  pooled = np.where(np.asarray(mask)[..., None], emb, -np.inf).max(1)
  np.testing.assert_allclose(np.asarray(out["features"])[:, -16:], pooled, rtol=1e-6)


def test_device_crop_equals_pipeline_crop_through_the_model():
  """The model given the whole image and boxes computes what it computes on the crops."""
  model = _model()
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (2, 64, 64, 1)).astype(np.uint8)
  boxes = np.asarray([[[0, 0, 16, 16], [8, 8, 40, 24], [0, 0, 64, 64]]] * 2, np.float32)
  crops = crop_and_resize(jnp.asarray(image), jnp.asarray(boxes), 16)
  _, tokens, mask = _inputs()
  mean, std = np.asarray(VISION.pixel_mean), np.asarray(VISION.pixel_std)
  normalised = (np.repeat(np.asarray(crops), 3, -1) / 255.0 - mean) / std
  variables = model.init(jax.random.key(0), jnp.asarray(normalised, jnp.float32), tokens,
                         region_mask=mask)
  a = model.apply(variables, jnp.asarray(normalised, jnp.float32), tokens, region_mask=mask)
  b = model.apply(variables, image=jnp.asarray(image), boxes=jnp.asarray(boxes),
                  tokens=tokens, region_mask=mask)
  np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# The recipe: a short run through the regions pipeline (class-balanced, keyword-masked,
# attention dropout, BatchNorm statistics), exact resumption, and the held-out evaluation.
# ---------------------------------------------------------------------------------------
def mmbcd_config(method: str = "masking", steps: int = 4):
  """configs/mmbcd.py at toy size: 256 px world images, 16 px crops of 4 regions, a
  one-block ViT and a one-layer text tower; 24 held-out cases per split."""
  from mmjax.configs import mmbcd as recipe
  config = recipe.get_config(method)
  config.model.vision.update(image_size=16, width=32, depth=1)
  config.model.text.update(width=32, depth=1, mlp_dim=64)
  config.model.embed_dim = 16
  config.data.update(batch_size=8)
  config.data.regions.update(num_regions=4, region_size=16, canvas_size=256)
  for name, entry in (*config.data.datasets.items(), *config.data.eval_datasets.items()):
    entry.source.update(image_size=256, size=24 if name != "train" else 400)
  config.train.update(steps=steps, log_every=2, checkpoint_every=2, eval_every=0)
  config.evaluate.batch_size = 16
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from test_train import run
  config = mmbcd_config()
  workdir = tmp_path_factory.mktemp("mmbcd")
  return config, workdir, run(config, workdir)


def test_a_resumed_run_continues_exactly(trained, tmp_path):
  """Resumed from its step-2 checkpoint, the run reaches step 4 bit for bit: the
  balanced draw, the keyword masking and the attention dropout are functions of the
  position and the step, the BatchNorm statistics are saved and restored."""
  import shutil

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
  jax.tree.map(np.testing.assert_array_equal, whole.params, again.params)
  jax.tree.map(np.testing.assert_array_equal, whole.model_state, again.model_state)


def test_the_run_ends_with_held_out_scores_and_calibration(trained):
  _, _, metrics = trained
  scores = metrics["few_shot"]["classify"][0]
  assert scores["cases"] == 24
  for name in ("accuracy", "f1", "nll", "ece", "temperature", "nll_scaled", "ece_scaled"):
    assert np.isfinite(scores[name]), name
  assert 0 <= scores["accuracy"] <= 1 and scores["temperature"] > 0


def test_device_crops_train_the_same_model(trained, tmp_path):
  """crop="device" (whole images on a canvas, cropped beside the towers) runs the recipe;
  its first loss is the pipeline-crop run's to resampling rounding."""
  from test_train import run
  config = mmbcd_config("attention", steps=1)
  config.data.regions.crop = "device"
  with config.unlocked():
    del config["evaluate"]
  device = run(config, tmp_path / "device")
  config.data.regions.crop = "pipeline"
  pipeline = run(config, tmp_path / "pipeline")
  assert abs(device["loss"] - pipeline["loss"]) < 0.05


def test_windowed_crops_equal_whole_image_crops_and_fall_back_for_large_boxes():
  rng = np.random.default_rng(3)
  image = jnp.asarray(rng.integers(0, 256, (2, 96, 80, 1)), jnp.uint8)
  boxes = jnp.asarray([[[3, 5, 30, 25], [60, 50, 96, 80], [10, 0, 11, 9]],
                       [[0, 0, 32, 32], [70, 70, 90, 80], [40, 7, 65, 30]]], jnp.float32)
  whole = crop_and_resize(image, boxes, 12)
  np.testing.assert_allclose(crop_and_resize(image, boxes, 12, window=40), whole, atol=1e-3)
  large = boxes.at[1, 2].set(jnp.asarray([0, 0, 90, 70], jnp.float32))  # wider than 40
  np.testing.assert_allclose(crop_and_resize(image, large, 12, window=40),
                             crop_and_resize(image, large, 12), atol=1e-3)
