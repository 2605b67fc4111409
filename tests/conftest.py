"""Toy shapes shared by the tests: small enough to compile in seconds on a CPU.

The tests see 8 CPU devices, so that sharded runs are tested against one device in the
same process; code that should run on one device asks for `jax.devices()[:1]`.
"""

import atexit
import os
import shutil
import sys
import tempfile

# CPU only: with libtpu installed (for ahead-of-time TPU compilation), JAX would otherwise
# probe for TPU hardware, also in the tests' subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_compilations() -> None:
  """One persistent compilation cache for the whole run: the many tests that train the same
  toy model compile its step once. Set in the environment before JAX is imported, so that
  pytest-xdist's workers (started after this conftest is imported in the controller), the
  tests' `python -m mmjax.train` subprocesses and the notebooks' kernels all share it. The
  cache only skips recompiling a program XLA has already compiled: outputs are unchanged.
  A `JAX_COMPILATION_CACHE_DIR` set by the caller is used (and kept) instead."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  cache = tempfile.mkdtemp(prefix="mmjax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  # The toy programs compile in well under JAX's default threshold of one second.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, cache, ignore_errors=True)


_share_compilations()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from mmjax.models.flamingo import Flamingo, FlamingoConfig  # noqa: E402
from mmjax.models.lm import LMConfig  # noqa: E402
from mmjax.models.perceiver import ResamplerConfig  # noqa: E402
from mmjax.models.vit import ViTConfig  # noqa: E402
from mmjax.models.xattn import XAttnConfig  # noqa: E402

MEDIA, ENDOFCHUNK, PAD = 1, 2, 0

GPT2_LIKE = LMConfig(vocab_size=64, width=32, depth=4, num_heads=4, max_len=64)
LLAMA_LIKE = LMConfig(vocab_size=64, width=32, depth=4, num_heads=4, num_kv_heads=2,
                      activation="silu", gated_mlp=True, norm="rmsnorm", norm_eps=1e-6,
                      use_bias=False, position="rope", tie_embeddings=False, mlp_dim=48)
# A head count that is not a power of two, for ALiBi's slopes.
MPT_LIKE = LMConfig(vocab_size=64, width=48, depth=2, num_heads=6, activation="gelu",
                    use_bias=False, position="alibi")


def flamingo_config(lm: LMConfig = LLAMA_LIKE, **xattn) -> FlamingoConfig:
  return FlamingoConfig(
      vision=ViTConfig(image_size=16, patch_size=8, width=32, depth=2, num_heads=4,
                       output_dim=16),
      resampler=ResamplerConfig(depth=2, num_heads=2, head_dim=8, num_latents=3),
      lm=lm,
      xattn=XAttnConfig(**{"every": 2, "num_heads": 2, "head_dim": 8, **xattn}),
      media_token_id=MEDIA, endofchunk_token_id=ENDOFCHUNK)


def random_gates(params, seed: int = 7):
  """Trained-looking gates: nonzero, so the cross-attention branches matter."""
  rng = jax.random.key(seed)
  def perturb(path, x):
    if getattr(path[-1], "key", None) in ("attn_gate", "mlp_gate"):
      return jax.random.uniform(rng, x.shape, minval=0.5, maxval=1.0)
    return x
  return jax.tree_util.tree_map_with_path(perturb, params)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "checkout: compares against a reference that is a source checkout named by "
      "an environment variable, not a package on PyPI; CI cannot install it, so there the "
      "test's skip is reported and counted, not failed")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  report = yield
  return report if item.get_closest_marker("checkout") else _no_skip_in_ci(report)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
  return _no_skip_in_ci((yield))


def _no_skip_in_ci(report):
  """In CI (`CI` set, as `.ci/run` runs) a skipped test or module fails: CI installs every
  reference the tests compare against (torch, transformers, open_flamingo, libtpu, TFDS),
  so a skip there means a missing install step, and a parity test must not pass by not
  running. `MMJAX_ALLOW_SKIPS=1` lets a CI-like run skip anyway. Tests marked `checkout`
  are exempt: their reference is no package (see `videogpt_vqvae`)."""
  if (report.skipped and os.environ.get("CI") and not os.environ.get("MMJAX_ALLOW_SKIPS")
      and not hasattr(report, "wasxfail")):
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = (f"Skipped in CI, where every test reference is installed: {reason}. "
                       "Install what it names (`bash .ci/run` installs everything).")
  return report


def videogpt_vqvae():
  """VideoGPT's `videogpt.vqvae` module, from the checkout of wilson1yan/VideoGPT that
  `VIDEOGPT_SRC` names (PyPI's `videogpt` is an empty placeholder); skips without one.
  Stubs stand in for what it imports but the VQ-VAE does not use: `pytorch_lightning` (the
  module subclasses LightningModule and calls save_hyperparameters, nothing else),
  `skvideo.io` (utils' video writer), and the package's `__init__` (which imports the GPT,
  the data and the downloads). Tests that call it are marked `checkout`."""
  src = os.environ.get("VIDEOGPT_SRC")
  if not src:
    pytest.skip("VIDEOGPT_SRC (a checkout of wilson1yan/VideoGPT) is not set; the written-out "
                "reference benchmarks/vqvae_torch.py, held equal to it, runs instead")
  import importlib
  import types

  import torch

  class LightningModule(torch.nn.Module):
    def save_hyperparameters(self, *args, **kwargs):
      pass

  stubs = {"pytorch_lightning": {"LightningModule": LightningModule}, "skvideo": {},
           "skvideo.io": {}, "videogpt": {"__path__": [os.path.join(src, "videogpt")]}}
  for name, attributes in stubs.items():
    if name not in sys.modules:
      module = sys.modules[name] = types.ModuleType(name)
      module.__dict__.update(attributes)
  return importlib.import_module("videogpt.vqvae")


@pytest.fixture(scope="module")
def toy_flamingo():
  """A toy Flamingo, its params with nonzero gates, and one interleaved batch."""
  model = Flamingo(flamingo_config())
  # row 0: text, <image>, text, <|endofchunk|>, <image>, text ...; row 1: right-padded.
  tokens = jnp.array([[5, 6, MEDIA, 7, 8, ENDOFCHUNK, MEDIA, 9, 10, 11, ENDOFCHUNK, 12],
                      [MEDIA, 13, 14, ENDOFCHUNK, 15, 16, 17, PAD, PAD, PAD, PAD, PAD]])
  images = jax.random.normal(jax.random.key(0), (2, 2, 1, 16, 16, 3))
  num_images = jnp.array([2, 1])
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens, images, num_images)["params"])
  return model, random_gates(params), tokens, images, num_images
