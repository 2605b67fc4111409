"""Decoder LM: KV-cached decoding equals the full pass; padding never leaks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GPT2_LIKE, LLAMA_LIKE, MPT_LIKE
from mmjax.models.lm import LanguageModel, LMConfig

# Float32 on CPU; the cached path reorders no reductions, differences are rounding only.
TOL = dict(atol=1e-5, rtol=1e-5)


def init(config, tokens):
  model = LanguageModel(config)
  return model, nn.unbox(model.init(jax.random.key(0), tokens)["params"])


@pytest.mark.parametrize("config", [GPT2_LIKE, LLAMA_LIKE, MPT_LIKE],
                         ids=["gpt2", "llama", "mpt"])
def test_kv_cached_decoding_equals_full_forward(config):
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, config.vocab_size)
  model, params = init(config, tokens)
  full = jax.jit(model.apply)({"params": params}, tokens)
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  _, state = model.apply({"params": params}, tokens, positions=positions, decode=True,
                         mutable=["cache"])
  cache = jax.tree_util.tree_map(jnp.zeros_like, state["cache"])

  @jax.jit
  def step(cache, tokens, positions):
    logits, state = model.apply({"params": params, "cache": cache}, tokens,
                                positions=positions, decode=True, mutable=["cache"])
    return logits, state["cache"]

  logits, cache = step(cache, tokens[:, :4], positions[:, :4])
  outs = [logits]
  for i in range(4, 10):
    logits, cache = step(cache, tokens[:, i:i + 1], positions[:, i:i + 1])
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


@pytest.mark.parametrize("config", [GPT2_LIKE, LLAMA_LIKE, MPT_LIKE],
                         ids=["gpt2", "llama", "mpt"])
def test_padding_changes_nothing_for_real_positions(config):
  real = jax.random.randint(jax.random.key(2), (1, 6), 3, config.vocab_size)
  model, params = init(config, real)
  ref = model.apply({"params": params}, real)[0]
  # Right padding: whatever the pad tokens are, real positions are unchanged (a different
  # length changes XLA's tiling, hence a tolerance rather than bit equality here).
  for pad in (0, 17):
    padded = jnp.concatenate([real, jnp.full((1, 3), pad)], axis=1)
    np.testing.assert_allclose(model.apply({"params": params}, padded)[0, :6], ref, **TOL)
  # Left padding with a token mask and shifted positions.
  padded = jnp.concatenate([jnp.full((1, 3), 5), real], axis=1)
  mask = jnp.arange(9)[None] >= 3
  positions = jnp.maximum(jnp.arange(9)[None] - 3, 0)
  out = model.apply({"params": params}, padded, positions=positions, token_mask=mask)[0, 3:]
  np.testing.assert_allclose(out, ref, **TOL)


def test_tied_and_untied_output_embeddings():
  tokens = jnp.zeros((1, 4), jnp.int32)
  _, tied = init(GPT2_LIKE, tokens)
  _, untied = init(LLAMA_LIKE, tokens)
  assert "lm_head" not in tied and "positions" in tied
  assert untied["lm_head"]["kernel"].shape == (32, 64) and "positions" not in untied


def test_config_errors_are_explicit():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    LMConfig(vocab_size=8, width=32, depth=1, num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    LMConfig(vocab_size=8, width=30, depth=1, num_heads=4)
  model = LanguageModel(GPT2_LIKE)
  with pytest.raises(ValueError, match="decoding needs explicit `positions`"):
    model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), decode=True)
