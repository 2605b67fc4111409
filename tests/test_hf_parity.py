"""Converted Hugging Face language models give transformers' logits (float32, max abs
difference below 1e-4) on batched, right-padded rows, and the same greedy tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

from mmjax import checkpoints, convert  # noqa: E402
from mmjax.models.lm import LanguageModel  # noqa: E402

VOCAB = 96


def _gpt2():
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=40))


def _opt():
  return transformers.OPTForCausalLM(transformers.OPTConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
      num_attention_heads=4, max_position_embeddings=40, word_embed_proj_dim=32,
      pad_token_id=0))


def _llama(tie=False):
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
      rope_theta=500.0, tie_word_embeddings=tie))


MODELS = {"gpt2": _gpt2, "opt": _opt, "llama": _llama, "llama_tied": lambda: _llama(tie=True)}


def _saved(tmp_path, make, seed=0):
  """A random model (weights far from their tiny init, so that every term matters),
  saved by save_pretrained (safetensors)."""
  torch.manual_seed(seed)
  model = make().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  model.save_pretrained(tmp_path)
  return model


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, VOCAB, size=(3, 12))
  lengths = np.array([12, 7, 3])  # right-padded rows of different lengths
  valid = np.arange(12)[None] < lengths[:, None]
  return np.where(valid, tokens, 0), valid


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_lm_logits_match_transformers(name, batch, tmp_path):
  model = _saved(tmp_path, MODELS[name])
  tokens, valid = batch
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens),
                     attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()
  cfg, params = convert.convert_lm(tmp_path)
  logits = LanguageModel(cfg).apply({"params": params}, jnp.asarray(tokens),
                                    token_mask=jnp.asarray(valid))
  diff = np.abs(np.asarray(logits) - expected)[valid]
  assert diff.max() < 1e-4, diff.max()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generation_gives_transformers_tokens(name, tmp_path):
  from mmjax import decoding
  model = _saved(tmp_path, MODELS[name], seed=1)
  prompt = np.array([[5, 17, 33, 2, 9]])
  with torch.no_grad():
    expected = model.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8, pad_token_id=0)[0, 5:].numpy()
  cfg, params = convert.convert_lm(tmp_path)
  lm = LanguageModel(cfg)

  def step(cache, tokens, positions):
    logits, state = lm.apply({"params": params, "cache": cache}, tokens, positions=positions,
                             decode=True, mutable=["cache"])
    return logits, state["cache"]

  cache = decoding.init_cache(lm.apply, {"params": params}, jnp.zeros((1, 13), jnp.int32),
                              positions=jnp.arange(13)[None], decode=True, mutable=["cache"])
  out = decoding.generate(step, cache, jnp.asarray(prompt), jnp.array([5]), jax.random.key(0),
                          max_new_tokens=8, stop_ids=(), pad_id=0)
  np.testing.assert_array_equal(np.asarray(out.tokens[0]), expected)


def test_the_converted_checkpoint_loads_as_a_backbone(tmp_path):
  _saved(tmp_path / "hf", _llama)
  cfg, params = convert.convert_lm(tmp_path / "hf")
  convert.save(tmp_path / "out", "lm", cfg, params)
  loaded = checkpoints.load_params(tmp_path / "out")
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_a_wrong_checkpoint_names_every_offending_parameter(tmp_path):
  from safetensors.numpy import load_file, save_file
  _saved(tmp_path, _llama)
  state = load_file(str(tmp_path / "model.safetensors"))
  state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:40]
  del state["model.norm.weight"]
  state["model.extra.weight"] = np.zeros(3, np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(convert.ConversionError) as error:
    convert.convert_lm(tmp_path)
  message = str(error.value)
  assert "missing parameters (1): ['model.norm.weight']" in message
  assert ("model.layers.1.mlp.up_proj.weight: (40, 32) in the checkpoint, (48, 32) from the "
          "config") in message
  assert "unexpected parameters (1): ['model.extra.weight']" in message
  with pytest.raises(convert.ConversionError, match="not a supported LM"):
    convert.lm_config({"model_type": "bert"})


def test_converted_clip_features_match_transformers(tmp_path):
  from mmjax.models.two_towers import TwoTowers
  from mmjax.models.vit import ViT
  _saved(tmp_path, lambda: transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       pad_token_id=0, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4),
      projection_dim=16)))
  model = transformers.CLIPModel.from_pretrained(tmp_path).eval()
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)  # normalised, "b c h w"
  lengths = np.array([9, 4])
  tokens = rng.integers(3, VOCAB - 2, size=(2, 12))
  tokens[np.arange(2), lengths - 1] = VOCAB - 1  # EOS closes each text, padding follows
  valid = np.arange(12)[None] < lengths[:, None]
  tokens = np.where(valid, tokens, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(int)),
                pixel_values=torch.tensor(pixels))
    patches = model.vision_model(pixel_values=torch.tensor(pixels)).last_hidden_state[:, 1:]

  cfg, params = convert.convert_clip(tmp_path)
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  image, text, scale = TwoTowers(cfg).apply({"params": params}, images, jnp.asarray(tokens))
  np.testing.assert_allclose(image, out.image_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(text, out.text_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(scale, model.logit_scale.exp().item(), rtol=1e-6)
  # The vision tower alone, as Flamingo reads it: patch tokens before ln_post.
  tokens_out = ViT(cfg.vision).apply({"params": params["image"]}, images)["tokens"]
  assert np.abs(np.asarray(tokens_out) - patches.numpy()).max() < 1e-4


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama"])
def test_fine_tuned_parameters_export_back_to_transformers(name, batch, tmp_path):
  _saved(tmp_path / "hf", MODELS[name])
  cfg, params = convert.convert_lm(tmp_path / "hf")
  # As if fine-tuned: every parameter moves.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(1)
  tuned = jax.tree_util.tree_unflatten(
      treedef, [x + 0.05 * rng.normal(size=x.shape).astype(np.float32) for x in leaves])
  hf_config, state = convert.export_lm(tuned, like=tmp_path / "hf")
  convert.save_hf(tmp_path / "exported", hf_config, state)
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
  tokens, valid = batch
  with torch.no_grad():
    expected = exported(input_ids=torch.tensor(tokens),
                        attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()
  logits = LanguageModel(cfg).apply({"params": tuned}, jnp.asarray(tokens),
                                    token_mask=jnp.asarray(valid))
  assert np.abs(np.asarray(logits) - expected)[valid].max() < 1e-4


def test_hf_tokenizers_get_flamingo_media_tokens_as_open_flamingo_adds_them(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from mmjax.data.tokenizer import HFTokenizer
  fast = Tokenizer(models.BPE(unk_token="<unk>"))
  fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  fast.decoder = decoders.ByteLevel()
  fast.train_from_iterator(["a red dax is here.", "this is a blue wug.", "it is a cat."] * 20,
                           trainers.BpeTrainer(vocab_size=120,
                                               special_tokens=["<unk>", "<s>", "</s>"]))
  transformers.PreTrainedTokenizerFast(tokenizer_object=fast, bos_token="<s>",
                                       eos_token="</s>", unk_token="<unk>"
                                       ).save_pretrained(tmp_path)
  # OpenFlamingo's factory:
  reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
  reference.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
  if reference.pad_token is None:
    reference.add_special_tokens({"pad_token": "<PAD>"})

  ours = HFTokenizer(tmp_path)
  text = "<image>this is a red dax.<|endofchunk|><image>it is a"
  assert ours.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
  assert ours.vocab_size == len(reference)
  assert (ours.media_id, ours.endofchunk_id, ours.pad_id) == tuple(
      reference.convert_tokens_to_ids(["<image>", "<|endofchunk|>", "<PAD>"]))
  assert ours.encode("a", bos=True, eos=True)[::len(ours.encode("a")) + 1] == [
      reference.bos_token_id, reference.eos_token_id]
  assert ours.decode(ours.encode(text) + [ours.pad_id]) == text == reference.decode(
      reference(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("qk_norms", [False, True])
def test_converted_idefics_logits_match_transformers(tmp_path, qk_norms):
  """A whole Flamingo-family model: CLIP-style ViT (class token kept), perceiver, gated
  blocks before every 2nd LLaMA layer, decoupled extra vocabulary, optional q/k norms;
  several images per row, text before the first image, a padding image, right padding."""
  from mmjax.models.flamingo import Flamingo
  from mmjax.models.xattn import media_attention_mask, media_index
  media, endofchunk = VOCAB, VOCAB + 1  # the two additional (decoupled) tokens
  _saved(tmp_path, lambda: transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(
      vocab_size=VOCAB, additional_vocab_size=2, hidden_size=32, intermediate_size=48,
      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=40,
      cross_layer_interval=2, use_resampler=True, alpha_type="vector",
      qk_layer_norms=qk_norms,
      vision_config=dict(embed_dim=16, image_size=16, patch_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=24),
      perceiver_config=dict(resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
                            resampler_n_latents=3, qk_layer_norms_perceiver=qk_norms))))
  model = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path).eval()
  tokens = np.array([[5, 6, media, 7, 8, endofchunk, media, 9, 10, 11],
                     [media, 13, 14, endofchunk, 15, 16, 0, 0, 0, 0]])
  valid = np.array([[True] * 10, [True] * 6 + [False] * 4])
  num_images = np.array([2, 1])  # row 1's second image is padding
  pixels = np.random.default_rng(0).normal(size=(2, 2, 3, 16, 16)).astype(np.float32)
  image_mask = np.asarray(media_attention_mask(
      media_index(jnp.asarray(tokens), media), jnp.arange(2)[None] < jnp.asarray(num_images)[:, None]))
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens),
                     attention_mask=torch.tensor(valid.astype(np.int64)),
                     pixel_values=torch.tensor(pixels),
                     image_attention_mask=torch.tensor(image_mask.astype(np.int64))).logits.numpy()

  cfg, params = convert.convert_idefics(tmp_path, media_token_id=media,
                                        endofchunk_token_id=endofchunk)
  images = jnp.asarray(pixels.transpose(0, 1, 3, 4, 2))[:, :, None]  # b T F h w c
  run = lambda images: np.asarray(Flamingo(cfg).apply(
      {"params": params}, jnp.asarray(tokens), images, jnp.asarray(num_images),
      token_mask=jnp.asarray(valid)))
  logits = run(images)
  assert np.abs(logits - expected)[valid].max() < 1e-4
  # ...and the images matter: other pixels move the logits after the first image only.
  moved = np.abs(run(images[:, ::-1]) - logits).max(axis=-1)
  assert moved[0, :2].max() == 0 and moved[0, 2:].min() > 1e-3
