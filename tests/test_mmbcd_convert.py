"""MMBCD's towers and whole checkpoint come in exactly: a random small Hugging Face ViTModel
(and the same tensors in the original DINO layout) and RoBERTa, converted, give
transformers' outputs (float32, within 1e-5); the authors' whole-model state dict
converts to the tree `MMBCD.init` builds and gives a torch module's logits in the layout
of the reference's `code/model.py` (benchmarks/mmbcd_torch.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

from benchmarks.mmbcd_torch import DinoViT, TorchMMBCD  # noqa: E402
from mmjax import convert  # noqa: E402
from mmjax.convert import vit as vit_conversion  # noqa: E402
from mmjax.models.bert import Bert  # noqa: E402
from mmjax.models.vit import ViT  # noqa: E402

VOCAB, SIZE, PATCH, WIDTH, HEADS, MLP = 60, 16, 4, 32, 4, 48


def _randomised(model, seed=0):
  """`model` in eval mode with weights far from their tiny init (every term matters)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  return model.eval()


def _hf_vit(cls=transformers.ViTModel, eps=1e-12, **kwargs):
  return _randomised(cls(transformers.ViTConfig(
      hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=MLP,
      image_size=SIZE, patch_size=PATCH, layer_norm_eps=eps, num_labels=3), **kwargs))


def _pixels(n=2, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


def _as_dino(model, path, prefix=""):
  """A ViTModel's tensors, as save_pretrained writes them into `path`, under the original
  DINO names (q, k, v packed in `qkv`)."""
  from safetensors.torch import load_file
  model.save_pretrained(path)
  s = load_file(str(path / "model.safetensors"))
  out = {"cls_token": s["embeddings.cls_token"],
         "pos_embed": s["embeddings.position_embeddings"],
         "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": s["layernorm.weight"], "norm.bias": s["layernorm.bias"]}
  for i in range(2):
    hf, p = f"encoder.layer.{i}.", f"blocks.{i}."
    att = hf + "attention.attention."
    for kind in ("weight", "bias"):
      out[p + f"attn.qkv.{kind}"] = torch.cat([s[att + f"{n}.{kind}"]
                                               for n in ("query", "key", "value")])
      for ours, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                           ("attn.proj", "attention.output.dense"),
                           ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
        out[p + f"{ours}.{kind}"] = s[hf + f"{theirs}.{kind}"]
  return {prefix + k: v for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# ViT: Hugging Face's ViTModel layout and the original DINO layout.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["ViTModel", "ViTForImageClassification"])
def test_vit_conversion_gives_transformers_hidden_states(cls, tmp_path):
  model = _hf_vit(getattr(transformers, cls))
  model.save_pretrained(tmp_path)
  pixels = _pixels()
  with torch.no_grad():
    out = model(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    expected = out.hidden_states[-1] if cls != "ViTModel" else out.last_hidden_state
    if cls != "ViTModel":  # the classifier's input is the final norm of the last state
      expected = model.vit.layernorm(expected)
  cfg, params = convert.convert_vit(tmp_path)
  assert (cfg.pixel_mean, cfg.norm_eps) == ((0.485, 0.456, 0.406), 1e-12)
  got = ViT(cfg).apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got["tokens"], expected.numpy(), atol=1e-5)
  np.testing.assert_allclose(got["pooled"], expected[:, 0].numpy(), atol=1e-5)


def test_vit_normalises_with_the_preprocessors_statistics(tmp_path):
  import json
  _hf_vit().save_pretrained(tmp_path)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
  cfg, _ = convert.convert_vit(tmp_path)
  assert (cfg.pixel_mean, cfg.pixel_std) == ((0.5,) * 3, (0.5,) * 3)


def test_dino_layout_gives_the_same_tower_as_transformers(tmp_path):
  model = _hf_vit(eps=1e-6)
  pixels = _pixels()
  with torch.no_grad():
    expected = model(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
  state = _as_dino(model, tmp_path, "image_encoder.")
  dino = DinoViT(WIDTH, 2, HEADS, MLP, SIZE, PATCH).eval()
  dino.load_state_dict({k.removeprefix("image_encoder."): v for k, v in state.items()})
  with torch.no_grad():  # the test's DINO module is transformers' ViT, in DINO's layout
    np.testing.assert_allclose(dino(torch.tensor(pixels)).numpy(), expected[:, 0], atol=1e-5)
  state = {k: v.numpy() for k, v in state.items()} | {"text.x": np.zeros(3, np.float32)}
  with pytest.raises(convert.ConversionError, match="32 wide cannot have 0 heads"):
    convert.convert_dino(state, "image_encoder.")  # DINO's heads are 64 wide, unless told
  cfg, params = convert.convert_dino(state, "image_encoder.", num_heads=HEADS)
  assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.depth, cfg.mlp_dim, cfg.norm_eps) == (
      SIZE, PATCH, WIDTH, 2, MLP, 1e-6)
  got = ViT(cfg).apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got["tokens"], expected, atol=1e-5)
  np.testing.assert_allclose(got["pooled"], expected[:, 0], atol=1e-5)


def test_dino_vit_s8_shapes_read_as_the_preset():
  """The shapes of `dino_vits8`'s state dict (only shapes: broadcast zeros) give
  `DINO_VIT_S8`, 6 heads of 64 by DINO's convention."""
  from mmjax.models.vit import DINO_VIT_S8, ViTConfig
  zeros = lambda *shape: np.broadcast_to(np.float32(0), shape)
  state = {"cls_token": zeros(1, 1, 384), "pos_embed": zeros(1, 785, 384),
           "patch_embed.proj.weight": zeros(384, 3, 8, 8),
           **{f"blocks.{i}.mlp.fc1.weight": zeros(1536, 384) for i in range(12)}}
  assert vit_conversion.dino_config(state) == ViTConfig(**DINO_VIT_S8)


def test_vit_conversions_refuse_what_they_cannot_compute(tmp_path):
  model = _hf_vit()
  hf = model.config.to_dict()
  with pytest.raises(convert.ConversionError, match="qkv_bias=False"):
    vit_conversion.vit_config(hf | {"qkv_bias": False})
  with pytest.raises(convert.ConversionError, match="use_new_thing"):
    vit_conversion.vit_config(hf | {"use_new_thing": True})
  state = {k: v.numpy() for k, v in _as_dino(model, tmp_path).items()}
  with pytest.raises(convert.ConversionError, match=r"unexpected parameters \(1\): "
                                                    r"\['blocks.0.attn.q_norm.weight'\]"):
    convert.convert_dino(state | {"blocks.0.attn.q_norm.weight": np.ones(8, np.float32)},
                         num_heads=HEADS)
  with pytest.raises(convert.ConversionError, match="No backbone.patch_embed.proj.weight"):
    convert.convert_dino(state, "backbone.")


# ---------------------------------------------------------------------------------------
# RoBERTa: BERT with positions from pad id + 1.
# ---------------------------------------------------------------------------------------
def _roberta_config():
  return transformers.RobertaConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
      intermediate_size=MLP, max_position_embeddings=20, type_vocab_size=1, pad_token_id=1,
      layer_norm_eps=1e-5, num_labels=2)


def _roberta(cls="RobertaModel"):
  return _randomised(getattr(transformers, cls)(_roberta_config()))


def _right_padded(pad=1):
  rng = np.random.default_rng(0)
  lengths = np.array([12, 7, 3])
  valid = np.arange(12)[None] < lengths[:, None]
  tokens = rng.integers(3, VOCAB, size=(3, 12))
  tokens[:, 0], tokens[np.arange(3), lengths - 1] = 0, 2  # <s> ... </s>
  return np.where(valid, tokens, pad), valid


@pytest.mark.parametrize("cls", ["RobertaModel", "RobertaForSequenceClassification",
                                 "RobertaForMaskedLM"])
def test_roberta_conversion_gives_transformers_hidden_states(cls, tmp_path):
  model = _roberta(cls)
  model.save_pretrained(tmp_path)
  tokens, valid = _right_padded()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(int)),
                output_hidden_states=True)
  cfg, params = convert.convert_bert(tmp_path)
  assert (cfg.position_offset, cfg.max_len, cfg.pooler) == (2, 20, cls == "RobertaModel")
  got = Bert(cfg).apply({"params": params}, jnp.asarray(tokens), token_mask=jnp.asarray(valid))
  expected = out.hidden_states[-1].numpy()
  assert np.abs(np.asarray(got["hidden"]) - expected)[valid].max() < 1e-5
  np.testing.assert_allclose(got["hidden"][:, 0], expected[:, 0], atol=1e-5)
  if cfg.pooler:
    np.testing.assert_allclose(got["pooled"], out.pooler_output.numpy(), atol=1e-5)
  with pytest.raises(ValueError, match="less position_offset=2"):
    Bert(cfg).apply({"params": params}, jnp.zeros((1, 19), jnp.int32))


# ---------------------------------------------------------------------------------------
# The whole MMBCD checkpoint, in the layout of the reference's code/model.py.
# ---------------------------------------------------------------------------------------
EMBED = 16
DINO_WIDTH = 64  # one head, 64 wide: the number of heads DINO's convention infers


@pytest.fixture(scope="module")
def mmbcd_checkpoint(tmp_path_factory):
  """`(torch module, its checkpoint as DataParallel saves it, RoBERTa's directory)`."""
  path = tmp_path_factory.mktemp("mmbcd")
  model = _randomised(TorchMMBCD(
      dict(width=DINO_WIDTH, depth=2, heads=1, mlp=96, size=SIZE, patch=PATCH),
      _roberta_config(), EMBED))
  with torch.no_grad():
    for bn in (model.img_fc_layer[0], model.txt_fc_layer[0]):
      bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.3)
      bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
      bn.num_batches_tracked.fill_(7)
  state = model.state_dict()
  assert "img_fc_layer.1.weight" in state and "img_fc1.weight" in state  # the alias
  torch.save({"module." + k: v for k, v in state.items()}, path / "model_best.pt")
  model.text_encoder.save_pretrained(path / "roberta")
  return model, path / "model_best.pt", path / "roberta"


def test_mmbcd_checkpoint_gives_the_reference_modules_logits(mmbcd_checkpoint):
  from mmjax.models.mmbcd import MMBCD
  model, checkpoint, roberta = mmbcd_checkpoint
  cfg, params, state = convert.convert_mmbcd(checkpoint, roberta)
  assert (cfg.embed_dim, cfg.num_classes, cfg.pad_id, cfg.text.position_offset) == (
      EMBED, 2, 1, 2)
  assert (cfg.vision.width, cfg.vision.num_heads, cfg.vision.mlp_dim) == (DINO_WIDTH, 1, 96)
  assert params["attn"]["query"]["kernel"].shape == (EMBED, 1, EMBED)
  assert params["attn"]["out"]["kernel"].shape == (1, EMBED, EMBED)
  np.testing.assert_array_equal(state["batch_stats"]["vision_bn"]["var"],
                                model.img_fc_layer[0].running_var.numpy())
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 3, 3, SIZE, SIZE)).astype(np.float32)  # "b k c s s"
  tokens, valid = _right_padded()
  tokens, valid = tokens[:2], valid[:2]
  with torch.no_grad():
    expected = model(torch.tensor(images), torch.tensor(tokens),
                     torch.tensor(valid.astype(int))).numpy()
  out = MMBCD(cfg).apply({"params": params, **state}, jnp.asarray(images.transpose(
      0, 1, 3, 4, 2)), jnp.asarray(tokens))
  np.testing.assert_allclose(out["logits"], expected, atol=1e-4)


def test_mmbcd_checkpoint_is_read_strictly(mmbcd_checkpoint, tmp_path):
  from mmjax.convert import mmbcd
  _, checkpoint, roberta = mmbcd_checkpoint
  state = torch.load(checkpoint, weights_only=True)
  save = lambda s: torch.save(s, tmp_path / "model.pt") or tmp_path / "model.pt"
  bare = {k.removeprefix("module."): v for k, v in state.items()}
  convert.convert_mmbcd(save(bare), roberta)  # without DataParallel's
  alias = {k: v for k, v in bare.items() if not k.startswith("img_fc1.")}
  convert.convert_mmbcd(save(alias), roberta)  # either name of the Linear
  bad = dict(bare, **{"img_fc_layer.1.bias": bare["img_fc1.bias"] + 1})
  with pytest.raises(convert.ConversionError, match="img_fc_layer.1.bias: differs from "
                                                    "img_fc1.bias"):
    convert.convert_mmbcd(save(bad), roberta)
  with pytest.raises(convert.ConversionError, match=r"unexpected parameters \(1\): "
                                                    r"\['model_fc3.weight'\]"):
    convert.convert_mmbcd(save(bare | {"model_fc3.weight": torch.zeros(2)}), roberta)
  with pytest.raises(convert.ConversionError, match=r"missing parameters \(1\): "
                                                    r"\['attention.in_proj_bias'\]"):
    convert.convert_mmbcd(save({k: v for k, v in bare.items()
                                if k != "attention.in_proj_bias"}), roberta)
  with pytest.raises(convert.ConversionError, match="dict of state dicts"):
    mmbcd.unwrap({"model": {"a": np.zeros(1)}})


def test_the_command_line_converts_mmbcd_and_a_vit(mmbcd_checkpoint, tmp_path):
  import json
  import os
  import subprocess
  import sys
  _, checkpoint, roberta = mmbcd_checkpoint
  _hf_vit().save_pretrained(tmp_path / "vit")
  for flags, task in (([f"--mmbcd={checkpoint}", f"--hf_dir={roberta}"], "mmbcd"),
                      ([f"--hf_dir={tmp_path / 'vit'}"], "vit")):
    run = subprocess.run([sys.executable, "-m", "mmjax.convert", *flags,
                          f"--output={tmp_path / task}"], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr
    saved = json.loads((tmp_path / task / "config.json").read_text())
    assert saved["task"] == task
  assert saved["model"]["width"] == WIDTH
