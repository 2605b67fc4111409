"""VideoGPT's VQ-VAE: the written-out PyTorch reference (benchmarks/vqvae_torch.py) against
VideoGPT's own code (when VIDEOGPT_SRC names its checkout), and the conversion of its
Lightning checkpoint into mmjax against that reference."""

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import vqvae_torch  # noqa: E402 (torch first)
from conftest import videogpt_vqvae  # noqa: E402

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


def _close(a, b, what, atol=1e-5):
  a, b = (x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (a, b))
  np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5, err_msg=what)


@pytest.mark.checkout
@pytest.mark.parametrize("downsample", DOWNSAMPLES)
def test_written_out_reference_equals_videogpt(downsample):
  vqvae = videogpt_vqvae()
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


def _checkpoint(tmp_path, args, seed: int = 0):
  """A random written-out reference (BatchNorm and codebook randomised) saved as VideoGPT's
  Lightning checkpoint."""
  torch.manual_seed(seed)
  model = _randomise(vqvae_torch.VQVAE(args), seed + 1).eval()
  path = tmp_path / "vqvae.ckpt"
  torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"args": args},
              "epoch": 3, "global_step": 1000}, path)
  return model, path


# (4, 4, 4): two strided convs on every axis; (1, 4, 4): time kept (stride 1 there),
# 8 frames, 3 heads' worth of mixed strides.
PARITY = ((4, 4, 4), (1, 4, 4))


@pytest.mark.parametrize("downsample", PARITY)
def test_converted_videogpt_matches_reference(tmp_path, downsample):
  import jax
  import jax.numpy as jnp

  from mmjax import convert
  from mmjax.models.vqvae import VQVAE
  args = _args(downsample)
  model, path = _checkpoint(tmp_path, args)
  cfg, params, state = convert.convert_videogpt(path)
  assert (cfg.n_hiddens, cfg.n_res_layers, cfg.downsample, cfg.embedding_dim, cfg.n_codes,
          cfg.frames, cfg.resolution) == (32, 2, downsample, 16, 32, 8, 16)
  assert bool(state["codebook"]["codebook"]["initialized"])

  video = _video(4)  # "b 3 t h w"
  with torch.no_grad():
    theirs = model.features(torch.tensor(video))
    _, recon, _ = model(torch.tensor(video))
  variables = {"params": params, **state}
  ours_video = jnp.asarray(video.transpose(0, 2, 3, 4, 1))  # "b t h w 3"
  model_j = VQVAE(cfg)

  @jax.jit  # one compilation: encode, reconstruct, decode the reference's codes
  def run(variables, video, codes):
    return (model_j.apply(variables, video, method="encode"),
            model_j.apply(variables, video, train=False),
            model_j.apply(variables, codes, method="decode"))

  ours, out, decoded = run(variables, ours_video, jnp.asarray(theirs["encodings"].numpy()))
  last = lambda x: vqvae_torch.channels_last(x).numpy()
  for name in ("resnet", "attention", "pre_vq"):
    np.testing.assert_allclose(np.asarray(ours[name]), last(theirs[name]), atol=1e-4,
                               rtol=1e-4, err_msg=name)
  np.testing.assert_array_equal(np.asarray(ours["encodings"]), theirs["encodings"].numpy())
  np.testing.assert_array_equal(np.asarray(out["encodings"]), theirs["encodings"].numpy())
  np.testing.assert_allclose(np.asarray(out["recon"]), last(recon), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(decoded), last(recon), atol=1e-4, rtol=1e-4)



def test_bare_state_dict_with_config_converts(tmp_path):
  from mmjax import convert
  args = _args((4, 4, 4))
  model = vqvae_torch.VQVAE(args)
  cfg, params, _ = convert.convert_videogpt(model.state_dict(), vars(args))
  assert cfg.n_hiddens == 32
  path = tmp_path / "state.pt"
  torch.save(model.state_dict(), path)
  with pytest.raises(convert.ConversionError, match="hyper_parameters.args"):
    convert.convert_videogpt(path)
  _, params2, _ = convert.convert_videogpt(path, vars(args))
  np.testing.assert_array_equal(params2["pre_vq"]["kernel"], params["pre_vq"]["kernel"])


def test_conversion_refuses_what_it_cannot_convert(tmp_path):
  from mmjax import convert
  args = _args((4, 4, 4))
  state = dict(vqvae_torch.VQVAE(args).state_dict())
  with pytest.raises(convert.ConversionError, match="unexpected parameters.*extra.weight"):
    convert.convert_videogpt(state | {"extra.weight": torch.zeros(2)}, vars(args))
  missing = {k: v for k, v in state.items() if k != "codebook.N"}
  with pytest.raises(convert.ConversionError, match="missing parameters.*codebook.N"):
    convert.convert_videogpt(missing, vars(args))
  with pytest.raises(convert.ConversionError, match="shape mismatches.*pre_vq_conv"):
    convert.convert_videogpt(state, vars(args) | {"embedding_dim": 8})
  with pytest.raises(convert.ConversionError, match="n_codes"):
    convert.convert_videogpt(state, {k: v for k, v in vars(args).items() if k != "n_codes"})
  # Every factor at most 2: VideoGPT's conv_last takes 3 channels (its loop variable), so
  # a 32-wide model cannot run there; refused, naming why.
  quirk = _args((2, 2, 2), n_hiddens=32)
  with pytest.raises(convert.ConversionError, match="conv_last.*loop"):
    convert.convert_videogpt(vqvae_torch.VQVAE(quirk).state_dict(), vars(quirk))
  with pytest.raises(RuntimeError):  # ... as the reference itself shows
    vqvae_torch.VQVAE(quirk).eval()(torch.tensor(_video(0)))


def test_train_steps_of_both_systems_agree():
  """benchmarks/vqvae.py's two steps (forward, backward, Adam, EMA) on the same converted
  weights and clips: equal losses at the first and third step, equal codebook counts and
  sums after three."""
  from benchmarks import vqvae as bench
  size = bench.STEP_SIZES["toy"]
  model, cfg, params, model_state = bench.reference_model(size)
  video = bench.clips(size)
  theirs = bench.TorchStep(model, video)
  ours = bench.MmjaxStep(cfg, params, model_state, video)
  for _ in range(3):
    ours(), theirs()
  assert ours.loss0 == pytest.approx(theirs.loss0, rel=1e-5)
  assert ours.loss == pytest.approx(theirs.loss, rel=1e-4)
  book = ours.state["codebook"]["codebook"]
  np.testing.assert_allclose(np.asarray(book["counts"]), model.codebook.N.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(book["sums"]), model.codebook.z_avg.numpy(), atol=1e-4)


def test_the_command_line_converts_videogpt(tmp_path):
  import json

  from absl import flags

  from mmjax.convert import __main__ as command
  _, path = _checkpoint(tmp_path, _args((4, 4, 4), n_res_layers=1))
  argv = ["convert", f"--videogpt={path}", f"--output={tmp_path / 'out'}"]
  flags.FLAGS(argv)
  try:
    command.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  assert saved["task"] == "vqvae"
  assert saved["model"]["n_hiddens"] == 32 and saved["model"]["downsample"] == [4, 4, 4]
  assert (tmp_path / "out" / "checkpoints" / "0").is_dir()
