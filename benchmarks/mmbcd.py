"""MMBCD on the mammography world: the paper's ablation (the claim), where region
cropping is fastest (`--crop`), and the train step beside the PyTorch reference
(`--step`).

  python -m benchmarks.mmbcd --out=/tmp/mmbcd/runs               # the ablation table
  python -m benchmarks.mmbcd --seeds=0,1,2 --methods=vision,attention
  python -m benchmarks.mmbcd --crop [--canvases=1024,2048 --region_sizes=32,224]
  python -m benchmarks.mmbcd --step [--sizes=small]

The claim: each (method, seed) trains `configs/mmbcd.py:<method>` with `seed` set (the
initial weights, the data order, the keyword draws; the world and its held-out cases are
the same for all), then reads the held-out scores its final evaluation recorded
(`mmjax.evaluate.classify`: accuracy, F1, ROC AUC, ECE before and after temperature
scaling). Runs are kept under --out and reused when finished. The table prints mean +-
standard deviation over seeds.

The crops (`--crop`): one batch of `batch` world cases with their top `num_regions`
boxes, cropped and resized to each region size either in the input pipeline
(`mmjax.data.regions.crop_regions`, PIL, one case after another, as the pipeline's
worker does) or by the model's fixed-shape `crop_and_resize` under `jit` on the batch of
whole images (on the canvas the pipeline lays them on), over the whole image and from
a window around each box (the recipe's `crop_window`); timed alternately after two
warm-up calls each (compilation), medians; the bytes each way sends to the device beside
the time. One JSON line per
setting to benchmarks/results/mmbcd.jsonl.
"""

import os

# Before anything loads torch (tensorboardX does, through mmjax.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from mmjax.configs import mmbcd as mmbcd_recipe

from benchmarks import harness
from benchmarks.side_by_side import alternate
from mmjax import train
from mmjax.data import regions as regions_lib
from mmjax.data.mammo_world import MammoWorld
from mmjax.models.mmbcd import crop_and_resize

FLAGS = flags.FLAGS
METRICS = ("accuracy", "f1", "roc_auc", "ece", "ece_scaled")


def _define_flags():
  """The command line's flags: defined when this module runs, not when it is imported
  (tests import it beside other benchmarks whose flags share names)."""
  flags.DEFINE_string("out", "/tmp/mmbcd/runs", "Where the runs are kept.")
  flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the runs.")
  flags.DEFINE_list("methods", list(mmbcd_recipe.METHODS), "Methods (recipe variants).")
  flags.DEFINE_string("shape", "tiny", "The recipe's shape (tiny or large).")
  flags.DEFINE_integer("steps", 0, "train.steps (0: the recipe's).")
  flags.DEFINE_bool("crop", False, "Time region cropping in the pipeline against on the "
                    "device instead of running the claim.")
  flags.DEFINE_list("canvases", ["1024", "2048"], "--crop: whole-image sizes.")
  flags.DEFINE_list("region_sizes", ["32", "224"], "--crop: crop sizes.")
  flags.DEFINE_integer("batch", 16, "--crop: cases per batch.")
  flags.DEFINE_integer("num_regions", 8, "--crop: regions per case.")
  flags.DEFINE_integer("runs", 5, "--crop: timed calls of each way, alternating.")
  flags.DEFINE_string("results", None, "Results file (default: benchmarks/results/"
                      "mmbcd.jsonl).")


def recipe(method: str, seed: int, shape: str = "tiny", steps: int = 0):
  config = mmbcd_recipe.get_config(method if shape == "tiny" else f"{method}-{shape}")
  config.seed = seed
  if steps:
    config.train.update(steps=steps, checkpoint_every=steps, eval_every=0,
                        log_every=max(steps // 6, 1))
  return config


def scores(workdir: pathlib.Path) -> dict[str, float]:
  record = json.loads((workdir / "finished.json").read_text())["metrics"]["few_shot"]
  cell = record["classify"]["0"]
  return {name: cell[name] for name in METRICS if name in cell}


def mean_std(values) -> str:
  values = np.asarray(values, np.float64)
  return f"{values.mean():.3f} ±{values.std(ddof=1) if len(values) > 1 else 0:.3f}"


def claim(methods, seeds, *, out: str, shape: str = "tiny", steps: int = 0) -> str:
  """Trains (or reuses) every (method, seed) run and returns the markdown table."""
  rows = []
  for method in methods:
    results = []
    for seed in seeds:
      config = recipe(method, seed, shape, steps)
      workdir = pathlib.Path(out) / f"{config.variant}-{config.train.steps}steps-seed{seed}"
      if not (workdir / "finished.json").exists():
        train.run(config, workdir)
      results.append(scores(workdir))
      print(f"{method} seed {seed}: {results[-1]}", flush=True)
    rows.append((method, results))
  names = [n for n in METRICS if n in rows[0][1][0]]
  lines = [f"| method | {' | '.join(names)} |", "| --- |" + " --- |" * len(names)]
  for method, results in rows:
    lines.append(f"| {method} | "
                 + " | ".join(mean_std([r[n] for r in results]) for n in names) + " |")
  return "\n".join(lines)


def crop_batch(world: MammoWorld, batch: int, num_regions: int, seed: int = 0
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """`batch` test cases' images and their top `num_regions` boxes in pixels (y0, x0, y1,
  x1), selected as the pipeline selects them (every case with at least one box)."""
  spec = regions_lib.RegionSpec(num_regions=num_regions, pad="duplicate")
  images, boxes, index = [], [], 0
  rng = np.random.default_rng(seed)
  while len(images) < batch:
    document = world.example("test", index)
    index += 1
    rows, _ = regions_lib.valid_boxes(document["boxes"])
    if not len(rows):
      continue
    rows, _ = regions_lib.select_boxes(rows, spec, rng)
    image = np.asarray(document["image"])
    images.append(image)
    boxes.append(regions_lib.pixel_boxes(rows, *image.shape[:2]))
  return images, boxes


def crop_timings(canvases, region_sizes, *, batch: int, num_regions: int, runs: int,
                 out: str | None = None) -> list[dict]:
  """Times both ways of cropping at each canvas and region size; records and returns one
  line per setting."""
  lines = []
  for canvas in canvases:
    images, boxes = crop_batch(MammoWorld(seed=0, image_size=canvas), batch, num_regions)
    whole = np.stack([regions_lib.canvas(i, canvas) for i in images])
    device_boxes = np.stack([regions_lib.canvas_boxes(b, *i.shape[:2], canvas)
                             for i, b in zip(images, boxes, strict=True)])
    for size in region_sizes:
      def pipeline():
        return [regions_lib.crop_regions(i, b, size) for i, b in zip(images, boxes,
                                                                     strict=True)]
      window = 256 * canvas // 1024  # the recipe's crop_window
      crop = jax.jit(lambda im, bx: crop_and_resize(im, bx, size))
      crop_windowed = jax.jit(lambda im, bx: crop_and_resize(im, bx, size, window))

      def device():
        return crop(jnp.asarray(whole), jnp.asarray(device_boxes)).block_until_ready()

      def device_windowed():
        return crop_windowed(jnp.asarray(whole),
                             jnp.asarray(device_boxes)).block_until_ready()

      timing = alternate({"pipeline": pipeline, "device": device,
                          "device_windowed": device_windowed}, rounds=runs, runs=1)
      line = {"measurement": "crop", "canvas": canvas, "region_size": size, "batch": batch,
              "num_regions": num_regions,
              "pipeline_s": timing["pipeline"]["median_s"],
              "pipeline_min_s": timing["pipeline"]["min_s"],
              "device_s": timing["device"]["median_s"],
              "device_min_s": timing["device"]["min_s"], "window": window,
              "device_windowed_s": timing["device_windowed"]["median_s"],
              "device_windowed_min_s": timing["device_windowed"]["min_s"],
              "pipeline_bytes": batch * num_regions * size * size * 3,
              "device_bytes": int(whole.nbytes + device_boxes.nbytes)}
      lines.append(harness.record("mmbcd", line, out))
      print(json.dumps(line), flush=True)
  return lines


def crop_table(lines: list[dict]) -> str:
  ms = lambda s: f"{s * 1e3:.1f} ms"
  out = ["| canvas | crop size | pipeline (PIL, per batch) | device, whole image (jit) | "
         "device, window (jit) | device window / pipeline | bytes to the device: pipeline / "
         "device |", "| --- " * 7 + "|"]
  for x in lines:
    out.append(f"| {x['canvas']} px | {x['region_size']} px | {ms(x['pipeline_s'])} | "
               f"{ms(x['device_s'])} | {ms(x['device_windowed_s'])} ({x['window']} px) | "
               f"{x['device_windowed_s'] / x['pipeline_s']:.1f} | "
               f"{x['pipeline_bytes'] / 2**20:.1f} MiB / {x['device_bytes'] / 2**20:.1f} MiB |")
  return "\n".join(out)


def main(argv):
  del argv
  if FLAGS.crop:
    print(crop_table(crop_timings([int(c) for c in FLAGS.canvases],
                                  [int(s) for s in FLAGS.region_sizes], batch=FLAGS.batch,
                                  num_regions=FLAGS.num_regions, runs=FLAGS.runs,
                                  out=FLAGS.results)))
    return
  print(claim(FLAGS.methods, [int(s) for s in FLAGS.seeds], out=FLAGS.out, shape=FLAGS.shape,
              steps=FLAGS.steps))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
