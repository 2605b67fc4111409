"""CLIP-layout ViT: patch embedding is a strided conv; features from any layer."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.vit import ViT, ViTConfig

CFG = ViTConfig(image_size=16, patch_size=4, width=32, depth=3, num_heads=4, output_dim=8)
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def vit():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  model = ViT(CFG)
  return model, nn.unbox(model.init(jax.random.key(1), images)["params"]), images


def test_patch_embedding_is_a_strided_convolution(vit):
  _, params, images = vit
  kernel = params["patch_embed"]["kernel"].reshape(4, 4, 3, 32)  # (p q c) d -> p q c d
  conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  patches = jnp.einsum("bpd,de->bpe", images.reshape(2, 4, 4, 4, 4, 3).transpose(
      0, 1, 3, 2, 4, 5).reshape(2, 16, 48), params["patch_embed"]["kernel"])
  np.testing.assert_allclose(conv.reshape(2, 16, 32), patches, **TOL)


def test_outputs_and_feature_layer(vit):
  model, params, images = vit
  out = jax.jit(model.apply)({"params": params}, images)
  assert out["tokens"].shape == (2, 16, 32) and out["pooled"].shape == (2, 8)
  # Penultimate-layer tokens equal the last-layer tokens of a ViT two blocks shorter.
  penultimate = model.apply({"params": params}, images, feature_layer=-2)
  assert "pooled" not in penultimate
  short = ViT(dataclasses.replace(CFG, depth=2))
  short_params = {k: v for k, v in params.items() if k != "layers_2"}
  np.testing.assert_allclose(short.apply({"params": short_params}, images)["tokens"],
                             penultimate["tokens"], **TOL)


def test_token_norm_applies_post_norm_to_tokens(vit):
  _, params, images = vit
  normed = ViT(dataclasses.replace(CFG, token_norm=True)).apply({"params": params}, images)
  tokens = normed["tokens"]
  np.testing.assert_allclose(tokens.mean(-1), 0.0, atol=1e-5)  # LayerNorm with unit scale


def test_wrong_image_shape_is_explained(vit):
  model, params, _ = vit
  with pytest.raises(ValueError, match=r"ViT expects images 'b h w c' of shape \(\*, 16, 16, 3\)"):
    model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)))


def test_uint8_pixels_are_normalised_with_the_config_statistics(vit):
  model, params, _ = vit
  pixels = jax.random.randint(jax.random.key(3), (2, 16, 16, 3), 0, 256).astype(jnp.uint8)
  normalised = (pixels / 255.0 - jnp.asarray(CFG.pixel_mean)) / jnp.asarray(CFG.pixel_std)
  np.testing.assert_allclose(model.apply({"params": params}, pixels)["tokens"],
                             model.apply({"params": params}, normalised)["tokens"], **TOL)


def test_the_class_token_can_be_kept_among_the_tokens():
  import dataclasses

  import flax.linen as nn
  import jax
  import numpy as np

  from mmjax.models.vit import ViT, ViTConfig
  cfg = ViTConfig(image_size=16, patch_size=8, width=32, depth=2, num_heads=4, output_dim=16)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = nn.unbox(ViT(cfg).init(jax.random.key(1), images)["params"])
  plain = ViT(cfg).apply({"params": params}, images)
  kept = ViT(dataclasses.replace(cfg, keep_class_token=True)).apply({"params": params}, images)
  assert kept["tokens"].shape == (2, cfg.num_patches + 1, 32) and cfg.num_tokens == 4
  np.testing.assert_array_equal(kept["tokens"][:, 1:], plain["tokens"])
  np.testing.assert_array_equal(kept["pooled"], plain["pooled"])
