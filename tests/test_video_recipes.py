"""The video recipes end to end at toy size: VQ-VAE pretraining on the video world (its
codebook and BatchNorm state carried, checkpointed and resumed exactly, the held-out
reconstruction evaluation), then segmentation heads on its encoder (grafted from the
pretraining run, frozen or fine-tuned), the UNet from pixels and the noise control."""

import shutil

import jax
import numpy as np
import pytest
from test_train import run

from mmjax import checkpoints, config as config_lib
from mmjax.configs import segment as segment_recipe
from mmjax.configs import vqvae as vqvae_recipe

# 4 frames of 32 px; one attention block of 16 channels; 32 codes of 8 dims.
TOY = dict(embedding_dim=8, n_codes=32, n_hiddens=16, n_res_layers=1, downsample=(2, 4, 4),
           frames=4, resolution=32)


def toy_sources(config, frames_kind: bool):
  for name, entry in (*config.data.datasets.items(), *config.data.eval_datasets.items()):
    entry.source.update(frames=4, resolution=32,
                        size=(24 if name == "test" else 200 if frames_kind else 400))
  config.data.video.update(frames=4, resolution=32)


def vqvae_config(steps: int = 4):
  config = vqvae_recipe.get_config()
  config.model.update(TOY)
  toy_sources(config, frames_kind=False)
  config.data.batch_size = 4
  config.train.update(steps=steps, log_every=2, checkpoint_every=2, eval_every=0)
  config.evaluate.batch_size = 8
  return config


def segment_config(method: str, pretrained, steps: int = 3):
  config = segment_recipe.get_config(method)
  if config.model.encoder is not None:
    config.model.encoder.update(TOY)
    config.init.encoder.workdir = str(pretrained)
  config.model.update(frames=4, image_size=32)
  toy_sources(config, frames_kind=True)
  config.data.batch_size = 4
  config.train.update(steps=steps, log_every=steps, checkpoint_every=steps, eval_every=0)
  config.evaluate.batch_size = 8
  return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  config = vqvae_config()
  config_lib.validate(config)
  workdir = tmp_path_factory.mktemp("vqvae")
  return config, workdir, run(config, workdir)


def test_pretraining_resumes_exactly_and_evaluates_reconstruction(pretrained, tmp_path):
  """From its step-2 checkpoint the run reaches step 4 bit for bit: the codebook's
  initialisation, EMA and restarts draw from the step's key, and the codebook and
  BatchNorm statistics are saved and restored."""
  config, workdir, metrics = pretrained
  scores = metrics["few_shot"]["reconstruct"][0]
  assert scores["clips"] == 24 and 1 <= scores["codes_used"] <= 32
  assert 1 <= scores["perplexity"] <= scores["codes_used"] and scores["mse"] > 0
  state = checkpoints.load(workdir).model_state
  assert bool(state["codebook"]["codebook"]["initialized"])  # collection, then module
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  (resumed / "finished.json").unlink()
  run(config, resumed)
  whole, again = checkpoints.load(workdir), checkpoints.load(resumed)
  assert whole.step == again.step == 4
  jax.tree.map(np.testing.assert_array_equal, whole.params, again.params)
  jax.tree.map(np.testing.assert_array_equal, whole.model_state, again.model_state)


def test_a_frozen_encoder_keeps_its_pretrained_weights(pretrained, tmp_path):
  _, vqvae_dir, _ = pretrained
  config = segment_config("resnet_conv", vqvae_dir)
  config_lib.validate(config)
  metrics = run(config, tmp_path / "frozen")
  scores = metrics["few_shot"]["segment"][0]
  assert scores["images"] == 24 and 0 <= scores["iou"] <= 1
  source, target = checkpoints.load(vqvae_dir), checkpoints.load(tmp_path / "frozen")
  jax.tree.map(np.testing.assert_array_equal, source.params["encoder"],
               target.params["encoder"])
  jax.tree.map(np.testing.assert_array_equal, source.model_state["batch_stats"]["encoder"],
               target.model_state["batch_stats"]["encoder"])


def test_a_fine_tuned_encoder_moves_and_the_unet_and_noise_control_run(pretrained, tmp_path):
  _, vqvae_dir, _ = pretrained
  config = segment_config("resnet_attention_ft", vqvae_dir, steps=2)
  run(config, tmp_path / "ft")
  source, target = checkpoints.load(vqvae_dir), checkpoints.load(tmp_path / "ft")
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), source.params["encoder"],
                       target.params["encoder"])
  # The "resnet" latent is the conv stack's output: those layers train.
  assert all(jax.tree.leaves({k: v for k, v in moved.items() if k.startswith("conv")}))
  for method in ("unet", "noise"):
    config = segment_config(method, vqvae_dir, steps=1)
    scores = run(config, tmp_path / method)["few_shot"]["segment"][0]
    assert scores["images"] == 24


def test_segment_recipe_refuses_a_mismatched_resolution(pretrained):
  _, vqvae_dir, _ = pretrained
  config = segment_config("resnet_conv", vqvae_dir)
  config.data.video.resolution = 64
  with pytest.raises(Exception, match="resolution"):
    config_lib.validate(config)
