"""LLaVA on shapes-world conversations: held-out answer accuracy of stage-2 full
fine-tuning against LoRA, with their trainable parameter counts (the claim), and the
train step of both beside transformers + peft on the same weights and batch (`--step`).

  python -m benchmarks.llava --out=/tmp/llava/runs            # the accuracy table
  python -m benchmarks.llava --seeds=0,1,2 --variants=tiny,lora
  python -m benchmarks.llava --step [--rounds=3 --runs=2]

The claim: each (variant, seed) trains `configs/llava.py:<variant>` with `seed` set (the
initial projector and LoRA weights and the data order; the backbones and stage 1 are
the recipe's cached ones, the same for all), then reads the held-out answer accuracy
(`mmjax.evaluate.instruct`) its final evaluation recorded. Runs are kept under --out
and reused when finished. The table prints mean +- standard deviation over seeds.
"""

import os

# Before anything loads torch (tensorboardX does, through mmjax.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import pathlib

import jax
import numpy as np
from absl import app, flags
from mmjax.configs import llava as llava_recipe

from mmjax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/llava/runs", "Where the runs are kept.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the runs.")
flags.DEFINE_list("variants", ["tiny", "lora"], "Stage-2 recipe variants.")
flags.DEFINE_integer("steps", 0, "train.steps (0: the recipe's).")
flags.DEFINE_integer("episodes", 0, "Held-out conversations (0: the recipe's).")


def recipe(variant: str, seed: int, steps: int = 0, episodes: int = 0):
  config = llava_recipe.get_config(variant)
  config.seed = seed
  if steps:
    config.train.update(steps=steps, checkpoint_every=steps, eval_every=steps,
                        log_every=max(steps // 8, 1))
  if episodes:
    config.evaluate.episodes = episodes
  return config


def trainable_count(config) -> int:
  """Parameters the run trains (the optimizer's tree), from abstract shapes."""
  parts = train.build(config, jax.devices()[:1])
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(parts.abstract["params"]))


def scores(workdir: pathlib.Path) -> dict[str, float]:
  record = json.loads((workdir / "finished.json").read_text())["metrics"]["few_shot"]
  return dict(record["instruct"]["0"])


def mean_std(values) -> str:
  values = np.asarray(values, np.float64)
  return f"{values.mean():.3f} ±{values.std(ddof=1) if len(values) > 1 else 0:.3f}"


def main(argv):
  del argv
  rows = []
  for variant in FLAGS.variants:
    results = []
    for seed in map(int, FLAGS.seeds):
      config = recipe(variant, seed, FLAGS.steps, FLAGS.episodes)
      workdir = pathlib.Path(FLAGS.out) / f"{variant}-{config.train.steps}steps-seed{seed}"
      train.run(config, workdir)
      results.append(scores(workdir))
      print(f"{variant} seed {seed}: {results[-1]}", flush=True)
    rows.append((variant, trainable_count(config), results))
  names = ["accuracy"] + sorted(k for k in rows[0][2][0]
                                if k.startswith("accuracy/"))
  print(f"\n| variant | trainable | seeds | {' | '.join(names)} |")
  print("| --- | --- | --- |" + " --- |" * len(names))
  for variant, count, results in rows:
    cells = " | ".join(mean_std([r[n] for r in results]) for n in names)
    print(f"| {variant} | {count:,} | {','.join(FLAGS.seeds)} | {cells} |")


if __name__ == "__main__":
  app.run(main)
