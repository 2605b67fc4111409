"""LLaVA on shapes-world conversations: held-out answer accuracy of stage-2 full
fine-tuning against LoRA, with their trainable parameter counts (the claim), and the
train step of both beside transformers + peft on the same weights and batch (`--step`).

  python -m benchmarks.llava --out=/tmp/llava/runs            # the accuracy table
  python -m benchmarks.llava --seeds=0,1,2 --variants=tiny,lora
  python -m benchmarks.llava --step [--sizes=small --step_variants=full,lora8,lora64]

The claim: each (variant, seed) trains `configs/llava.py:<variant>` with `seed` set (the
initial projector and LoRA weights and the data order; the backbones and stage 1 are
the recipe's cached ones, the same for all), then reads the held-out answer accuracy
(`mmjax.evaluate.instruct`) its final evaluation recorded. Runs are kept under --out
and reused when finished. The table prints mean +- standard deviation over seeds.

The step (`--step`), at each of `STEP_SIZES`: a random transformers
`LlavaForConditionalGeneration` of that size (CLIP vision tower, mlp2x_gelu projector,
LLaMA LM; llava-hf's vocabulary and image token) is saved and converted with
`mmjax.convert.convert_llava`, so both systems hold the same weights. Each `VARIANTS`
entry trains on one batch (random images, each row's `<image>` expanded to the model's
image tokens after a short prompt, the answer after them; the loss mask as
`mmjax.data.conversation` sets it: prompt and image positions masked, answer tokens
trained; the torch labels -100 where the mmjax mask is 0):

  full     the projector and the LM trained, the vision tower frozen (configs/llava.py
           tiny); transformers: the vision tower's `requires_grad` off.
  lora<r>  LoRA of rank r, alpha 2r, no dropout, on the LM layers' q, k, v, o, gate, up and
           down maps, the projector trained in full (`config.peft`, as configs/llava.py
           lora); transformers + peft: `LoraConfig` on the same modules,
           `modules_to_save=["multi_modal_projector"]`.

mmjax runs the real `mmjax.train` step (configs/llava.py with the converted model, its
fresh state's base weights replaced by the converted ones; LoRA's B starts at zero in both,
so every variant starts from the same function); transformers the model's own `labels`
loss, backward, clipping at the recipe's norm, AdamW with the recipe's betas, eps and
weight decay. Both first losses and both trainable counts are recorded (they must agree).
All six are timed alternately (`side_by_side.alternate`), on every core. Memory: the mmjax
step's compiled `memory_analysis`, and for both systems the peak resident memory of a
fresh process (`--rss_child`) that builds that one system and variant (the mmjax step
compiled, its AdamW state made), runs one step (which makes torch's AdamW moments), then
steps alone: their peak (VmHWM, reset before them through /proc/self/clear_refs;
`ru_maxrss` where that is not possible) less the resident memory after the build (the
table's column), and the resident memory after the first step. One JSON line per
system, variant and size to benchmarks/results/llava.jsonl.
"""

import os

# Before anything loads torch (tensorboardX does, through mmjax.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags

from benchmarks import contrastive, harness
from benchmarks.side_by_side import alternate, record_systems
from mmjax import checkpoints, convert, sharding, train
from mmjax.configs import llava as llava_recipe

FLAGS = flags.FLAGS


def _define_flags():
  """The command line's flags: defined when this module runs, not when it is imported
  (tests import it beside benchmarks.medclip, whose flags share names)."""
  flags.DEFINE_string("out", "/tmp/llava/runs", "Where the runs are kept.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the runs.")
  flags.DEFINE_list("variants", ["tiny", "lora"], "Stage-2 recipe variants.")
  flags.DEFINE_integer("steps", 0, "train.steps (0: the recipe's).")
  flags.DEFINE_integer("episodes", 0, "Held-out conversations (0: the recipe's).")
  flags.DEFINE_bool("step", False, "Time the train step of full fine-tuning and LoRA against "
                    "transformers + peft instead of running the claim.")
  flags.DEFINE_list("sizes", ["small"], "--step: sizes (STEP_SIZES).")
  flags.DEFINE_list("step_variants", ["full", "lora8", "lora64"], "--step: VARIANTS.")
  flags.DEFINE_integer("rounds", 3, "--step: alternating rounds.")
  flags.DEFINE_integer("runs", 1, "--step: timed calls per system per round.")
  flags.DEFINE_integer("rss_steps", 3, "--step: steps of each peak-memory process (0: none).")
  flags.DEFINE_string("results", None, "--step: results file (default: benchmarks/results/"
                      "llava.jsonl).")
  flags.DEFINE_string("rss_child", None, "Internal: 'system,variant,size,hf_dir': build that "
                      "one system, run --rss_steps steps and print its peak memory as JSON.")


# The train step's sizes: transformers `vision_config` and `text_config`, the batch.
STEP_SIZES = {
    # A CLIP-style ViT 224px/14 (256 image tokens), a 4-layer LLaMA 512 wide.
    "small": {"vision": {"hidden_size": 256, "intermediate_size": 1024,
                         "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 224,
                         "patch_size": 14},
              "text": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
                       "num_attention_heads": 8, "vocab_size": 32064},
              "seq_len": 384, "batch": 4},
    # For tests: 4 image tokens, a 2-layer LM 32 wide.
    "tiny": {"vision": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                        "num_attention_heads": 4, "image_size": 28, "patch_size": 14},
             "text": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "vocab_size": 128},
             "seq_len": 40, "batch": 2},
}
# LoRA rank of each variant (None: full fine-tuning).
VARIANTS = {"full": None, "lora8": 8, "lora64": 64}
# The LM's linear maps, named as each system names them.
LORA_TARGETS = r"lm/layers_\d+/(attn|mlp)/\w+"
TORCH_LORA_TARGETS = (r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|"
                      r"mlp\.(gate|up|down)_proj)")


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


def reference_model(size: dict, path: str):
  """A random transformers LLaVA of `size`, saved to `path`: `(LlavaConfig, params)` of its
  conversion. Its image token is llava-hf's place for it: 64 below the vocabulary's end
  (32000 of 32064), the pad after it."""
  import torch
  import transformers
  torch.manual_seed(0)
  image_token = size["text"]["vocab_size"] - 64
  model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      vision_config=dict(model_type="clip_vision_model", **size["vision"]),
      text_config=dict(model_type="llama", **size["text"], max_position_embeddings=4096,
                       pad_token_id=image_token + 1),
      image_token_index=image_token))
  model.save_pretrained(path)
  return convert.convert_llava(path)


def step_batch(cfg, size: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """One batch of `size` for `cfg` (a `LlavaConfig`): per row, a short prompt (BOS and 7
  tokens), the image's `image_tokens` tokens, a question of 16 tokens, the answer to the
  end; `loss_mask` 1 on the positions that predict an answer token (the prompt, image and
  question, and the last position, masked), as `mmjax.data.conversation` trains answers."""
  rng = np.random.default_rng(seed)
  b, t, n = size["batch"], size["seq_len"], cfg.image_tokens
  side = cfg.vision.image_size
  tokens = rng.integers(3, cfg.image_token_id, size=(b, t))
  tokens[:, 0] = 1
  tokens[:, 8:8 + n] = cfg.image_token_id
  answer = 8 + n + 16
  if answer >= t - 1:
    raise ValueError(f"seq_len={t} leaves no answer after {n} image tokens and a 24-token "
                     "prompt; raise STEP_SIZES' seq_len.")
  loss_mask = np.zeros((b, t), np.float32)
  loss_mask[:, answer - 1:t - 1] = 1
  return {"images": rng.integers(0, 256, size=(b, 1, side, side, 3), dtype=np.uint8),
          "tokens": tokens.astype(np.int32),
          "targets": np.roll(tokens, -1, axis=1).astype(np.int32), "loss_mask": loss_mask}


def step_recipe(cfg, size: dict, variant: str):
  """configs/llava.py (tiny, or lora at `VARIANTS[variant]`'s rank, alpha twice it, no
  dropout) around `cfg`, `size`'s batch, one device, nothing loaded from `config.init`."""
  rank = VARIANTS[variant]
  config = llava_recipe.get_config("tiny" if rank is None else "lora")
  config.model = dataclasses.asdict(cfg)
  config.init = {}
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  config.data.update(batch_size=size["batch"], seq_len=size["seq_len"],
                     image_size=cfg.vision.image_size, image_tokens=cfg.image_tokens)
  config.tokens.pad = cfg.pad_token_id
  config.optim.warmup_steps = 0
  if rank is not None:
    config.peft = {"lora": {"rank": rank, "alpha": 2 * rank, "dropout": 0.0,
                            "targets": LORA_TARGETS}, "modules_to_save": (r"^projector/",)}
  return config


def mmjax_step(cfg, params: dict, size: dict, variant: str, batch: dict
               ) -> contrastive.TrainStep:
  """The compiled `mmjax.train` step of `variant` on `batch`, its fresh state's base
  weights replaced by `params` (the LoRA leaves stay as initialised: B is zero)."""
  config = step_recipe(cfg, size, variant)
  parts = train.build(config, jax.devices()[:1])
  state = jax.device_get(train.init_state(config, parts, pretrained=False))
  given = checkpoints.flat_params(params)
  for part in ("params", "frozen"):
    flat = checkpoints.flat_params(state[part])
    for path, value in flat.items():
      if path.rsplit("/", 1)[-1] in ("lora_a", "lora_b"):
        continue
      if path not in given or np.shape(given[path]) != np.shape(value):
        raise ValueError(f"The converted LLaVA has no {path} of shape {np.shape(value)} "
                         f"(has {np.shape(given.get(path))}): the recipe's model differs "
                         "from the converted one.")
      flat[path] = np.asarray(given[path], value.dtype)
    state[part] = checkpoints.tree_params(flat)
  state["opt_state"] = jax.device_get(parts.tx.init(state["params"]))
  placed = sharding.global_batch(batch, sharding.batch_sharding(parts.mesh, parts.rules))
  step = contrastive.TrainStep(config, parts, state, placed)
  step.trainable = sum(int(np.prod(np.shape(x)))
                       for x in jax.tree_util.tree_leaves(state["params"]))
  return step


class TorchStep:
  """The same step in transformers (+ peft for LoRA) on the model saved at `hf_dir`: its
  `labels` loss (-100 where the mmjax loss mask is 0), backward, clipping, AdamW with the
  recipe's settings of `config`."""

  def __init__(self, hf_dir: str, config, variant: str, batch: dict, cfg):
    import torch
    import transformers
    self.torch = torch
    model = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir,
                                                                       dtype=torch.float32)
    rank = VARIANTS[variant]
    if rank is None:
      for name, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    else:
      import peft
      model = peft.get_peft_model(model, peft.LoraConfig(
          r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TORCH_LORA_TARGETS,
          modules_to_save=["multi_modal_projector"]))
    self.model = model.train()
    self.trainable_params = [p for p in model.parameters() if p.requires_grad]
    self.trainable = sum(p.numel() for p in self.trainable_params)
    image = np.asarray(batch["images"][:, 0], np.float32) / 255
    pixels = (image - np.asarray(cfg.vision.pixel_mean)) / np.asarray(cfg.vision.pixel_std)
    tokens = torch.tensor(batch["tokens"], dtype=torch.long)
    # transformers shifts labels itself: the label at t is the target of position t - 1.
    labels = torch.full_like(tokens, -100)
    trained = torch.tensor(batch["loss_mask"][:, :-1] > 0)
    labels[:, 1:] = torch.where(trained, tokens[:, 1:], labels[:, 1:])
    self.inputs = {"input_ids": tokens, "labels": labels, "pixel_values": torch.tensor(
        pixels.transpose(0, 3, 1, 2).astype(np.float32))}
    optim = config.optim
    self.optimizer = torch.optim.AdamW(self.trainable_params, lr=optim.lr,
                                       betas=(optim.b1, optim.b2), eps=optim.eps,
                                       weight_decay=optim.weight_decay)
    self.clip_norm = optim.clip_norm
    self.loss = None

  def __call__(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.model(**self.inputs).loss
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.trainable_params, self.clip_norm)
    self.optimizer.step()
    self.loss = loss.item()


def build_system(system: str, variant: str, size: dict, hf_dir: str, cfg, params):
  batch = step_batch(cfg, size)
  if system == "mmjax":
    return mmjax_step(cfg, params, size, variant, batch)
  return TorchStep(hf_dir, step_recipe(cfg, size, variant), variant, batch, cfg)


def rss_child(spec: str, steps: int) -> dict:
  """`--rss_child`: builds one system and variant, runs one step (the optimizer's state,
  first allocations), then `steps` steps alone: the resident memory after the build and
  after that step, and the peak over the later steps. The peak less the built memory is
  what training adds to the built model; the peak less the memory after the first step
  what a step adds to what the first left resident (XLA keeps its step's temporaries
  resident, so this is small for mmjax)."""
  import gc

  import torch
  torch.set_num_threads(os.cpu_count())
  system, variant, name, hf_dir = spec.split(",", 3)
  cfg, params = convert.convert_llava(hf_dir)
  fn = build_system(system, variant, STEP_SIZES[name], hf_dir, cfg, params)
  del params
  gc.collect()
  built = harness.resident_bytes()
  fn()
  baseline = harness.resident_bytes()
  harness.resident_peak_bytes(reset=True)
  for _ in range(steps):
    fn()
  peak = harness.resident_peak_bytes()
  return {"rss_built_bytes": built, "rss_baseline_bytes": baseline, "rss_peak_bytes": peak,
          "rss_step_bytes": peak - baseline}


def measure_rss(system: str, variant: str, name: str, hf_dir: str, steps: int) -> dict:
  """`rss_child` in a fresh process."""
  child = f"--rss_child={system},{variant},{name},{hf_dir}"
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.llava", child, f"--rss_steps={steps}"],
      capture_output=True, text=True, check=True,
      cwd=pathlib.Path(__file__).resolve().parent.parent)
  return json.loads(out.stdout.strip().splitlines()[-1])


def train_steps(sizes, variants, *, rounds: int, runs: int, rss_steps: int = 3,
                out: str | None = None) -> list[dict]:
  """Times the mmjax and transformers train steps of each variant at each of `sizes`, all
  alternating; records one line per size, variant and system and returns them."""
  import torch
  torch.set_num_threads(os.cpu_count())
  lines = []
  for name in sizes:
    size = STEP_SIZES[name]
    with tempfile.TemporaryDirectory() as hf_dir:
      cfg, params = reference_model(size, hf_dir)
      systems = {(system, variant): build_system(system, variant, size, hf_dir, cfg, params)
                 for variant in variants for system in ("mmjax", "torch")}
      for (system, variant), fn in systems.items():  # the first step: the weights as given
        fn()
        print(f"{name} {variant} {system}: first loss {float(fn.loss):.6f}, trainable "
              f"{fn.trainable:,}", flush=True)
      first = {key: float(fn.loss) for key, fn in systems.items()}
      timing = alternate({f"{s}/{v}": fn for (s, v), fn in systems.items()}, rounds, runs)
      rss = {key: measure_rss(*key, name, hf_dir, rss_steps) if rss_steps else {}
             for key in systems}
    for variant in variants:
      ours, theirs = systems["mmjax", variant], systems["torch", variant]
      common = {"size": name, "variant": variant, "lora_rank": VARIANTS[variant],
                "batch": size["batch"], "seq_len": size["seq_len"],
                "image_tokens": cfg.image_tokens, "vision": size["vision"],
                "text": size["text"], "threads": os.cpu_count(), "torch": torch.__version__,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "loss_mmjax": first["mmjax", variant], "loss_torch": first["torch", variant],
                "trainable_mmjax": ours.trainable, "trainable_torch": theirs.trainable,
                **ours.memory}
      for system in ("mmjax", "torch"):
        common |= {f"{k}_{system}": v for k, v in rss[system, variant].items()}
      pair = {"mmjax": timing[f"mmjax/{variant}"], "torch": timing[f"torch/{variant}"]}
      lines += record_systems("llava", common, "train_step", pair,
                              size["batch"] * size["seq_len"], peak=1.0, out=out)
  return lines


def scores(workdir: pathlib.Path) -> dict[str, float]:
  record = json.loads((workdir / "finished.json").read_text())["metrics"]["few_shot"]
  return dict(record["instruct"]["0"])


def step_table(lines: list[dict]) -> str:
  """A markdown table of `train_steps`' lines."""
  t = lambda s: f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"
  ms = lambda x: f"{t(x['step_s'])} ({t(x['step_min_s'])}–{t(x['step_max_s'])})"
  def mib(x, system):  # the peak over the steps less the resident memory after the build
    if f"rss_peak_bytes_{system}" not in x:
      return "–"
    return f"{(x[f'rss_peak_bytes_{system}'] - x[f'rss_built_bytes_{system}']) / 2**20:.0f} MiB"

  by = {(x["size"], x["variant"], x["system"]): x for x in lines}
  out = [("| size | variant | trainable (mmjax / torch) | first loss (mmjax / torch) | "
          "mmjax step | torch step | torch / mmjax | mmjax compiled temp + arguments | "
          "peak RSS less built: mmjax / torch |"), "| --- " * 9 + "|"]
  for size, variant, _ in by:
    if _ != "mmjax":
      continue
    ours, theirs = by[size, variant, "mmjax"], by[size, variant, "torch"]
    out.append(
        f"| {size} | {variant} | {ours['trainable_mmjax']:,} / {ours['trainable_torch']:,} | "
        f"{ours['loss_mmjax']:.5f} / {ours['loss_torch']:.5f} | {ms(ours)} | {ms(theirs)} | "
        f"{ours['speedup_vs_torch']:.2f} | "
        f"{(ours['temp_bytes'] + ours['argument_bytes']) / 2**20:.0f} MiB | "
        f"{mib(ours, 'mmjax')} / {mib(ours, 'torch')} |")
  return "\n".join(out)


def main(argv):
  del argv
  if FLAGS.rss_child:
    print(json.dumps(rss_child(FLAGS.rss_child, FLAGS.rss_steps)))
    return
  if FLAGS.step:
    print(step_table(train_steps(FLAGS.sizes, FLAGS.step_variants, rounds=FLAGS.rounds,
                                 runs=FLAGS.runs, rss_steps=FLAGS.rss_steps,
                                 out=FLAGS.results)))
    return
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
    cells = " | ".join(harness.mean_std([r[n] for r in results]) for n in names)
    print(f"| {variant} | {count:,} | {','.join(FLAGS.seeds)} | {cells} |")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
