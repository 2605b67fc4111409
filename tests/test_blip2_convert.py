"""Converted Hugging Face BLIP-2 models compute what transformers computes (float32, within
1e-4): the EVA ViT-g vision tower (`Blip2VisionModel`), the Q-Former (`Blip2QFormerModel`),
Blip2ForConditionalGeneration with OPT or T5 (logits, and greedy tokens identical to its
`generate`), and Blip2ForImageTextRetrieval (ITM scores, ITC similarities)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

from mmjax.convert import blip2, common  # noqa: E402
from mmjax.models import blip2 as blip2_model  # noqa: E402
from mmjax.models.blip2 import Blip2  # noqa: E402
from mmjax.models.qformer import QFormer  # noqa: E402
from mmjax.models.vit import EVA_VIT_G, ViT, ViTConfig  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=28, patch_size=14)
VOCAB, QUERIES = 96, 4
IMAGE_TOKEN = VOCAB - 1  # the LM's <image> placeholder
QFORMER = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=40, max_position_embeddings=16)
OPT = dict(model_type="opt", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=40,
           num_attention_heads=4, max_position_embeddings=48, word_embed_proj_dim=16,
           pad_token_id=0, bos_token_id=2, eos_token_id=3)


def _randomise(model, seed=0, scale=0.3):
  """Weights far from their tiny init, so that every term matters; the key part of each
  fused qkv bias stays zero, as in every BLIP-2 checkpoint (EVA has no key bias)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * scale)
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


# ---------------------------------------------------------------------------------------
# Q-Former.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("frequency", [1, 2])
def test_converted_qformer_gives_transformers_query_outputs(frequency):
  """Queries cross-attending (on layers 0, f, 2f, ...) to features of another width."""
  hf = transformers.Blip2QFormerConfig(**QFORMER, cross_attention_frequency=frequency,
                                       encoder_hidden_size=20)
  model = _randomise(transformers.Blip2QFormerModel(hf))
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(QUERIES, 24)).astype(np.float32)
  image = rng.normal(size=(2, 5, 20)).astype(np.float32)
  with torch.no_grad():
    expected = model(query_embeds=torch.tensor(queries).expand(2, -1, -1),
                     encoder_hidden_states=torch.tensor(image),
                     encoder_attention_mask=torch.ones(2, 5, dtype=torch.long)
                     ).last_hidden_state.numpy()
  f = common.Fields(hf.to_dict(), "BLIP-2 Q-Former")
  cfg, text = blip2.qformer_config(f, QUERIES)
  f.finish(blip2.QFORMER_IGNORED_FIELDS)
  assert (cfg.encoder_width, cfg.cross_attention_freq, text) == (20, frequency, False)
  read = common.Reader({k: v.numpy() for k, v in model.state_dict().items()})
  params = blip2.qformer_params(read, cfg, text=False) | {"queries": queries}
  read.finish()
  blip2.check_qformer(params, cfg, text=False)
  assert ("xattn" in params["layers_1"]) == (frequency == 1)
  out = QFormer(cfg).apply({"params": params}, jnp.asarray(image))["queries"]
  diff = np.abs(np.asarray(out) - expected).max()
  assert diff < 1e-4, diff


# ---------------------------------------------------------------------------------------
# Stage 2: Blip2ForConditionalGeneration with OPT.
# ---------------------------------------------------------------------------------------
def _blip2_config(image_token_index=IMAGE_TOKEN, qformer_text=False, **top):
  return transformers.Blip2Config(
      vision_config=VISION, qformer_config=dict(QFORMER, use_qformer_text_input=qformer_text),
      text_config=OPT, num_query_tokens=QUERIES, image_text_hidden_size=12,
      image_token_index=image_token_index, **top)


def _prompts():
  """Right-padded prompts `"b t"` (BOS first) and their lengths."""
  rng = np.random.default_rng(1)
  lengths = np.array([6, 3])
  tokens = rng.integers(4, IMAGE_TOKEN, size=(2, 6))
  tokens[:, 0] = OPT["bos_token_id"]
  return np.where(np.arange(6)[None] < lengths[:, None], tokens, 0), lengths


def _with_placeholders(tokens, valid):
  """transformers' input: the query placeholders first (as Blip2Processor puts them), then
  the text."""
  ids = np.concatenate([np.full((len(tokens), QUERIES), IMAGE_TOKEN), tokens], 1)
  mask = np.concatenate([np.ones((len(tokens), QUERIES), bool), valid], 1)
  return torch.tensor(ids), torch.tensor(mask.astype(np.int64))


@pytest.mark.parametrize("qformer_text", [False, True])
def test_converted_blip2_opt_gives_transformers_logits(qformer_text, tmp_path):
  """With `use_qformer_text_input`, the Q-Former's text feed-forwards (unused in stage 2)
  are left out."""
  model = _randomise(transformers.Blip2ForConditionalGeneration(
      _blip2_config(qformer_text=qformer_text)))
  model.save_pretrained(tmp_path)
  tokens, lengths = _prompts()
  valid = np.arange(6)[None] < lengths[:, None]
  pixels = _pixels()
  with torch.no_grad():
    ids, mask = _with_placeholders(tokens, valid)
    expected = model(pixel_values=torch.tensor(pixels), input_ids=ids,
                     attention_mask=mask).logits.numpy()[:, QUERIES:]
  cfg, params = blip2.convert_blip2(tmp_path)
  assert cfg.lm is not None and cfg.qformer.num_queries == QUERIES
  assert "mlp" not in params["qformer"]["layers_0"] and "embed" not in params["qformer"]
  logits = Blip2(cfg).apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                            jnp.asarray(tokens))
  diff = np.abs(np.asarray(logits) - expected)[valid].max()
  assert diff < 1e-4, diff


def test_blip2_greedy_generation_gives_transformers_tokens(tmp_path):
  """Prompts of different lengths: left-padded for transformers' `generate` (after the
  placeholders), right-padded for mmjax's. (Smaller weights than elsewhere, so that the
  continuations vary.)"""
  model = _randomise(transformers.Blip2ForConditionalGeneration(_blip2_config()), 1, 0.15)
  model.save_pretrained(tmp_path)
  tokens, lengths = _prompts()
  left = np.stack([np.roll(row, len(row) - n)
                   for row, n in zip(tokens, lengths, strict=True)])
  pixels = _pixels()
  with torch.no_grad():
    ids, mask = _with_placeholders(left, np.arange(6)[None] >= 6 - lengths[:, None])
    expected = model.generate(pixel_values=torch.tensor(pixels), input_ids=ids,
                              attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=0)[:, QUERIES + 6:].numpy()
  cfg, params = blip2.convert_blip2(tmp_path)
  out = blip2_model.generate(Blip2(cfg), params, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                             jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0),
                             max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def test_converted_blip2_flan_t5_gives_transformers_logits(tmp_path):
  """The queries and the text (after its placeholders, for transformers) are encoded, the
  decoder's tokens decoded. (tests/test_t5.py compares T5's generation with transformers',
  tests/test_blip2.py BLIP-2's with its forward.)"""
  t5 = dict(model_type="t5", vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=40, num_layers=2,
            num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
  model = _randomise(transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
      vision_config=VISION, qformer_config=QFORMER, text_config=t5, num_query_tokens=QUERIES,
      image_token_index=IMAGE_TOKEN)), 1, 0.15)
  model.save_pretrained(tmp_path)
  tokens, lengths = _prompts()
  valid = np.arange(6)[None] < lengths[:, None]
  decoder = np.random.default_rng(2).integers(2, IMAGE_TOKEN, size=(2, 5))
  decoder[:, 0] = 0  # the decoder's start token
  pixels = _pixels()
  with torch.no_grad():
    ids, mask = _with_placeholders(tokens, valid)
    expected = model(pixel_values=torch.tensor(pixels), input_ids=ids, attention_mask=mask,
                     decoder_input_ids=torch.tensor(decoder)).logits.numpy()
  cfg, params = blip2.convert_blip2(tmp_path)
  assert cfg.t5 is not None and cfg.lm is None and "lm" not in params
  logits = Blip2(cfg).apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                            jnp.asarray(tokens), jnp.asarray(valid),
                            decoder_tokens=jnp.asarray(decoder))
  diff = np.abs(np.asarray(logits) - expected).max()
  assert diff < 1e-4, diff


def test_a_transformers_4_config_with_only_the_fields_that_differ_is_the_paper_model():
  """Salesforce/blip2-opt-2.7b's config.json (transformers 4.47): sub-configs list only the
  fields that differ from transformers' defaults."""
  hf = {
      "architectures": ["Blip2ForConditionalGeneration"], "image_text_hidden_size": 256,
      "image_token_index": 50265, "initializer_factor": 1.0, "initializer_range": 0.02,
      "model_type": "blip-2", "num_query_tokens": 32,
      "qformer_config": {"classifier_dropout": None, "model_type": "blip_2_qformer"},
      "text_config": {"_name_or_path": "facebook/opt-2.7b", "activation_dropout": 0.0,
                      "architectures": ["OPTForCausalLM"], "eos_token_id": 50118,
                      "ffn_dim": 10240, "hidden_size": 2560, "model_type": "opt",
                      "num_attention_heads": 32, "num_hidden_layers": 32, "prefix": "</s>",
                      "torch_dtype": "float16", "vocab_size": 50304,
                      "word_embed_proj_dim": 2560},
      "torch_dtype": "float32", "transformers_version": "4.47.0.dev0",
      "use_decoder_only_language_model": True,
      "vision_config": {"dropout": 0.0, "initializer_factor": 1.0,
                        "model_type": "blip_2_vision_model", "num_channels": 3,
                        "projection_dim": 512}}
  cfg, _ = blip2.blip2_config(hf, stage=2)
  assert cfg.vision == ViTConfig(**EVA_VIT_G, keep_class_token=True, token_norm=True,
                                 output_dim=None)
  q = cfg.qformer
  assert (q.width, q.depth, q.num_heads, q.mlp_dim, q.num_queries, q.cross_attention_freq,
          q.encoder_width, q.norm_eps) == (768, 12, 12, 3072, 32, 2, 1408, 1e-12)
  lm = cfg.lm
  assert (lm.vocab_size, lm.width, lm.depth, lm.num_heads, lm.mlp_dim, lm.max_len,
          lm.activation, lm.tie_embeddings) == (50304, 2560, 32, 32, 10240, 2048, "relu", True)


# ---------------------------------------------------------------------------------------
# Stage 1: Blip2ForImageTextRetrieval.
# ---------------------------------------------------------------------------------------
def test_converted_retrieval_model_gives_transformers_itm_and_itc(tmp_path):
  """ITM: the mean over queries of the match head on a bidirectional pass over [queries;
  text]; ITC: each image's best query's cosine similarity with each text's [CLS]. (With
  `image_token_index` set, transformers takes placeholders before the text, and drops
  them: the same numbers.)"""
  model = _randomise(transformers.Blip2ForImageTextRetrieval(
      _blip2_config(None, qformer_text=True)))
  model.save_pretrained(tmp_path)
  rng = np.random.default_rng(0)
  lengths = np.array([7, 4, 2])
  valid = np.arange(7)[None] < lengths[:, None]
  tokens = np.where(valid, rng.integers(3, IMAGE_TOKEN, size=(3, 7)), 0)
  pixels = _pixels(3)
  ids, mask = torch.tensor(tokens), torch.tensor(valid.astype(np.int64))
  with torch.no_grad():
    itm, itc = (model(pixel_values=torch.tensor(pixels), input_ids=ids, attention_mask=mask,
                      use_image_text_matching_head=head).logits_per_image.numpy()
                for head in (True, False))
  cfg, params = blip2.convert_blip2(tmp_path)
  assert cfg.lm is None and cfg.embed_dim == 12

  def retrieval(model, images, tokens, valid):
    image = model.image_features(images)
    return model.matching(image, tokens, valid), model.contrastive(image, tokens, valid)
  matching, (image_embeds, text_embed, _) = Blip2(cfg).apply(
      {"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(tokens),
      jnp.asarray(valid), method=retrieval)
  similarity = np.einsum("iqk,jk->ijq", image_embeds, text_embed).max(-1)
  assert np.abs(np.asarray(matching) - itm).max() < 1e-4
  assert np.abs(similarity - itc).max() < 1e-4


# ---------------------------------------------------------------------------------------
# The saved config (`python -m mmjax.convert` writes it beside the checkpoint, as
# `mmjax.convert.save` does for every family; tests/test_convert_strict.py runs the command
# on a BLIP-2 directory).
# ---------------------------------------------------------------------------------------
def test_a_converted_blip2_config_reads_back_as_the_blip2_tasks_model(tmp_path):
  import dataclasses
  import json

  from mmjax.tasks import blip2 as task
  _randomise(transformers.Blip2ForConditionalGeneration(_blip2_config())).save_pretrained(
      tmp_path)
  cfg, _ = blip2.convert_blip2(tmp_path)
  saved = json.loads(json.dumps(dataclasses.asdict(cfg)))
  assert task.MODEL_CONFIG.from_dict(saved) == cfg
