"""T5: converted from transformers' T5ForConditionalGeneration (T5 v1.0's tied, scaled relu
flavour and FLAN-T5's untied gated-gelu one, as the Hub and transformers 5 save them), it
gives transformers' logits, encoder outputs with a prefix of embeddings, and greedy and
beam search outputs; its relative position buckets are T5's; decoding with the KV cache
gives the full forward's logits."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert, decoding
from mmjax.models.t5 import T5, T5Config, generate, relative_position_bucket

torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

VOCAB = 100

FLAVOURS = {
    # T5 v1.0: relu, the output layer tied to the embedding, the decoder's output scaled.
    "v1.0": {"feed_forward_proj": "relu", "relative_attention_num_buckets": 8,
             "relative_attention_max_distance": 20},
    # FLAN-T5 as the Hub has it: a transformers 4 config (tie_word_embeddings false, no
    # scale_decoder_outputs), gated-gelu, its own lm_head.
    "flan-hub": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    # As transformers 5 saves it (tie_word_embeddings true, lm_head.weight apart), with a
    # deeper decoder (which transformers 5.25's generate cannot run: its cache has as many
    # layers as the encoder).
    "flan-v5": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                "num_decoder_layers": 3},
}


def _hf_dir(path, flavour, seed=0):
  """A random small T5ForConditionalGeneration saved in `path`, and transformers' model
  loaded back from it (so that it reads the config as the converter must)."""
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      decoder_start_token_id=0, **FLAVOURS[flavour]))
  untied = FLAVOURS[flavour].get("tie_word_embeddings") is False
  if untied:
    model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, 32))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (1.0 if "shared" in name else 0.3))
    model.lm_head.weight[1] *= 3  # the end token comes up now and then
  model.save_pretrained(path)
  if flavour == "flan-hub":
    config = json.loads((path / "config.json").read_text())
    del config["scale_decoder_outputs"]
    config["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config))
  loaded = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  assert (loaded.lm_head.weight is loaded.shared.weight) == (not untied)
  return loaded


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def converted(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  hf = _hf_dir(path, request.param)
  cfg, params = convert.convert_t5(path)
  return request.param, hf, cfg, jax.tree_util.tree_map(jnp.asarray, params)


def _inputs(seed=0):
  """Right-padded encoder inputs and decoder inputs starting with the start token 0."""
  rng = np.random.default_rng(seed)
  valid = np.arange(13)[None] < np.array([[13], [8], [3]])
  tokens = np.where(valid, rng.integers(2, VOCAB, size=(3, 13)), 0)
  decoder = np.concatenate([np.zeros((3, 1), int), rng.integers(2, VOCAB, size=(3, 9))], 1)
  return tokens, valid, decoder


def test_logits_are_transformers(converted):
  flavour, hf, cfg, params = converted
  assert (cfg.tie_embeddings, cfg.scales_output, cfg.gated_mlp) == (
      (True, True, False) if flavour == "v1.0" else (False, False, True))
  tokens, valid, decoder = _inputs()
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(int)),
             decoder_input_ids=torch.tensor(decoder))
  model = T5(cfg)
  logits, encoded = jax.jit(lambda params, tokens, valid, decoder: (
      model.apply({"params": params}, tokens, decoder, token_mask=valid),
      model.apply({"params": params}, tokens, valid, method=T5.encode)))(
          params, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(decoder))
  np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4, rtol=0)
  expected = out.encoder_last_hidden_state.numpy()
  assert np.abs(np.asarray(encoded) - expected)[valid].max() < 1e-4


def test_encoder_with_a_prefix_is_transformers_with_its_embeddings_in_front(converted):
  _, hf, cfg, params = converted
  tokens, valid, _ = _inputs(1)
  prefix = np.random.default_rng(2).normal(size=(3, 4, 32)).astype(np.float32)
  embeds = np.concatenate([prefix, hf.shared(torch.tensor(tokens)).detach().numpy()], 1)
  mask = np.concatenate([np.ones((3, 4), bool), valid], 1)
  with torch.no_grad():
    expected = hf.encoder(inputs_embeds=torch.tensor(embeds),
                          attention_mask=torch.tensor(mask.astype(int))).last_hidden_state
  encoded = jax.jit(functools.partial(T5(cfg).apply, method=T5.encode))(
      {"params": params}, jnp.asarray(tokens), jnp.asarray(valid), prefix=jnp.asarray(prefix))
  assert encoded.shape == (3, 17, 32)
  assert np.abs(np.asarray(encoded) - expected.numpy())[mask].max() < 1e-4


# Greedy on FLAN-T5, beams on T5 v1.0 (they share the decoding steps); not "flan-v5",
# whose uneven depths transformers' generate cannot run (its cache follows the encoder's).
@pytest.mark.parametrize(("converted", "beams"), [("flan-hub", None), ("v1.0", 3)],
                         ids=["flan-hub-greedy", "v1.0-beams_3"], indirect=["converted"])
def test_generation_gives_transformers_tokens(converted, beams):
  flavour, hf, cfg, params = converted
  tokens, valid, _ = _inputs(3)
  with torch.no_grad():
    expected = hf.generate(input_ids=torch.tensor(tokens),
                           attention_mask=torch.tensor(valid.astype(int)), max_new_tokens=10,
                           num_beams=beams or 1, do_sample=False, length_penalty=1.0,
                           early_stopping=False).numpy()[:, 1:]  # after the start token
  out = generate(T5(cfg), params, jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(0),
                 max_new_tokens=10,
                 beams=None if beams is None else decoding.BeamConfig(num_beams=beams))
  stopped = 0
  for row, got, n in zip(expected, np.asarray(out.tokens), np.asarray(out.lengths)):
    # transformers' tokens up to its first end token (what follows is its padding).
    ends = np.flatnonzero(row == cfg.eos_id)
    stopped += len(ends) > 0
    assert got[:n].tolist() == row[:ends[0] + 1 if len(ends) else len(row)].tolist()
    assert (got[n:] == cfg.pad_id).all()
  assert 0 < stopped < len(expected)  # rows that end, and rows that run to the limit


def _naive_bucket(relative: int, bidirectional: bool, num_buckets: int, max_distance: int):
  """T5's bucket, re-derived from its definition in Python's own floats."""
  offset = 0
  if bidirectional:
    num_buckets //= 2
    offset = num_buckets if relative > 0 else 0
    distance = abs(relative)
  else:
    distance = max(-relative, 0)
  exact = num_buckets // 2
  if distance < exact:
    return offset + distance
  wide = exact + int(math.log(distance / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact))
  return offset + min(wide, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (7, 9)])
def test_relative_position_buckets_are_t5s(bidirectional, num_buckets, max_distance):
  relative = np.arange(-300, 301)
  got = relative_position_bucket(jnp.asarray(relative), bidirectional=bidirectional,
                                 num_buckets=num_buckets, max_distance=max_distance)
  expected = [_naive_bucket(int(r), bidirectional, num_buckets, max_distance)
              for r in relative]
  np.testing.assert_array_equal(got, expected)
  last = (num_buckets // 2 * 2 if bidirectional else num_buckets) - 1
  assert max(expected) == last  # the distances reach the logarithmic buckets' cap


def test_decoding_with_the_cache_gives_the_full_forward():
  """Scanned layers, whose caches stack on a layer axis (the generation tests decode
  layer by layer)."""
  cfg = T5Config(vocab_size=VOCAB, width=32, depth=2, decoder_depth=3, num_heads=4,
                 head_dim=8, mlp_dim=64, activation="gelu", gated_mlp=True,
                 relative_buckets=8, relative_max_distance=12, tie_embeddings=False,
                 scan_layers=True)
  model = T5(cfg)
  tokens, valid, decoder = (jnp.asarray(x) for x in _inputs(4))
  params = jax.jit(model.init)(jax.random.key(0), tokens, decoder)["params"]
  full, encoded = jax.jit(lambda params: (
      model.apply({"params": params}, tokens, decoder, token_mask=valid),
      model.apply({"params": params}, tokens, valid, method=T5.encode)))(params)
  b, t = decoder.shape
  step = jax.jit(functools.partial(model.apply, method=T5.decode, decode=True,
                                   mutable=["cache"]))
  cache = decoding.init_cache(step, {"params": params}, jnp.zeros((b, t), jnp.int32), encoded,
                              valid, positions=jnp.broadcast_to(jnp.arange(t), (b, t)))
  steps = []
  for i in range(t):  # the encoder's output is passed on the first step only
    first = i == 0
    logits, state = step({"params": params, "cache": cache}, decoder[:, i:i + 1],
                         encoded if first else None, valid if first else None,
                         positions=jnp.full((b, 1), i))
    cache = state["cache"]
    steps.append(logits[:, 0])
  np.testing.assert_allclose(jnp.stack(steps, 1), full, atol=1e-5, rtol=0)
