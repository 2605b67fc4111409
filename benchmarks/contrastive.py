"""What the contrastive losses cost as the batch grows: the CLIP recipe's train step with
CLIP's softmax (InfoNCE) and SigLIP's sigmoid loss, and the losses alone beside
open_clip's `ClipLoss` and `SigLipLoss`.

  python -m benchmarks.contrastive                           # 8 simulated CPU devices
  python -m benchmarks.contrastive --step_batch_sizes=256,512,1024,2048,4096 --rounds=5

Run as a script, it asks XLA for 8 CPU devices (`--xla_force_host_platform_device_count=8`,
unless XLA_FLAGS already sets a count) before JAX loads. Measured, at each batch size:

  train_step  the real `mmjax.train` step of configs/clip.py with small towers (`TOWERS`:
              the similarity matrix's `b^2` work is visible beside theirs) on the recipe's
              first batch (distinct shapes-world pairs), on one device
              and on all of them (mesh `data=n`), `config.model.loss` "softmax" and
              "sigmoid" (SigLIP's `init_bias=-10`, `init_temperature=0.1`) alternating in
              each round; the compiled step's memory (`memory_analysis()`: its temporary
              buffers, arguments and outputs, per device).
  loss        forward and backward (gradients of both features, the scale and the bias)
              of `mmjax.losses.contrastive_loss` / `sigmoid_loss` (one `jit`, one device)
              against open_clip's `ClipLoss` / `SigLipLoss` (world size 1, torch on every
              core), the same L2-normalised random features, alternating in each round;
              both loss values are recorded and must agree; the mmjax side's compiled
              memory.

Sizes that fail to compile or run for lack of memory are recorded as skipped. Both
systems use every core (`torch.set_num_threads(os.cpu_count())`; OMP_WAIT_POLICY=PASSIVE
unless the environment sets it, see benchmarks/blip2.py). One JSON line per measurement
goes to benchmarks/results/contrastive.jsonl. open_clip: `pip install --no-deps
open_clip_torch==3.3.0`; its `loss.py` is loaded from its file (the package's `__init__`
needs torchvision).
"""

import os

if __name__ == "__main__" and "host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
# Before anything loads torch (tensorboardX does, through mmjax.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import harness
from benchmarks.side_by_side import alternate, record_systems
from mmjax import losses, sharding, train
from mmjax.train import DataHealth

# Small towers, so that the loss's b x b similarities are a visible share of the step.
TOWERS = {"vision": {"image_size": 32, "patch_size": 16, "width": 64, "depth": 1,
                     "num_heads": 2, "output_dim": 128, "activation": "quick_gelu"},
          "text": {"width": 64, "depth": 1, "num_heads": 2, "max_len": 16,
                   "activation": "quick_gelu"},
          "seq_len": 12}
EMBED_DIM = TOWERS["vision"]["output_dim"]
# The model config of each loss; the sigmoid loss's as SigLIP's training recipe starts it.
LOSSES = {"softmax": {"loss": "softmax"},
          "sigmoid": {"loss": "sigmoid", "init_bias": -10.0, "init_temperature": 0.1}}
# The losses' inputs: the logit scale and bias the recipes start from.
SCALE_AND_BIAS = {"softmax": (1 / 0.07, None), "sigmoid": (10.0, -10.0)}
BATCH_SIZES = (256, 512, 1024, 2048, 4096)
# The train step compiles once per size, loss and device count (~5 s each on 2 idle
# cores): by default, every other size.
STEP_BATCH_SIZES = (256, 1024, 4096)


def recipe(loss: str, batch_size: int, num_devices: int, towers: dict = TOWERS):
  """configs/clip.py with `towers`, `loss` ("softmax" or "sigmoid") and its model
  settings, the global batch `batch_size` over a `data=num_devices` mesh."""
  from mmjax.configs import clip
  config = clip.get_config()
  config.model.vision = dict(towers["vision"])
  config.model.text = dict(config.model.text, **towers["text"])
  config.model.embed_dim = towers["vision"]["output_dim"]
  config.model.update(LOSSES[loss])
  config.mesh = {"data": num_devices, "fsdp": 1, "tensor": 1}
  config.data.batch_size, config.data.seq_len = batch_size, towers["seq_len"]
  config.data.image_size = towers["vision"]["image_size"]
  config.data.datasets.pairs.source.image_size = towers["vision"]["image_size"]
  config.optim.warmup_steps = 0
  return config


def memory(compiled) -> dict[str, int]:
  """A compiled computation's buffers in bytes, per device (XLA's `memory_analysis`)."""
  stats = compiled.memory_analysis()
  return {f"{name}_bytes": int(getattr(stats, f"{name}_size_in_bytes"))
          for name in ("temp", "argument", "output", "alias")}


def fresh_state(config, devices) -> tuple[train.Parts, dict]:
  """The parts of `config` on `devices` and a fresh train state on the host: the parts and
  the state do not depend on the batch size, so that each size only compiles its step."""
  parts = train.build(config, devices)
  return parts, jax.device_get(train.init_state(config, parts, pretrained=False))


def first_batch(config, parts: train.Parts) -> dict:
  """The recipe pipeline's first global batch, split over the mesh: `batch_size` distinct
  image-caption pairs (the contrastive loss of one example repeated would be degenerate,
  every similarity alike)."""
  batch = next(iter(train.make_data(config, seed=0, health=DataHealth())))
  return sharding.global_batch(batch, sharding.batch_sharding(parts.mesh, parts.rules))


class TrainStep:
  """The compiled `mmjax.train` step of `config` (whose `parts` and host `state`
  `fresh_state` gives) on `batch` (`first_batch`); each call is one step (the state is
  donated and replaced)."""

  def __init__(self, config, parts: train.Parts, state: dict, batch: dict):
    self.state = jax.device_put(state, parts.shardings)
    self.batch = batch
    self.compiled = train.make_train_step(config, parts).lower(self.state,
                                                               self.batch).compile()
    self.memory = memory(self.compiled)
    self.loss = None

  def __call__(self):
    self.state, metrics, _ = self.compiled(self.state, self.batch)
    self.loss = metrics["loss"]
    jax.block_until_ready(self.loss)


def features(batch_size: int, dim: int = EMBED_DIM, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
  """`(image, text)` float32 `"b e"` L2-normalised random features, each text near its
  image (as after some training, so that the loss is neither trivial nor saturated)."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch_size, dim))
  text = image + 2 * rng.normal(size=(batch_size, dim))
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return unit(image), unit(text)


class MmjaxLoss:
  """Forward and backward of mmjax's `loss` ("softmax" or "sigmoid") on `image, text`:
  one `jit` of the value and the gradients of the features, the scale and the bias."""

  def __init__(self, loss: str, image: np.ndarray, text: np.ndarray):
    scale, bias = SCALE_AND_BIAS[loss]
    self.args = [jnp.asarray(image), jnp.asarray(text), jnp.float32(scale)]
    if loss == "sigmoid":
      self.args.append(jnp.float32(bias))
    fn = losses.sigmoid_loss if loss == "sigmoid" else losses.contrastive_loss
    grad = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(self.args)))))
    self.compiled = grad.lower(*self.args).compile()
    self.memory = memory(self.compiled)

  def value_and_grads(self) -> tuple[float, list[np.ndarray]]:
    value, grads = self.compiled(*self.args)
    return float(value), [np.asarray(g) for g in grads]

  def __call__(self):
    jax.block_until_ready(self.compiled(*self.args))


def open_clip_losses():
  """open_clip's `loss.py` (ClipLoss, SigLipLoss), loaded from its file: the package's
  `__init__` imports torchvision, which it does not need."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    raise ImportError("open_clip is not installed: pip install --no-deps "
                      "open_clip_torch==3.3.0")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "loss.py"
  module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


class OpenClipLoss:
  """Forward and backward of open_clip's `ClipLoss` ("softmax") or `SigLipLoss`
  ("sigmoid"), world size 1, on `image, text`: the gradients of the features, the scale
  and the bias, as `MmjaxLoss`."""

  def __init__(self, loss: str, image: np.ndarray, text: np.ndarray):
    import torch
    module = open_clip_losses()
    self.loss = module.SigLipLoss() if loss == "sigmoid" else module.ClipLoss()
    scale, bias = SCALE_AND_BIAS[loss]
    self.args = [torch.tensor(image, requires_grad=True),
                 torch.tensor(text, requires_grad=True),
                 torch.tensor(scale, dtype=torch.float32, requires_grad=True)]
    if loss == "sigmoid":
      self.args.append(torch.tensor(bias, dtype=torch.float32, requires_grad=True))

  def value_and_grads(self) -> tuple[float, list[np.ndarray]]:
    value = self()
    return float(value), [a.grad.numpy().copy() for a in self.args]

  def __call__(self):
    for a in self.args:
      a.grad = None
    value = self.loss(*self.args)
    value.backward()
    return value.detach()


def out_of_memory(error: Exception) -> bool:
  text = str(error)
  return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in text or (
      "memory" in text.lower() and "alloc" in text.lower())


def train_steps(batch_sizes, device_counts, *, rounds: int, runs: int,
                out: str | None = None) -> list[dict]:
  """Times and sizes the train step of both losses at each batch size and device count;
  records one line per (devices, batch, loss) and returns them."""
  lines = []
  for n in device_counts:
    devices = jax.devices()[:n]
    fresh = {loss: fresh_state(recipe(loss, batch_sizes[0], n), devices) for loss in LOSSES}
    for b in batch_sizes:
      common = {"measurement": "train_step", "devices": n, "mesh": {"data": n},
                "batch": b, "towers": TOWERS}
      try:
        configs = {loss: recipe(loss, b, n) for loss in LOSSES}
        batch = first_batch(configs["softmax"], fresh["softmax"][0])  # the same for both
        steps = {loss: TrainStep(configs[loss], *fresh[loss], batch) for loss in LOSSES}
        timing = alternate(steps, rounds, runs)
      except Exception as error:  # only a lack of memory skips a size; the rest raises
        if not out_of_memory(error):
          raise
        lines.append(harness.record("contrastive", {**common, "skipped": str(error)[:200]},
                                    out))
        continue
      for loss, step in steps.items():
        t = timing[loss]
        lines.append(harness.record("contrastive", {
            **common, "loss": loss, "step_s": t["median_s"], "step_min_s": t["min_s"],
            "step_max_s": t["max_s"], "runs": t["runs"], "examples_per_s": b / t["median_s"],
            "vs_softmax": t["median_s"] / timing["softmax"]["median_s"],
            "loss_value": float(step.loss), **step.memory,
            "peak_rss_bytes": harness.peak_memory_bytes()}, out))
      del steps
  return lines


def loss_side_by_side(batch_sizes, *, rounds: int, runs: int, out: str | None = None
                      ) -> list[dict]:
  """Times both losses' forward and backward in mmjax and open_clip at each batch size;
  records one line per (batch, loss, system), the mmjax line with its compiled memory,
  both with both loss values, and returns them."""
  import torch
  torch.set_num_threads(os.cpu_count())
  lines = []
  for b in batch_sizes:
    image, text = features(b)
    for loss in LOSSES:
      ours, theirs = MmjaxLoss(loss, image, text), OpenClipLoss(loss, image, text)
      values = {"mmjax": ours.value_and_grads()[0], "torch": theirs.value_and_grads()[0]}
      common = {"batch": b, "embed_dim": EMBED_DIM, "loss": loss,
                "loss_mmjax": values["mmjax"], "loss_open_clip": values["torch"],
                "loss_rel_diff": abs(values["mmjax"] - values["torch"]) / abs(values["torch"]),
                "threads": os.cpu_count(), "torch": torch.__version__,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), **ours.memory}
      timing = alternate({"mmjax": ours, "torch": theirs}, rounds, runs)
      lines += record_systems("contrastive", common, "loss", timing, b, peak=1.0,
                              unit="examples", out=out)
  return lines


def tables(lines: list[dict]) -> str:
  """Markdown tables of result lines (as `train_steps` and `loss_side_by_side` record
  them; of repeated measurements, the last): step times, memory and the open_clip
  comparison, by batch size."""
  ms = lambda line: (f"{line['step_s'] * 1e3:.3g} ms ({line['step_min_s'] * 1e3:.3g}–"
                     f"{line['step_max_s'] * 1e3:.3g})")
  mib = lambda n: f"{n / 2**20:.3g} MiB"
  steps = {(x["devices"], x["batch"], x["loss"]): x for x in lines
           if x.get("measurement") == "train_step" and "loss" in x}
  alone = {(x["batch"], x["loss"], x["system"]): x for x in lines
           if x.get("measurement") == "loss"}
  counts = sorted({n for n, _, _ in steps})
  batches = sorted({b for _, b, _ in steps} | {b for b, _, _ in alone})
  out = ["| batch | " + " | ".join(f"{n} device{'s' * (n > 1)}: {loss}" for n in counts
                                   for loss in (*LOSSES, "sigmoid / softmax")) + " |",
         "| --- " * (1 + 3 * len(counts)) + "|"]
  for b in batches:
    cells = []
    for n in counts:
      found = [steps.get((n, b, loss)) for loss in LOSSES]
      cells += [ms(x) if x else "" for x in found]
      cells.append(f"{found[1]['vs_softmax']:.2f}" if all(found) else "")
    if any(cells):
      out.append(f"| {b} | " + " | ".join(cells) + " |")
  out += ["", "| batch | " + " | ".join(
      [f"step temp, {n} device{'s' * (n > 1)}: {loss}" for n in counts for loss in LOSSES]
      + [f"{loss} loss alone: temp (b x b float32 arrays)" for loss in LOSSES]) + " |",
          "| --- " * (1 + 2 * len(counts) + 2) + "|"]
  for b in batches:
    cells = [mib(steps[n, b, loss]["temp_bytes"]) if (n, b, loss) in steps else ""
             for n in counts for loss in LOSSES]
    for loss in LOSSES:
      x = alone.get((b, loss, "mmjax"))
      cells.append(f"{mib(x['temp_bytes'])} ({x['temp_bytes'] / (4 * b * b):.2f})" if x else "")
    out.append(f"| {b} | " + " | ".join(cells) + " |")
  out += ["", "| batch | " + " | ".join(
      f"{loss}: {system}" for loss in LOSSES
      for system in ("mmjax", "open_clip", "mmjax / open_clip (speed)", "loss rel. diff")) + " |",
          "| --- " * 9 + "|"]
  for b in batches:
    cells = []
    for loss in LOSSES:
      ours, theirs = alone.get((b, loss, "mmjax")), alone.get((b, loss, "torch"))
      cells += ([ms(ours), ms(theirs), f"{ours['speedup_vs_torch']:.2f}",
                 f"{ours['loss_rel_diff']:.1e}"] if ours and theirs else [""] * 4)
    if any(cells):
      out.append(f"| {b} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def main(argv):
  del argv
  f = flags.FLAGS
  if f.tables:
    with open(f.tables) as results:
      print(tables([json.loads(line) for line in results]))
    return
  counts = sorted({1, jax.device_count()})
  lines = []
  if "step" in f.only:
    lines += train_steps([int(b) for b in f.step_batch_sizes], counts, rounds=f.rounds,
                         runs=f.runs, out=f.out)
  if "loss" in f.only:
    lines += loss_side_by_side([int(b) for b in f.batch_sizes], rounds=f.rounds,
                               runs=f.runs, out=f.out)
  print(tables(lines))


if __name__ == "__main__":
  # Defined here, not at import, so that the measurement functions import cleanly anywhere.
  flags.DEFINE_list("batch_sizes", [str(b) for b in BATCH_SIZES], "Batch sizes of the "
                    "losses alone.")
  flags.DEFINE_list("step_batch_sizes", [str(b) for b in STEP_BATCH_SIZES], "Global batch "
                    "sizes of the train step.")
  flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
  flags.DEFINE_integer("runs", 2, "Timed calls per system per round.")
  flags.DEFINE_list("only", ["step", "loss"], "What to measure: step, loss or both.")
  flags.DEFINE_string("tables", None, "Only print the tables of this results file (e.g. "
                      "benchmarks/results/contrastive.jsonl).")
  flags.DEFINE_string("out", None, "Results file (default: benchmarks/results/"
                      "contrastive.jsonl).")
  app.run(main)
