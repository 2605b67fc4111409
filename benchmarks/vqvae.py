"""VideoGPT's VQ-VAE train step beside the PyTorch reference (`--step`).

  python -m benchmarks.vqvae --step [--sizes=tiny,medium,base --rounds=3 --runs=2]
  python -m benchmarks.vqvae --convs [--rounds=3]

`--convs`: where the step's time goes on a CPU. The model's 3D convolutions at the tiny
size's first downsampling/last-but-one upsampling shape (4 clips, 64 channels, 8x32x32 <->
4x16x16, kernel 4, stride 2): XLA's strided convolution forward, its input gradient and its
kernel gradient, and the transposed convolution forward, each jitted, against
`torch.nn.functional`'s (the gradients through autograd), timed alternately. One JSON line
per op to benchmarks/results/vqvae.jsonl.

At each of `STEP_SIZES` (64 px, 16 frames), one step of VideoGPT's training: forward in
train mode (BatchNorm on the batch), `mse(recon, x) / 0.06 + 0.25 mse(z, sg(e))`, backward,
Adam (lr 3e-4, betas (0.9, 0.999), as `VQVAE.configure_optimizers`) over the parameters,
and the codebook's EMA update and dead-code restart (state, not parameters). The reference
is benchmarks/vqvae_torch.py (VideoGPT's module written out), with random weights (its
BatchNorm and codebook randomised as tests/test_vqvae_convert.py does); mmjax's
`mmjax.models.vqvae.VQVAE` holds the same weights, converted by
`mmjax.convert.convert_videogpt`, and steps under one `jit` with optax's Adam (params, Adam
state and model state donated). Both see the same uint8 clips (torch as `x / 255 - 0.5`,
`"b 3 t h w"`; mmjax `"b t h w 3"`, mapped inside the step); their first losses (the
first step's, before its update) must agree (`loss0_*`), and so do the last
(`loss_last_*`) while no code is restarted (their restart draws differ). The torch codebook
starts initialised, as the converted one does (`_need_init` False: VideoGPT would
re-initialise a loaded codebook from the first batch).

Timed alternately (`side_by_side.alternate`: two warm-up calls each, then `rounds` rounds of
`runs` calls each, medians), torch on every core (OMP_WAIT_POLICY=PASSIVE unless the
environment sets it). Memory: the mmjax step's compiled buffers (`memory_analysis`) and,
for both, the peak resident memory over one steady step less the resident memory before
it (VmHWM, reset through /proc/self/clear_refs). One JSON line per size and system to
benchmarks/results/vqvae.jsonl.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import argparse
import gc

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks import harness
from benchmarks.contrastive import memory
from benchmarks.side_by_side import alternate, record_systems
from mmjax import convert
from mmjax.layers import conv as conv_lib
from mmjax.models.vqvae import VQVAE

FLAGS = flags.FLAGS
LR, BETAS = 3e-4, (0.9, 0.999)  # VideoGPT's Adam

# VideoGPT's args (`n_hiddens`, `n_res_layers`, `downsample`, `embedding_dim`, `n_codes`),
# the clips' shape and the batch.
STEP_SIZES = {
    # A small model on the reference's clips.
    "tiny": {"n_hiddens": 64, "n_res_layers": 2, "downsample": (4, 4, 4),
             "embedding_dim": 64, "n_codes": 512, "frames": 16, "resolution": 64,
             "batch": 4},
    # Twice as wide, batch 2: PyTorch's step takes a few seconds on 2 shared cores.
    "medium": {"n_hiddens": 128, "n_res_layers": 2, "downsample": (4, 4, 4),
               "embedding_dim": 128, "n_codes": 1024, "frames": 16, "resolution": 64,
               "batch": 2},
    # VideoGPT's default model (its BAIR/UCF-101 shape: 240 wide, 4 residual blocks,
    # 2048 codes of 256), batch 2. On a 2-core CPU mmjax's step takes minutes: XLA:CPU's
    # transposed and input-gradient 3D convolutions (lhs-dilated) are 20-35x slower than
    # PyTorch's (see BENCHMARKS.md).
    "base": {"n_hiddens": 240, "n_res_layers": 4, "downsample": (4, 4, 4),
             "embedding_dim": 256, "n_codes": 2048, "frames": 16, "resolution": 64,
             "batch": 2},
    # For tests.
    "toy": {"n_hiddens": 16, "n_res_layers": 1, "downsample": (2, 4, 4),
            "embedding_dim": 8, "n_codes": 16, "frames": 4, "resolution": 16, "batch": 2},
}


def _define_flags():
  """The command line's flags: defined when this module runs, not when it is imported."""
  flags.DEFINE_bool("step", False, "Time the train step against the PyTorch reference.")
  flags.DEFINE_bool("convs", False, "Time the 3D convolution primitives of both systems.")
  flags.DEFINE_list("sizes", ["tiny", "medium"], "--step: sizes (STEP_SIZES).")
  flags.DEFINE_integer("rounds", 3, "--step: alternating rounds.")
  flags.DEFINE_integer("runs", 2, "--step: timed calls per system per round.")
  flags.DEFINE_string("results", None, "Results file (default: benchmarks/results/"
                      "vqvae.jsonl).")


def args_of(size: dict) -> argparse.Namespace:
  """VideoGPT's args for `size`."""
  return argparse.Namespace(
      n_hiddens=size["n_hiddens"], n_res_layers=size["n_res_layers"],
      downsample=size["downsample"], embedding_dim=size["embedding_dim"],
      n_codes=size["n_codes"], sequence_length=size["frames"], resolution=size["resolution"])


def reference_model(size: dict, seed: int = 0):
  """`(torch VQVAE in train mode, VQVAEConfig, params, model state)`: the written-out
  reference at `size` with random weights, BatchNorm statistics and an initialised
  codebook, and its conversion."""
  import torch

  from benchmarks import vqvae_torch
  torch.manual_seed(seed)
  model = vqvae_torch.VQVAE(args_of(size))
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm3d):
        c = module.num_features
        module.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen))
        module.bias.copy_(0.2 * torch.randn(c, generator=gen))
    book = model.codebook
    book.embeddings.copy_(0.3 * torch.randn(book.embeddings.shape, generator=gen))
    book.N.copy_(1 + torch.rand(book.N.shape, generator=gen))
    book.z_avg.copy_(book.embeddings * book.N[:, None])
    book._need_init = False  # the converted codebook is initialised
  cfg, params, model_state = convert.convert_videogpt(model.state_dict(), args_of(size))
  return model.train(), cfg, params, model_state


def clips(size: dict, seed: int = 0) -> np.ndarray:
  """uint8 clips `"b t h w 3"`: smooth random blobs (not noise, so codes are reused)."""
  rng = np.random.default_rng(seed)
  b, t, r = size["batch"], size["frames"], size["resolution"]
  coarse = rng.uniform(0, 255, (b, t, r // 8 + 1, r // 8 + 1, 3))
  ys = np.linspace(0, r // 8, r)
  fine = coarse[:, :, np.round(ys).astype(int)][:, :, :, np.round(ys).astype(int)]
  return fine.astype(np.uint8)


class MmjaxStep:
  """One jitted train step of `VQVAE(cfg)`: loss, gradients, Adam, BatchNorm statistics and
  codebook state; the arrays donated and replaced each call."""

  def __init__(self, cfg, params: dict, model_state: dict, video: np.ndarray):
    model, tx = VQVAE(cfg), optax.adam(LR, b1=BETAS[0], b2=BETAS[1], eps=1e-8)

    def loss_fn(params, state, video, key):
      out, new_state = model.apply({"params": params, **state}, video, train=True,
                                   mutable=["batch_stats", "codebook"], rngs={"codebook": key})
      return out["recon_loss"] + out["commitment_loss"], new_state

    def step(params, opt_state, state, video, key):
      (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, state, video, key)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, new_state, loss

    self.params = jax.device_put(params)
    self.opt_state = tx.init(self.params)
    self.state = jax.device_put(model_state)
    self.video, self.key = jnp.asarray(video), jax.random.key(0)
    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    self.compiled = jitted.lower(self.params, self.opt_state, self.state, self.video,
                                 self.key).compile()
    self.memory = memory(self.compiled)
    self.loss = self.loss0 = None

  def __call__(self):
    self.params, self.opt_state, self.state, loss = self.compiled(
        self.params, self.opt_state, self.state, self.video, self.key)
    self.loss = float(jax.block_until_ready(loss))
    self.loss0 = self.loss if self.loss0 is None else self.loss0


class TorchStep:
  """The reference's train step (`training_step`, backward, Adam) on `video`."""

  def __init__(self, model, video: np.ndarray):
    import torch
    self.model = model.train()
    self.x = torch.tensor(video.transpose(0, 4, 1, 2, 3).astype(np.float32) / 255 - 0.5)
    self.optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS)
    self.loss = self.loss0 = None

  def __call__(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.model.training_step({"video": self.x})
    loss.backward()
    self.optimizer.step()
    self.loss = loss.item()
    self.loss0 = self.loss if self.loss0 is None else self.loss0


def step_memory(fn, steps: int = 1) -> int:
  """Peak resident memory over `steps` calls of `fn` less the resident memory before."""
  gc.collect()
  before = harness.resident_bytes()
  harness.resident_peak_bytes(reset=True)
  for _ in range(steps):
    fn()
  return harness.resident_peak_bytes() - before


def train_steps(sizes, *, rounds: int, runs: int, out: str | None = None) -> list[dict]:
  """Times both train steps at each of `sizes` on the same weights and clips, alternating;
  records one line per size and system and returns them."""
  import torch
  torch.set_num_threads(os.cpu_count())
  lines = []
  for name in sizes:
    size = STEP_SIZES[name]
    model, cfg, params, model_state = reference_model(size)
    video = clips(size)
    theirs = TorchStep(model, video)
    ours = MmjaxStep(cfg, params, model_state, video)
    systems = {"mmjax": ours, "torch": theirs}
    timing = alternate(systems, rounds, runs)
    rss = {f"step_rss_bytes_{system}": step_memory(fn) for system, fn in systems.items()}
    common = {"size": name, **{k: size[k] for k in STEP_SIZES[name]},
              "params": sum(p.numel() for p in model.parameters()),
              "threads": os.cpu_count(), "torch": torch.__version__,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), **ours.memory, **rss,
              "loss0_mmjax": ours.loss0, "loss0_torch": theirs.loss0,
              "loss_last_mmjax": ours.loss, "loss_last_torch": theirs.loss}
    lines += record_systems("vqvae", common, "train_step", timing, size["batch"], peak=1.0,
                            unit="clips", out=out)
    del ours, theirs
  return lines


def step_table(lines: list[dict]) -> str:
  """A markdown table of `train_steps`' lines."""
  t = lambda s: f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"
  ms = lambda x: f"{t(x['step_s'])} ({t(x['step_min_s'])}–{t(x['step_max_s'])})"
  mib = lambda b: f"{b / 2**20:.0f} MiB"
  by = {(x["size"], x["system"]): x for x in lines}
  header = ("| size | batch x clip | params | mmjax step | PyTorch step | PyTorch / mmjax | "
            "mmjax compiled temp / arguments | step peak RSS mmjax / PyTorch | first loss "
            "mmjax / PyTorch |")
  out = [header, "| --- " * 9 + "|"]
  for name in dict.fromkeys(x["size"] for x in lines):
    a, b = by[name, "mmjax"], by[name, "torch"]
    out.append(
        f"| {name} (n {a['n_hiddens']}, {a['n_res_layers']} res, {a['n_codes']}x"
        f"{a['embedding_dim']}) | {a['batch']} x {a['frames']}x{a['resolution']}² | "
        f"{a['params'] / 1e6:.2f}M | {ms(a)} | {ms(b)} | {a['speedup_vs_torch']:.2f} | "
        f"{mib(a['temp_bytes'])} / {mib(a['argument_bytes'])} | "
        f"{mib(a['step_rss_bytes_mmjax'])} / {mib(a['step_rss_bytes_torch'])} | "
        f"{a['loss0_mmjax']:.5f} / {a['loss0_torch']:.5f} |")
  return "\n".join(out)


def conv_timings(rounds: int, out: str | None = None) -> list[dict]:
  """Times the 3D convolution primitives of both systems (see `--convs`); records and
  returns one line per op."""
  import torch
  torch.set_num_threads(os.cpu_count())
  rng = np.random.default_rng(0)
  fine = rng.standard_normal((4, 8, 32, 32, 64), np.float32)  # "b t h w c"
  coarse = rng.standard_normal((4, 4, 16, 16, 64), np.float32)
  kernel = rng.standard_normal((4, 4, 4, 64, 64), np.float32) * 0.02  # "kt kh kw i o"
  dims = ("NDHWC", "DHWIO", "NDHWC")
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2, 2), [(1, 1)] * 3,
                                                   dimension_numbers=dims)
  convt = lambda x, k: jax.lax.conv_transpose(x, k, (2, 2, 2), [(2, 2)] * 3,
                                              dimension_numbers=dims, transpose_kernel=True)
  # mmjax.layers.conv: the same arithmetic without a dilated input (what the model runs)
  conv1 = lambda x, k: conv_lib.conv(x, k, (2, 2, 2), [(1, 1)] * 3)
  convt1 = lambda x, k: conv_lib.conv_transpose(x, k, (2, 2, 2), [(2, 2)] * 3,
                                                transpose_kernel=True)

  def ops(conv, convt):
    return {
        "conv_forward": (jax.jit(conv), (fine, kernel)),
        "conv_input_grad": (jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]),
                            (fine, kernel, coarse)),
        "conv_kernel_grad": (jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]),
                             (fine, kernel, coarse)),
        "conv_transpose_forward": (jax.jit(convt), (coarse, kernel)),
    }
  ours, stride_one = ops(conv, convt), ops(conv1, convt1)
  tx = torch.tensor(fine.transpose(0, 4, 1, 2, 3)).requires_grad_()
  tw = torch.tensor(kernel.transpose(4, 3, 0, 1, 2).copy()).requires_grad_()  # "o i kt kh kw"
  tg = torch.tensor(coarse.transpose(0, 4, 1, 2, 3))
  tconv = lambda: torch.nn.functional.conv3d(tx, tw, stride=2, padding=1)
  theirs = {
      "conv_forward": lambda: tconv().detach(),
      "conv_input_grad": lambda: torch.autograd.grad(tconv(), tx, tg)[0],
      "conv_kernel_grad": lambda: torch.autograd.grad(tconv(), tw, tg)[0],
      "conv_transpose_forward": lambda: torch.nn.functional.conv_transpose3d(
          tg, tw.detach().transpose(0, 1), stride=2, padding=1),
  }
  lines = []
  for op, (fn, inputs) in ours.items():
    inputs = [jnp.asarray(x) for x in inputs]
    fn1 = stride_one[op][0]
    timing = alternate({"lax": lambda fn=fn, inputs=inputs: jax.block_until_ready(
        fn(*inputs)), "mmjax": lambda fn=fn1, inputs=inputs: jax.block_until_ready(
        fn(*inputs)), "torch": theirs[op]}, rounds, 1)
    line = {"measurement": "conv3d", "op": op, "input": list(fine.shape),
            "output": list(coarse.shape), "kernel": list(kernel.shape),
            "lax_dilated_s": timing["lax"]["median_s"],
            "mmjax_s": timing["mmjax"]["median_s"], "torch_s": timing["torch"]["median_s"],
            "torch_over_mmjax": timing["torch"]["median_s"] / timing["mmjax"]["median_s"]}
    lines.append(harness.record("vqvae", line, out))
  return lines


def main(argv):
  del argv
  if FLAGS.convs:
    for x in conv_timings(FLAGS.rounds, FLAGS.results):
      print(f"{x['op']}: lax (dilated) {x['lax_dilated_s'] * 1e3:.1f} ms, mmjax.layers.conv "
            f"{x['mmjax_s'] * 1e3:.1f} ms, PyTorch {x['torch_s'] * 1e3:.1f} ms")
    return
  if not FLAGS.step:
    raise app.UsageError("Give --step (the train step against the PyTorch reference) or "
                         "--convs.")
  print(step_table(train_steps(FLAGS.sizes, rounds=FLAGS.rounds, runs=FLAGS.runs,
                               out=FLAGS.results)))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
