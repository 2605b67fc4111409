"""OpenFlamingo checkpoints convert exactly: the perceiver, the gated blocks and the whole
model give open_flamingo's outputs (float32, max abs difference below 1e-4).

The reference is open_flamingo's own code (`pip install --no-deps open_flamingo==2.0.1`:
its requirements pin an old torch). Its package `__init__` imports open_clip, so its
modules are imported from their files; the vision tower is Hugging Face's CLIP behind
open_clip's `(pooled, tokens)` interface, tokens before `ln_post` as in the open_clip
versions OpenFlamingo was trained with.
"""

import dataclasses
import functools
import os
import importlib
import importlib.util
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")
pytest.importorskip("einops_exts", reason="open_flamingo's helpers need einops-exts (dev extra)")

from mmjax import convert  # noqa: E402
from mmjax.models.flamingo import Flamingo  # noqa: E402
from mmjax.models.perceiver import PerceiverResampler  # noqa: E402
from mmjax.models.xattn import (GatedCrossAttentionBlock, media_attention_mask,  # noqa: E402
                                media_index)

VOCAB = 96
EOC, MEDIA = VOCAB, VOCAB + 1  # added as OpenFlamingo's factory adds them, then <PAD>
TOKENS = np.array([[5, 6, MEDIA, 7, 8, EOC, MEDIA, 9, 10, 11],  # text before the 1st image
                   [MEDIA, 13, 14, EOC, 15, 16, 0, 0, 0, 0]])  # one image, right padding
VALID = np.array([[True] * 10, [True] * 6 + [False] * 4])
NUM_IMAGES = np.array([2, 1])  # row 1's second image is padding


@functools.cache  # once: it replaces open_flamingo's package modules in sys.modules
def _open_flamingo():
  """`(helpers, flamingo, flamingo_lm, utils, train_utils)` modules of open_flamingo."""
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None:
    pytest.skip("open_flamingo is not installed (pip install --no-deps open_flamingo==2.0.1)")
  root = spec.submodule_search_locations[0]
  for name, path in (("open_flamingo", root), ("open_flamingo.src", f"{root}/src"),
                     ("open_flamingo.train", f"{root}/train")):
    if name not in sys.modules or not hasattr(sys.modules[name], "Flamingo"):
      package = types.ModuleType(name)
      package.__path__ = [path]
      sys.modules[name] = package
  sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # train_utils' logging only
  return [importlib.import_module(f"open_flamingo.{m}") for m in (
      "src.helpers", "src.flamingo", "src.flamingo_lm", "src.utils", "train.train_utils")]


class _OpenClipVisual(torch.nn.Module):
  """open_clip's `VisionTransformer(output_tokens=True)` interface over HF CLIP: `(pooled,
  patch tokens)`, the tokens before `ln_post` (open_clip <= 2.22)."""

  def __init__(self, clip):
    super().__init__()
    self.clip = clip

  def forward(self, pixels):
    out = self.clip(pixel_values=pixels)
    return out.pooler_output, out.last_hidden_state[:, 1:]


def _open_clip_state(clip_state: dict) -> dict:
  """An HF CLIPVisionModel state dict in open_clip's layout (`visual.*`), the mapping
  transformers' own CLIP conversion script inverts."""
  names = {"embeddings.patch_embedding.weight": "conv1.weight",
           "embeddings.class_embedding": "class_embedding",
           "embeddings.position_embedding.weight": "positional_embedding"}
  for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
    names |= {f"{ours}.{p}": f"{theirs}.{p}" for p in ("weight", "bias")}
  out = {"visual.proj": np.zeros((128, 8), np.float32)}
  state = {k.removeprefix("vision_model."): v.numpy() for k, v in clip_state.items()}
  for key, value in state.items():
    if key in names:
      out["visual." + names[key]] = value
    elif key.startswith("encoder.layers."):
      i, rest = key.split(".", 3)[2:]
      block = f"visual.transformer.resblocks.{i}."
      layer = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
               "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
      module, _, p = rest.rpartition(".")
      if module in layer:
        out[block + f"{layer[module]}.{p}"] = value
      elif module == "self_attn.q_proj":  # q, k, v become one in_proj
        out[block + f"attn.in_proj_{p}"] = np.concatenate(
            [state[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"])
  return out


def _build(out, tie: bool = False):
  """A random OpenFlamingo (CLIP ViT, 4-layer LLaMA, blocks every 2nd layer) saved as
  open_flamingo saves it: checkpoint.pt, the LM directory, the vision weights. With
  `tie`, the LM's output layer is its input embedding (as in OPT, GPT-2, MPT), which
  the checkpoint then holds as `lang_encoder.lm_head.weight` too."""
  helpers, flamingo, flamingo_lm, utils, train_utils = _open_flamingo()
  torch.manual_seed(0)
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=128, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
      image_size=16, patch_size=8, hidden_act="quick_gelu"))
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
      tie_word_embeddings=tie))
  for module in (clip, lm):
    with torch.no_grad():
      for p in module.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
  clip.save_pretrained(out / "clip")
  torch.save({k: torch.tensor(v) for k, v in _open_clip_state(clip.state_dict()).items()},
             out / "open_clip.bin")
  lm.save_pretrained(out / "lm")

  # As open_flamingo's factory builds it (a smaller perceiver, with frame embeddings).
  utils.extend_instance(lm, flamingo_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("model.layers")
  lm.resize_token_embeddings(VOCAB + 3)
  model = flamingo.Flamingo(types.SimpleNamespace(visual=_OpenClipVisual(clip)), lm, EOC, MEDIA,
                            vis_dim=128, cross_attn_every_n_layers=2)
  model.perceiver = helpers.PerceiverResampler(dim=128, depth=2, heads=2, num_latents=3,
                                               max_num_frames=2)
  with torch.no_grad():
    for p in [*model.perceiver.parameters(), *lm.gated_cross_attn_layers.parameters()]:
      p.copy_(torch.randn_like(p) * 0.3)  # gates too: tanh(gate) != 0
    embed, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    embed[VOCAB:] = torch.randn_like(embed[VOCAB:])
    if not tie:
      head[VOCAB:] = head[:VOCAB].mean(0)  # what conversion fills in (not in the checkpoint)
  model.eval().requires_grad_(False)
  model.perceiver.requires_grad_(True)
  lm.gated_cross_attn_layers.requires_grad_(True)
  lm.get_input_embeddings().requires_grad_(True)
  torch.save(train_utils.filter_state_dict_to_trainable(model, model.state_dict()),
             out / "checkpoint.pt")
  return model, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("openflamingo"))


@pytest.fixture(scope="module")
def converted(reference):
  _, out = reference
  return convert.convert_openflamingo(out / "checkpoint.pt", vision=out / "open_clip.bin",
                                      lm_dir=out / "lm", media_token_id=MEDIA,
                                      endofchunk_token_id=EOC)


def test_checkpoint_holds_only_the_trainable_weights(reference):
  _, out = reference
  keys = torch.load(out / "checkpoint.pt", weights_only=True).keys()
  assert {k.split(".")[0] for k in keys} == {"perceiver", "lang_encoder"}
  assert not any("decoder_layer" in k or "lm_head" in k for k in keys)


def test_perceiver_matches_open_flamingo(reference, converted):
  model, _ = reference
  cfg, params = converted
  features = np.random.default_rng(1).normal(size=(2, 3, 2, 4, 128)).astype(np.float32)
  with torch.no_grad():  # b T F v d, two frames: frame embeddings matter
    expected = model.perceiver(torch.tensor(features)).numpy()
  ours = PerceiverResampler(cfg.resampler).apply({"params": params["resampler"]},
                                                 jnp.asarray(features))
  assert cfg.resampler.max_frames == 2 and cfg.resampler.num_latents == 3
  assert np.abs(np.asarray(ours) - expected).max() < 1e-4


@pytest.mark.parametrize("only_immediate", [True, False])
def test_gated_block_matches_open_flamingo(reference, converted, only_immediate):
  model, _ = reference
  cfg, params = converted
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 10, 32)).astype(np.float32)
  media = rng.normal(size=(2, 2, 3, 128)).astype(np.float32)  # b T n e
  block = model.lang_encoder.gated_cross_attn_layers[1]
  block.attn.only_attend_immediate_media = only_immediate
  with torch.no_grad():
    expected = block(torch.tensor(x), torch.tensor(media),
                     media_locations=torch.tensor(TOKENS == MEDIA)).numpy()
  block.attn.only_attend_immediate_media = True
  mask = media_attention_mask(media_index(jnp.asarray(TOKENS), MEDIA),
                              jnp.ones((2, 2), bool), only_immediate)
  ours = GatedCrossAttentionBlock(dataclasses.replace(cfg.xattn, only_immediate=only_immediate)
                                  ).apply({"params": params["lm"]["xattn_1"]}, jnp.asarray(x),
                                          jnp.asarray(media.reshape(2, 6, 128)),
                                          jnp.repeat(mask, 3, axis=-1))
  diff = np.abs(np.asarray(ours) - expected)
  # Text before the first image sees no image in both. open_flamingo zeroes its
  # attention only in immediate mode; otherwise it averages all images' values
  # (mmjax: zero). Compare everything else.
  seen = media_index(jnp.asarray(TOKENS), MEDIA) > 0
  assert diff[np.asarray(seen)].max() < 1e-4
  if only_immediate:
    assert diff.max() < 1e-4


def _logits_match(model, out, vision="open_clip.bin"):
  pixels = np.random.default_rng(3).normal(size=(2, 2, 1, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():  # b T F c h w
    expected = model(vision_x=torch.tensor(pixels), lang_x=torch.tensor(TOKENS),
                     attention_mask=torch.tensor(VALID.astype(np.int64))).logits.numpy()
  cfg, params = convert.convert_openflamingo(
      out / "checkpoint.pt", vision=out / vision, lm_dir=out / "lm", media_token_id=MEDIA,
      endofchunk_token_id=EOC)
  assert (cfg.xattn.every, cfg.lm.vocab_size, cfg.vision.token_norm) == (2, VOCAB + 3, False)
  logits = Flamingo(cfg).apply({"params": params}, jnp.asarray(TOKENS),
                               jnp.asarray(pixels.transpose(0, 1, 2, 4, 5, 3)),
                               jnp.asarray(NUM_IMAGES), token_mask=jnp.asarray(VALID))
  assert np.abs(np.asarray(logits) - expected)[VALID].max() < 1e-4


@pytest.mark.parametrize("vision", ["open_clip.bin", "clip"])
def test_converted_openflamingo_logits_match(reference, vision):
  """Several images per row, text before the first image, a padding image, right
  padding; the vision tower from open_clip's weights file or an HF CLIP directory."""
  _logits_match(*reference, vision)


def test_an_openflamingo_on_a_tied_lm_converts_and_its_head_must_be_the_embedding(tmp_path):
  """OpenFlamingo saves a tied LM's output layer (lang_encoder.lm_head.weight) beside the
  trained embedding it equals; it is checked, not refused as unexpected."""
  model, out = _build(tmp_path, tie=True)
  state = torch.load(out / "checkpoint.pt", weights_only=True)
  assert "lang_encoder.lm_head.weight" in state
  _logits_match(model, out)
  state["lang_encoder.lm_head.weight"] = state["lang_encoder.lm_head.weight"] + 1
  torch.save(state, tmp_path / "bad.pt")
  with pytest.raises(convert.ConversionError, match="lm_head.weight: differs from"):
    convert.convert_openflamingo(tmp_path / "bad.pt", vision=out / "clip", lm_dir=out / "lm",
                                 media_token_id=MEDIA, endofchunk_token_id=EOC)


def test_a_full_state_dict_converts_and_its_copies_must_agree(reference, tmp_path):
  """A whole model's state dict (not filtered to the trainable weights): the LM layers
  under their FlamingoLayer names and aliases, the gated blocks' aliases, the vision
  encoder; each copy must agree with the others and with --vision."""
  model, out = reference
  full = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}
  visual = _open_clip_state(model.vision_encoder.clip.state_dict())
  full |= {"vision_encoder." + k.removeprefix("visual."): torch.tensor(v)
           for k, v in visual.items()}  # as open_clip's VisionTransformer names them
  torch.save(full, tmp_path / "full.pt")
  cfg, params = convert.convert_openflamingo(
      tmp_path / "full.pt", vision=out / "clip", lm_dir=out / "lm", media_token_id=MEDIA,
      endofchunk_token_id=EOC)
  assert any(".decoder_layer." in k for k in full) and any("old_decoder_blocks" in k
                                                           for k in full)
  import jax
  _, filtered = convert.convert_openflamingo(
      out / "checkpoint.pt", vision=out / "clip", lm_dir=out / "lm", media_token_id=MEDIA,
      endofchunk_token_id=EOC)
  # Equal, but for the untied output layer's added rows: torch's mean there, numpy's here.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7),
                         params, filtered)
  for key in ("lang_encoder.gated_cross_attn_layers.1.attn_gate",
              "vision_encoder.ln_pre.weight"):
    bad = dict(full)
    bad[key] = bad[key] + 1
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(convert.ConversionError, match="differ"):
      convert.convert_openflamingo(tmp_path / "bad.pt", vision=out / "clip", lm_dir=out / "lm",
                                   media_token_id=MEDIA, endofchunk_token_id=EOC)


def test_a_checkpoint_without_gated_blocks_is_rejected(reference, tmp_path):
  _, out = reference
  state = torch.load(out / "checkpoint.pt", weights_only=True)
  torch.save({k: v for k, v in state.items() if "gated" not in k}, tmp_path / "bad.pt")
  with pytest.raises(convert.ConversionError, match="no gated cross-attention blocks"):
    convert.convert_openflamingo(tmp_path / "bad.pt", vision=out / "clip", lm_dir=out / "lm",
                                 media_token_id=MEDIA, endofchunk_token_id=EOC)


def test_an_unknown_tensor_in_the_checkpoint_is_refused_by_name(reference, tmp_path):
  _, out = reference
  state = torch.load(out / "checkpoint.pt", weights_only=True)
  state["perceiver.layers.0.0.extra_scale"] = torch.ones(3)
  torch.save(state, tmp_path / "bad.pt")
  with pytest.raises(convert.ConversionError,
                     match=r"unexpected parameters \(1\): \['perceiver.layers.0.0.extra_scale'\]"):
    convert.convert_openflamingo(tmp_path / "bad.pt", vision=out / "clip", lm_dir=out / "lm",
                                 media_token_id=MEDIA, endofchunk_token_id=EOC)


def test_the_command_line_writes_a_flamingo_checkpoint(reference, converted, tmp_path):
  import json
  import subprocess

  import jax

  from mmjax import checkpoints
  from mmjax.models.flamingo import FlamingoConfig
  _, out = reference
  subprocess.run(
      [sys.executable, "-m", "mmjax.convert", f"--openflamingo={out / 'checkpoint.pt'}",
       f"--vision={out / 'open_clip.bin'}", f"--hf_dir={out / 'lm'}",
       f"--output={tmp_path / 'of'}", f"--media_token_id={MEDIA}",
       f"--endofchunk_token_id={EOC}"], check=True, env={**os.environ,
                                                          "JAX_PLATFORMS": "cpu"})
  cfg, params = converted
  saved = json.loads((tmp_path / "of" / "config.json").read_text())
  assert saved["task"] == "flamingo" and FlamingoConfig.from_dict(saved["model"]) == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         checkpoints.load_params(tmp_path / "of"), params)
