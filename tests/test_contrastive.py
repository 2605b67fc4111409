"""The contrastive family's losses and recipe options: SigLIP's sigmoid loss against a
written-out reference, CLIP's logit-scale clamp, the SigLIP and LiT variants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import _lm_batch, _one_step, clip_config

from mmjax import checkpoints, losses
from mmjax.tasks import clip as clip_task


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_sigmoid_loss_matches_a_naive_sum_over_pairs_divided_by_the_batch():
  rng = np.random.default_rng(0)
  image, text = _unit(rng, (5, 8)), _unit(rng, (5, 8))
  scale, bias = 10.0, -3.0
  naive = 0.0
  for i in range(5):
    for j in range(5):
      z = scale * image[i] @ text[j] + bias
      label = 1.0 if i == j else -1.0
      naive += math.log1p(math.exp(-label * z))  # -log sigmoid(label * z)
  got = losses.sigmoid_loss(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32),
                            jnp.float32(scale), jnp.float32(bias))
  np.testing.assert_allclose(got, naive / 5, rtol=1e-5)


def test_sigmoid_loss_is_a_sum_not_a_mean_over_pairs():
  """Doubling the batch with unrelated pairs roughly doubles each row's negatives: the
  loss per example grows, which a mean over b^2 pairs would hide."""
  rng = np.random.default_rng(1)
  image, text = _unit(rng, (16, 32)), _unit(rng, (16, 32))
  small = losses.sigmoid_loss(image[:8], text[:8], 1.0, 0.0)
  large = losses.sigmoid_loss(image, text, 1.0, 0.0)
  # At scale 1, bias 0 every pair costs about log 2: b pairs per row.
  np.testing.assert_allclose(small, 8 * math.log(2), rtol=0.1)
  np.testing.assert_allclose(large, 16 * math.log(2), rtol=0.1)


def test_siglip_starts_at_its_recipes_temperature_and_bias_and_trains_the_bias():
  from mmjax.configs import clip as clip_recipe
  config = clip_recipe.get_config("siglip")
  assert config.model.loss == "sigmoid"
  tiny = clip_config(vision_depth=1, embed_dim=16, batch_size=8)
  tiny.model.update(loss="sigmoid", init_bias=config.model.init_bias,
                    init_temperature=config.model.init_temperature)
  batch = _lm_batch(tiny)
  state, metrics, _ = _one_step(tiny, batch)
  params = state["params"]
  # One Adam step moves each scalar by about the learning rate from its start.
  np.testing.assert_allclose(params["log_scale"], math.log(10.0), atol=2e-3)
  np.testing.assert_allclose(params["logit_bias"], -10.0, atol=2e-3)
  assert float(params["logit_bias"]) != -10.0
  # Pairs score 10 * cos - 10 in [-20, 0]: each negative costs at most log(1 + e^0)
  # but mostly ~e^-10, each positive log(1 + e^(10 - 10 cos)) <= 20. (Starting from
  # open_clip's class default, scale 1/0.07 and bias 0, the negatives alone would cost
  # about 7 * log 2 per example.)
  assert 0 < float(metrics["loss"]) < 21


@pytest.fixture(scope="module")
def lit_step_from_above_the_clamp():
  """One train step of the LiT recipe's trainable parameters with the clamp on and a
  start above its ceiling (log scale 5.3 > ln 100): the state after it."""
  from mmjax.configs import clip as clip_recipe
  tiny = clip_config(vision_depth=1, embed_dim=16, batch_size=8)
  tiny.trainable = clip_recipe.get_config("lit").trainable
  tiny.model.init_temperature = 0.005
  tiny.clamp_logit_scale = True
  state, _, _ = _one_step(tiny, _lm_batch(tiny))
  return state


def test_the_clamp_applies_inside_the_train_step(lit_step_from_above_the_clamp):
  """A run starting above the clamp's ceiling ends its first step on it (the step's own
  update is ~lr); the bounds themselves: `test_project_params_clamps_...`."""
  state = lit_step_from_above_the_clamp
  np.testing.assert_allclose(state["params"]["log_scale"], math.log(100.0), atol=1e-6)


@pytest.mark.parametrize("log_scale, clamped", [(9.0, math.log(100.0)), (-0.5, 0.0),
                                               (2.0, 2.0)])
def test_project_params_clamps_the_log_scale_to_0_to_ln_100_only_when_asked(log_scale,
                                                                            clamped):
  params = {"log_scale": jnp.float32(log_scale), "logit_bias": jnp.float32(-50.0)}
  config = clip_config(vision_depth=1, embed_dim=16, batch_size=8)
  config.clamp_logit_scale = False
  assert clip_task.project_params(config, params) is params
  config.clamp_logit_scale = True
  projected = clip_task.project_params(config, params)
  assert float(projected["log_scale"]) == pytest.approx(clamped)
  assert float(projected["logit_bias"]) == -50.0  # the bias is not clamped


def test_lit_locks_the_image_tower_and_trains_the_text_tower(lit_step_from_above_the_clamp):
  state = lit_step_from_above_the_clamp
  trainable = checkpoints.flat_params(state["params"])
  frozen = checkpoints.flat_params(state["frozen"])
  assert frozen and all(path.startswith("image/") for path in frozen)
  assert not any(path.startswith("image/") for path in trainable)
  assert any(path.startswith("text/") for path in trainable)
  assert "log_scale" in trainable
  assert jax.tree_util.tree_leaves(state["opt_state"])


@pytest.mark.parametrize("variant, millions", [("b16", 149.62), ("l14", 427.62),
                                               ("siglip-b16", 203.16)])
def test_paper_variants_have_the_published_parameter_counts(variant, millions):
  """open_clip's counts of ViT-B-16, ViT-L-14 and ViT-B-16-SigLIP (224px)."""
  from mmjax.configs import clip as clip_recipe
  from mmjax.summary import model_and_inputs
  config = clip_recipe.get_config(variant)
  model, inputs, _, _ = model_and_inputs(config, jax.random.key(0))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs)["params"])
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  assert round(count / 1e6, 2) == millions
