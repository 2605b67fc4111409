"""MedCLIP's claim on the findings world: the semantic matching loss with decoupled data
against InfoNCE on paired data, with the paired set whole and at one tenth.

  python -m benchmarks.medclip --out=/tmp/medclip/runs                # the claim table
  python -m benchmarks.medclip --seeds=0,1,2 --fractions=1,0.1 --steps=600

Each (method, paired fraction, seed) trains `configs/medclip.py:<method>` with
`data.datasets.paired.source.fraction` and `seed` set (the seed draws the initial
weights and the data order; the world and its held-out studies are the same for all),
then reads the zero-shot accuracy (five classes, composed prompts, mean logit) and the
report-retrieval recall that the run's final evaluation recorded. Runs are kept under
--out and reused when finished. The table prints mean +- standard deviation over seeds.
"""

import json
import pathlib

import numpy as np
from absl import app, flags

from mmjax import train
from mmjax.configs import medclip as medclip_recipe

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/medclip/runs", "Where the runs are kept.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the runs.")
flags.DEFINE_list("fractions", ["1", "0.1"], "Fractions of the paired set.")
flags.DEFINE_list("methods", list(medclip_recipe.METHODS), "Methods (recipe variants).")
flags.DEFINE_integer("steps", 0, "train.steps (0: the recipe's).")
flags.DEFINE_integer("episodes", 0, "Held-out test images (0: the recipe's).")


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


def scores(workdir: pathlib.Path) -> dict[str, float]:
  record = json.loads((workdir / "finished.json").read_text())["metrics"]["few_shot"]
  zs, rt = record["zeroshot"]["0"], record["retrieval"]["0"]
  return {"zero-shot top-1": zs["top1"], "image->report R@1": rt["image_to_text/R@1"],
          "report->image R@1": rt["text_to_image/R@1"],
          "image->report R@5": rt["image_to_text/R@5"]}


def mean_std(values) -> str:
  values = np.asarray(values, np.float64)
  return f"{values.mean():.3f} ±{values.std(ddof=1) if len(values) > 1 else 0:.3f}"


def main(argv):
  del argv
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
    cells = " | ".join(mean_std([r[n] for r in results]) for n in names)
    print(f"| {method} | {paired} ({fraction:g}) | {cells} |")


if __name__ == "__main__":
  app.run(main)
