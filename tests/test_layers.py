"""Building blocks against naive references: attention, GQA, norms, MLP, RoPE, ALiBi, Dense."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.layers import Attention, Dense, Mlp, Norm, RopeScaling, apply_rope, rope_frequencies
from mmjax.layers import padding_mask
from mmjax.layers.embeddings import alibi_slopes

TOL = dict(atol=1e-5, rtol=1e-5)


def naive_attention(params, x, kv, mask, num_heads, num_kv_heads, head_dim, bias=None):
  """Softmax attention written out with numpy, one head at a time; `bias "h t s"`."""
  x, kv = np.asarray(x, np.float64), np.asarray(kv, np.float64)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"])
  k = np.einsum("bsd,dhk->bshk", kv, p["key"]["kernel"])
  v = np.einsum("bsd,dhk->bshk", kv, p["value"]["kernel"])
  group = num_heads // num_kv_heads
  out = np.zeros(q.shape)
  for h in range(num_heads):
    logits = np.einsum("btk,bsk->bts", q[:, :, h], k[:, :, h // group]) / np.sqrt(head_dim)
    logits = logits if bias is None else logits + bias[h]
    logits = np.where(mask, logits, -np.inf)
    row_max = np.where(mask.any(-1, keepdims=True), logits.max(-1, keepdims=True), 0.0)
    w = np.exp(logits - row_max)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)  # fully masked rows -> 0
    out[:, :, h] = np.einsum("bts,bsk->btk", w, v[:, :, h // group])
  return np.einsum("bthk,hkd->btd", out, p["out"]["kernel"])


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_masked_cross_attention_matches_naive_softmax(num_kv_heads):
  rng = np.random.default_rng(0)
  x, kv = rng.normal(size=(2, 5, 16)), rng.normal(size=(2, 7, 12))
  mask = rng.random((2, 5, 7)) < 0.5
  mask[0, 2] = False  # a query with nothing to attend to
  attn = Attention(num_heads=4, head_dim=8, num_kv_heads=num_kv_heads, cross=True)
  params = nn.unbox(attn.init(jax.random.key(0), x, kv, mask=mask)["params"])
  out = jax.jit(attn.apply)({"params": params}, x, kv, mask=jnp.asarray(mask))
  ref = naive_attention(params, x, kv, mask, 4, num_kv_heads, 8)
  np.testing.assert_allclose(out, ref, **TOL)
  np.testing.assert_array_equal(out[0, 2], 0.0)  # exactly zero, not a uniform average


def test_causal_attention_with_padding_matches_naive():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 16))
  key_valid = np.array([[True] * 6, [False, False, True, True, True, True]])
  attn = Attention(num_heads=2, head_dim=8, causal=True)
  params = nn.unbox(attn.init(jax.random.key(0), x)["params"])
  full_mask = np.tril(np.ones((6, 6), bool))[None] & key_valid[:, None, :]
  ref = naive_attention(params, x, x, full_mask, 2, 2, 8)
  out = attn.apply({"params": params}, x, mask=padding_mask(jnp.asarray(key_valid)))
  np.testing.assert_allclose(out[1, 2:], ref[1, 2:], **TOL)
  np.testing.assert_allclose(out[0], ref[0], **TOL)
  # The is_causal fast path (no explicit mask) equals the explicit causal mask.
  np.testing.assert_allclose(attn.apply({"params": params}, x)[0], ref[0], **TOL)


def test_gqa_equals_mha_with_repeated_kv_heads():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 6, 16))
  gqa = Attention(num_heads=4, head_dim=8, num_kv_heads=2, causal=True, rope_theta=10_000.0)
  mha = Attention(num_heads=4, head_dim=8, causal=True, rope_theta=10_000.0)
  params = nn.unbox(gqa.init(jax.random.key(0), x)["params"])
  repeated = dict(params)
  for name in ("key", "value"):  # kv head g serves query heads 2g, 2g+1
    repeated[name] = {"kernel": jnp.repeat(params[name]["kernel"], 2, axis=1)}
  np.testing.assert_allclose(gqa.apply({"params": params}, x),
                             mha.apply({"params": repeated}, x), **TOL)


@pytest.mark.parametrize("position", [dict(rope_theta=10_000.0), dict(alibi_bias_max=8.0)],
                         ids=["rope", "alibi"])
def test_incremental_decoding_equals_full_attention(position):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
  attn = Attention(num_heads=4, head_dim=4, num_kv_heads=2, causal=True, qk_norm="rmsnorm",
                   **position)
  params = nn.unbox(attn.init(jax.random.key(0), x)["params"])
  full = attn.apply({"params": params}, x)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  _, state = attn.apply({"params": params}, x, positions=positions, decode=True,
                        mutable=["cache"])
  cache = jax.tree_util.tree_map(jnp.zeros_like, state["cache"])
  step = jax.jit(lambda cache, x, positions: attn.apply(
      {"params": params, "cache": cache}, x, positions=positions, decode=True,
      mutable=["cache"]))
  outs = []
  for start, stop in [(0, 3), (3, 4), (4, 5), (5, 8)]:  # a prefill, then steps
    out, state = step(cache, x[:, start:stop], positions[:, start:stop])
    cache = state["cache"]
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def test_rope_depends_only_on_relative_position():
  rng = np.random.default_rng(4)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))
  def score(pq, pk):
    return jnp.sum(apply_rope(q, jnp.array([[pq]])) * apply_rope(k, jnp.array([[pk]])))
  np.testing.assert_allclose(score(3, 1), score(10, 8), **TOL)
  np.testing.assert_allclose(score(0, 0), jnp.sum(q * k), **TOL)
  assert abs(float(score(3, 1)) - float(score(3, 2))) > 1e-4


def test_rope_scaling_slows_the_frequencies_of_its_bands():
  plain = np.asarray(rope_frequencies(16, 500.0))  # wavelengths 6.3, 13.7, 29.7, 64.6, ...
  linear = np.asarray(rope_frequencies(16, 500.0, RopeScaling("linear", factor=4.0)))
  np.testing.assert_allclose(plain / linear, 4.0, rtol=1e-6)
  llama3 = np.asarray(rope_frequencies(16, 500.0, RopeScaling(
      "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=48)))
  slowdown = plain / llama3
  # Wavelengths below 48 / 4 are kept, those above 48 / 1 divided by 8, the band between
  # blended.
  assert slowdown[0] == 1.0 and np.all((slowdown[1:3] > 1.01) & (slowdown[1:3] < 7.9))
  np.testing.assert_allclose(slowdown[3:], 8.0, rtol=1e-6)


def test_alibi_slopes_follow_mpt_for_any_head_count():
  np.testing.assert_array_equal(alibi_slopes(4), 2.0 ** -np.array([2, 4, 6, 8]))
  # 6 heads: the 4 slopes of 4 heads, then those of 8 heads that lie between them.
  np.testing.assert_array_equal(alibi_slopes(6), 2.0 ** -np.array([2, 4, 6, 8, 1, 3]))
  np.testing.assert_array_equal(alibi_slopes(2, bias_max=4.0), 2.0 ** -np.array([2, 4]))


def test_alibi_attention_matches_naive_bias_relative_to_the_last_key():
  """Our bias, -slope * (i - j), differs from the reference's, slope * (j - (s - 1)) (MPT
  in transformers), by a constant per query row, which the softmax ignores."""
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 7, 24))
  key_valid = np.array([[True] * 7, [True] * 4 + [False] * 3])  # right padding
  attn = Attention(num_heads=6, head_dim=4, num_kv_heads=2, causal=True, alibi_bias_max=8.0)
  params = nn.unbox(attn.init(jax.random.key(0), x)["params"])
  slopes = 2.0 ** -np.array([2, 4, 6, 8, 1, 3])
  bias = slopes[:, None, None] * (np.arange(7) - 6)[None, None, :]  # h 1 s
  full_mask = np.tril(np.ones((7, 7), bool))[None] & key_valid[:, None, :]
  ref = naive_attention(params, x, x, full_mask, 6, 2, 4, bias=bias)
  out = attn.apply({"params": params}, x, mask=padding_mask(jnp.asarray(key_valid)))
  np.testing.assert_allclose(out[0], ref[0], **TOL)
  np.testing.assert_allclose(out[1, :4], ref[1, :4], **TOL)
  np.testing.assert_allclose(attn.apply({"params": params}, x)[0], ref[0], **TOL)  # is_causal
  # Only relative positions count: shifting them all changes nothing.
  shifted = attn.apply({"params": params}, x, positions=jnp.arange(7)[None] + 5)
  np.testing.assert_allclose(shifted[0], ref[0], **TOL)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norms_match_formula(kind):
  x = (np.random.default_rng(5).normal(size=(3, 10)) * 4 + 1).astype(np.float32)
  norm = Norm(kind, epsilon=1e-6)
  params = {"scale": jnp.arange(1.0, 11.0), **({"bias": jnp.ones(10)} if kind == "layernorm" else {})}
  y = norm.apply({"params": params}, x)
  if kind == "layernorm":
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    ref = ref * np.arange(1, 11) + 1
  else:
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * np.arange(1, 11)
  np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-5)


def test_swiglu_matches_formula():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 8)), jnp.float32)
  mlp = Mlp(16, "silu", gated=True)
  p = nn.unbox(mlp.init(jax.random.key(0), x)["params"])
  ref = (jax.nn.silu(x @ p["gate"]["kernel"]) * (x @ p["up"]["kernel"])) @ p["down"]["kernel"]
  np.testing.assert_allclose(mlp.apply({"params": p}, x), ref, **TOL)


def test_dense_multi_axis_kernel_has_true_fan_in_and_logical_axes():
  x = jnp.ones((4, 2, 64))
  dense = Dense((8, 16), ("embed", "heads", "head_dim"), use_bias=True)
  variables = dense.init(jax.random.key(0), x)
  specs = nn.get_partition_spec(variables)["params"]
  assert tuple(specs["kernel"]) == ("embed", "heads", "head_dim")
  assert tuple(specs["bias"]) == ("heads", "head_dim")
  kernel = nn.unbox(variables)["params"]["kernel"]
  assert kernel.shape == (64, 8, 16)
  np.testing.assert_allclose(np.std(kernel), 64 ** -0.5, rtol=0.1)  # lecun: 1/sqrt(fan_in)
  with pytest.raises(ValueError, match="must name 1 input and 2 output axes"):
    Dense((8, 16), ("embed", "heads")).init(jax.random.key(0), x)


def test_attention_misuse_is_explained():
  x = jnp.ones((1, 3, 8))
  with pytest.raises(ValueError, match=r"construct Attention\(cross=True\)"):
    Attention(num_heads=2, head_dim=4).init(jax.random.key(0), x, x)
  with pytest.raises(ValueError, match="RoPE is defined for self-attention only"):
    Attention(num_heads=2, head_dim=4, cross=True, rope_theta=1e4).init(jax.random.key(0), x, x)
  with pytest.raises(ValueError, match="ALiBi is defined for causal self-attention only"):
    Attention(num_heads=2, head_dim=4, alibi_bias_max=8.0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="multiple of num_kv_heads=3"):
    Attention(num_heads=4, head_dim=4, num_kv_heads=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="decoding needs the absolute `positions`"):
    Attention(num_heads=2, head_dim=4, causal=True).init(jax.random.key(0), x, decode=True)


# ---------------------------------------------------------------------------------------
# Strided and transposed convolutions in stride-1 form (mmjax.layers.conv).
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,s,padding", [
    (2, 3, 2, "SAME"), (2, 2, 2, "SAME"), (2, 5, 2, "VALID"), (2, 4, 2, "VALID"),
    (2, 3, 1, "SAME"), (3, 4, 2, "videogpt"), (3, 4, 1, "videogpt"), (3, 3, 2, "SAME")])
def test_stride_one_convolutions_equal_lax(n, k, s, padding):
  from mmjax.layers import conv as conv_lib  # noqa: PLC0415

  rng = np.random.default_rng(k * 10 + s)
  size = 8 if n == 2 else 6
  dn = ("NHWC", "HWIO", "NHWC") if n == 2 else ("NDHWC", "DHWIO", "NDHWC")
  x = jnp.asarray(rng.normal(size=(2, *(size,) * n, 5)), jnp.float32)
  strides = (s,) * n
  if padding == "videogpt":  # k - s in all, the odd one in front; the transpose's on the
    pads = [((k - s + 1) // 2, (k - s) // 2)] * n  # dilated input: s times that
    transpose_pads = [(a * s, b * s) for a, b in pads]
  else:
    pads = jax.lax.padtype_to_pads((size,) * n, (k,) * n, strides, padding)
    transpose_pads = padding
  for features in (3, 40):  # phases fused into one convolution or one per phase
    kernel = jnp.asarray(rng.normal(size=(*(k,) * n, 5, features)), jnp.float32)
    want = jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=dn)
    np.testing.assert_allclose(conv_lib.conv(x, kernel, strides, pads), want, atol=1e-4)
    for flip in (False, True):
      kernel = jnp.asarray(rng.normal(size=(*(k,) * n, *((features, 5) if flip else
                                                         (5, features)))), jnp.float32)
      want = jax.lax.conv_transpose(x, kernel, strides, transpose_pads, dimension_numbers=dn,
                                    transpose_kernel=flip)
      if any(o % s for o in want.shape[1:-1]):
        continue  # output sizes that are not whole phases are refused
      module = conv_lib.Conv(features, (k,) * n, strides, transpose_pads, transpose=True,
                             transpose_kernel=flip, use_bias=False)
      got = module.apply({"params": {"kernel": kernel}}, x)
      np.testing.assert_allclose(got, want, atol=1e-4)
