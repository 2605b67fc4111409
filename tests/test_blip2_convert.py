"""Converted Hugging Face BLIP-2 parts compute what transformers computes (float32, within
1e-4): the EVA ViT-g vision tower (`Blip2VisionModel`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

from mmjax.convert import blip2, common  # noqa: E402
from mmjax.models.vit import EVA_VIT_G, ViT, ViTConfig  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=28, patch_size=14)


def _randomise(model, seed=0):
  """Weights far from their tiny init, so that every term matters; the key part of each
  fused qkv bias stays zero, as in every BLIP-2 checkpoint (EVA has no key bias)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.3)
      if name.endswith("qkv.bias"):
        p[p.shape[0] // 3:2 * p.shape[0] // 3] = 0
  return model.eval()


def _tree(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in flat}


def _pixels(n=2, size=28):
  return np.random.default_rng(0).normal(size=(n, 3, size, size)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Vision tower.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_converted_vision_tower_gives_transformers_tokens(qkv_bias, tmp_path):
  model = _randomise(transformers.Blip2VisionModel(transformers.Blip2VisionConfig(
      **VISION, qkv_bias=qkv_bias)))
  model.save_pretrained(tmp_path)
  pixels = _pixels()
  with torch.no_grad():  # post_layernorm (ln_vision) on all 5 tokens, class token first
    expected = model(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
  cfg, params = blip2.convert_blip2_vision(tmp_path)
  assert (cfg.patch_bias, cfg.pre_norm, cfg.key_bias) == (True, False, False)
  vit = ViT(cfg)
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  import flax.linen as nn
  init = nn.unbox(jax.eval_shape(lambda: vit.init(jax.random.key(0), images))["params"])
  assert _tree(params) == _tree(init)
  assert "bias" not in params["layers_0"]["attn"]["key"] and "pre_norm" not in params
  tokens = vit.apply({"params": params}, images)["tokens"]
  assert tokens.shape == expected.shape == (2, 5, 32)
  diff = np.abs(np.asarray(tokens) - expected).max()
  assert diff < 1e-4, diff


def test_a_key_bias_that_is_not_zero_is_refused_by_name(tmp_path):
  model = _randomise(transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**VISION)))
  with torch.no_grad():
    model.encoder.layers[1].self_attn.qkv.bias[40] = 0.5
  model.save_pretrained(tmp_path)
  with pytest.raises(common.ConversionError,
                     match=r"key part \(elements 32:64\) of \['encoder\.layers\.1\.self_attn"
                           r"\.qkv\.bias'\] is not zero"):
    blip2.convert_blip2_vision(tmp_path)


def test_the_default_vision_config_is_the_named_eva_vit_g():
  """transformers 4.x wrote only non-default fields (the hub's configs hold almost none):
  an empty vision_config is ViT-g, with the fields older versions added ignored."""
  legacy = {"dropout": 0.0, "initializer_factor": 1.0, "num_channels": 3,
            "projection_dim": 512, "model_type": "blip_2_vision_model"}
  f = common.Fields(legacy, "BLIP-2 vision tower")
  cfg = blip2.vision_config(f)
  f.finish(blip2.VISION_IGNORED_FIELDS)
  assert cfg == ViTConfig(**EVA_VIT_G, keep_class_token=True, token_norm=True,
                          output_dim=None)
  # 1408 * 3 fewer numbers per block than transformers' model: its qkv bias holds the
  # key part, which is zero and absent here.
  with torch.device("meta"):
    hf = transformers.Blip2VisionModel(transformers.Blip2VisionConfig())
  hf_count = sum(p.numel() for p in hf.parameters())
  shapes = jax.eval_shape(lambda: ViT(cfg).init(jax.random.key(0),
                                                jnp.zeros((1, 224, 224, 3))))["params"]
  import flax.linen as nn
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))
  assert count == hf_count - 39 * 1408


@pytest.mark.parametrize("change, message", [
    (dict(num_channels=1), "num_channels=1"),
    (dict(hidden_act="gelu_10"), "hidden_act='gelu_10'"),
    (dict(image_size=[28, 42]), r"image_size=\[28, 42\]"),
    (dict(use_mask_token=True), "use_mask_token"),
])
def test_vision_fields_it_cannot_compute_are_refused_by_name(change, message):
  hf = transformers.Blip2VisionConfig(**VISION).to_dict() | change

  def convert():
    f = common.Fields(hf, "BLIP-2 vision tower")
    blip2.vision_config(f)
    f.finish(blip2.VISION_IGNORED_FIELDS)
  with pytest.raises(common.ConversionError, match=message):
    convert()
