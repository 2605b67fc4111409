"""Video VQ-VAE latents as a visual encoder: the segmentation ablation (the claim).

  python -m benchmarks.segment --out=/tmp/segment/runs        # the README table
  python -m benchmarks.segment --seeds=0,1,2 --methods=unet,resnet_attention_ft

Each (method, seed) trains `configs/segment.py:<method>` with `seed` set (the head's
initial weights and the order of the 250 labelled frames; the world, its held-out frames
and the pretrained VQ-VAE, `configs/vqvae.py:<shape>` at its own seed, are the same for
all) and reads the held-out scores its final evaluation recorded
(`mmjax.evaluate.segment`: IoU per frame and over all pixels, Dice, pixel accuracy).
The pretrained encoder is trained once and cached (`mmjax.train.pretrained_workdir`);
its own held-out reconstruction (`mmjax.evaluate.reconstruct`) is printed beside the
table. Runs are kept under --out and reused when finished. The table prints mean +-
standard deviation over seeds; one JSON line per method to
benchmarks/results/segment.jsonl.
"""

import os

# Before anything loads torch (tensorboardX does, through mmjax.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pathlib

from absl import app, flags

from benchmarks import harness
from mmjax import train
from mmjax.configs import segment as segment_recipe

FLAGS = flags.FLAGS
METRICS = ("iou", "iou_pixels", "dice", "pixel_accuracy")


def _define_flags():
  flags.DEFINE_list("methods", list(segment_recipe.METHODS), "configs/segment.py methods.")
  flags.DEFINE_list("seeds", ["0", "1"], "Seeds of each method's run.")
  flags.DEFINE_string("shape", "tiny", "configs/segment.py shape.")
  flags.DEFINE_integer("steps", 0, "Train steps of each run (0: the recipe's).")
  flags.DEFINE_string("out", "/tmp/mmjax-segment", "Runs are kept (and reused) here.")
  flags.DEFINE_string("results", None, "JSON lines file (default benchmarks/results).")


def recipe(method: str, seed: int, shape: str = "tiny", steps: int = 0):
  config = segment_recipe.get_config(method if shape == "tiny" else f"{method}-{shape}")
  config.seed = seed
  if steps:
    config.train.update(steps=steps, checkpoint_every=steps, eval_every=0,
                        log_every=max(steps // 4, 1))
  return config


def claim(methods, seeds, *, out: str, shape: str = "tiny", steps: int = 0,
          results: str | None = None) -> str:
  """Trains (or reuses) every (method, seed) run and returns the markdown table."""
  rows = []
  for method in methods:
    runs = []
    for seed in seeds:
      config = recipe(method, seed, shape, steps)
      workdir = pathlib.Path(out) / f"{config.variant}-{config.train.steps}steps-seed{seed}"
      if not (workdir / "finished.json").exists():
        train.run(config, workdir)
      runs.append(harness.final_scores(workdir, "segment"))
      print(f"{method} seed {seed}: {runs[-1]}", flush=True)
    rows.append((method, runs))
    harness.record("segment", {"method": method, "shape": shape, "seeds": list(seeds),
                               "runs": runs}, out=results)
  names = [n for n in METRICS if n in rows[0][1][0]]
  lines = [f"| method | latent | head | encoder | {' | '.join(names)} |",
           "| --- | --- | --- | --- |" + " --- |" * len(names)]
  for method, runs in rows:
    latent, head, frozen, noise = segment_recipe.METHODS[method]
    encoder = ("none (pixels)" if latent is None else
               ("frozen" if frozen else "fine-tuned") + (", noise input" if noise else ""))
    lines.append(f"| {method} | {latent or '-'} | {head} | {encoder} | "
                 + " | ".join(harness.mean_std([r[n] for r in runs]) for n in names) + " |")
  encoder = segment_recipe.get_config(f"resnet_conv-{shape}").init.encoder
  pretrained = train.pretrained_workdir("encoder", encoder)
  lines.append(f"\nVQ-VAE ({pretrained}): {harness.final_scores(pretrained, 'reconstruct')}")
  return "\n".join(lines)


def main(argv):
  del argv
  print(claim(FLAGS.methods, [int(s) for s in FLAGS.seeds], out=FLAGS.out, shape=FLAGS.shape,
              steps=FLAGS.steps, results=FLAGS.results))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
