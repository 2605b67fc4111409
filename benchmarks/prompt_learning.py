"""CoOp's and CoCoOp's claims on the shapes world, base-to-new (seeds 1, 2, 3):

  MMJAX_CACHE=/tmp/pl/cache python -m benchmarks.prompt_learning --out=/tmp/pl/runs

1. zero-shot CLIP with one hand prompt ("a photo of a {}.") against the "shapes_world"
   template ensemble, on the base and the new classes;
2. CoOp (16 shots of each base class) on base and new, its context random (CoOp's
   paper) or from "a photo of a" (CoCoOp's base-to-new comparison);
3. CoCoOp likewise; H (the harmonic mean of base and new) for each, mean +- std over the
   seeds (each seed draws its own shots and trains its own context).
The CLIP is configs/clip.py:tiny, trained once and cached under $MMJAX_CACHE. Training
runs are kept under --out and reused when finished.

`--memory` instead prints the compiled memory of CoCoOp's train step (XLA's
memory_analysis: arguments, outputs, temporaries) against the batch size and
`model.image_chunk`, beside CoOp's.
"""

import pathlib

import jax
import numpy as np
from absl import app, flags

from mmjax import checkpoints, train
from mmjax.configs import coop as coop_recipe
from mmjax.data.tokenizer import make_tokenizer
from mmjax.evaluate import prompt_learning as evaluation
from mmjax.evaluate import zeroshot
from mmjax.inference import read_config

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/pl/runs", "Where the CoOp and CoCoOp runs are kept.")
flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds: each draws the shots and trains.")
flags.DEFINE_integer("coop_steps", 0, "CoOp's train.steps (0: the recipe's).")
flags.DEFINE_integer("cocoop_steps", 0, "CoCoOp's train.steps (0: the recipe's).")
flags.DEFINE_string("backbone", "", "A finished CLIP run or converted CLIP to use instead of "
                    "the cached run of configs/clip.py:tiny.")
flags.DEFINE_list("methods", ["coop", "coop_init", "cocoop"], "Trained rows to run.")
flags.DEFINE_integer("test_size", 600, "Held-out images of each half (base, new).")
flags.DEFINE_bool("memory", False, "Measure CoCoOp's compiled memory instead.")
flags.DEFINE_list("batch_sizes", ["4", "16"], "--memory: batch sizes.")
flags.DEFINE_list("chunks", ["0", "2", "4"], "--memory: image_chunk values (0: none).")


def recipe(variant: str, seed: int, backbone: pathlib.Path, steps: int):
  config = coop_recipe.get_config(variant)
  config.seed = seed
  config.data.datasets.shots.source.shots_seed = seed
  config.init.clip.workdir = str(backbone)
  config.init.clip.steps = -1
  config.train.eval_every = 0
  if steps:
    config.train.steps = steps
    config.train.checkpoint_every = steps
    config.train.log_every = max(steps // 4, 1)
  return config


def mean_std(values) -> str:
  values = np.asarray(values, np.float64) * 100
  return f"{values.mean():5.1f} +- {values.std():4.1f}"


def claims():
  config = coop_recipe.get_config("coop")
  backbone = (pathlib.Path(FLAGS.backbone) if FLAGS.backbone
              else train.pretrained_workdir("clip", config.init.clip))
  tokenizer, seq_len = make_tokenizer(config), config.data.seq_len
  encoder = zeroshot.DualEncoder(read_config(backbone), checkpoints.load_params(backbone),
                                 batch_size=64)
  sets = {half: evaluation.test_set(half, FLAGS.test_size, config.data.image_size)
          for half in ("base", "new")}
  rows = []
  for name, templates in (("zero-shot CLIP, 'a photo of a {}.'", ("a photo of a {}.",)),
                          ("zero-shot CLIP, shapes_world ensemble",
                           zeroshot.load_templates("shapes_world"))):
    base, new = (evaluation.zero_shot_accuracy(encoder, sets[h][2], templates, sets[h][0],
                                               sets[h][1])
                 for h in ("base", "new"))
    rows.append((name, [base], [new], [evaluation.harmonic_mean(base, new)]))
    print(f"{name}: base {base:.3f} new {new:.3f}", flush=True)
  # CoOp as the paper trains it (16 random vectors), and as CoCoOp's base-to-new
  # comparison does (the context from "a photo of a"), then CoCoOp.
  methods = (("coop", "coop", "", FLAGS.coop_steps),
             ("coop_init", "coop", "a photo of a", FLAGS.coop_steps),
             ("cocoop", "cocoop", "a photo of a", FLAGS.cocoop_steps))
  for run, variant, ctx_init, steps in methods:
    if run not in FLAGS.methods:
      continue
    scores = []
    for seed in map(int, FLAGS.seeds):
      config = recipe(variant, seed, backbone, steps)
      config.model.ctx_init = ctx_init
      workdir = pathlib.Path(FLAGS.out) / f"{run}-{config.train.steps}steps-seed{seed}"
      train.run(config, workdir)
      model = train.build(config).model
      score = evaluation.base_to_new(model, checkpoints.load_params(workdir), tokenizer,
                                     seq_len, FLAGS.test_size, config.data.image_size)
      print(f"{variant} seed {seed}: {score}", flush=True)
      scores.append(score)
    context = f"ctx '{ctx_init}'" if ctx_init else f"{config.model.n_ctx} random ctx"
    label = (f"{variant}, {context}, {config.data.datasets.shots.source.shots} shots, "
             f"{config.train.steps} x {config.data.batch_size}")
    rows.append((label, *([s[k] for s in scores] for k in ("base", "new", "h"))))
  print(f"\nBase-to-new on the shapes world ({len(sets['base'][2])} base, "
        f"{len(sets['new'][2])} new classes; {FLAGS.test_size} test images each; seeds "
        f"{','.join(FLAGS.seeds)}; accuracy %, mean +- std)")
  print(f"| {'method':58s} | {'base':13s} | {'new':13s} | {'H':13s} |")
  print(f"|{'-' * 60}|{'-' * 15}|{'-' * 15}|{'-' * 15}|")
  for name, base, new, h in rows:
    print(f"| {name:58s} | {mean_std(base)} | {mean_std(new)} | {mean_std(h)} |")


def memory():
  """Compiled memory of one train step, from abstract shapes (nothing is trained)."""
  print(f"{'variant':8s} {'batch':>5s} {'chunk':>5s} {'temp MiB':>9s} {'args MiB':>9s} "
        f"{'out MiB':>8s}", flush=True)
  cases = [("coop", b, 0) for b in map(int, FLAGS.batch_sizes)]
  cases += [("cocoop", b, c) for b in map(int, FLAGS.batch_sizes) for c in map(int, FLAGS.chunks)
            if c < b]
  for variant, batch, chunk in cases:
    config = coop_recipe.get_config(variant)
    config.data.batch_size = batch
    config.model.image_chunk = chunk
    parts = train.build(config)
    size = config.data.image_size
    batch_shapes = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8),
                    "label": jax.ShapeDtypeStruct((batch,), np.int32),
                    "tokens": jax.ShapeDtypeStruct((batch, config.data.seq_len), np.int32),
                    "loss_weight": jax.ShapeDtypeStruct((batch,), np.float32),
                    "dataset_id": jax.ShapeDtypeStruct((batch,), np.int32)}
    step = train.make_train_step(config, parts)
    analysis = step.lower(parts.abstract, batch_shapes).compile().memory_analysis()
    mib = lambda n: n / 2 ** 20
    print(f"{variant:8s} {batch:5d} {chunk:5d} {mib(analysis.temp_size_in_bytes):9.1f} "
          f"{mib(analysis.argument_size_in_bytes):9.1f} "
          f"{mib(analysis.output_size_in_bytes):8.1f}", flush=True)


def main(argv):
  del argv
  memory() if FLAGS.memory else claims()


if __name__ == "__main__":
  app.run(main)
