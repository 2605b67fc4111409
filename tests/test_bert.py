"""BERT encoder: bidirectional, padding-blind for real tokens, segment-aware."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.bert import Bert, BertConfig

CFG = BertConfig(vocab_size=50, width=32, depth=2, num_heads=4, mlp_dim=48, max_len=16)
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def bert():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 1, CFG.vocab_size)
  model = Bert(CFG)
  params = nn.unbox(model.init(jax.random.key(1), tokens)["params"])
  run = jax.jit(lambda tokens, **kw: model.apply({"params": params}, tokens, **kw))
  return run, params, tokens


def test_shapes_and_the_optional_pooler(bert):
  run, params, tokens = bert
  out = run(tokens)
  assert out["hidden"].shape == (2, 8, 32) and out["pooled"].shape == (2, 32)
  assert set(params) == {"embed", "token_types", "positions", "embed_norm", "layers_0",
                         "layers_1", "pooler"}
  unpooled = Bert(dataclasses.replace(CFG, pooler=False))
  no_pooler = {k: v for k, v in params.items() if k != "pooler"}
  out2 = unpooled.apply({"params": no_pooler}, tokens)
  assert set(out2) == {"hidden"}
  np.testing.assert_allclose(out2["hidden"], out["hidden"], **TOL)


def test_padding_keys_do_not_change_real_tokens(bert):
  run, _, tokens = bert
  valid = jnp.arange(8)[None] < jnp.array([[8], [5]])
  padded = run(tokens, token_mask=valid)["hidden"]
  # Other ids in the padding slots change nothing, and neither does dropping them.
  other = run(jnp.where(valid, tokens, 7), token_mask=valid)["hidden"]
  np.testing.assert_allclose(other[1, :5], padded[1, :5], **TOL)
  alone = run(tokens[1:, :5])["hidden"]
  np.testing.assert_allclose(alone[0], padded[1, :5], **TOL)
  np.testing.assert_allclose(run(tokens[:1])["hidden"][0], padded[0], **TOL)


def test_every_token_sees_later_tokens(bert):
  run, _, tokens = bert
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % CFG.vocab_size)
  before, after = run(tokens)["hidden"], run(changed)["hidden"]
  assert np.abs(np.asarray(after - before)[:, 0]).min() > 1e-4


def test_token_types_are_embedded(bert):
  run, _, tokens = bert
  segments = (jnp.arange(8) >= 4).astype(jnp.int32)[None].repeat(2, 0)
  assert np.abs(np.asarray(run(tokens, token_types=segments)["hidden"]
                           - run(tokens)["hidden"])).max() > 1e-3


def test_a_scanned_rematerialised_bert_matches_the_per_layer_one(bert):
  from mmjax.checkpoints import flat_params, match_layout, tree_params
  run, params, tokens = bert
  scanned = Bert(dataclasses.replace(CFG, scan_layers=True, remat="full"))
  target = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(1), tokens)["params"])
  moved, unused = match_layout(flat_params(params),
                               {k: v.shape for k, v in flat_params(target).items()})
  assert not unused and moved["layers/attn/query/kernel"].shape[0] == CFG.depth
  valid = jnp.arange(8)[None] < jnp.array([[8], [5]])
  out = scanned.apply({"params": tree_params(moved)}, tokens, token_mask=valid)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), out,
                         run(tokens, token_mask=valid))


def test_too_long_inputs_and_indivisible_widths_are_explained():
  with pytest.raises(ValueError, match="17 tokens exceed max_len=16"):
    Bert(CFG).init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="width=30 is not divisible by num_heads=4"):
    BertConfig(vocab_size=50, width=30, depth=1, num_heads=4)
