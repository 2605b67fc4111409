"""MedCLIP on the findings world: its claim (the semantic matching loss with decoupled data
against InfoNCE on paired data, with the paired set whole and at one tenth), and its train
step beside the PyTorch reference's (`--step`).

  python -m benchmarks.medclip --out=/tmp/medclip/runs                # the claim table
  python -m benchmarks.medclip --seeds=0,1,2 --fractions=1,0.1 --steps=600
  python -m benchmarks.medclip --step [--sizes=tiny,resnet50] [--rounds=3 --runs=2]

The claim:

Each (method, paired fraction, seed) trains `configs/medclip.py:<method>` with
`data.datasets.paired.source.fraction` and `seed` set (the seed draws the initial
weights and the data order; the world and its held-out studies are the same for all),
then reads the zero-shot accuracy (five classes, composed prompts, mean logit) and the
report-retrieval recall that the run's final evaluation recorded. Runs are kept under
--out and reused when finished. The table prints mean +- standard deviation over seeds.

The step (`--step`), at each of `STEP_SIZES`: the real `mmjax.train` step of
configs/medclip.py (semantic) with that size's towers and batch, on its pipeline's first
batch (paired and decoupled findings-world images, tokens, image and text labels), one
device; and the same step of the PyTorch reference (benchmarks/medclip_torch.py:
`TorchMedCLIP` in train mode, `semantic_matching_loss` as MedCLIP's
`ImageTextContrastiveLoss` computes it, backward, gradient clipping at the recipe's norm,
AdamW with its settings) on the same batch (pixels normalised as the ResNet does, missing
labels 0, padding masked). BERT's dropout is off on the torch side, as mmjax's BERT has
none. The weights are random in both, of the same shapes (their values do not change the
work). Timed alternately (`side_by_side.alternate`), both on every core
(`torch.set_num_threads(os.cpu_count())`, OMP_WAIT_POLICY=PASSIVE unless the environment
sets it); the mmjax step's compiled memory (`memory_analysis`). One JSON line per system
and size to benchmarks/results/medclip.jsonl.
"""

import os

# Before anything loads torch (tensorboardX does, through mmjax.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import math
import pathlib

import jax
import numpy as np
from absl import app, flags
from mmjax.configs import medclip as medclip_recipe

from benchmarks import contrastive, harness
from benchmarks.side_by_side import alternate, record_systems
from mmjax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/medclip/runs", "Where the runs are kept.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the runs.")
flags.DEFINE_list("fractions", ["1", "0.1"], "Fractions of the paired set.")
flags.DEFINE_list("methods", list(medclip_recipe.METHODS), "Methods (recipe variants).")
flags.DEFINE_integer("steps", 0, "train.steps (0: the recipe's).")
flags.DEFINE_integer("episodes", 0, "Held-out test images (0: the recipe's).")
flags.DEFINE_bool("step", False, "Time the train step against the PyTorch reference "
                  "instead of running the claim.")
flags.DEFINE_list("sizes", ["tiny", "resnet50"], "--step: sizes (STEP_SIZES).")
flags.DEFINE_integer("rounds", 3, "--step: alternating rounds.")
flags.DEFINE_integer("runs", 2, "--step: timed calls per system per round.")
flags.DEFINE_string("results", None, "--step: results file (default: benchmarks/results/"
                    "medclip.jsonl).")

# The train step's sizes: model overrides of configs/medclip.py and the batch.
STEP_SIZES = {
    # The recipe as it is: a 4-stage bottleneck ResNet 8 wide at 64 px, a 2-layer BERT.
    "tiny": {"batch": 64},
    # ResNet-50's layout at 128 px, a 4-layer BERT 256 wide.
    "resnet50": {"batch": 16, "image_size": 128,
                 "vision": {"depths": (3, 4, 6, 3), "width": 64, "output_dim": 128},
                 "text": {"width": 256, "depth": 4, "num_heads": 4, "mlp_dim": 1024},
                 "embed_dim": 128},
}


def recipe(method: str, fraction: float, seed: int, steps: int = 0, episodes: int = 0):
  config = medclip_recipe.get_config(method)
  config.seed = seed
  config.data.datasets.paired.source.fraction = fraction
  if steps:
    config.train.update(steps=steps, checkpoint_every=steps, eval_every=0,
                        log_every=max(steps // 6, 1))
  if episodes:
    config.evaluate.episodes = episodes
  return config


def step_recipe(size: dict):
  """configs/medclip.py (semantic) at `size` (a `STEP_SIZES` entry), on one device."""
  config = medclip_recipe.get_config("semantic")
  config.model.vision.update(size.get("vision", {}))
  config.model.text.update(size.get("text", {}))
  config.model.embed_dim = size.get("embed_dim", config.model.embed_dim)
  image_size = size.get("image_size", config.data.image_size)
  config.model.vision.image_size = config.data.image_size = image_size
  for datasets in (config.data.datasets, config.data.eval_datasets):
    for dataset in datasets.values():
      dataset.source.image_size = image_size
  config.data.batch_size = size["batch"]
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  config.optim.warmup_steps = 0
  return config


class TorchStep:
  """The PyTorch reference's train step on the towers of `config` and `batch` (the mmjax
  step's, on the host): forward of both towers in train mode, the semantic matching loss,
  backward, clipping, AdamW."""

  def __init__(self, config, batch: dict):
    import torch

    from benchmarks import medclip_torch
    self.torch, self.loss_fn = torch, medclip_torch.semantic_matching_loss
    vision, text, optim = config.model.vision, config.model.text, config.optim
    bert = {"vocab_size": text.vocab_size, "hidden_size": text.width,
            "num_hidden_layers": text.depth, "num_attention_heads": text.num_heads,
            "intermediate_size": text.mlp_dim, "max_position_embeddings": text.max_len,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    self.model = medclip_torch.TorchMedCLIP(
        bert, config.model.embed_dim, tuple(vision.depths), vision.width,
        logit_scale=math.log(1 / 0.07)).train()
    image = np.asarray(batch["image"], np.float32) / 255
    pixels = (image - np.asarray(vision.pixel_mean)) / np.asarray(vision.pixel_std)
    tokens = torch.tensor(np.asarray(batch["tokens"]), dtype=torch.long)
    self.inputs = (medclip_torch.to_torch(pixels.astype(np.float32)), tokens,
                   (tokens != config.tokens.pad).long())
    self.labels = [torch.tensor(np.nan_to_num(np.asarray(batch[k]), nan=0.0))
                   for k in ("image_labels", "text_labels")]
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr,
                                       betas=(optim.b1, optim.b2), eps=optim.eps,
                                       weight_decay=optim.weight_decay)
    self.clip_norm = optim.clip_norm
    self.loss = None

  def __call__(self):
    self.optimizer.zero_grad(set_to_none=True)
    _, _, logits = self.model(*self.inputs)
    loss = self.loss_fn(logits, *self.labels)
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    self.optimizer.step()
    self.loss = loss.item()


def train_steps(sizes, *, rounds: int, runs: int, out: str | None = None) -> list[dict]:
  """Times the mmjax and PyTorch train steps at each of `sizes` (`STEP_SIZES` names),
  alternating; records one line per size and system and returns them."""
  import torch
  torch.set_num_threads(os.cpu_count())
  lines = []
  for name in sizes:
    size = STEP_SIZES[name]
    config = step_recipe(size)
    parts, state = contrastive.fresh_state(config, jax.devices()[:1])
    batch = contrastive.first_batch(config, parts)
    ours = contrastive.TrainStep(config, parts, state, batch)
    theirs = TorchStep(config, jax.device_get(batch))
    params = sum(p.numel() for n, p in theirs.model.named_parameters()
                 if ".pooler." not in n)
    common = {"size": name, "batch": size["batch"], "image_size": config.data.image_size,
              "seq_len": config.data.seq_len, "vision": dict(config.model.vision),
              "text": dict(config.model.text), "embed_dim": config.model.embed_dim,
              "params": params, "threads": os.cpu_count(), "torch": torch.__version__,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), **ours.memory}
    timing = alternate({"mmjax": ours, "torch": theirs}, rounds, runs)
    common |= {"loss_mmjax": float(ours.loss), "loss_torch": theirs.loss}
    lines += record_systems("medclip", common, "train_step", timing, size["batch"],
                            peak=1.0, unit="examples", out=out)
    del ours, theirs
  return lines


def step_table(lines: list[dict]) -> str:
  """A markdown table of `train_steps`' lines."""
  t = lambda s: f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"
  ms = lambda x: f"{t(x['step_s'])} ({t(x['step_min_s'])}–{t(x['step_max_s'])})"
  by = {(x["size"], x["system"]): x for x in lines}
  out = [("| size | batch | params | mmjax step | PyTorch step | PyTorch / mmjax | "
         "mmjax compiled temp / arguments |"), "| --- " * 7 + "|"]
  for name in dict.fromkeys(x["size"] for x in lines):
    ours, theirs = by[name, "mmjax"], by[name, "torch"]
    out.append(f"| {name} ({ours['image_size']} px) | {ours['batch']} | "
               f"{ours['params'] / 1e6:.2f}M | {ms(ours)} | {ms(theirs)} | "
               f"{ours['speedup_vs_torch']:.2f} | {ours['temp_bytes'] / 2**20:.0f} MiB / "
               f"{ours['argument_bytes'] / 2**20:.0f} MiB |")
  return "\n".join(out)


def scores(workdir: pathlib.Path) -> dict[str, float]:
  record = json.loads((workdir / "finished.json").read_text())["metrics"]["few_shot"]
  zs, rt = record["zeroshot"]["0"], record["retrieval"]["0"]
  return {"zero-shot top-1": zs["top1"], "image->report R@1": rt["image_to_text/R@1"],
          "report->image R@1": rt["text_to_image/R@1"],
          "image->report R@5": rt["image_to_text/R@5"]}


def main(argv):
  del argv
  if FLAGS.step:
    print(step_table(train_steps(FLAGS.sizes, rounds=FLAGS.rounds, runs=FLAGS.runs,
                                 out=FLAGS.results)))
    return
  rows = []
  for method in FLAGS.methods:
    for fraction in map(float, FLAGS.fractions):
      results = []
      for seed in map(int, FLAGS.seeds):
        config = recipe(method, fraction, seed, FLAGS.steps, FLAGS.episodes)
        workdir = (pathlib.Path(FLAGS.out)
                   / f"{method}-f{fraction:g}-{config.train.steps}steps-seed{seed}")
        train.run(config, workdir)
        results.append(scores(workdir))
        print(f"{method} fraction {fraction:g} seed {seed}: {results[-1]}", flush=True)
      paired = round(fraction * config.data.datasets.paired.source.get("size", 0) or
                     fraction * 2000)
      rows.append((method, fraction, paired, results))
  names = list(rows[0][3][0])
  print(f"\n| method | paired studies | {' | '.join(names)} |")
  print("| --- | --- |" + " --- |" * len(names))
  for method, fraction, paired, results in rows:
    cells = " | ".join(harness.mean_std([r[n] for r in results]) for n in names)
    print(f"| {method} | {paired} ({fraction:g}) | {cells} |")


if __name__ == "__main__":
  app.run(main)
