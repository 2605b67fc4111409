"""SigLIP and open_clip dual encoders: the ViT, LM and TwoTowers options SigLIP needs, the
conversions of transformers' SiglipModel and of open_clip's CLIP (float32 embeddings
within 1e-5 of the references'), and mmjax's contrastive losses against open_clip's.

The references are transformers and open_clip 3.3.0 (`pip install --no-deps
open_clip_torch==3.3.0`). open_clip's package `__init__` imports its image transforms
(torchvision), which the CPU build of torch 2.13 cannot import beside it; its model and
loss modules are imported from their files, with a stand-in for the one torchvision name
`open_clip.utils` imports (`FrozenBatchNorm2d`, used only to freeze ResNet towers).
"""

import functools
import importlib
import importlib.util
import json
import math
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax import convert, losses
from mmjax.convert.open_clip import convert_open_clip, open_clip_model
from mmjax.convert.siglip import convert_siglip, siglip_config
from mmjax.models.lm import LanguageModel, LMConfig
from mmjax.models.two_towers import TwoTowers, TwoTowersConfig
from mmjax.models.vit import ViT, ViTConfig

VOCAB = 99
SIGLIP = dict(
    text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=12,
                     projection_size=32, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1),
    vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, image_size=16, patch_size=4))


@functools.cache
def _open_clip():
  """`(model, loss)`: open_clip's `open_clip.model` and `open_clip.loss` modules."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    raise ImportError("open_clip is not installed: pip install --no-deps "
                      "open_clip_torch==3.3.0")
  if "open_clip" not in sys.modules or not hasattr(sys.modules["open_clip"], "CLIP"):
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = package
  saved = {name: sys.modules.get(name) for name in
           ("torchvision", "torchvision.ops", "torchvision.ops.misc")}
  misc = types.ModuleType("torchvision.ops.misc")
  misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
  sys.modules.update({"torchvision": types.ModuleType("torchvision"),
                      "torchvision.ops": types.ModuleType("torchvision.ops"),
                      "torchvision.ops.misc": misc})
  try:
    return (importlib.import_module("open_clip.model"),
            importlib.import_module("open_clip.loss"))
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


def _randomise(model: torch.nn.Module, std: float, seed: int = 0) -> None:
  """Weights far from their init (LayerNorm biases nonzero, ...), so every term matters."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * std)


def _tree_keys(module, *args):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  return set(flax.traverse_util.flatten_dict(flax.linen.meta.unbox(shapes), sep="/"))


# ---------------------------------------------------------------------------------------
# Model options.
# ---------------------------------------------------------------------------------------
VIT = dict(image_size=16, patch_size=8, width=32, depth=1, num_heads=4)


def test_existing_configs_keep_their_parameter_trees():
  """The new options default to CLIP's layout: the same trees as before."""
  images = jnp.zeros((1, 16, 16, 3))
  assert _tree_keys(ViT(ViTConfig(**VIT, output_dim=8)), images) == {
      "patch_embed/kernel", "cls_token", "positions", "pre_norm/scale", "pre_norm/bias",
      "post_norm/scale", "post_norm/bias", "head/kernel",
      *(f"layers_0/{p}" for p in (
          "attn_norm/scale", "attn_norm/bias", "mlp_norm/scale", "mlp_norm/bias",
          "mlp/up/kernel", "mlp/up/bias", "mlp/down/kernel", "mlp/down/bias",
          *(f"attn/{n}/{k}" for n in ("query", "key", "value", "out")
            for k in ("kernel", "bias"))))}
  lm = LMConfig(vocab_size=10, width=32, depth=1, num_heads=4, max_len=8)
  keys = _tree_keys(TwoTowers(TwoTowersConfig(vision=ViTConfig(**VIT, output_dim=8),
                                              text=lm, embed_dim=8)),
                    images, jnp.zeros((1, 4), jnp.int32))
  assert {k for k in keys if not k.startswith(("image/", "text/"))} == {"text_head/kernel",
                                                                       "log_scale"}


def test_siglip_vit_layout_and_map_pooling():
  """No class token, patch bias, no ln_pre, ln_post on every token, then the MAP head;
  the pooled embedding equals a naive attention pooling computed from the parameters."""
  cfg = ViTConfig(**VIT, output_dim=None, class_token=False, pooling="map", patch_bias=True,
                  pre_norm=False, token_norm=True, activation="gelu_tanh")
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  model = ViT(cfg)
  out, variables = jax.jit(model.init_with_output)(jax.random.key(0), images)
  params = flax.linen.meta.unbox(variables["params"])
  assert "cls_token" not in params and "pre_norm" not in params and "head" not in params
  assert params["positions"].shape == (4, 32) and "bias" in params["patch_embed"]
  tokens, pooled = out["tokens"], out["pooled"]
  assert tokens.shape == (2, 4, 32) and pooled.shape == (2, 32)

  head = jax.tree.map(np.asarray, params["map_head"])  # a naive reference, in numpy
  attn, mlp, norm = head["attn"], head["mlp"], head["mlp_norm"]
  proj = lambda x, name: np.einsum("bnd,dhk->bnhk", x, attn[name]["kernel"]) + attn[name][
      "bias"]
  q = proj(np.broadcast_to(head["probe"], (2, 1, 32)), "query")
  k, v = proj(np.asarray(tokens), "key"), proj(np.asarray(tokens), "value")
  logits = np.einsum("bqhk,bnhk->bhqn", q, k) / math.sqrt(8)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  h = np.einsum("bhqn,bnhk->bqhk", weights, v)
  h = np.einsum("bqhk,hkd->bqd", h, attn["out"]["kernel"]) + attn["out"]["bias"]
  normed = ((h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + cfg.norm_eps)
            * norm["scale"] + norm["bias"])
  up = normed @ mlp["up"]["kernel"] + mlp["up"]["bias"]
  up = 0.5 * up * (1 + np.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up ** 3)))
  expected = (h + up @ mlp["down"]["kernel"] + mlp["down"]["bias"])[:, 0]
  np.testing.assert_allclose(pooled, expected, atol=1e-5)


@pytest.mark.parametrize("options, message", [
    (dict(pooling="mean"), "pooling must be 'class' or 'map'"),
    (dict(class_token=False), "with class_token=False set pooling='map'"),
    (dict(class_token=False, pooling="map", keep_class_token=True),
     "keep_class_token=True needs class_token=True"),
])
def test_vit_options_are_validated(options, message):
  with pytest.raises(ValueError, match=message):
    ViTConfig(**VIT, **options)


def test_bidirectional_lm_sees_later_tokens_and_cannot_decode():
  cfg = LMConfig(vocab_size=10, width=16, depth=1, num_heads=2, max_len=8, causal=False)
  model = LanguageModel(cfg)
  tokens = jnp.array([[1, 2, 3, 4], [1, 2, 3, 5]])  # the same but for the last token
  hidden, variables = jax.jit(lambda key, t: model.init_with_output(key, t, return_hidden=True))(
      jax.random.key(0), tokens)
  params = flax.linen.meta.unbox(variables["params"])
  assert not np.allclose(hidden[0, 0], hidden[1, 0])
  causal = LanguageModel(LMConfig(**{**vars(cfg), "causal": True}))
  hidden = jax.jit(lambda t: causal.apply({"params": params}, t, return_hidden=True))(tokens)
  np.testing.assert_allclose(hidden[0, :3], hidden[1, :3])
  with pytest.raises(ValueError, match="cannot decode"):
    model.apply({"params": params}, tokens, positions=jnp.zeros_like(tokens), decode=True,
                mutable=["cache"])
  with pytest.raises(ValueError, match="causal=False is not defined with ALiBi"):
    LMConfig(vocab_size=10, width=16, depth=1, num_heads=2, position="alibi", causal=False)


@pytest.mark.parametrize("options, message", [
    (dict(text_pool="first"), "text_pool must be 'last', 'eos', 'argmax' or 'final'"),
    (dict(embed_dim=16), r"pooled width 32 \(output_dim=None, width=32\) must equal "
                         "embed_dim=16"),
])
def test_two_towers_options_are_validated(options, message):
  lm = LMConfig(vocab_size=10, width=32, depth=1, num_heads=4, max_len=8)
  with pytest.raises(ValueError, match=message):
    TwoTowersConfig(**{"vision": ViTConfig(**VIT, output_dim=None), "text": lm,
                       "embed_dim": 32, **options})


# ---------------------------------------------------------------------------------------
# transformers' SiglipModel.
# ---------------------------------------------------------------------------------------
def _siglip_dir(tmp_path, **overrides):
  torch.manual_seed(0)
  model = transformers.SiglipModel(transformers.SiglipConfig(**{**SIGLIP, **overrides}))
  _randomise(model, 0.3)
  with torch.no_grad():
    model.logit_scale.fill_(math.log(10.0))
    model.logit_bias.fill_(-2.5)
  model.eval().save_pretrained(tmp_path)
  return model


def test_converted_siglip_matches_transformers(tmp_path):
  model = _siglip_dir(tmp_path)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)  # normalised, "b c h w"
  tokens = rng.integers(0, VOCAB, size=(3, 12))  # SigLIP pads every row to the full length
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(pixels),
                return_loss=True)
    patches = model.vision_model(pixel_values=torch.tensor(pixels)).last_hidden_state

  cfg, params = convert_siglip(tmp_path)
  assert cfg.text_pool == "final" and not cfg.text.causal and cfg.vision.pooling == "map"
  two_towers = TwoTowers(cfg)
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  run = lambda m, images, tokens: (m(images, tokens), m.image(images)["tokens"])
  (image, text, scale, bias), tokens_out = jax.jit(
      lambda p: two_towers.apply({"params": p}, images, jnp.asarray(tokens), method=run))(params)
  np.testing.assert_allclose(image, out.image_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(text, out.text_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(scale * image @ text.T + bias, out.logits_per_image.numpy(),
                             atol=1e-4)
  np.testing.assert_allclose([scale, bias], [10.0, -2.5], rtol=1e-6)
  # transformers' loss (big_vision's mean over rows of the sum over columns) is mmjax's.
  np.testing.assert_allclose(losses.sigmoid_loss(image, text, scale, bias), out.loss.item(),
                             rtol=1e-5)
  # The vision tower's tokens are its last_hidden_state (post-LayerNorm, no class token).
  np.testing.assert_allclose(tokens_out, patches.numpy(), atol=1e-4)


def test_siglip_conversion_is_strict(tmp_path):
  _siglip_dir(tmp_path)
  hf = convert.read_hf_config(tmp_path)
  with pytest.raises(convert.ConversionError, match=r"vision_config.vision_use_head=False"):
    siglip_config({**hf, "vision_config": {**hf["vision_config"], "vision_use_head": False}})
  with pytest.raises(convert.ConversionError, match=r"text_config.projection_size=16"):
    siglip_config({**hf, "text_config": {**hf["text_config"], "projection_size": 16}})
  with pytest.raises(convert.ConversionError, match=r"vision_config.image_size=\[16, 32\]"):
    siglip_config({**hf, "vision_config": {**hf["vision_config"], "image_size": [16, 32]}})
  with pytest.raises(convert.ConversionError, match=r"\['vision_config.new_field'\]"):
    siglip_config({**hf, "vision_config": {**hf["vision_config"], "new_field": 1}})
  with pytest.raises(convert.ConversionError, match="model_type='clip'"):
    siglip_config({**hf, "model_type": "clip"})
  from safetensors.numpy import load_file, save_file
  state = load_file(str(tmp_path / "model.safetensors"))
  del state["vision_model.head.probe"]
  save_file({**state, "text_model.extra": np.zeros(2, np.float32)},
            str(tmp_path / "model.safetensors"))
  with pytest.raises(convert.ConversionError,
                     match=r"missing parameters \(1\): \['vision_model.head.probe'\].*"
                           r"unexpected parameters \(1\): \['text_model.extra'\]"):
    convert_siglip(tmp_path)


def test_the_command_line_converts_siglip(tmp_path):
  from absl import flags

  from mmjax.convert import __main__ as command
  _siglip_dir(tmp_path / "hf")
  argv = ["convert", f"--hf_dir={tmp_path / 'hf'}", f"--output={tmp_path / 'out'}"]
  flags.FLAGS(argv)
  try:
    command.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  assert saved["task"] == "clip" and saved["model"]["text_pool"] == "final"
  assert saved["model"]["vision"]["pooling"] == "map" and not saved["model"]["text"]["causal"]
  assert (tmp_path / "out" / "checkpoints" / "0").is_dir()


# ---------------------------------------------------------------------------------------
# open_clip's CLIP, and the losses.
# ---------------------------------------------------------------------------------------
def _open_clip_model(activation: str, bias: float | None):
  model_lib, _ = _open_clip()
  model = model_lib.CLIP(
      embed_dim=24,
      vision_cfg=model_lib.CLIPVisionCfg(layers=2, width=128, head_width=64, mlp_ratio=1.5,
                                         patch_size=8, image_size=16),
      text_cfg=model_lib.CLIPTextCfg(context_length=10, vocab_size=VOCAB, width=128, heads=2,
                                     layers=2, mlp_ratio=1.5),
      quick_gelu=activation == "quick_gelu", init_logit_bias=bias)
  _randomise(model, 0.1)
  with torch.no_grad():
    model.logit_scale.fill_(math.log(10.0 if bias is not None else 1 / 0.07))
    if bias is not None:
      model.logit_bias.fill_(bias)
  return model.eval()


def _open_clip_inputs(rng):
  pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
  tokens = rng.integers(1, VOCAB - 1, size=(3, 10))
  lengths = np.array([10, 6, 3])
  tokens[np.arange(3), lengths - 1] = VOCAB - 1  # OpenAI's EOT, the largest id; 0 pads
  tokens = np.where(np.arange(10)[None] < lengths[:, None], tokens, 0)
  return pixels, tokens


@pytest.mark.parametrize("activation, bias, from_file", [("quick_gelu", None, True),
                                                         ("gelu", -5.0, False)])
def test_converted_open_clip_matches_open_clip(activation, bias, from_file, tmp_path):
  """An OpenAI-style CLIP (quick_gelu, no bias; read from a saved state dict) and a
  SigLIP-trained one (gelu, `init_logit_bias`): the normalised features within 1e-5, and
  the loss of the converted model's features is open_clip's (ClipLoss; SigLipLoss)."""
  _, loss_lib = _open_clip()
  model = _open_clip_model(activation, bias)
  pixels, tokens = _open_clip_inputs(np.random.default_rng(1))
  with torch.no_grad():
    image_ref = model.encode_image(torch.tensor(pixels), normalize=True)
    text_ref = model.encode_text(torch.tensor(tokens), normalize=True)
    logits_ref, _ = model.get_logits(torch.tensor(pixels), torch.tensor(tokens))
    scale_ref = model.logit_scale.exp()
    if bias is None:
      loss_ref = loss_lib.ClipLoss()(image_ref, text_ref, scale_ref)
    else:
      loss_ref = loss_lib.SigLipLoss()(image_ref, text_ref, scale_ref, model.logit_bias)

  state = {k: v.numpy() for k, v in model.state_dict().items()}
  if from_file:
    torch.save(model.state_dict(), tmp_path / "open_clip.pt")
    cfg, params = convert_open_clip(tmp_path / "open_clip.pt", activation)
  else:
    cfg, params = open_clip_model(state, activation)
  assert cfg.text_pool == "argmax" and cfg.text.causal
  assert cfg.loss == ("softmax" if bias is None else "sigmoid")
  image, text, scale, logit_bias = jax.jit(TwoTowers(cfg).apply)(
      {"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(tokens))
  np.testing.assert_allclose(image, image_ref.numpy(), atol=1e-5)
  np.testing.assert_allclose(text, text_ref.numpy(), atol=1e-5)
  np.testing.assert_allclose(scale * image @ text.T + logit_bias, logits_ref.numpy(),
                             atol=1e-4)
  loss = (losses.contrastive_loss(image, text, scale) if bias is None
          else losses.sigmoid_loss(image, text, scale, logit_bias))
  np.testing.assert_allclose(loss, loss_ref.item(), rtol=1e-5)


def test_open_clip_conversion_is_strict():
  state = {k: v.numpy() for k, v in _open_clip_model("gelu", None).state_dict().items()}
  with pytest.raises(convert.ConversionError, match=r"unexpected parameters \(1\): "
                                                    r"\['text_model.encoder.layers.0.ls_1"):
    open_clip_model({**state, "transformer.resblocks.0.ls_1.gamma": np.ones(128, np.float32)})
  with pytest.raises(convert.ConversionError, match=r"unexpected parameters \(1\): \['extra'\]"):
    open_clip_model({**state, "extra": np.ones(1, np.float32)})
  with pytest.raises(convert.ConversionError, match="no text_projection matrix"):
    open_clip_model({k: v for k, v in state.items() if k != "text_projection"})
  with pytest.raises(convert.ConversionError, match="CustomTextCLIP"):
    open_clip_model({k: v for k, v in state.items() if k.startswith("visual.")})
  with pytest.raises(convert.ConversionError, match="activation='relu'"):
    open_clip_model(state, "relu")
  # OpenAI's TorchScript archives store sizes as tensors: ignored on purpose.
  open_clip_model({**state, "context_length": np.array(10), "vocab_size": np.array(VOCAB),
                   "input_resolution": np.array(16)})


def test_losses_equal_open_clips():
  """On random normalised features: InfoNCE is open_clip's ClipLoss, the sigmoid loss its
  SigLipLoss (one process), within 1e-5."""
  _, loss_lib = _open_clip()
  rng = np.random.default_rng(2)
  image, text = (rng.normal(size=(6, 8)).astype(np.float32) for _ in range(2))
  image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text))
  scale, bias = np.float32(7.5), np.float32(-3.0)
  t = torch.tensor
  np.testing.assert_allclose(losses.contrastive_loss(image, text, scale),
                             loss_lib.ClipLoss()(t(image), t(text), t(scale)).item(),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses.sigmoid_loss(image, text, scale, bias),
                             loss_lib.SigLipLoss()(t(image), t(text), t(scale), t(bias)).item(),
                             rtol=1e-5, atol=1e-5)
