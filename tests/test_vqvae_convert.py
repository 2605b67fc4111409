"""VideoGPT's VQ-VAE: the written-out PyTorch reference (benchmarks/vqvae_torch.py) against
VideoGPT's own code (when VIDEOGPT_SRC names its checkout), and the conversion of its
Lightning checkpoint into mmjax against that reference."""

import argparse
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import vqvae_torch

# (n_hiddens, n_res_layers, downsample, embedding_dim, n_codes) of the random models.
SMALL = {"n_hiddens": 32, "n_res_layers": 2, "embedding_dim": 16, "n_codes": 32}
DOWNSAMPLES = ((4, 4, 4), (2, 2, 2))  # (2, 2, 2): conv_last takes 3 channels, so n_hiddens 3


def _args(downsample, **overrides) -> argparse.Namespace:
  fields = SMALL | {"n_hiddens": 3 if downsample == (2, 2, 2) else SMALL["n_hiddens"]}
  return argparse.Namespace(**(fields | overrides), downsample=downsample,
                            sequence_length=8, resolution=16)


def _video(seed: int, batch: int = 2, frames: int = 8, size: int = 16) -> np.ndarray:
  """Float video `"b 3 t h w"` in [-0.5, 0.5] (the reference's layout)."""
  return np.random.default_rng(seed).uniform(-0.5, 0.5, (batch, 3, frames, size, size)
                                             ).astype(np.float32)


def _randomise(model, seed: int):
  """Random BatchNorm affines and statistics (init leaves them 1 and 0), a random codebook
  whose counts are all at least 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm3d):
        c = module.num_features
        module.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen))
        module.bias.copy_(0.2 * torch.randn(c, generator=gen))
        module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_var.copy_(1 + 0.3 * torch.rand(c, generator=gen))
    book = model.codebook
    book.embeddings.copy_(0.3 * torch.randn(book.embeddings.shape, generator=gen))
    book.N.copy_(1 + torch.rand(book.N.shape, generator=gen))
    book.z_avg.copy_(book.embeddings * book.N[:, None])
  return model


def _videogpt():
  """VideoGPT's `videogpt.vqvae` from VIDEOGPT_SRC. Stubs stand in for what it imports
  but the VQ-VAE does not use: `pytorch_lightning` (the module subclasses LightningModule
  and calls save_hyperparameters, nothing else), `skvideo.io` (utils' video writer), and
  the package's `__init__` (which imports the GPT, the data and the downloads)."""
  src = os.environ.get("VIDEOGPT_SRC")
  if not src:
    pytest.skip("VIDEOGPT_SRC (a checkout of wilson1yan/VideoGPT) is not set.")
  if "videogpt.vqvae" in sys.modules:
    return sys.modules["videogpt.vqvae"]

  class LightningModule(torch.nn.Module):
    def save_hyperparameters(self, *args, **kwargs):
      pass

  stubs = {"pytorch_lightning": {"LightningModule": LightningModule}, "skvideo": {},
           "skvideo.io": {}, "videogpt": {"__path__": [os.path.join(src, "videogpt")]}}
  for name, attributes in stubs.items():
    if name not in sys.modules:
      module = sys.modules[name] = types.ModuleType(name)
      module.__dict__.update(attributes)
  import importlib
  return importlib.import_module("videogpt.vqvae")


def _close(a, b, what, atol=1e-5):
  a, b = (x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (a, b))
  np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5, err_msg=what)


@pytest.mark.parametrize("downsample", DOWNSAMPLES)
def test_written_out_reference_equals_videogpt(downsample):
  vqvae = _videogpt()
  args = _args(downsample)
  torch.manual_seed(0)
  theirs = _randomise(vqvae.VQVAE(args), 1)
  ours = vqvae_torch.VQVAE(args)
  assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
  ours.load_state_dict(theirs.state_dict())
  x = torch.tensor(_video(2))

  ours.eval(), theirs.eval()
  with torch.no_grad():
    (loss_a, recon_a, vq_a), (loss_b, recon_b, vq_b) = ours(x), theirs(x)
  _close(recon_a, recon_b, "eval reconstruction")
  _close(loss_a, loss_b, "eval recon_loss")
  for name in ("commitment_loss", "perplexity", "embeddings"):
    _close(vq_a[name], vq_b[name], f"eval {name}")
  assert torch.equal(vq_a["encodings"], vq_b["encodings"])
  assert torch.equal(ours.encode(x), theirs.encode(x))
  _close(ours.decode(vq_a["encodings"]), theirs.decode(vq_b["encodings"]), "decode")
  _close(ours.encoder(x), theirs.encoder(x), "encoder")

  # One train step each, the random draws (codebook init, restarts) from the same seed; on
  # 4 frames at (4, 4, 4) the batch has fewer vectors than codes (the tiling's noise).
  ours.train(), theirs.train()
  x = torch.tensor(_video(3, batch=1, frames=4))
  results = []
  for model in (ours, theirs):
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.9, 0.999))
    torch.manual_seed(3)
    recon_loss, _, vq = model(x)
    loss = recon_loss + vq["commitment_loss"]
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    optimizer.step()
    results.append((loss.detach(), vq, grads,
                    {k: v.clone() for k, v in model.state_dict().items()}))
  (loss_a, vq_a, grads_a, state_a), (loss_b, vq_b, grads_b, state_b) = results
  _close(loss_a, loss_b, "train loss")
  assert torch.equal(vq_a["encodings"], vq_b["encodings"])
  for name in ("codebook.embeddings", "codebook.N", "codebook.z_avg"):
    _close(state_a[name], state_b[name], f"train step's {name}")
  for name in grads_a:
    _close(grads_a[name], grads_b[name], f"gradient of {name}", atol=1e-5)
  # Adam's first step moves each weight by about lr * sign(gradient): a gradient within
  # rounding of 0 may move it either way.
  for name in state_a:
    _close(state_a[name], state_b[name], f"after the train step: {name}", atol=2.1 * 3e-4)
