"""Beam search finds the hypotheses transformers' beam search finds, on a converted random
GPT-2 (batched prompts of different lengths against one transformers call per prompt), and
runs on Flamingo's caches whatever their layout."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

from conftest import ENDOFCHUNK, MEDIA, PAD, flamingo_config  # noqa: E402
from mmjax import convert, decoding  # noqa: E402
from mmjax.checkpoints import flat_params, match_layout, tree_params  # noqa: E402
from mmjax.decoding import BeamConfig, SamplingConfig  # noqa: E402
from mmjax.models import flamingo, lm  # noqa: E402
from mmjax.models.lm import LMConfig  # noqa: E402
from mmjax.tasks import with_fields  # noqa: E402

PROMPTS = [[5, 17, 33, 2, 9, 41, 8], [12, 70, 3]]
NEW = 10
# The random model below continues both prompts greedily with 76, 19, 19, ...: as stop
# tokens, these end hypotheses early, and length penalties then decide which ones win.
FIRST, THEN = 76, 19


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """On a toy model torch's threads only contend with JAX's: one runs the calls below 30x
  faster on a busy CPU."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """A random GPT-2 with peaked next-token distributions (weights far from their tiny
  init), and its conversion."""
  path = tmp_path_factory.mktemp("gpt2")
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=0,
      eos_token_id=0)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.6)
  model.save_pretrained(path)
  cfg, params = convert.convert_lm(path)
  return model, lm.LanguageModel(cfg), params


def _ours(gpt2, stop_ids, **kw) -> list[list[int]]:
  """Each prompt's continuation, all prompts right-padded in one batch."""
  _, model, params = gpt2
  t = max(map(len, PROMPTS))
  right = jnp.array([p + [PAD] * (t - len(p)) for p in PROMPTS])
  out = lm.generate(model, params, right, jnp.array([len(p) for p in PROMPTS]),
                    jax.random.key(0), max_new_tokens=NEW, stop_ids=stop_ids, pad_id=PAD, **kw)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for row, n in zip(tokens, lengths):
    np.testing.assert_array_equal(row[n:], PAD)
  return [row[:n].tolist() for row, n in zip(tokens, lengths)]


@pytest.mark.parametrize("stop_ids, length_penalty, early_stopping, min_new_tokens", [
    ((FIRST,), 0.0, False, 3),
    ((FIRST,), 1.0, False, 0),
    ((FIRST,), 2.0, True, 0),
    ((THEN,), 2.0, "never", 0),
    ((FIRST, THEN), 2.0, False, 0),
])
def test_beam_search_finds_transformers_hypotheses(gpt2, stop_ids, length_penalty,
                                                   early_stopping, min_new_tokens):
  beams = BeamConfig(num_beams=3, length_penalty=length_penalty,
                     early_stopping=early_stopping, min_new_tokens=min_new_tokens)
  got = _ours(gpt2, stop_ids, beams=beams)
  with torch.no_grad():
    expected = [gpt2[0].generate(
        torch.tensor([p]), num_beams=3, length_penalty=length_penalty, max_new_tokens=NEW,
        min_new_tokens=min_new_tokens, early_stopping=early_stopping, do_sample=False,
        eos_token_id=list(stop_ids), pad_token_id=PAD)[0, len(p):].tolist() for p in PROMPTS]
  assert got == expected


def test_one_beam_without_length_penalty_is_greedy(gpt2):
  greedy = _ours(gpt2, (THEN,))
  assert [len(row) for row in greedy] == [2, 2]  # stopped
  assert _ours(gpt2, (THEN,), beams=BeamConfig(num_beams=1, length_penalty=0.0)) == greedy


def test_beams_do_not_sample(gpt2):
  with pytest.raises(ValueError, match="deterministic"):
    _ours(gpt2, (), beams=BeamConfig(), sampling=SamplingConfig(temperature=1.0))


def test_cache_batch_axes_are_found_by_shape():
  cache = lambda n: {"layers": jnp.zeros((4, n, 7)), "count": jnp.zeros((n,), jnp.int32)}
  assert decoding.cache_batch_axes(cache) == {"layers": 1, "count": 0}
  with pytest.raises(ValueError, match=r"\['step'\] has no single batch axis"):
    decoding.cache_batch_axes(lambda n: {"step": jnp.zeros(())})


def test_flamingo_beam_search_with_scanned_and_per_layer_caches():
  """Media caches (cross-attention keys, media masks) are copied to the beams like the
  text's; scanned layers keep their caches' batch on axis 1, per-layer ones on axis 0."""
  model = flamingo.Flamingo(flamingo_config(LMConfig(vocab_size=64, width=32, depth=2,
                                                     num_heads=4)))
  scanned = flamingo.Flamingo(with_fields(model.config, scan_layers=True))
  prompt, lengths = jnp.array([[5, MEDIA, 7, 8], [MEDIA, 13, PAD, PAD]]), jnp.array([4, 2])
  images = jnp.zeros((2, 2, 1, 16, 16, 3))
  shapes = lambda m: nn.unbox(jax.eval_shape(m.init, jax.random.key(0), prompt, images)["params"])
  # Random weights (gates included, so that the media matter) without compiling an init.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda x: 0.3 * rng.standard_normal(x.shape, np.float32),
                                  shapes(model))
  moved, _ = match_layout(flat_params(params),
                          {k: v.shape for k, v in flat_params(shapes(scanned)).items()})
  media = rng.standard_normal(jax.eval_shape(functools.partial(
      model.apply, {"params": params}, images, method=flamingo.Flamingo.encode_media)).shape,
                              np.float32)
  run = lambda m, p: flamingo.generate(
      m, p, prompt, lengths, jax.random.key(0), media=media, num_images=jnp.array([2, 1]),
      max_new_tokens=4, stop_ids=(ENDOFCHUNK, 3), beams=BeamConfig(num_beams=3))
  out, out_scanned = run(model, params), run(scanned, tree_params(moved))
  np.testing.assert_array_equal(out.tokens, out_scanned.tokens)
  np.testing.assert_array_equal(out.lengths, out_scanned.lengths)
  assert out.tokens.shape == (2, 4) and np.all((out.lengths >= 1) & (out.lengths <= 4))
