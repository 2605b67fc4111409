"""Converted LLaVA checkpoints compute what their references compute (float32, within 1e-4):
Hugging Face's LlavaForConditionalGeneration (LLaMA or Mistral; logits, and greedy tokens
identical to its `generate`), and the original layout (haotian-liu/LLaVA: a LLaMA directory
with `model.mm_projector.*`, and a separate CLIP directory) against the model it describes,
written out in torch: CLIP's hidden state, the projector, and the LM reading the features
where the prompt's -200 placeholder was."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import checkpoints, convert
from mmjax.convert import llava
from mmjax.models import llava as llava_model
from mmjax.models.llava import Llava

torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

VOCAB, IMAGE_TOKEN = 96, 95
VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
          "num_attention_heads": 4, "image_size": 28, "patch_size": 14}
TEXT = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _randomise(model, seed=0, scale=0.3):
  """Weights far from their tiny init, so that every term matters."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * scale)
  return model.eval()


def _tree(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in flat}


def _init_tree(cfg) -> dict:
  import flax.linen as nn
  size = cfg.vision.image_size
  return _tree(nn.unbox(jax.eval_shape(lambda: Llava(cfg).init(
      jax.random.key(0), jnp.zeros((1, 1, size, size, 3)), jnp.zeros((1, 2), jnp.int32)))
                        ["params"]))


def _pixels(n=2):
  """Normalised pixels: `"b c h w"` for torch, `"b 1 h w c"` for mmjax."""
  pixels = np.random.default_rng(0).normal(size=(n, 3, 28, 28)).astype(np.float32)
  return pixels, jnp.asarray(pixels.transpose(0, 2, 3, 1))[:, None]


def _prompts(image_tokens, image_id=IMAGE_TOKEN):
  """Two rows of text around one image, expanded to `image_tokens` image tokens."""
  image = [image_id] * image_tokens
  return np.array([[1, 5] + image + [7, 8, 9, 30], [1] + image + [9, 10, 11, 12, 40]])


# ---------------------------------------------------------------------------------------
# Hugging Face's layout.
# ---------------------------------------------------------------------------------------
def _hf_llava(text="llama", text_changes=None, **c):
  text_config = dict(model_type=text, **TEXT, **(text_changes or {}))
  return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**{
      "vision_config": dict(model_type="clip_vision_model", **VISION),
      "text_config": text_config, "image_token_index": IMAGE_TOKEN, **c}))


HF_CASES = {
    # LLaVA-1.5's settings: the penultimate layer's patches.
    "llama-default": lambda: _hf_llava(),
    # The last layer (post_layernorm in the tree, unused), class token kept, no projector
    # bias, tied embeddings (set at the top level only), Mistral's sliding window.
    "mistral-full-last_layer-tied-no_bias": lambda: _hf_llava(
        "mistral", {"sliding_window": 6}, vision_feature_select_strategy="full",
        vision_feature_layer=-1, multimodal_projector_bias=False, tie_word_embeddings=True),
    # A positive feature layer: hidden state 1, after the first block.
    "llama-full-layer_1": lambda: _hf_llava(vision_feature_layer=1,
                                            vision_feature_select_strategy="full"),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_converted_llava_gives_transformers_logits(case, tmp_path):
  model = _randomise(HF_CASES[case]())
  model.save_pretrained(tmp_path)
  hf = model.config
  cfg, params = convert.convert_llava(tmp_path)
  layer = hf.vision_feature_layer % (VISION["num_hidden_layers"] + 1)
  assert cfg.vision_feature_layer == hf.vision_feature_layer
  assert cfg.vision_feature_select == hf.vision_feature_select_strategy
  assert (cfg.image_token_id, cfg.projector, cfg.projector_bias) == (
      IMAGE_TOKEN, "mlp2x_gelu", hf.multimodal_projector_bias)
  assert cfg.lm.tie_embeddings == hf.tie_word_embeddings
  # Only what LLaVA runs: no layers after the feature layer, no unused post_layernorm.
  assert _tree(params) == _init_tree(cfg)
  assert sorted(k for k in params["vision"] if k.startswith("layers_")) == [
      f"layers_{i}" for i in range(layer)]
  assert ("post_norm" in params["vision"]) == (layer == VISION["num_hidden_layers"])

  pixels, images = _pixels()
  tokens = _prompts(cfg.image_tokens)
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens),
                     pixel_values=torch.tensor(pixels)).logits.numpy()
  logits = jax.jit(Llava(cfg).apply)({"params": params}, images, jnp.asarray(tokens))
  diff = np.abs(np.asarray(logits) - expected).max()
  assert diff < 1e-4, diff


def test_converted_llava_gives_transformers_greedy_tokens(tmp_path):
  """With the KV cache, stopping at the EOS as transformers does. (Smaller weights than
  elsewhere, so that the continuations vary.)"""
  model = _randomise(HF_CASES["llama-default"](), scale=0.15)
  model.save_pretrained(tmp_path)
  cfg, params = convert.convert_llava(tmp_path)
  pixels, images = _pixels()
  tokens = _prompts(cfg.image_tokens)
  with torch.no_grad():
    expected = model.generate(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(pixels),
                              max_new_tokens=6, do_sample=False,
                              pad_token_id=0)[:, tokens.shape[1]:].numpy()
  out = llava_model.generate(Llava(cfg), params, images, jnp.asarray(tokens),
                             jnp.full((2,), tokens.shape[1]), jax.random.key(0),
                             max_new_tokens=6, stop_ids=(TEXT["eos_token_id"],), pad_id=0)
  got = np.asarray(out.tokens)
  assert len(set(expected.ravel().tolist())) > 3  # continuations that vary
  np.testing.assert_array_equal(got[:, :expected.shape[1]], expected)
  assert not got[:, expected.shape[1]:].any()  # transformers stopped: all rows ended


def test_the_settings_these_cases_vary_change_transformers_logits():
  """Reading the wrong hidden state, or keeping the class token where LLaVA drops it,
  would fail the comparison: each moves transformers' image features."""
  pixels = torch.tensor(_pixels()[0])

  def features(**c):
    model = _randomise(_hf_llava(**c))
    with torch.no_grad():
      return torch.cat(model.get_image_features(pixel_values=pixels).pooler_output).numpy()

  default = features()
  assert default.shape == (2 * 4, 32)
  assert np.abs(features(vision_feature_layer=-1) - default).max() > 1e-3
  full = features(vision_feature_select_strategy="full")
  assert full.shape == (2 * 5, 32)
  assert np.abs(full.reshape(2, 5, 32)[:, 1:] - default.reshape(2, 4, 32)).max() < 1e-5


def _hf_dict(**c) -> dict:
  return json.loads(_hf_llava(**c).config.to_json_string())


@pytest.mark.parametrize("change, message", [
    (lambda hf: hf | {"vision_feature_layer": [-2, -5]},
     r"vision_feature_layer=\[-2, -5\] \(features of several layers, concatenated\) is not"),
    (lambda hf: hf | {"projector_hidden_act": "silu"}, "projector_hidden_act='silu'"),
    (lambda hf: hf | {"vision_feature_select_strategy": "cls"},
     "vision_feature_select_strategy='cls'"),
    (lambda hf: hf | {"vision_feature_layer": 7}, "vision_feature_layer=7 is outside"),
    (lambda hf: hf | {"image_token_index": VOCAB}, f"image_token_id={VOCAB} is outside"),
    (lambda hf: hf | {"text_config": hf["text_config"] | {"model_type": "opt"}},
     "text_config.model_type='opt'"),
    (lambda hf: hf | {"text_config": hf["text_config"] | {"attention_bias": True}},
     "text_config.attention_bias=True"),
    (lambda hf: hf | {"vision_config": hf["vision_config"] | {
        "model_type": "siglip_vision_model"}}, "vision_config.model_type='siglip_vision_model'"),
    (lambda hf: hf | {"vision_config": hf["vision_config"] | {"hidden_act": "gelu_10"}},
     "vision_config.hidden_act='gelu_10'"),
    (lambda hf: hf | {"some_new_setting": 3}, "some_new_setting"),
    (lambda hf: hf | {"vision_config": hf["vision_config"] | {"some_new_setting": 3}},
     r"vision_config\.some_new_setting"),
])
def test_llava_settings_and_fields_it_does_not_know_are_refused_by_name(change, message):
  hf = _hf_dict()
  assert llava.llava_config(hf).image_tokens == 4
  with pytest.raises(convert.ConversionError, match=message):
    llava.llava_config(change(hf))


# llava-hf/llava-1.5-7b-hf's config.json, as transformers 4 wrote it: the fields at their
# defaults left out.
LLAVA_15_7B_HF = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
    "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5",
                    "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                    "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                    "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                      "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "vocab_size": 32064}


def test_a_transformers_4_config_takes_the_defaults_it_left_out():
  cfg = llava.llava_config(LLAVA_15_7B_HF)
  assert (cfg.image_tokens, cfg.image_token_id, cfg.pad_token_id) == (576, 32000, 32001)
  assert (cfg.vision.width, cfg.vision.depth, cfg.vision.activation) == (1024, 24, "quick_gelu")
  assert (cfg.lm.width, cfg.lm.depth, cfg.lm.num_heads, cfg.lm.mlp_dim) == (4096, 32, 32, 11008)
  assert (cfg.lm.vocab_size, cfg.lm.max_len, cfg.lm.norm_eps) == (32064, 4096, 1e-5)
  # Each default as transformers' config classes have it.
  top = {k: v for k, v in LLAVA_15_7B_HF.items()
         if k not in ("vision_config", "text_config", "vocab_size")} | {"image_token_index": 7}
  hf = json.loads(transformers.LlavaConfig(**top).to_json_string())
  full, defaults = llava.llava_config(hf), llava.llava_config(top)
  assert full.lm.head_dim == full.lm.width // full.lm.num_heads  # written out: the same
  assert dataclasses.replace(full, lm=dataclasses.replace(full.lm, head_dim=None)) == defaults
  mistral = llava.llava_config(LLAVA_15_7B_HF | {"text_config": {"model_type": "mistral",
                                                                  "vocab_size": 32064}})
  assert (mistral.lm.num_kv_heads, mistral.lm.sliding_window) == (8, 4096)
  with pytest.raises(convert.ConversionError, match=r"vocab_size=32064 .*supported: 32000"):
    llava.llava_config(LLAVA_15_7B_HF | {"text_config": {"model_type": "llama"}})


def _add_tensor(path, name):
  from safetensors.numpy import load_file, save_file
  state = load_file(str(path / "model.safetensors"))
  state[name] = np.zeros((3,), np.float32)
  save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize("extra", ["vision_tower.encoder.layers.0.extra.bias",
                                   "multi_modal_projector.linear_3.weight",
                                   "language_model.model.layers.0.self_attn.q_norm.weight",
                                   "image_newline"])
def test_unknown_tensors_are_refused_by_name_and_unused_layers_are_not(extra, tmp_path):
  """The vision layers after the feature layer and post_layernorm are in the checkpoint
  and left out on purpose; anything else unknown is refused by name (the LM's relative
  to it)."""
  _randomise(_hf_llava()).save_pretrained(tmp_path)
  _, params = convert.convert_llava(tmp_path)  # (layer 2 of 3 and post_layernorm unused)
  assert "layers_2" not in params["vision"] and "post_norm" not in params["vision"]
  _add_tensor(tmp_path, extra)
  name = extra.replace("language_model.model.", "model.")
  with pytest.raises(convert.ConversionError,
                     match=rf"unexpected parameters \(1\): \['{name}'\]"):
    convert.convert_llava(tmp_path)


def test_transformers_5_tensor_names_convert_too(tmp_path):
  """The names of a LlavaForConditionalGeneration in memory (`model.`-prefixed), as a
  state dict saved without save_pretrained's renaming has them."""
  from safetensors.torch import save_file
  model = _randomise(_hf_llava())
  model.save_pretrained(tmp_path)
  expected = convert.convert_llava(tmp_path)[1]
  state = model.state_dict()
  assert any(k.startswith("model.language_model.") for k in state)
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
  _, params = convert.convert_llava(tmp_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)


# ---------------------------------------------------------------------------------------
# The original layout (haotian-liu/LLaVA).
# ---------------------------------------------------------------------------------------
ORIGINAL_TRAINING_FIELDS = {
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "use_mm_proj": True,
    "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
    "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "mm_projector_lr": None,
    "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
    "unfreeze_mm_vision_tower": False, "mm_patch_merge_type": "flat"}


def _original(tmp_path, projector, select, clip_model):
  """An original LLaVA directory (a LlamaForCausalLM's, with `mm_*` fields and
  `model.mm_projector.*`) and its CLIP directory (a CLIPModel's or a CLIPVisionModel's).
  Returns `(llava_dir, clip_dir, lm, projector)`, the last two torch modules."""
  lm = _randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)), 1, 0.15)
  llava_dir, clip_dir = tmp_path / "llava", tmp_path / "clip"
  lm.save_pretrained(llava_dir)
  if clip_model:
    tower = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=VISION, text_config={
            "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16}))
  else:
    tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
  _randomise(tower, 2, 0.15).save_pretrained(clip_dir)
  (clip_dir / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "crop_size": 28}))
  d, e = TEXT["hidden_size"], VISION["hidden_size"]
  torch.manual_seed(3)
  if projector == "linear":
    proj = torch.nn.Linear(e, d)
    names = {"model.mm_projector.weight": proj.weight, "model.mm_projector.bias": proj.bias}
  else:
    proj = torch.nn.Sequential(torch.nn.Linear(e, d), torch.nn.GELU(), torch.nn.Linear(d, d))
    names = {f"model.mm_projector.{i}.{kind}": getattr(proj[i], kind)
             for i in (0, 2) for kind in ("weight", "bias")}
  from safetensors.numpy import load_file, save_file
  state = load_file(str(llava_dir / "model.safetensors"))
  state |= {k: v.detach().numpy() for k, v in names.items()}
  save_file(state, str(llava_dir / "model.safetensors"))
  config = json.loads((llava_dir / "config.json").read_text())
  config |= ORIGINAL_TRAINING_FIELDS | {
      "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
      "mm_projector_type": projector, "mm_hidden_size": e, "mm_vision_select_layer": -2,
      "mm_vision_select_feature": select}
  (llava_dir / "config.json").write_text(json.dumps(config))
  return llava_dir, clip_dir, lm, proj.eval()


def _original_logits(clip_dir, lm, projector, select, pixels, tokens):
  """Original LLaVA's forward, written out: `CLIPVisionModel.from_pretrained` on the CLIP
  directory, hidden state -2, the class token dropped ("patch") or kept ("cls_patch"), the
  projector, and each -200 of `tokens` replaced by its image's features."""
  tower = transformers.CLIPVisionModel.from_pretrained(clip_dir).eval()
  with torch.no_grad():
    hidden = tower(pixel_values=torch.tensor(pixels),
                   output_hidden_states=True).hidden_states[-2]
    features = projector(hidden[:, 1:] if select == "patch" else hidden)
    embed = lm.get_input_embeddings()
    rows = []
    for row, image in zip(tokens, features, strict=True):
      parts = [image if t == -200 else embed(torch.tensor([t])) for t in row]
      rows.append(torch.cat(parts))
    return lm(inputs_embeds=torch.stack(rows)).logits.numpy()


@pytest.mark.parametrize("projector, select, clip_model, image_id", [
    ("linear", "cls_patch", True, None),
    ("mlp2x_gelu", "patch", False, 50),
], ids=["linear-cls_patch-clip_model-appended_id", "mlp2x_gelu-patch-vision_model-given_id"])
def test_original_llava_gives_the_logits_of_the_model_it_describes(
    projector, select, clip_model, image_id, tmp_path):
  llava_dir, clip_dir, lm, proj = _original(tmp_path, projector, select, clip_model)
  cfg, params = convert.convert_llava(llava_dir, vision=clip_dir, image_token_id=image_id)
  appended = image_id is None
  assert cfg.image_token_id == (VOCAB if appended else image_id)
  assert cfg.lm.vocab_size == VOCAB + appended
  assert (cfg.projector, cfg.vision_feature_select) == (
      projector, {"patch": "default", "cls_patch": "full"}[select])
  assert cfg.vision.pixel_mean == (0.5, 0.4, 0.3)
  assert _tree(params) == _init_tree(cfg)

  pixels, images = _pixels()
  placeholder = [[1, 5, -200, 7, 8, 9, 30], [1, -200, 9, 10, 11, 12, 40]]
  expected = _original_logits(clip_dir, lm, proj, select, pixels, placeholder)
  tokens = np.array([[x for t in row for x in (
      [cfg.image_token_id] * cfg.image_tokens if t == -200 else [t])] for row in placeholder])
  logits = np.asarray(jax.jit(Llava(cfg).apply)({"params": params}, images,
                                                 jnp.asarray(tokens)))
  diff = np.abs(logits[..., :VOCAB] - expected).max()
  assert diff < 1e-4, diff
  if appended:  # the new id's logit is the mean of the others: greedy never picks it
    np.testing.assert_allclose(logits[..., VOCAB], expected.mean(-1), atol=1e-5)


def _convert(*flags):
  return subprocess.run([sys.executable, "-m", "mmjax.convert", *flags], check=False,
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_original_llava_converts_from_the_command_line(tmp_path):
  llava_dir, clip_dir, *_ = _original(tmp_path, "mlp2x_gelu", "patch", False)
  out = tmp_path / "out"
  run = _convert(f"--hf_dir={llava_dir}", f"--vision={clip_dir}", f"--output={out}")
  assert run.returncode == 0, run.stderr
  config = json.loads((out / "config.json").read_text())
  assert config["task"] == "llava"
  assert config["model"]["image_token_id"] == VOCAB
  assert config["model"]["lm"]["vocab_size"] == VOCAB + 1
  _, params = convert.convert_llava(llava_dir, vision=clip_dir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, checkpoints.load_params(out), params)
  with pytest.raises(convert.ConversionError, match=r"give its CLIP vision tower's .*--vision"):
    convert.convert_llava(llava_dir)


@pytest.mark.parametrize("change, message", [
    ({"mm_vision_select_layer": [-2, -1]}, r"mm_vision_select_layer=\[-2, -1\]"),
    ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature='cls'"),
    ({"mm_projector_type": "identity"}, "mm_projector_type='identity'"),
    ({"mm_hidden_size": 48}, r"mm_hidden_size=48 .*supported: 32"),
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio='anyres'"),
    ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type='spatial_unpad'"),
    ({"hidden_act": "tanh"}, "hidden_act='tanh'"),
    ({"some_new_setting": 3}, "some_new_setting"),
])
def test_original_llava_settings_it_cannot_compute_are_refused_by_name(change, message,
                                                                       tmp_path):
  llava_dir, clip_dir, *_ = _original(tmp_path, "mlp2x_gelu", "patch", False)
  hf = json.loads((llava_dir / "config.json").read_text())
  vision, _ = llava.clip_vision(clip_dir)
  assert llava.original_config(hf, vision, None)[0].image_token_id == VOCAB
  with pytest.raises(convert.ConversionError, match=message):
    llava.original_config(hf | change, vision, None)


def test_original_llava_refuses_a_projector_other_than_its_config_says(tmp_path):
  llava_dir, clip_dir, *_ = _original(tmp_path, "linear", "patch", False)
  config = json.loads((llava_dir / "config.json").read_text())
  config["mm_projector_type"] = "mlp2x_gelu"
  (llava_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(convert.ConversionError,
                     match=r"missing parameters \(4\).*mm_projector_type='mlp2x_gelu'"):
    convert.convert_llava(llava_dir, vision=clip_dir)


@pytest.mark.parametrize("unfreeze", [True, False])
def test_a_vision_tower_saved_in_the_checkpoint_is_used_where_llavas_loader_keeps_it(
    unfreeze, tmp_path):
  """A run that trained the tower saves it as `model.vision_tower.vision_tower.*`: LLaVA's
  loader keeps it with `unfreeze_mm_vision_tower`, and otherwise reloads
  `mm_vision_tower`'s weights over it."""
  from safetensors.numpy import load_file, save_file
  llava_dir, clip_dir, *_ = _original(tmp_path, "linear", "patch", False)
  given = load_file(str(clip_dir / "model.safetensors"))
  tuned = {f"model.vision_tower.vision_tower.{k}": v + 0.5 for k, v in given.items()}
  state = load_file(str(llava_dir / "model.safetensors")) | tuned
  save_file(state, str(llava_dir / "model.safetensors"))
  config = json.loads((llava_dir / "config.json").read_text())
  (llava_dir / "config.json").write_text(json.dumps(config | {
      "unfreeze_mm_vision_tower": unfreeze}))
  _, params = convert.convert_llava(llava_dir, vision=clip_dir)
  key = next(k for k in given if k.endswith("embeddings.position_embedding.weight"))
  expected = tuned[f"model.vision_tower.vision_tower.{key}"] if unfreeze else given[key]
  np.testing.assert_array_equal(params["vision"]["positions"], expected)
