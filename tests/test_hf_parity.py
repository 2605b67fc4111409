"""Converted Hugging Face language models give transformers' logits (float32, max abs
difference below 1e-4) on batched, right-padded rows, and the same greedy tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

from mmjax import checkpoints, convert  # noqa: E402
from mmjax.layers import RopeScaling  # noqa: E402
from mmjax.models.lm import LanguageModel, generate  # noqa: E402

VOCAB = 96


def _gpt2():
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=40))


def _opt():
  return transformers.OPTForCausalLM(transformers.OPTConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
      num_attention_heads=4, max_position_embeddings=40, word_embed_proj_dim=32,
      pad_token_id=0))


def _llama(tie=False, **config):
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
      **dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
             rope_theta=500.0, tie_word_embeddings=tie), **config}))


def _mpt(d_model=32, n_heads=4):
  return transformers.MptForCausalLM(transformers.MptConfig(
      vocab_size=VOCAB, d_model=d_model, n_heads=n_heads, n_layers=2, max_seq_len=40))


MODELS = {"gpt2": _gpt2, "opt": _opt, "llama": _llama, "llama_tied": lambda: _llama(tie=True),
          "mpt": _mpt, "mpt_6_heads": lambda: _mpt(d_model=48, n_heads=6)}


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


# With head_dim 16 and theta 500 the wavelengths are 6.3, 13.7, 29.7, 64.6, ... positions,
# so llama3's bands for an original context of 48 (kept below 48 / 4, divided above 48 / 1)
# all hold some frequencies; the test rows run to position 79.
SCALED_ROPE = {
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=48)}


@pytest.mark.parametrize("kind", sorted(SCALED_ROPE))
def test_converted_scaled_rope_logits_match_transformers(kind, tmp_path):
  from mmjax.layers import rope_frequencies
  model = _saved(tmp_path, lambda: _llama(
      head_dim=16, max_position_embeddings=128,
      rope_parameters=dict(rope_theta=500.0, **SCALED_ROPE[kind])))
  cfg, params = convert.convert_lm(tmp_path)
  assert cfg.rope_scaling.kind == kind
  frequencies = np.asarray(rope_frequencies(16, cfg.rope_theta, cfg.rope_scaling))
  np.testing.assert_allclose(frequencies, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
  assert not np.allclose(frequencies, rope_frequencies(16, cfg.rope_theta), rtol=1e-3)

  rng = np.random.default_rng(0)
  valid = np.arange(80)[None] < np.array([[80], [66]])
  tokens = np.where(valid, rng.integers(3, VOCAB, size=(2, 80)), 0)
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens),
                     attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()
  logits = LanguageModel(cfg).apply({"params": params}, jnp.asarray(tokens),
                                    token_mask=jnp.asarray(valid))
  diff = np.abs(np.asarray(logits) - expected)[valid]
  assert diff.max() < 1e-4, diff.max()


def test_rope_settings_are_read_from_old_and_new_configs():
  new = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
         "max_position_embeddings": 131072}
  old = {"rope_theta": 5e5, "max_position_embeddings": 131072,
         "rope_scaling": {k: v for k, v in new["rope_parameters"].items() if k != "rope_theta"}}
  assert convert.rope_settings(new) == convert.rope_settings(old) == (5e5, RopeScaling(
      "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192))
  assert convert.rope_settings({"rope_theta": 1e4, "rope_scaling": {
      "type": "linear", "factor": 2.0}}) == (1e4, RopeScaling("linear", factor=2.0))
  assert convert.rope_settings({"rope_theta": 1e4}) == (1e4, None)
  with pytest.raises(convert.ConversionError, match=r"'yarn'.*\('linear', 'llama3'\)"):
    convert.rope_settings({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("name", ["gpt2", "llama", "mpt"])
def test_greedy_generation_gives_transformers_tokens(name, tmp_path):
  model = _saved(tmp_path, MODELS[name], seed=1)
  prompt = np.array([[5, 17, 33, 2, 9]])
  with torch.no_grad():
    expected = model.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8, pad_token_id=0)[0, 5:].numpy()
  cfg, params = convert.convert_lm(tmp_path)
  out = generate(LanguageModel(cfg), params, jnp.asarray(prompt), jnp.array([5]),
                 jax.random.key(0), max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(out.tokens[0]), expected)


def test_mpt_batched_greedy_generation_gives_transformers_tokens(tmp_path):
  """Prompts of different lengths decode together: ALiBi over each row's own cache slots.
  transformers takes them left-padded (its ALiBi then spans the padding, which is masked
  and shifts every real distance alike), mmjax right-padded with their lengths."""
  model = _saved(tmp_path, lambda: _mpt(d_model=48, n_heads=6), seed=2)
  prompts = [[5, 17, 33, 2, 9, 41, 8], [12, 70, 3]]
  lengths, t, new = np.array([7, 3]), 7, 8
  left = np.array([[0] * (t - len(p)) + p for p in prompts])
  right = np.array([p + [0] * (t - len(p)) for p in prompts])
  with torch.no_grad():
    expected = model.generate(torch.tensor(left),
                              attention_mask=torch.tensor((left != 0).astype(np.int64)),
                              max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0)[:, t:].numpy()
  cfg, params = convert.convert_lm(tmp_path)
  out = generate(LanguageModel(cfg), params, jnp.asarray(right), jnp.asarray(lengths),
                 jax.random.key(0), max_new_tokens=new)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def test_mpt_settings_that_would_convert_wrongly_are_rejected():
  hf = transformers.MptConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2).to_dict()
  cfg = convert.lm_config(hf)
  assert (cfg.position, cfg.alibi_bias_max, cfg.use_bias, cfg.mlp_dim) == ("alibi", 8, False, 128)
  attn = hf["attn_config"]
  convert.lm_config(hf | {"attn_config": attn | {"softmax_scale": 8 ** -0.5}})  # the default
  for change, message in ((dict(no_bias=False), "no_bias=False"),
                          (dict(logit_scale=0.5), "logit_scale=0.5"),
                          (dict(attn_config=attn | {"alibi": False}), "attn_config.alibi=False"),
                          (dict(attn_config=attn | {"attn_type": "multiquery_attention"}),
                           "attn_config.attn_type='multiquery_attention'"),
                          (dict(attn_config=attn | {"prefix_lm": True}), "prefix_lm=True"),
                          (dict(attn_config=attn | {"qk_ln": True}), "attn_config.qk_ln=True"),
                          (dict(attn_config=attn | {"clip_qkv": 6.0}), "clip_qkv=6.0"),
                          (dict(attn_config=attn | {"softmax_scale": 0.1}),
                           "attn_config.softmax_scale=0.1")):
    with pytest.raises(convert.ConversionError, match=message):
      convert.lm_config(hf | change)


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
  image, text, scale, _ = TwoTowers(cfg).apply({"params": params}, images,
                                                jnp.asarray(tokens))
  np.testing.assert_allclose(image, out.image_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(text, out.text_embeds.numpy(), atol=1e-5)
  np.testing.assert_allclose(scale, model.logit_scale.exp().item(), rtol=1e-6)
  # The vision tower alone, as Flamingo reads it: patch tokens before ln_post.
  tokens_out = ViT(cfg.vision).apply({"params": params["image"]}, images)["tokens"]
  assert np.abs(np.asarray(tokens_out) - patches.numpy()).max() < 1e-4


@pytest.mark.parametrize("head, legacy_names", [("BertModel", False),
                                                ("BertForMaskedLM", True)])
def test_converted_bert_matches_transformers(head, legacy_names, tmp_path):
  """A BertModel, and a BertForMaskedLM (encoder under `bert.`, a `cls.*` head, no pooler)
  whose LayerNorms are renamed gamma/beta as in Google's original checkpoints."""
  from safetensors.numpy import load_file, save_file

  from mmjax.models.bert import Bert
  model = _saved(tmp_path, lambda: getattr(transformers, head)(transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=16, type_vocab_size=3)))
  encoder = model if head == "BertModel" else model.bert
  if legacy_names:
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({k.replace("LayerNorm.weight", "LayerNorm.gamma")
               .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()},
              str(tmp_path / "model.safetensors"))
  rng = np.random.default_rng(0)
  valid = np.arange(12)[None] < np.array([[12], [7], [3]])
  tokens = np.where(valid, rng.integers(3, VOCAB, size=(3, 12)), 0)
  types = np.where(valid, rng.integers(0, 3, size=(3, 12)), 0)
  with torch.no_grad():
    expected = encoder(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types),
                       attention_mask=torch.tensor(valid.astype(np.int64)))

  cfg, params = convert.convert_bert(tmp_path)
  assert cfg.pooler == (head == "BertModel")
  out = Bert(cfg).apply({"params": params}, jnp.asarray(tokens), token_types=jnp.asarray(types),
                        token_mask=jnp.asarray(valid))
  diff = np.abs(np.asarray(out["hidden"]) - expected.last_hidden_state.numpy())[valid]
  assert diff.max() < 1e-4, diff.max()
  if cfg.pooler:
    assert np.abs(np.asarray(out["pooled"]) - expected.pooler_output.numpy()).max() < 1e-4


def test_bert_settings_that_would_convert_wrongly_are_rejected():
  hf = transformers.BertConfig(vocab_size=VOCAB).to_dict()  # BERT-base's shape
  assert convert.bert_config(hf).activation == "gelu"
  for change, message in ((dict(position_embedding_type="relative_key"), "relative_key"),
                          (dict(is_decoder=True), "is_decoder"),
                          (dict(add_cross_attention=True), "add_cross_attention"),
                          (dict(hidden_act="mish"), "'mish'")):
    with pytest.raises(convert.ConversionError, match=message):
      convert.bert_config(hf | change)


# Untied output layers and OPT's norm-only biases go back where they came from too.
EXPORTED = {**{name: MODELS[name] for name in ("gpt2", "opt", "llama", "mpt")},
            "gpt2_untied": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=40,
                tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True)),
            "opt_no_bias_untied": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                num_attention_heads=4, max_position_embeddings=40, word_embed_proj_dim=32,
                pad_token_id=0, enable_bias=False, tie_word_embeddings=False))}


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_fine_tuned_parameters_export_back_to_transformers(name, batch, tmp_path):
  _saved(tmp_path / "hf", EXPORTED[name])
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


@pytest.mark.parametrize("settings, special_tokens_map", [
    (dict(legacy=False, bos_token="<s>", eos_token="</s>"), {}),
    (dict(legacy=False, add_prefix_space=False, bos_token="<s>", eos_token="</s>"), {}),
    (dict(legacy=True), dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
])
def test_sentencepiece_only_llama_tokenizers_get_the_media_tokens_as_open_flamingo_adds_them(
    tmp_path, settings, special_tokens_map):
  import io
  import json

  import sentencepiece as spm

  from mmjax.data.tokenizer import HFTokenizer
  model = io.BytesIO()
  # LLaMA's kind of model: BPE with byte fallback, a "▁" prefix, whitespace kept, no pad.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["a red dax is here.", "this is a blue wug.", "it is  a cat."] * 20),
      model_writer=model, vocab_size=300, model_type="bpe", character_coverage=1.0,
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"tokenizer_class": "LlamaTokenizer", **settings}))
  if special_tokens_map:  # older directories name their special tokens only there
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
  # OpenFlamingo's factory:
  reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
  reference.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
  if reference.pad_token is None:
    reference.add_special_tokens({"pad_token": "<PAD>"})

  ours = HFTokenizer(tmp_path)
  for text in ["<image>this is a red dax.<|endofchunk|><image>it is a",
               " a  blue wug <image> é\n<s>it</s>x<unk>", "it is a cat.<|endofchunk|>", ""]:
    ids = reference(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == ids, text
    assert ours.decode(ids) == reference.decode(ids), text
  assert ours.vocab_size == len(reference)
  assert (ours.media_id, ours.endofchunk_id, ours.pad_id, ours.bos_id, ours.eos_id) == tuple(
      reference.convert_tokens_to_ids(["<image>", "<|endofchunk|>", "<PAD>", "<s>", "</s>"]))
  assert [ours.word_id("is")] == reference.encode(" is", add_special_tokens=False)


MEDIA, ENDOFCHUNK = VOCAB, VOCAB + 1  # IDEFICS's two additional (decoupled) tokens


def _idefics(tmp_path, qk_norms=False, seed=0, alpha_type="vector", interval=2):
  """`(transformers model, FlamingoConfig, params)`: a random IDEFICS, saved, reloaded and
  converted. A whole Flamingo-family model: CLIP-style ViT (class token kept), perceiver,
  gated blocks before every `interval`-th LLaMA layer, decoupled extra vocabulary,
  optional q/k norms, vector or scalar gates."""
  _saved(tmp_path, lambda: transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(
      vocab_size=VOCAB, additional_vocab_size=2, hidden_size=32, intermediate_size=48,
      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=40,
      cross_layer_interval=interval, use_resampler=True, alpha_type=alpha_type,
      qk_layer_norms=qk_norms,
      vision_config=dict(embed_dim=16, image_size=16, patch_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=24),
      perceiver_config=dict(resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
                            resampler_n_latents=3, qk_layer_norms_perceiver=qk_norms))),
         seed=seed)
  model = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path).eval()
  cfg, params = convert.convert_idefics(tmp_path, media_token_id=MEDIA,
                                        endofchunk_token_id=ENDOFCHUNK)
  return model, cfg, params


def _image_attention_mask(tokens: np.ndarray, num_images: np.ndarray,
                          num_media: int = 2) -> torch.Tensor:
  """transformers' `image_attention_mask` `"b t T"`: each token sees its latest image."""
  from mmjax.models.xattn import media_attention_mask, media_index
  images_valid = jnp.arange(num_media)[None] < jnp.asarray(num_images)[:, None]
  mask = media_attention_mask(media_index(jnp.asarray(tokens), MEDIA), images_valid)
  return torch.tensor(np.asarray(mask).astype(np.int64))


@pytest.mark.parametrize("qk_norms, alpha_type, interval", [(False, "vector", 2),
                                                             (True, "float", 1)])
def test_converted_idefics_logits_match_transformers(tmp_path, qk_norms, alpha_type, interval):
  """Several images per row, text before the first image, a padding image, right
  padding."""
  from mmjax.models.flamingo import Flamingo
  model, cfg, params = _idefics(tmp_path, qk_norms, alpha_type=alpha_type, interval=interval)
  assert (cfg.xattn.every, cfg.xattn.gate) == (interval, {"vector": "vector",
                                                          "float": "scalar"}[alpha_type])
  media, endofchunk = MEDIA, ENDOFCHUNK
  tokens = np.array([[5, 6, media, 7, 8, endofchunk, media, 9, 10, 11],
                     [media, 13, 14, endofchunk, 15, 16, 0, 0, 0, 0]])
  valid = np.array([[True] * 10, [True] * 6 + [False] * 4])
  num_images = np.array([2, 1])  # row 1's second image is padding
  pixels = np.random.default_rng(0).normal(size=(2, 2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens),
                     attention_mask=torch.tensor(valid.astype(np.int64)),
                     pixel_values=torch.tensor(pixels),
                     image_attention_mask=_image_attention_mask(tokens, num_images)).logits.numpy()

  images = jnp.asarray(pixels.transpose(0, 1, 3, 4, 2))[:, :, None]  # b T F h w c
  run = lambda images: np.asarray(Flamingo(cfg).apply(
      {"params": params}, jnp.asarray(tokens), images, jnp.asarray(num_images),
      token_mask=jnp.asarray(valid)))
  logits = run(images)
  assert np.abs(logits - expected)[valid].max() < 1e-4
  # ...and the images matter: other pixels move the logits after the first image only.
  moved = np.abs(run(images[:, ::-1]) - logits).max(axis=-1)
  assert moved[0, :2].max() == 0 and moved[0, 2:].min() > 1e-3


def test_idefics_greedy_generation_gives_transformers_tokens(tmp_path):
  """Cached generation (images encoded once, their keys and values cached) for a batch of
  prompts of different lengths: two images with text before the first, and one image."""
  from mmjax.models.flamingo import Flamingo, generate
  model, cfg, params = _idefics(tmp_path, seed=2)
  prompts = [[5, 6, MEDIA, 7, 8, ENDOFCHUNK, MEDIA, 9, 10], [11, MEDIA, 13, 14]]
  lengths = np.array([len(p) for p in prompts])
  num_images = np.array([2, 1])  # row 1's second image is padding
  pixels = np.random.default_rng(1).normal(size=(2, 2, 3, 16, 16)).astype(np.float32)
  t, new = lengths.max(), 10
  # transformers batches left-padded prompts; mmjax right-padded ones with their lengths.
  left = np.array([[0] * (t - len(p)) + p for p in prompts])
  right = np.array([p + [0] * (t - len(p)) for p in prompts])
  with torch.no_grad():
    out = model.generate(
        input_ids=torch.tensor(left), attention_mask=torch.tensor((left != 0).astype(np.int64)),
        pixel_values=torch.tensor(pixels),
        image_attention_mask=_image_attention_mask(left, num_images), max_new_tokens=new,
        do_sample=False, eos_token_id=ENDOFCHUNK, pad_token_id=0)[:, t:].numpy()
  expected = np.pad(out, ((0, 0), (0, new - out.shape[1])))  # rows stop early: pad with 0
  # After a generated <image> (no pixels behind it) transformers keeps showing the latest
  # prompt image, while mmjax shows none, as it does for any <image> without an image; the
  # rows compared here generate none.
  assert MEDIA not in expected

  generated = generate(
      Flamingo(cfg), params, jnp.asarray(right), jnp.asarray(lengths), jax.random.key(0),
      images=jnp.asarray(pixels.transpose(0, 1, 3, 4, 2))[:, :, None],
      num_images=jnp.asarray(num_images), max_new_tokens=new, stop_ids=(ENDOFCHUNK,), pad_id=0)
  np.testing.assert_array_equal(np.asarray(generated.tokens), expected)
