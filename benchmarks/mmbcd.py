"""MMBCD on the mammography world: the paper's ablation (the claim), where region
cropping is fastest (`--crop`), and the train step beside the PyTorch reference
(`--step`).

  python -m benchmarks.mmbcd --out=/tmp/mmbcd/runs               # the ablation table
  python -m benchmarks.mmbcd --seeds=0,1,2 --methods=vision,attention
  python -m benchmarks.mmbcd --crop [--canvases=1024,2048 --region_sizes=32,224]
  python -m benchmarks.mmbcd --step [--sizes=tiny,small --rounds=3 --runs=2]

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

The step (`--step`), at each of `STEP_SIZES`: the real `mmjax.train` step of
configs/mmbcd.py:paper with that size's towers, batch and K regions and the recipe's
freezing (`trainable_pattern`), on the recipe pipeline's first batch (regions cropped in
the pipeline, padded with duplicates as the reference pads, so both systems get the same
uint8 crops), one device; and the PyTorch reference's step
(benchmarks/mmbcd_torch.py: `TorchMMBCD` in train mode, so BatchNorm on the batch and the
attention's dropout 0.3 on, cross-entropy, backward, Adam with the recipe's settings and
no clipping over the parameters that require grad, frozen as the reference freezes) on the
same crops normalised as the ViT normalises them. RoBERTa's own dropouts are 0 on the
torch side: mmjax's BERT has none. Both hold the same weights: the torch module's state
dict, converted by `mmjax.convert.convert_mmbcd`; the first losses with the attention's
dropout off agree (`loss0_nodropout_*`), the first steps' losses differ by the dropout
draws (`loss0_*`). Timed alternately (`side_by_side.alternate`), torch on every core
(`torch.set_num_threads(os.cpu_count())`, OMP_WAIT_POLICY=PASSIVE unless the environment
sets it); the mmjax step's compiled memory (`memory_analysis`). One JSON line per system
and size to benchmarks/results/mmbcd.jsonl.
"""

import os

# Before anything loads torch (tensorboardX does, through mmjax.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from mmjax.configs import mmbcd as mmbcd_recipe

from benchmarks import contrastive, harness
from benchmarks.side_by_side import alternate, record_systems
from mmjax import checkpoints, convert, train
from mmjax.data import regions as regions_lib
from mmjax.data.mammo_world import MammoWorld
from mmjax.models.mmbcd import MMBCD, crop_and_resize

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
  flags.DEFINE_integer("runs", 5, "--crop: timed calls of each way, alternating; --step: "
                       "timed calls per system per round.")
  flags.DEFINE_bool("step", False, "Time the train step against the PyTorch reference "
                    "instead of running the claim.")
  flags.DEFINE_list("sizes", ["tiny", "small"], "--step: sizes (STEP_SIZES).")
  flags.DEFINE_integer("rounds", 3, "--step: alternating rounds.")
  flags.DEFINE_string("results", None, "Results file (default: benchmarks/results/"
                      "mmbcd.jsonl).")


# The train step's sizes: the DinoViT's arguments, the RoBERTa's (transformers names), the
# projections' width, the batch, K regions, the history's tokens and the freezing (DINO's
# frozen blocks, RoBERTa's trained layers; None: nothing frozen) and, where given, the
# world's image size (the recipe's: 1024 px).
STEP_SIZES = {
    # The recipe's tiny towers (configs/mmbcd.py's default shape): nothing frozen.
    "tiny": {"vision": dict(width=64, depth=4, heads=2, mlp=256, size=32, patch=8),
             "text": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=128),
             "embed_dim": 64, "batch": 16, "num_regions": 8, "seq_len": 48,
             "vision_frozen_blocks": None, "text_trained_layers": None},
    # DINO ViT-S/8's shape (blocks 0-8 frozen) at 64 px crops, a 4-layer RoBERTa 256 wide
    # (its last 2 layers trained); batch 6 (at 8 the reference's step took ~7 s on 2 shared
    # cores).
    "small": {"vision": dict(width=384, depth=12, heads=6, mlp=1536, size=64, patch=8),
              "text": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024),
              "embed_dim": 256, "batch": 6, "num_regions": 8, "seq_len": 48,
              "vision_frozen_blocks": 9, "text_trained_layers": 2},
    # For tests: two 2-layer towers 32 wide, both partly frozen.
    "toy": {"vision": dict(width=32, depth=2, heads=2, mlp=64, size=16, patch=8),
            "text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64),
            "embed_dim": 16, "batch": 4, "num_regions": 2, "seq_len": 48,
            "vision_frozen_blocks": 1, "text_trained_layers": 1, "world_size": 256},
}


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
                 + " | ".join(harness.mean_std([r[n] for r in results]) for n in names) + " |")
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
# The reference's RobertaForSequenceClassification's head, which MMBCD never uses.
UNUSED = "text_encoder.classifier."


def reference_model(size: dict, config, seed: int = 0):
  """`(TorchMMBCD, MMBCDConfig, params, model_state)`: the reference module at `size`
  (random weights from `seed`; RoBERTa's vocabulary, pad, <s> and </s> those of
  `config`'s tokenizer, its dropouts 0) and the conversion of its state dict."""
  import torch
  import transformers

  from benchmarks import mmbcd_torch
  tokens = config.tokens
  roberta = transformers.RobertaConfig(
      **size["text"], vocab_size=mmbcd_recipe.get_config().model.text.vocab_size,
      max_position_embeddings=size["seq_len"] + 16, type_vocab_size=1, layer_norm_eps=1e-5,
      pad_token_id=tokens.pad, bos_token_id=tokens.bos, eos_token_id=tokens.eos,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
  torch.manual_seed(seed)
  model = mmbcd_torch.TorchMMBCD(size["vision"], roberta, size["embed_dim"],
                                 attn_dropout=config.model.attn_dropout,
                                 vision_frozen_blocks=size["vision_frozen_blocks"],
                                 text_trained_layers=size["text_trained_layers"])
  with torch.no_grad():  # DINO's init of its bare parameters (zeros in the module)
    for p in (model.image_encoder.cls_token, model.image_encoder.pos_embed):
      p.normal_(std=0.02)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "model.pt"
    torch.save(model.state_dict(), path)
    cfg, params, model_state = convert.convert_mmbcd(path, roberta.to_dict(),
                                                     num_heads=size["vision"]["heads"])
  return model, cfg, params, model_state


def step_recipe(cfg, size: dict):
  """configs/mmbcd.py:paper around `cfg` (an `MMBCDConfig`): `size`'s batch, regions,
  history length, freezing and world, crops made in the pipeline and padded with duplicates (as
  the reference pads), one device."""
  config = mmbcd_recipe.get_config("paper")
  config.model = dataclasses.asdict(cfg) | {"attn_dropout": config.model.attn_dropout}
  config.trainable = mmbcd_recipe.trainable_pattern(size["vision_frozen_blocks"] or 0,
                                                    size["text_trained_layers"],
                                                    cfg.text.depth)
  config.data.update(batch_size=size["batch"], seq_len=size["seq_len"])
  config.data.regions.update(num_regions=size["num_regions"], region_size=size["vision"]["size"],
                             crop="pipeline", pad="duplicate")
  world = size.get("world_size")
  if world:
    config.data.regions.canvas_size = world
    for datasets in (config.data.datasets, config.data.eval_datasets):
      for dataset in datasets.values():
        dataset.source.image_size = world
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  return config


def mmjax_step(config, params: dict, model_state: dict) -> contrastive.TrainStep:
  """The compiled `mmjax.train` step of `config` on its pipeline's first batch, its fresh
  state's weights and BatchNorm statistics replaced by `params` and `model_state`."""
  parts, state = contrastive.fresh_state(config, jax.devices()[:1])
  given = checkpoints.flat_params(params)
  for part in ("params", "frozen"):
    flat = checkpoints.flat_params(state[part])
    for path, value in flat.items():
      if np.shape(given.get(path)) != np.shape(value):
        raise ValueError(f"The converted MMBCD has no {path} of shape {np.shape(value)} "
                         f"(has {np.shape(given.get(path))}): the recipe's model differs "
                         "from the converted one.")
      flat[path] = np.asarray(given[path], value.dtype)
    state[part] = checkpoints.tree_params(flat)
  state["model_state"] = jax.tree_util.tree_map(np.asarray, model_state)
  state["opt_state"] = jax.device_get(parts.tx.init(state["params"]))
  step = contrastive.TrainStep(config, parts, state, contrastive.first_batch(config, parts))
  step.trainable = sum(int(np.prod(np.shape(x)))
                       for x in jax.tree_util.tree_leaves(state["params"]))
  return step


class TorchStep:
  """The reference's train step of `model` (a `TorchMMBCD`) on `batch` (the mmjax step's,
  on the host): forward in train mode, cross-entropy, backward, Adam with `config`'s
  settings over the parameters that require grad (no weight decay, no clipping, as
  there)."""

  def __init__(self, model, config, batch: dict):
    import torch
    self.torch, self.model = torch, model.train()
    vision, optim = config.model.vision, config.optim
    if optim.weight_decay or optim.clip_norm:
      raise ValueError(f"The reference's Adam has no weight decay and no clipping; the "
                       f"recipe has weight_decay={optim.weight_decay}, "
                       f"clip_norm={optim.clip_norm}.")
    image = np.asarray(batch["regions"], np.float32) / 255  # "b k s s 3"
    pixels = (image - np.asarray(vision.pixel_mean)) / np.asarray(vision.pixel_std)
    tokens = torch.tensor(np.asarray(batch["tokens"]), dtype=torch.long)
    self.inputs = (torch.tensor(pixels.transpose(0, 1, 4, 2, 3).astype(np.float32)), tokens,
                   (tokens != config.tokens.pad).long())
    self.labels = torch.tensor(np.asarray(batch["label"]), dtype=torch.long)
    self.trainable_params = [p for p in model.parameters() if p.requires_grad]
    # RoBERTa's classifier gets no gradient (MMBCD reads the hidden state) and Adam skips it.
    self.trainable = sum(p.numel() for n, p in model.named_parameters()
                         if p.requires_grad and not n.startswith(UNUSED))
    self.optimizer = torch.optim.Adam(self.trainable_params, lr=optim.lr,
                                      betas=(optim.b1, optim.b2), eps=optim.eps)
    self.loss = None

  def __call__(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.torch.nn.functional.cross_entropy(self.model(*self.inputs), self.labels)
    loss.backward()
    self.optimizer.step()
    self.loss = loss.item()


def losses_without_dropout(model, cfg, params: dict, model_state: dict, config,
                           batch: dict) -> dict[str, float]:
  """Both systems' cross-entropy on `batch` in train mode (BatchNorm on the batch) with the
  attention's dropout off, before any step: equal when both compute the same function of
  the same weights."""
  import torch
  theirs = TorchStep(model, config, batch)
  attention, p = model.attention, model.attention.dropout
  attention.dropout = 0.0
  try:
    with torch.no_grad():
      torch_loss = torch.nn.functional.cross_entropy(model(*theirs.inputs), theirs.labels)
  finally:
    attention.dropout = p
  out, _ = MMBCD(dataclasses.replace(cfg, attn_dropout=0.0)).apply(
      {"params": params, **model_state}, jnp.asarray(batch["regions"]),
      jnp.asarray(batch["tokens"]), region_mask=jnp.asarray(batch["region_mask"]), train=True,
      mutable=["batch_stats"])
  nll = -jax.nn.log_softmax(out["logits"])[np.arange(len(batch["label"])),
                                           np.asarray(batch["label"])]
  return {"loss0_nodropout_mmjax": float(nll.mean()), "loss0_nodropout_torch": float(torch_loss)}


def train_steps(sizes, *, rounds: int, runs: int, out: str | None = None) -> list[dict]:
  """Times the mmjax and PyTorch train steps at each of `sizes` (`STEP_SIZES` names) on the
  same weights, alternating; records one line per size and system and returns them."""
  import torch
  torch.set_num_threads(os.cpu_count())
  lines = []
  for name in sizes:
    size = STEP_SIZES[name]
    model, cfg, params, model_state = reference_model(size, mmbcd_recipe.get_config("paper"))
    config = step_recipe(cfg, size)
    ours = mmjax_step(config, params, model_state)
    batch = jax.device_get(ours.batch)
    check = losses_without_dropout(model, cfg, params, model_state, config, batch)
    theirs = TorchStep(model, config, batch)
    if ours.trainable != theirs.trainable:
      raise ValueError(f"{name}: mmjax trains {ours.trainable} parameters, the reference "
                       f"{theirs.trainable}: the freezing differs.")
    first = {}
    for system, fn in (("mmjax", ours), ("torch", theirs)):
      fn()
      first[f"loss0_{system}"] = float(fn.loss)
    common = {"size": name, "batch": size["batch"], "num_regions": size["num_regions"],
              "image_size": size["vision"]["size"], "seq_len": size["seq_len"],
              "vision": size["vision"], "text": size["text"], "embed_dim": size["embed_dim"],
              "vision_frozen_blocks": size["vision_frozen_blocks"],
              "text_trained_layers": size["text_trained_layers"],
              "params": sum(p.numel() for n, p in model.named_parameters()
                            if not n.startswith(UNUSED)),
              "trainable": theirs.trainable, "threads": os.cpu_count(),
              "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              **ours.memory, **check, **first}
    timing = alternate({"mmjax": ours, "torch": theirs}, rounds, runs)
    lines += record_systems("mmbcd", common, "train_step", timing, size["batch"], peak=1.0,
                            unit="examples", out=out)
    del ours, theirs
  return lines


def step_table(lines: list[dict]) -> str:
  """A markdown table of `train_steps`' lines."""
  t = lambda s: f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"
  ms = lambda x: f"{t(x['step_s'])} ({t(x['step_min_s'])}–{t(x['step_max_s'])})"
  by = {(x["size"], x["system"]): x for x in lines}
  out = [("| size | batch x regions | params (trained) | mmjax step | PyTorch step | "
          "PyTorch / mmjax | mmjax compiled temp / arguments | first loss mmjax / PyTorch "
          "(no dropout) |"), "| --- " * 8 + "|"]
  for name in dict.fromkeys(x["size"] for x in lines):
    ours, theirs = by[name, "mmjax"], by[name, "torch"]
    out.append(f"| {name} ({ours['image_size']} px) | {ours['batch']} x {ours['num_regions']} "
               f"| {ours['params'] / 1e6:.2f}M ({ours['trainable'] / 1e6:.2f}M) | {ms(ours)} "
               f"| {ms(theirs)} | {ours['speedup_vs_torch']:.2f} | "
               f"{ours['temp_bytes'] / 2**20:.0f} MiB / {ours['argument_bytes'] / 2**20:.0f} MiB "
               f"| {ours['loss0_nodropout_mmjax']:.5f} / {ours['loss0_nodropout_torch']:.5f} |")
  return "\n".join(out)


def main(argv):
  del argv
  if FLAGS.step:
    print(step_table(train_steps(FLAGS.sizes, rounds=FLAGS.rounds, runs=FLAGS.runs,
                                 out=FLAGS.results)))
    return
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
