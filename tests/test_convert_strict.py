"""Conversion cannot be silently wrong: on configs that vary every setting that changes
the function, each converter gives exactly the tree the mmjax model's `init` builds and
transformers' outputs (float32, within 1e-4); each setting it cannot compute, each tensor
it does not consume and each config field it does not know is refused by name."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

from mmjax import convert  # noqa: E402
from mmjax.convert import common  # noqa: E402
from mmjax.models.bert import Bert  # noqa: E402
from mmjax.models.lm import LanguageModel  # noqa: E402
from mmjax.models.two_towers import TwoTowers  # noqa: E402

VOCAB = 96


def _save(path, model, seed=0, weights="safetensors"):
  """Weights far from their tiny init (so that every term matters), saved in a native
  format: save_pretrained's safetensors, or a torch.save'd state dict (pytorch_model.bin,
  which keeps a tied output layer beside its embedding)."""
  torch.manual_seed(seed)
  model.eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  model.save_pretrained(path)
  if weights == "bin":
    for f in path.glob("*.safetensors"):
      f.unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
  return model


def _tree(tree) -> dict:
  """`{path: (shape, dtype)}` of a params tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): (tuple(np.shape(v)), jnp.dtype(v.dtype)) for k, v in flat}


def _init_tree(module, *args) -> dict:
  import flax.linen as nn
  return _tree(nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
                        ["params"]))


def _batch():
  rng = np.random.default_rng(0)
  valid = np.arange(12)[None] < np.array([[12], [7], [3]])  # right-padded rows
  return np.where(valid, rng.integers(3, VOCAB, size=(3, 12)), 0), valid


# ---------------------------------------------------------------------------------------
# Language models: every setting that changes the function, each away from its default in
# some case (tied/untied, biases, activations, attention scales, GQA, head_dim, RoPE
# scaling, ALiBi slopes, sliding window, ...), in both weight formats.
# ---------------------------------------------------------------------------------------
def _gpt2(**c):
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{
      **dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=40), **c}))


def _opt(**c):
  return transformers.OPTForCausalLM(transformers.OPTConfig(**{
      **dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
             num_attention_heads=4, max_position_embeddings=40, word_embed_proj_dim=32,
             pad_token_id=0), **c}))


def _llama(cls="Llama", **c):
  return getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**{
      **dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
             tie_word_embeddings=False), **c}))


def _mpt(**c):
  return transformers.MptForCausalLM(transformers.MptConfig(**{
      **dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=40), **c}))


LM_CASES = {
    "gpt2-untied-pytorch_tanh-unscaled": (lambda: _gpt2(
        tie_word_embeddings=False, activation_function="gelu_pytorch_tanh",
        scale_attn_weights=False), "safetensors"),
    "gpt2-layer_scaled-relu-inner": (lambda: _gpt2(
        scale_attn_by_inverse_layer_idx=True, activation_function="relu", n_inner=40,
        layer_norm_epsilon=1e-3, reorder_and_upcast_attn=True), "safetensors"),
    "gpt2-both_scales-gelu-tied_bin": (lambda: _gpt2(
        scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True,
        activation_function="gelu"), "bin"),
    "opt-no_bias": (lambda: _opt(enable_bias=False), "safetensors"),
    "opt-untied-gelu": (lambda: _opt(tie_word_embeddings=False, activation_function="gelu"),
                        "safetensors"),
    "opt-no_bias-untied-bin": (lambda: _opt(enable_bias=False, tie_word_embeddings=False),
                               "bin"),
    "llama-mqa-head_dim-gelu": (lambda: _llama(num_key_value_heads=1, head_dim=16,
                                               hidden_act="gelu", rms_norm_eps=1e-3,
                                               pretraining_tp=2),
                                "safetensors"),
    "llama-mha-tied-linear_rope": (lambda: _llama(
        num_key_value_heads=4, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="linear", factor=2.0, rope_theta=300.0)), "bin"),
    "mistral-window_covers_positions": (lambda: _llama(
        "Mistral", sliding_window=40, rope_parameters=dict(rope_type="default",
                                                           rope_theta=700.0)), "safetensors"),
    # (transformers' MPT ignores expansion_ratio and alibi_bias_max, which mosaicml's own
    # code, and mmjax, honour: test_mpt_fields_it_does_not_know_are_refused_by_name.)
    "mistral-window_4": (lambda: _llama("Mistral", sliding_window=4), "safetensors"),
    "mpt-6_heads-untied": (lambda: _mpt(d_model=48, n_heads=6, tie_word_embeddings=False,
                                        layer_norm_epsilon=1e-3), "safetensors"),
    "mpt-tied-bin": (lambda: _mpt(), "bin"),
}


@pytest.mark.parametrize("case", sorted(LM_CASES))
def test_lm_conversion_is_init_tree_and_transformers_logits(case, tmp_path):
  make, weights = LM_CASES[case]
  model = _save(tmp_path, make(), weights=weights)
  tokens, valid = _batch()
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens),
                     attention_mask=torch.tensor(valid.astype(np.int64))).logits.numpy()
  cfg, params = convert.convert_lm(tmp_path)
  lm = LanguageModel(cfg)
  assert _tree(params) == _init_tree(lm, jnp.zeros((1, 4), jnp.int32))
  logits = lm.apply({"params": params}, jnp.asarray(tokens), token_mask=jnp.asarray(valid))
  diff = np.abs(np.asarray(logits) - expected)[valid]
  assert diff.max() < 1e-4, diff.max()


def test_the_defects_that_were_silent_change_the_logits():
  """The settings these cases vary move transformers' logits: ignoring one would fail."""
  tokens, valid = _batch()

  def logits(model):
    torch.manual_seed(0)
    with torch.no_grad():
      for p in model.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
      return model(input_ids=torch.tensor(tokens)).logits.numpy()

  for default, changed in (
      (lambda: _gpt2(), lambda: _gpt2(scale_attn_weights=False)),
      (lambda: _gpt2(), lambda: _gpt2(scale_attn_by_inverse_layer_idx=True)),
      (lambda: _opt(), lambda: _opt(enable_bias=False))):
    assert np.abs(logits(default().eval()) - logits(changed().eval())).max() > 1e-3


@pytest.mark.parametrize("change, message", [
    (dict(activation_function="mish"), r"activation_function='mish'.*'gelu_pytorch_tanh'"),
    (dict(add_cross_attention=True), "add_cross_attention=True"),
])
def test_gpt2_settings_it_cannot_compute_are_refused_by_name(change, message):
  hf = transformers.GPT2Config(vocab_size=VOCAB).to_dict()
  with pytest.raises(convert.ConversionError, match=message):
    convert.lm_config(hf | change)


@pytest.mark.parametrize("change, message", [
    (dict(layer_norm_elementwise_affine=False), "layer_norm_elementwise_affine=False"),
    (dict(do_layer_norm_before=False), "do_layer_norm_before=False"),
    (dict(word_embed_proj_dim=16), "word_embed_proj_dim=16"),
    (dict(_remove_final_layer_norm=True), "_remove_final_layer_norm=True"),
    (dict(activation_function="silu_x"), "activation_function='silu_x'"),
])
def test_opt_settings_it_cannot_compute_are_refused_by_name(change, message):
  hf = transformers.OPTConfig(vocab_size=VOCAB).to_dict()
  with pytest.raises(convert.ConversionError, match=message):
    convert.lm_config(hf | change)


def test_mistral_sliding_window_is_honoured_where_it_hides_positions():
  hf = transformers.MistralConfig(vocab_size=VOCAB, max_position_embeddings=4096,
                                  sliding_window=4096).to_dict()
  assert convert.lm_config(hf).sliding_window is None  # it hides nothing
  assert convert.lm_config(hf | dict(sliding_window=None)).sliding_window is None
  assert convert.lm_config(hf | dict(sliding_window=1024)).sliding_window == 1024


def test_mistral_sliding_window_greedy_generation_gives_transformers_tokens(tmp_path):
  """Decoding with the KV cache: each new token sees the last 4 positions only."""
  from mmjax.models.lm import generate
  model = _save(tmp_path, _llama("Mistral", sliding_window=4), seed=1)
  prompt = np.array([[5, 17, 33, 2, 9, 41, 8]])
  with torch.no_grad():
    expected = model.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8, pad_token_id=0)[0, 7:].numpy()
  cfg, params = convert.convert_lm(tmp_path)
  assert cfg.sliding_window == 4
  out = generate(LanguageModel(cfg), params, jnp.asarray(prompt), jnp.array([7]),
                 jax.random.key(0), max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(out.tokens[0]), expected)


@pytest.mark.parametrize("change, message", [
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="tanh"), "hidden_act='tanh'"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4,
                               partial_rotary_factor=0.5)), "partial_rotary_factor=0.5"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4,
                               beta_fast=3)), r"rope_parameters\.beta_fast"),
    (dict(some_new_setting=3), "some_new_setting"),
])
def test_llama_settings_and_fields_it_does_not_know_are_refused_by_name(change, message):
  hf = transformers.LlamaConfig(vocab_size=VOCAB).to_dict()
  with pytest.raises(convert.ConversionError, match=message):
    convert.lm_config(hf | change)


def test_mpt_fields_it_does_not_know_are_refused_by_name():
  hf = transformers.MptConfig(vocab_size=VOCAB, d_model=32).to_dict()
  cfg = convert.lm_config(hf | dict(expansion_ratio=2, attn_config=hf["attn_config"] | dict(
      alibi_bias_max=4)))
  assert (cfg.mlp_dim, cfg.alibi_bias_max) == (64, 4)
  for change, message in ((dict(norm_type="rmsnorm"), "norm_type='rmsnorm'"),
                          (dict(ffn_config={"ffn_type": "te_ln_mlp"}), "'ffn_config'"),
                          (dict(attn_config=hf["attn_config"] | {"rope": True}),
                           r"attn_config\.rope")):
    with pytest.raises(convert.ConversionError, match=message):
      convert.lm_config(hf | change)


def _blip2(**c):
  """A tiny Blip2ForConditionalGeneration (OPT); without q and v biases (`qkv_bias=False`),
  so that random weights keep the key bias EVA lacks at zero."""
  return transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**{
      **dict(vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=4, image_size=28, patch_size=14,
                                qkv_bias=False),
             qformer_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=48,
                                 max_position_embeddings=16),
             text_config=dict(model_type="opt", vocab_size=VOCAB, hidden_size=32,
                              num_hidden_layers=1, ffn_dim=48, num_attention_heads=4,
                              max_position_embeddings=40, word_embed_proj_dim=32),
             num_query_tokens=4, image_token_index=VOCAB - 1), **c}))


def _blip2_dict(**c) -> dict:
  return json.loads(_blip2(**c).config.to_json_string())


@pytest.mark.parametrize("change, message", [
    (lambda hf: hf | dict(some_new_setting=3), "some_new_setting"),
    (lambda hf: hf | dict(text_config=dict(model_type="bart", d_model=32)),
     r"text_config.model_type='bart' is not supported; supported: gpt2, opt, .*t5"),
    (lambda hf: hf | dict(text_config=hf["text_config"] | dict(model_type="t5")),
     "The BLIP-2 config has no 'text_config.d_model'"),
    (lambda hf: hf | dict(text_config=hf["text_config"] | dict(do_layer_norm_before=False)),
     "do_layer_norm_before=False"),
    (lambda hf: hf | dict(qformer_config=hf["qformer_config"] | dict(
        position_embedding_type="relative_key")), "position_embedding_type='relative_key'"),
    (lambda hf: hf | dict(qformer_config=hf["qformer_config"] | dict(encoder_hidden_size=48)),
     r"qformer_config.encoder_hidden_size=48 .*supported: 32"),
    (lambda hf: hf | dict(vision_config=hf["vision_config"] | dict(num_channels=1)),
     "vision_config.num_channels=1"),
    (lambda hf: hf | dict(vision_config=hf["vision_config"] | dict(hidden_act="gelu_10")),
     "vision_config.hidden_act='gelu_10'"),
])
def test_blip2_settings_and_fields_it_does_not_know_are_refused_by_name(change, message):
  hf = _blip2_dict()
  convert.blip2_config(hf, stage=2)
  with pytest.raises(convert.ConversionError, match=message):
    convert.blip2_config(change(hf), stage=2)


def test_a_blip2_retrieval_config_without_the_q_formers_text_input_is_refused():
  hf = _blip2_dict(qformer_config=dict(use_qformer_text_input=True))
  convert.blip2_config(hf, stage=1)
  hf["qformer_config"]["use_qformer_text_input"] = False
  with pytest.raises(convert.ConversionError, match="use_qformer_text_input=false"):
    convert.blip2_config(hf, stage=1)


# ---------------------------------------------------------------------------------------
# Tensors: every one consumed, or ignored on purpose.
# ---------------------------------------------------------------------------------------
def _add_tensor(path, name):
  from safetensors.numpy import load_file, save_file
  state = load_file(str(path / "model.safetensors"))
  state[name] = np.zeros((3,), np.float32)
  save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize("make, extra, conversion", [
    (lambda: _gpt2(), "transformer.h.0.attn.extra_scale", convert.convert_lm),
    (lambda: _opt(), "model.decoder.layers.0.extra.weight", convert.convert_lm),
    (lambda: _mpt(), "transformer.wpe.weight", convert.convert_lm),
    (lambda: _llama(), "model.layers.0.self_attn.q_norm.weight", convert.convert_lm),
    (lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=16)), "encoder.layer.0.extra.bias",
     convert.convert_bert),
    (lambda: _roberta(), "roberta.encoder.layer.0.extra.bias", convert.convert_bert),
    (lambda: _vit(), "encoder.layer.0.attention.attention.q_norm.weight",
     convert.convert_vit),
    (lambda: _blip2(), "qformer.encoder.layer.0.extra.bias", convert.convert_blip2),
    (lambda: _t5(), "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
     convert.convert_t5),
])
def test_an_unknown_tensor_is_refused_by_name(make, extra, conversion, tmp_path):
  _save(tmp_path, make())
  _add_tensor(tmp_path, extra)
  with pytest.raises(convert.ConversionError,
                     match=rf"unexpected parameters \(1\): \['{extra}'\]"):
    conversion(tmp_path)


@pytest.mark.parametrize("make", [lambda: _gpt2(), lambda: _opt(),
                                  lambda: _llama(tie_word_embeddings=True), lambda: _mpt()],
                         ids=["gpt2", "opt", "llama", "mpt"])
def test_a_tied_output_layer_saved_beside_its_embedding_must_equal_it(make, tmp_path):
  _save(tmp_path, make(), weights="bin")
  state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
  assert "lm_head.weight" in state  # consumed: it equals the embedding
  convert.convert_lm(tmp_path)
  state["lm_head.weight"] = state["lm_head.weight"] + 1
  torch.save(state, tmp_path / "pytorch_model.bin")
  with pytest.raises(convert.ConversionError, match="lm_head.weight: differs from"):
    convert.convert_lm(tmp_path)


def test_a_tree_other_than_inits_is_refused_naming_the_difference():
  cfg = convert.lm_config(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1,
                                                  n_head=4, n_positions=8).to_dict())
  lm = LanguageModel(cfg)
  params = jax.tree_util.tree_map(np.asarray, jax.jit(lm.init)(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  import flax.linen as nn
  params = nn.unbox(params)
  common.check_tree(params, lm, jnp.zeros((1, 1), jnp.int32))
  del params["layers_0"]["attn"]["query"]["bias"]
  params["lm_head"] = {"kernel": np.zeros((32, VOCAB), np.float32)}
  params["final_norm"]["scale"] = np.zeros((33,), np.float32)
  with pytest.raises(convert.ConversionError) as error:
    common.check_tree(params, lm, jnp.zeros((1, 1), jnp.int32))
  message = str(error.value)
  assert "not converted (1): ['layers_0/attn/query/bias']" in message
  assert "not in the model (1): ['lm_head/kernel']" in message
  assert "final_norm/scale: (33,) float32 converted, (32,) float32 from init" in message


# ---------------------------------------------------------------------------------------
# CLIP: pooling where transformers pools, rows padded as CLIPTokenizer pads them.
# ---------------------------------------------------------------------------------------
def _clip(eos, act):
  return transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       pad_token_id=1, bos_token_id=VOCAB - 2, eos_token_id=eos,
                       hidden_act=act),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, hidden_act=act,
                         num_channels=3),
      projection_dim=16))


@pytest.mark.parametrize("eos, act", [(7, "quick_gelu"), (2, "gelu")],
                         ids=["first_eos-padded_with_eos", "legacy_eos_2-argmax"])
def test_clip_conversion_is_init_tree_and_pools_where_transformers_does(eos, act, tmp_path):
  model = _save(tmp_path, _clip(eos, act))
  rng = np.random.default_rng(0)
  lengths = np.array([9, 4, 12])
  tokens = rng.integers(8, VOCAB - 2, size=(3, 12))
  valid = np.arange(12)[None] < lengths[:, None]
  if eos == 2:  # OpenAI's vocabulary: the EOS is the highest id; padded with 0
    tokens[np.arange(3), lengths - 1] = VOCAB - 1
    tokens = np.where(valid, tokens, 0)
  else:  # CLIPTokenizer: EOS closes each text, and pads the row
    tokens[np.arange(3), lengths - 1] = eos
    tokens = np.where(valid, tokens, eos)
  pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    expected = model.get_text_features(input_ids=torch.tensor(tokens),
                                       attention_mask=torch.tensor(valid.astype(int)))
    expected = getattr(expected, "pooler_output", expected).numpy()
    images = model.get_image_features(pixel_values=torch.tensor(pixels))
    images = getattr(images, "pooler_output", images).numpy()
  cfg, params = convert.convert_clip(tmp_path)
  assert cfg.text_pool == ("argmax" if eos == 2 else "eos")
  towers = TwoTowers(cfg)
  image_in = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  assert _tree(params) == _init_tree(towers, image_in[:1], jnp.zeros((1, 4), jnp.int32))
  image, text, *_ = towers.apply({"params": params}, image_in, jnp.asarray(tokens[:2]))
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(text, norm(expected[:2]), atol=1e-5)
  np.testing.assert_allclose(image, norm(images), atol=1e-5)
  text = towers.apply({"params": params}, jnp.asarray(tokens), method=TwoTowers.encode_text)
  np.testing.assert_allclose(text, norm(expected), atol=1e-5)


# What transformers 4.x wrote into every config and sub-config (openai/clip-vit-base-
# patch32's config.json has all of it), none of which changes the function.
LEGACY_GENERIC_FIELDS = {
    "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False,
    "early_stopping": False, "encoder_no_repeat_ngram_size": 0, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "is_decoder": False,
    "is_encoder_decoder": False, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
    "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_scores": False, "prefix": None, "pruned_heads": {},
    "remove_invalid_values": False, "repetition_penalty": 1.0,
    "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False,
    "tie_encoder_decoder": False, "tie_word_embeddings": True, "tokenizer_class": None,
    "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False,
    "typical_p": 1.0, "use_bfloat16": False, "transformers_version": "4.26.0.dev0"}


def test_a_transformers_4_clip_config_converts_and_neutral_fields_must_stay_neutral():
  hf = _clip(2, "quick_gelu").config.to_dict()
  for tower in ("text_config", "vision_config"):
    hf[tower] |= LEGACY_GENERIC_FIELDS
  hf |= {"text_config_dict": None, "vision_config_dict": None, "_commit_hash": "abc"}
  assert convert.clip_config(hf).text_pool == "argmax"
  hf["text_config_dict"] = {"eos_token_id": 7}  # as transformers 4.x, it wins
  assert convert.clip_config(hf).eos_id == 7
  hf["vision_config"]["pruned_heads"] = {"0": [1]}
  with pytest.raises(convert.ConversionError, match=r"vision_config.pruned_heads="):
    convert.clip_config(hf)


def test_clip_fields_it_does_not_know_are_refused_by_name():
  hf = _clip(7, "quick_gelu").config.to_dict()
  convert.clip_config(hf)
  bad = json.loads(json.dumps(hf))
  bad["text_config"]["hidden_act"] = "gelu_10"
  with pytest.raises(convert.ConversionError, match=r"text_config.hidden_act='gelu_10'"):
    convert.clip_config(bad)
  bad = json.loads(json.dumps(hf))
  bad["vision_config"]["use_absolute_position_embeddings"] = False
  with pytest.raises(convert.ConversionError,
                     match=r"vision_config.use_absolute_position_embeddings"):
    convert.clip_config(bad)


# ---------------------------------------------------------------------------------------
# BERT: pooler present or absent, activations, token types.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooler, act, types", [(True, "gelu_new", 3), (False, "relu", 1)])
def test_bert_conversion_is_init_tree_and_transformers_outputs(pooler, act, types, tmp_path):
  model = _save(tmp_path, transformers.BertModel(transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=16, type_vocab_size=types,
      hidden_act=act, layer_norm_eps=1e-6), add_pooling_layer=pooler))
  tokens, valid = _batch()
  token_types = np.where(valid, np.random.default_rng(1).integers(0, types, tokens.shape), 0)
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(token_types),
                     attention_mask=torch.tensor(valid.astype(np.int64)))
  cfg, params = convert.convert_bert(tmp_path)
  assert cfg.pooler == pooler
  bert = Bert(cfg)
  assert _tree(params) == _init_tree(bert, jnp.zeros((1, 4), jnp.int32))
  out = bert.apply({"params": params}, jnp.asarray(tokens), token_types=jnp.asarray(token_types),
                   token_mask=jnp.asarray(valid))
  assert np.abs(np.asarray(out["hidden"]) - expected.last_hidden_state.numpy())[valid].max() < 1e-4
  if pooler:
    assert np.abs(np.asarray(out["pooled"]) - expected.pooler_output.numpy()).max() < 1e-4


# ---------------------------------------------------------------------------------------
# RoBERTa (BERT with positions from pad id + 1) and ViT (Hugging Face's ViTModel layout);
# tests/test_mmbcd_convert.py compares their outputs with transformers'.
# ---------------------------------------------------------------------------------------
def _roberta(**c):
  return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**{
      **dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
             intermediate_size=48, max_position_embeddings=20, type_vocab_size=1), **c}))


def _vit(**c):
  return transformers.ViTModel(transformers.ViTConfig(**{
      **dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
             intermediate_size=48, image_size=16, patch_size=8), **c}))


@pytest.mark.parametrize("change, message", [
    (dict(pad_token_id=0), None),
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (dict(is_decoder=True), "is_decoder=True"),
    (dict(hidden_act="gelu_10"), "hidden_act='gelu_10'"),
    (dict(model_type="xlm-roberta"), "model_type='xlm-roberta'"),
    (dict(some_new_setting=3), "some_new_setting"),
])
def test_roberta_settings_and_fields_it_does_not_know_are_refused_by_name(change, message):
  hf = _roberta().config.to_dict()
  assert convert.bert_config(hf).position_offset == 2  # pad id 1 + 1
  if message is None:
    assert convert.bert_config(hf | change).position_offset == change["pad_token_id"] + 1
    return
  with pytest.raises(convert.ConversionError, match=message):
    convert.bert_config(hf | change)


@pytest.mark.parametrize("change, message", [
    (dict(qkv_bias=False), "qkv_bias=False"),
    (dict(image_size=[16, 24]), r"image_size=\[16, 24\]"),
    (dict(hidden_act="gelu_10"), "hidden_act='gelu_10'"),
    (dict(model_type="vit_mae"), "model_type='vit_mae'"),
    (dict(some_new_setting=3), "some_new_setting"),
])
def test_vit_settings_and_fields_it_does_not_know_are_refused_by_name(change, message):
  from mmjax.convert.vit import vit_config
  hf = _vit().config.to_dict()
  assert vit_config(hf).norm_eps == 1e-12 and vit_config(hf).token_norm
  with pytest.raises(convert.ConversionError, match=message):
    vit_config(hf | change)


# ---------------------------------------------------------------------------------------
# T5: settings it cannot compute, and the tensors beside the shared embedding as
# transformers 4 and 5 write them (tests/test_t5.py compares outputs with transformers').
# ---------------------------------------------------------------------------------------
def _t5(**c):
  return transformers.T5ForConditionalGeneration(transformers.T5Config(**{
      **dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4), **c}))


@pytest.mark.parametrize("change, message", [
    (dict(feed_forward_proj="gated-mish"), "feed_forward_proj='gated-mish'"),
    (dict(relative_attention_max_distance=16), "relative_attention_max_distance=16"),
    (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets=2"),
    (dict(eos_token_id=[1, 2]), r"eos_token_id=\[1, 2\]"),
    (dict(is_decoder=True), "is_decoder=True"),
    (dict(some_new_setting=3), "some_new_setting"),
])
def test_t5_settings_and_fields_it_does_not_know_are_refused_by_name(change, message):
  hf = transformers.T5Config(vocab_size=VOCAB).to_dict()
  assert convert.t5_config(hf).activation == "relu"
  with pytest.raises(convert.ConversionError, match=message):
    convert.t5_config(hf | change)


def test_t5_tensors_beside_the_shared_embedding(tmp_path):
  """Copies of the shared embedding must equal it; an `lm_head.weight` that differs is
  the output layer where transformers 5 wrote the config, refused where transformers 4
  did and tied it; the original checkpoints' unused cross-attention bias is ignored."""
  from safetensors.numpy import load_file, save_file
  _save(tmp_path, _t5())
  state = load_file(str(tmp_path / "model.safetensors"))
  shared = state["shared.weight"]
  write = lambda **tensors: save_file(state | tensors, str(tmp_path / "model.safetensors"))
  write(**{"encoder.embed_tokens.weight": shared, "lm_head.weight": shared,
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
               np.ones((32, 4), np.float32)})
  cfg, params = convert.convert_t5(tmp_path)
  assert cfg.tie_embeddings and cfg.scales_output and "lm_head" not in params
  write(**{"decoder.embed_tokens.weight": shared + 1})
  with pytest.raises(convert.ConversionError,
                     match="decoder.embed_tokens.weight: differs from shared.weight"):
    convert.convert_t5(tmp_path)
  write(**{"lm_head.weight": shared + 1})
  cfg, params = convert.convert_t5(tmp_path)
  assert not cfg.tie_embeddings and cfg.scales_output and "lm_head" in params
  config = json.loads((tmp_path / "config.json").read_text())
  del config["scale_decoder_outputs"]  # as transformers 4 writes it
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(convert.ConversionError, match="lm_head.weight: differs from"):
    convert.convert_t5(tmp_path)
  config["tie_word_embeddings"] = False
  (tmp_path / "config.json").write_text(json.dumps(config))
  cfg, params = convert.convert_t5(tmp_path)
  assert not cfg.tie_embeddings and not cfg.scales_output and "lm_head" in params


def test_the_command_line_reports_user_mistakes_in_one_line(tmp_path):
  import os
  import subprocess
  import sys
  config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4,
                                   n_positions=8, activation_function="mish").to_dict()
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  blip2 = _blip2_dict() | {"text_config": {"model_type": "bart"}}
  (tmp_path / "blip2").mkdir()  # (no weights: the config is checked first)
  (tmp_path / "blip2" / "config.json").write_text(json.dumps(
      blip2 | {"architectures": ["Blip2ForConditionalGeneration"]}))
  for hf_dir, message in ((tmp_path / "missing", "has no config.json"),
                          (tmp_path / "hf", "activation_function='mish' is not supported"),
                          (tmp_path / "blip2", "text_config.model_type='bart'")):
    run = subprocess.run([sys.executable, "-m", "mmjax.convert", f"--hf_dir={hf_dir}",
                          f"--output={tmp_path / 'out'}"], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
  assert not (tmp_path / "out").exists()
