"""MedCLIP: the converted model against a PyTorch reference of MedCLIP's ResNet variant, and
its text pooling against naive numpy.

The reference is benchmarks/medclip_torch.py's `TorchMedCLIP`, written out rather than
imported from the `medclip` package (why: its docstring): MedCLIPModel's module names (hence
its state dict's keys) and its computation.
"""

import dataclasses
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from benchmarks.medclip_torch import TorchMedCLIP, to_torch
from mmjax.convert import ConversionError
from mmjax.convert.medclip import PIXEL_MEAN, PIXEL_STD, convert_medclip
from mmjax.models.bert import Bert, BertConfig
from mmjax.models.common import config_from_dict
from mmjax.models.medclip import MedCLIP, MedCLIPConfig
from mmjax.models.resnet import ResNetConfig

VOCAB, EMBED = 40, 12
HF_BERT = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 3,
           "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 16}


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  grey = rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
  valid = np.arange(10)[None] < np.array([[10], [6], [2]])  # right-padded rows
  tokens = np.where(valid, rng.integers(1, VOCAB, (3, 10)), 0)
  return grey, tokens, valid


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("medclip")
  torch.manual_seed(0)
  ref = TorchMedCLIP(HF_BERT, EMBED).eval()
  with torch.no_grad():
    for p in ref.text_model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  torch.save(ref.state_dict(), tmp / "pytorch_model.bin")
  hf = transformers.BertConfig(**HF_BERT).to_dict()
  return ref, tmp, convert_medclip(tmp / "pytorch_model.bin", hf)


def test_converted_medclip_matches_the_reference(converted):
  ref, _, (cfg, params, model_state) = converted
  assert cfg.embed_dim == EMBED and cfg.vision.output_dim == EMBED
  assert cfg.vision.pixel_mean == (PIXEL_MEAN,) * 3 and not cfg.text.pooler
  assert set(params) == {"image", "text", "text_head", "log_scale"}
  assert set(model_state["batch_stats"]) == {"image"}
  grey, tokens, valid = inputs()
  image, text, scale = jax.jit(MedCLIP(cfg).apply)(
      {"params": params, **model_state}, jnp.asarray(grey), jnp.asarray(tokens))
  pixels = (grey.astype(np.float32) / 255 - PIXEL_MEAN) / PIXEL_STD  # normalise, then repeat
  with torch.no_grad():
    want_image, want_text, want_logits = ref(to_torch(pixels), torch.from_numpy(tokens),
                                             torch.from_numpy(valid.astype(np.int64)))
  assert image.dtype == text.dtype == jnp.float32
  np.testing.assert_allclose(image, want_image.numpy(), atol=1e-5)
  np.testing.assert_allclose(text, want_text.numpy(), atol=1e-5)
  np.testing.assert_allclose(scale, 100.0, rtol=1e-4)  # clamped like MedCLIP's
  np.testing.assert_allclose(scale * image @ text.T, want_logits.numpy(), atol=1e-3)


def test_saved_with_batch_stats(converted, tmp_path):
  """`common.save` writes a model state beside the parameters (a small one: saving
  fingerprints every array)."""
  from mmjax import checkpoints
  from mmjax.convert import common
  cfg = converted[2][0]
  params = {"log_scale": np.float32(2.0)}
  model_state = {"batch_stats": {"image": {"bn1": {"mean": np.arange(3, dtype=np.float32)}}}}
  common.save(tmp_path, "medclip", cfg, params, model_state)
  mngr = checkpoints.manager(tmp_path)
  state = mngr.restore(0, args=checkpoints.ocp.args.Composite(
      state=checkpoints.ocp.args.StandardRestore()))["state"]
  mngr.close()
  assert set(state) == {"params", "model_state"}
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["task"] == "medclip"
  assert config_from_dict(MedCLIPConfig, saved["model"]) == cfg
  np.testing.assert_array_equal(state["model_state"]["batch_stats"]["image"]["bn1"]["mean"],
                                [0, 1, 2])


def test_conversion_is_strict(converted, tmp_path):
  _, tmp, _ = converted
  state = torch.load(tmp / "pytorch_model.bin")
  hf = transformers.BertConfig(**HF_BERT).to_dict()
  for name, change, message in (
      ("extra", {"text_model.extra.weight": torch.zeros(2)}, "unexpected.*text_model.extra"),
      ("bias", {"text_model.projection_head.bias": torch.zeros(EMBED)},
       "unexpected.*projection_head.bias"),
      ("nofc", {"vision_model.model.fc.weight": None}, "no fc"),
      ("noscale", {"logit_scale": None}, "missing.*logit_scale")):
    changed = {k: v for k, v in (state | change).items() if v is not None}
    torch.save(changed, tmp_path / f"{name}.bin")
    with pytest.raises(ConversionError, match=message):
      convert_medclip(tmp_path / f"{name}.bin", hf)
  with pytest.raises(ConversionError, match="shape mismatches"):
    convert_medclip(tmp / "pytorch_model.bin", hf | {"num_hidden_layers": 2,
                                                     "intermediate_size": 20})


# --- The text pooling, defined by naive numpy. -----------------------------------------
TEXT = BertConfig(vocab_size=VOCAB, width=16, depth=3, num_heads=2, mlp_dim=24, max_len=16,
                  pooler=False)
VISION = ResNetConfig((1,), 4, block="basic", output_dim=8)


@pytest.fixture(scope="module")
def text_tower():
  """A random text tower's parameters, and its hidden states 0 to 3 on `inputs(1)`."""
  _, tokens, valid = inputs(1)
  shapes = jax.eval_shape(lambda: Bert(TEXT).init(jax.random.key(0), jnp.asarray(tokens)))
  rng = np.random.default_rng(0)  # no random init to compile: numpy's normals, by shape
  params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                        flax.linen.meta.unbox(shapes["params"]))
  states = Bert(TEXT).apply({"params": params}, jnp.asarray(tokens),
                            token_mask=jnp.asarray(valid), hidden_layers=(0, 1, 2, 3))
  return params, np.asarray(states["hidden_layers"])


@pytest.mark.parametrize("pool", ["medclip", "cls", "mean"])
def test_text_pooling_defined_naively(pool, text_tower):
  cfg = MedCLIPConfig(VISION, TEXT, embed_dim=8, text_pool=pool, text_layers=(1, 2, -1))
  _, tokens, valid = inputs(1)
  model = MedCLIP(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             jnp.asarray(tokens)))
  variables = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           flax.linen.meta.unbox(shapes))
  variables["params"]["text"] = text_tower[0]
  pooled = np.asarray(model.apply(variables, jnp.asarray(tokens), method="pool_text"))
  states = text_tower[1]  # "n b t d", hidden states 0 to 3
  _, b, t, d = states.shape
  want = np.zeros((b, d))
  for row in range(b):
    if pool == "medclip":  # every position, padding included, of states 1, 2 and 3
      want[row] = sum(states[n, row, p] for n in (1, 2, 3) for p in range(t)) / (3 * t)
    elif pool == "cls":
      want[row] = states[3, row, 0]
    else:
      real = [p for p in range(t) if valid[row, p]]
      want[row] = sum(states[3, row, p] for p in real) / len(real)
  np.testing.assert_allclose(pooled, want, atol=1e-5)
  if pool == "medclip":  # padding changes the pool: the mean runs over padded positions
    assert np.abs(pooled[2] - states[1:, 2, :2].mean((0, 1))).max() > 1e-3


def test_bert_hidden_layers_scanned_and_per_layer(text_tower):
  """Hidden states against towers cut to 0 and 2 layers, and a scanned tower's."""
  params, states = text_tower
  _, tokens, valid = inputs(1)
  tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
  for n in (0, 2):
    cut = Bert(dataclasses.replace(TEXT, depth=n)).apply(
        {"params": params}, tokens, token_mask=valid)["hidden"]
    np.testing.assert_allclose(states[n], cut, atol=1e-6)
  scanned = {k: v for k, v in params.items() if not k.startswith("layers_")}
  scanned["layers"] = jax.tree.map(lambda *x: jnp.stack(x),
                                   *(params[f"layers_{i}"] for i in range(3)))
  again = Bert(dataclasses.replace(TEXT, scan_layers=True)).apply(
      {"params": scanned}, tokens, token_mask=valid, hidden_layers=(2, 0, -3))
  np.testing.assert_allclose(again["hidden_layers"], states[[2, 0, 1]], atol=1e-5)
  with pytest.raises(ValueError, match="hidden state 4"):
    Bert(TEXT).apply({"params": params}, tokens, hidden_layers=(4,))


def test_config_checks():
  with pytest.raises(ValueError, match="output_dim=8 must equal embed_dim=16"):
    MedCLIPConfig(VISION, TEXT, embed_dim=16)
  with pytest.raises(ValueError, match="out of range: \\[5\\]"):
    MedCLIPConfig(VISION, TEXT, embed_dim=8, text_layers=(1, 5))
  with pytest.raises(ValueError, match="text_pool"):
    MedCLIPConfig(VISION, TEXT, embed_dim=8, text_pool="max")
