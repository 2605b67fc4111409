"""VideoGPT's VQ-VAE (mmjax.models.vqvae) against torch's convolutions, naive restatements of
the axial attention and the EMA codebook, and (with VIDEOGPT_SRC naming a checkout of
wilson1yan/VideoGPT) the reference model itself."""

import functools
import math
import types

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import videogpt_vqvae

from mmjax import sharding
from mmjax.models import vqvae
from mmjax.models.vqvae import VQVAE, Codebook, Encoder, VQVAEConfig

TINY = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=8, n_res_layers=1,
                   downsample=(2, 4, 4), frames=4, resolution=16)


def torch_same_pad(kernel, strides):
  """VideoGPT's F.pad argument: per axis (last first) `k - s` split with the odd one in
  front."""
  pads = []
  for k, s in reversed(list(zip(kernel, strides))):
    p = k - s
    pads += [p // 2 + p % 2, p // 2]
  return pads


def ncthw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def cthwn(x):
  return np.moveaxis(x.detach().numpy(), 1, -1)


class Wrap(nn.Module):
  """A module around a layer-building function, for testing it alone."""

  build: callable

  @nn.compact
  def __call__(self, x):
    return self.build(x)


@pytest.mark.parametrize("kernel,strides", [(4, (2, 2, 2)), (4, (1, 2, 2)), (3, (1, 1, 1))])
def test_same_pad_conv_matches_torch(kernel, strides):
  x = np.random.default_rng(0).normal(size=(2, 4, 8, 6, 3)).astype(np.float32)
  module = Wrap(lambda h: vqvae.conv3d(5, kernel, strides, name="conv")(h))
  params = module.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(1).normal(size=a.shape),
                                              jnp.float32), flax.linen.meta.unbox(params))
  w, b = np.array(params["conv"]["kernel"]), np.array(params["conv"]["bias"])
  got = module.apply({"params": params}, x)
  ks = (kernel,) * 3
  want = F.conv3d(F.pad(ncthw(x), torch_same_pad(ks, strides)),
                  torch.from_numpy(np.ascontiguousarray(w.transpose(4, 3, 0, 1, 2))),
                  torch.from_numpy(b), stride=strides)
  assert got.shape == (2, 4 // strides[0], 8 // strides[1], 6 // strides[2], 5)
  np.testing.assert_allclose(got, cthwn(want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strides", [(2, 2, 2), (1, 2, 2)])
@pytest.mark.parametrize("features", [4, 20])  # phases fused in one convolution, or not
def test_same_pad_conv_transpose_matches_torch(strides, features):
  """The kernel is torch's ConvTranspose3d weight `"in out kt kh kw"` permuted to
  `"kt kh kw out in"`; torch pads the input, then crops `k - 1` on each side."""
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 6)).astype(np.float32)
  module = Wrap(lambda h: vqvae.conv_transpose3d(features, 4, strides, name="convt")(h))
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]["convt"]
  assert shapes["kernel"].value.shape == (4, 4, 4, features, 6)
  rng = np.random.default_rng(1)
  weight = rng.normal(size=(6, features, 4, 4, 4)).astype(np.float32)  # in out kt kh kw
  bias = rng.normal(size=(features,)).astype(np.float32)
  params = {"convt": {"kernel": jnp.asarray(weight.transpose(2, 3, 4, 1, 0)),
                      "bias": jnp.asarray(bias)}}
  got = module.apply({"params": params}, x)
  want = F.conv_transpose3d(F.pad(ncthw(x), torch_same_pad((4, 4, 4), strides)),
                            torch.from_numpy(weight), torch.from_numpy(bias), stride=strides,
                            padding=3)
  assert got.shape == (2, 3 * strides[0], 4 * strides[1], 5 * strides[2], features)
  np.testing.assert_allclose(got, cthwn(want), atol=1e-4, rtol=1e-4)


def naive_axial(x, params, heads):
  """Attention along each of t, h, w separately (every other position fixed), summed."""
  b, t, h, w, n = x.shape
  d = n // heads
  total = np.zeros_like(x)
  for axis, name in ((1, "t"), (2, "h"), (3, "w")):
    p = params[f"attn_{name}"]
    q, k, v = (np.einsum("bthwn,nm->bthwm", x, p[m]["kernel"]).reshape(b, t, h, w, heads, d)
               for m in ("query", "key", "value"))
    out = np.zeros((b, t, h, w, heads, d), np.float64)
    for idx in np.ndindex(b, t, h, w):  # one query position
      sl = list(idx)
      sl[axis] = slice(None)
      keys, values = k[tuple(sl)], v[tuple(sl)]  # l heads d
      logits = np.einsum("hd,lhd->hl", q[idx], keys) / math.sqrt(d)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[idx] = np.einsum("hl,lhd->hd", probs, values)
    total += out.reshape(b, t, h, w, n) @ p["out"]["kernel"] + p["out"]["bias"]
  return total


def test_axial_block_matches_naive_attention():
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 8)).astype(np.float32)
  module = Wrap(lambda h: vqvae.axial_block(h, 2, {}))
  params = flax.linen.meta.unbox(module.init(jax.random.key(0), x)["params"])
  assert set(params) == {"attn_t", "attn_h", "attn_w"}
  assert set(params["attn_t"]["out"]) == {"kernel", "bias"}
  assert set(params["attn_t"]["query"]) == {"kernel"}
  rng = np.random.default_rng(1)  # different weights for each attention
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
  got = module.apply({"params": params}, x)
  np.testing.assert_allclose(got, naive_axial(x.astype(np.float64), jax.tree.map(
      np.asarray, params), 2), atol=1e-4, rtol=1e-4)


# The codebook, restated.

def naive_laplace(counts, sums):
  n = counts.sum()
  return sums / ((counts + 1e-7) / (n + len(counts) * 1e-7) * n)[:, None]


def nearest(flat, codes):
  return np.argmin(((flat[:, None, :] - codes[None]) ** 2).sum(-1), axis=1)


def near_rows(codes, flat, tol):
  """Whether each code is within `tol` (max abs) of a row of `flat`."""
  return np.abs(codes[:, None, :] - flat[None]).max(-1).min(-1) <= tol


def codebook_step(state, z, seed=0, train=True, restart=True):
  out, new = Codebook(state["embeddings"].shape[0], restart=restart).apply(
      {"codebook": state}, jnp.asarray(z), train=train, mutable=["codebook"],
      rngs={"codebook": jax.random.key(seed)})
  return out, jax.tree.map(np.asarray, new["codebook"])


def test_codebook_first_step_initialises_from_the_batch():
  """The first train step draws its codes from the batch's vectors (distinct rows: 32
  vectors for 16 codes), encodes with them, then takes one EMA step."""
  z = np.random.default_rng(0).normal(size=(2, 2, 2, 4, 3)).astype(np.float32)
  flat = z.reshape(-1, 3)
  model = Codebook(16)
  state = model.init(jax.random.key(0), jnp.asarray(z), train=True)["codebook"]
  assert not state["initialized"] and state["embeddings"].shape == (16, 3)
  np.testing.assert_array_equal(state["counts"], 0)
  np.testing.assert_array_equal(state["sums"], state["embeddings"])
  out, new = codebook_step(jax.tree.map(np.asarray, state), z)
  assert new["initialized"]
  idx = np.asarray(out["encodings"]).reshape(-1)
  onehot = np.eye(16)[idx]
  n = onehot.sum(0)
  np.testing.assert_allclose(new["counts"], 0.99 + 0.01 * n, rtol=1e-6)
  first = (new["sums"] - 0.01 * onehot.T @ flat) / 0.99  # the drawn codes
  assert near_rows(first, flat, 1e-5).all()
  assert len({tuple(np.round(r, 4)) for r in first}) == 16  # distinct rows
  np.testing.assert_array_equal(idx, nearest(flat, first))
  np.testing.assert_allclose(np.asarray(out["embeddings"]).reshape(-1, 3), first[idx],
                             atol=1e-5)
  assert (new["counts"] >= 1).all()  # each drawn code is its own vector's nearest
  np.testing.assert_allclose(new["embeddings"], naive_laplace(new["counts"], new["sums"]),
                             rtol=1e-5)


def test_codebook_tiles_a_small_batch_with_noise():
  """Fewer vectors (4) than codes (16): codes are batch vectors plus noise of std
  0.01 / sqrt(e), not exact copies."""
  z = np.random.default_rng(1).normal(size=(1, 1, 2, 2, 4)).astype(np.float32)
  flat = z.reshape(-1, 4)
  state = jax.tree.map(np.asarray, Codebook(16).init(jax.random.key(0), jnp.asarray(z),
                                                     train=True)["codebook"])
  out, new = codebook_step(state, z)
  onehot = np.eye(16)[np.asarray(out["encodings"]).reshape(-1)]
  first = (new["sums"] - 0.01 * onehot.T @ flat) / 0.99  # the drawn codes
  std = 0.01 / math.sqrt(4)
  assert near_rows(first, flat, 6 * std).all()
  assert not near_rows(first, flat, 1e-7).any()
  # the four vectors tiled four times, permuted: each the source of four codes
  np.testing.assert_array_equal(np.bincount(nearest(first, flat), minlength=4), [4] * 4)
  restarted = new["counts"] < 1
  assert restarted.any()
  assert near_rows(new["embeddings"][restarted], flat, 6 * std).all()


def test_codebook_ema_step_laplace_smoothing_and_restart():
  """A step from a known state: encodings, counts, sums and the Laplace-smoothed codes as
  a numpy restatement computes them; codes whose count fell below 1 are batch rows."""
  rng = np.random.default_rng(2)
  k, e = 12, 3
  codes = rng.normal(size=(k, e)).astype(np.float32)
  counts = np.where(np.arange(k) % 3 == 0, 0.5, 4.0).astype(np.float32)
  codes[1], counts[1] = 100.0, 0.0  # never chosen, never counted: smoothing keeps it finite
  state = {"embeddings": codes, "counts": counts, "sums": codes * counts[:, None] * 1.5,
           "initialized": np.array(True)}
  z = rng.normal(size=(2, 1, 3, 4, e)).astype(np.float32)
  flat = z.reshape(-1, e)
  out, new = codebook_step(state, z, seed=3)
  idx = nearest(flat, codes)
  np.testing.assert_array_equal(np.asarray(out["encodings"]).reshape(-1), idx)
  assert out["encodings"].shape == (2, 1, 3, 4) and out["encodings"].dtype == jnp.int32
  onehot = np.eye(k)[idx]
  want_counts = 0.99 * counts + 0.01 * onehot.sum(0)
  want_sums = 0.99 * state["sums"] + 0.01 * onehot.T @ flat
  np.testing.assert_allclose(new["counts"], want_counts, rtol=1e-6)
  np.testing.assert_allclose(new["sums"], want_sums, rtol=1e-5, atol=1e-6)
  used = want_counts >= 1
  assert used.any() and not used.all()
  np.testing.assert_allclose(new["embeddings"][used], naive_laplace(want_counts, want_sums)[
      used], rtol=1e-5, atol=1e-6)
  assert near_rows(new["embeddings"][~used], flat, 1e-6).all()
  # commitment, perplexity and the codes used are the batch's
  np.testing.assert_allclose(out["commitment_loss"], np.mean((flat - codes[idx]) ** 2),
                             rtol=1e-5)
  p = onehot.mean(0)
  np.testing.assert_allclose(out["perplexity"], np.exp(-np.sum(p * np.log(p + 1e-10))),
                             rtol=1e-5)
  assert out["codes_used"] == len(set(idx.tolist()))
  # without restarts the dead codes keep their smoothed averages
  _, kept = codebook_step(state, z, seed=3, restart=False)
  np.testing.assert_allclose(kept["embeddings"], naive_laplace(want_counts, want_sums),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(kept["embeddings"][1], 0.0)


def test_codebook_straight_through_and_eval():
  """d embeddings / d z is the identity; outside training nothing changes."""
  rng = np.random.default_rng(3)
  state = {"embeddings": rng.normal(size=(8, 3)).astype(np.float32),
           "counts": np.ones(8, np.float32), "sums": rng.normal(size=(8, 3)).astype(np.float32),
           "initialized": np.array(True)}
  z = jnp.asarray(rng.normal(size=(1, 1, 2, 2, 3)).astype(np.float32))
  f = lambda z: Codebook(8).apply({"codebook": state}, z)["embeddings"]
  jac = jax.jacobian(f)(z).reshape(12, 12)
  np.testing.assert_array_equal(jac, np.eye(12))
  out, new = codebook_step(state, z, train=False)
  jax.tree.map(np.testing.assert_array_equal, new, state)
  np.testing.assert_allclose(np.asarray(out["embeddings"]).reshape(-1, 3),
                             state["embeddings"][nearest(np.asarray(z).reshape(-1, 3),
                                                         state["embeddings"])], atol=1e-6)


def video(b=2, cfg=TINY, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, cfg.frames, cfg.resolution,
                                                       cfg.resolution, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_variables():
  return flax.linen.meta.unbox(jax.jit(VQVAE(TINY).init)(jax.random.key(0), video(b=1)))


def test_vqvae_eval_mutates_nothing_and_interfaces(tiny_variables):
  model, x, variables = VQVAE(TINY), video(), tiny_variables

  @jax.jit
  def run(variables, x):
    out, new = model.apply(variables, x, train=False, mutable=True)
    enc = model.apply(variables, x, method="encode")
    recon = model.apply(variables, enc["encodings"], method="decode")
    alone = Encoder(TINY).apply({k: v["encoder"] for k, v in variables.items()
                                 if k in ("params", "batch_stats")}, x)
    return out, new, enc, recon, alone

  out, new, enc, recon, alone = run(variables, x)
  jax.tree.map(np.testing.assert_array_equal, new, variables)
  assert out["recon"].shape == x.shape and out["encodings"].shape == (2, 2, 4, 4)
  assert enc["resnet"].shape == enc["attention"].shape == (2, 2, 4, 4, 8)
  assert enc["pre_vq"].shape == (2, 2, 4, 4, 8)
  np.testing.assert_array_equal(enc["encodings"], out["encodings"])
  np.testing.assert_allclose(recon, out["recon"], atol=1e-5)
  np.testing.assert_array_equal(alone["attention"], enc["attention"])
  np.testing.assert_allclose(out["recon_loss"], np.mean(
      (np.asarray(out["recon"]) - (x / 255 - 0.5)) ** 2) / 0.06, rtol=1e-5)


def test_config_refuses_bad_downsampling():
  with pytest.raises(ValueError, match="powers of two"):
    VQVAEConfig(downsample=(3, 4, 4))
  with pytest.raises(ValueError, match="not divisible"):
    VQVAEConfig(frames=6, downsample=(4, 4, 4))


def test_data_parallel_step_sums_the_global_batch(tiny_variables):
  """A jitted train step with the batch split over 8 devices updates the codebook (and the
  BatchNorm statistics) as one device does: its counts and sums are the global batch's."""
  model, x, variables = VQVAE(TINY), jnp.asarray(video(b=8)), tiny_variables

  def step(variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats", "codebook"],
                       rngs={"codebook": jax.random.key(1)})

  one = jax.jit(step)(*jax.device_put((variables, x), jax.devices()[0]))
  mesh = sharding.make_mesh({"data": 8}, jax.devices()[:8])
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.jit(step, in_shardings=(replicated, batch))(variables,
                                                           jax.device_put(x, batch))
  assert sharded[1]["codebook"]["codebook"]["counts"].sharding.is_fully_replicated
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
  jax.tree.map(close, jax.device_get(sharded), jax.device_get(one))
  counts = np.asarray(one[1]["codebook"]["codebook"]["counts"])
  np.testing.assert_allclose(counts.sum(), 0.99 * 16 + 0.01 * 8 * 2 * 4 * 4, rtol=1e-5)


# The reference model (wilson1yan/VideoGPT), from the checkout VIDEOGPT_SRC names.

def to_flax(state: dict, cfg: VQVAEConfig) -> dict:
  """The reference's state dict as this model's variables."""
  sd = {k: v.detach().numpy() for k, v in state.items()}
  params, stats = {}, {}

  def conv(prefix):
    out = {"kernel": sd[f"{prefix}.weight"].transpose(2, 3, 4, 1, 0)}
    if f"{prefix}.bias" in sd:
      out["bias"] = sd[f"{prefix}.bias"]
    return out

  def norm(prefix):
    stats_ = {"mean": sd[f"{prefix}.running_mean"], "var": sd[f"{prefix}.running_var"]}
    return {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}, stats_

  def stack(prefix):
    p, s = {}, {}
    for j in range(cfg.n_res_layers):
      block = f"{prefix}.res_stack.{j}.block"
      rp, rs = {}, {}
      for i, layer in enumerate((0, 3, 6)):
        rp[f"norm_{i}"], rs[f"norm_{i}"] = norm(f"{block}.{layer}")
      rp["conv_0"] = conv(f"{block}.2.conv")
      rp["conv_1"] = conv(f"{block}.5.conv")
      for a in "thw":
        att = f"{block}.8.attn_{a}"
        rp[f"attn_{a}"] = {m: {"kernel": sd[f"{att}.{w}.weight"].T} for m, w in
                           (("query", "w_qs"), ("key", "w_ks"), ("value", "w_vs"))}
        rp[f"attn_{a}"]["out"] = {"kernel": sd[f"{att}.fc.weight"].T,
                                  "bias": sd[f"{att}.fc.bias"]}
      p[f"res_{j}"], s[f"res_{j}"] = rp, rs
    p["norm"], s["norm"] = norm(f"{prefix}.res_stack.{cfg.n_res_layers}")
    return p, s

  params["encoder"], stats["encoder"] = stack("encoder")
  params["decoder"], stats["decoder"] = stack("decoder")
  for i in range(cfg.num_down):
    params["encoder"][f"convs_{i}"] = conv(f"encoder.convs.{i}.conv")
    params["decoder"][f"convts_{i}"] = conv(f"decoder.convts.{i}.convt")
  params["encoder"]["conv_last"] = conv("encoder.conv_last.conv")
  params["pre_vq"] = conv("pre_vq_conv.conv")
  params["post_vq"] = conv("post_vq_conv.conv")
  codebook = {"embeddings": sd["codebook.embeddings"], "counts": sd["codebook.N"],
              "sums": sd["codebook.z_avg"], "initialized": np.array(True)}
  return jax.tree.map(jnp.asarray, {"params": params, "batch_stats": stats,
                                    "codebook": {"codebook": codebook}})


def randomised(module):
  """Random BatchNorm affines and running statistics, so that they matter."""
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm3d):
        m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
  return module


@pytest.mark.checkout
@pytest.mark.parametrize("downsample", [(2, 4, 4), (4, 4, 4)])
def test_matches_the_reference(downsample):
  ref_module = videogpt_vqvae()
  cfg = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=2,
                    downsample=downsample, frames=8, resolution=16)
  torch.manual_seed(0)
  args = types.SimpleNamespace(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=2,
                               downsample=downsample, sequence_length=8, resolution=16)
  ref = randomised(ref_module.VQVAE(args))
  with torch.no_grad():  # counts high enough that no code is restarted after one step
    ref.codebook.N.fill_(10.0)
    ref.codebook.z_avg.copy_(ref.codebook.embeddings * 10)
  ref.codebook._need_init = False
  variables = to_flax(ref.state_dict(), cfg)
  model = VQVAE(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 16, 16, 3)))
  assert jax.tree.structure(flax.linen.meta.unbox(shapes)) == jax.tree.structure(variables)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape),
               flax.linen.meta.unbox(shapes), variables)

  x = video(b=2, cfg=cfg)
  xt = ncthw(x.astype(np.float32) / 255 - 0.5)
  # eval: the running statistics
  ref.eval()
  with torch.no_grad():
    h = xt
    for conv in ref.encoder.convs:
      h = F.relu(conv(h))
    want_resnet = ref.encoder.conv_last(h)
    want_z = ref.pre_vq_conv(ref.encoder(xt))
    want_codes = ref.codebook(want_z)["encodings"].numpy()
    _, want_recon, _ = ref(xt)
  enc = model.apply(variables, x, method="encode")
  np.testing.assert_allclose(enc["resnet"], cthwn(want_resnet), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(enc["pre_vq"], cthwn(want_z), atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(enc["encodings"], want_codes)
  out = model.apply(variables, x, train=False)
  np.testing.assert_allclose(out["recon"], cthwn(want_recon), atol=1e-4, rtol=1e-4)

  # train: batch statistics, the running ones and the codebook updated
  ref.train()
  with torch.no_grad():
    loss, want_recon, vq = ref(xt)
  out, new = model.apply(variables, x, train=True, mutable=["batch_stats", "codebook"],
                         rngs={"codebook": jax.random.key(0)})
  np.testing.assert_allclose(out["recon"], cthwn(want_recon), atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(out["encodings"], vq["encodings"].numpy())
  np.testing.assert_allclose(out["recon_loss"], loss.item(), rtol=1e-4)
  np.testing.assert_allclose(out["commitment_loss"], vq["commitment_loss"].item(), rtol=1e-4)
  np.testing.assert_allclose(out["perplexity"], vq["perplexity"].item(), rtol=1e-4)
  want = to_flax(ref.state_dict(), cfg)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
               {k: new[k] for k in new}, {k: want[k] for k in new})
