"""Perceiver Resampler against a naive reference, and its invariances."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.perceiver import PerceiverResampler, ResamplerConfig

CFG = ResamplerConfig(depth=2, num_heads=2, head_dim=8, num_latents=4)
TOL = dict(atol=1e-5, rtol=1e-5)


def layernorm(x, p, eps=1e-5):
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return x * p["scale"] + p["bias"]


def naive_resampler(params, media, cfg):
  """OpenFlamingo's resampler written out with numpy for one image `"v d"`."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x, latents = np.asarray(media, np.float64), p["latents"]
  for i in range(cfg.depth):
    lp = p[f"layers_{i}"]
    normed = layernorm(latents, lp["latents_norm"])
    context = np.concatenate([layernorm(x, lp["media_norm"]), normed])
    a = lp["attn"]
    q = np.einsum("nd,dhk->hnk", normed, a["query"]["kernel"])
    k = np.einsum("sd,dhk->hsk", context, a["key"]["kernel"])
    v = np.einsum("sd,dhk->hsk", context, a["value"]["kernel"])
    w = np.einsum("hnk,hsk->hns", q, k) / np.sqrt(cfg.head_dim)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    latents = latents + np.einsum("hnk,hkd->nd", np.einsum("hns,hsk->hnk", w, v),
                                  a["out"]["kernel"])
    h = layernorm(latents, lp["mlp_norm"]) @ lp["mlp"]["up"]["kernel"]
    h = np.asarray(jax.nn.gelu(h, approximate=False))
    latents = latents + h @ lp["mlp"]["down"]["kernel"]
  return layernorm(latents, p["final_norm"])


@pytest.fixture(scope="module")
def resampler():
  media = jax.random.normal(jax.random.key(0), (2, 3, 1, 5, 16))  # b T F v d
  model = PerceiverResampler(CFG)
  return model, nn.unbox(model.init(jax.random.key(1), media)["params"]), media


def test_matches_naive_reference(resampler):
  model, params, media = resampler
  out = jax.jit(model.apply)({"params": params}, media)
  assert out.shape == (2, 3, 4, 16)
  np.testing.assert_allclose(out[1, 2], naive_resampler(params, media[1, 2, 0], CFG), **TOL)


def test_output_size_is_fixed_and_token_order_is_irrelevant(resampler):
  model, params, media = resampler
  more = jnp.concatenate([media, media[..., :2, :]], axis=3)  # 7 tokens per image
  assert model.apply({"params": params}, more).shape == (2, 3, 4, 16)
  shuffled = media[..., jnp.array([3, 0, 4, 1, 2]), :]
  np.testing.assert_allclose(model.apply({"params": params}, shuffled),
                             model.apply({"params": params}, media), **TOL)


def test_frame_embeddings_make_frame_order_matter():
  cfg = dataclasses.replace(CFG, max_frames=4)
  video = jax.random.normal(jax.random.key(2), (1, 1, 3, 5, 16))
  model = PerceiverResampler(cfg)
  params = nn.unbox(model.init(jax.random.key(3), video)["params"])
  assert params["frame_embed"].shape == (4, 16)
  swapped = video[:, :, ::-1]
  assert not np.allclose(model.apply({"params": params}, swapped),
                         model.apply({"params": params}, video), atol=1e-4)
  with pytest.raises(ValueError, match="exceed max_frames=4"):
    model.apply({"params": params}, jnp.zeros((1, 1, 5, 5, 16)))
