"""mmjax against PyTorch references on the same Flamingo, same batch, same machine.

  python -m benchmarks.side_by_side --size=default     # the embedded recipe's shapes
  python -m benchmarks.side_by_side --size=base        # width 768, 12 layers, ViT-B/16

The reference is transformers' IDEFICS (a Flamingo: CLIP ViT, perceiver resampler, gated
cross-attention before LLaMA layers) built from a random config of the chosen size and
saved; mmjax runs the same weights through `mmjax.convert.convert_idefics`, so both
compute the same function. Measured, alternating the two systems in each of --rounds
rounds so that drift in the machine's speed hits both:

  train step   frozen vision tower and LM, trainable perceiver and gated blocks;
               AdamW with gradient clipping (mmjax: the real `mmjax.train` step)
  generation   greedy decoding with a KV cache, the images encoded once
  LM alone     a train step of the LLaMA LM by itself (every parameter trains): what
               the Flamingo additions cost
  OpenFlamingo forward and backward of open_flamingo's own PerceiverResampler and
               GatedCrossAttentionBlock against mmjax's, same shapes (`pip install
               --no-deps open_flamingo==2.0.1`; its modules are loaded from their file)

Both use every core (torch.set_num_threads(os.cpu_count()); XLA's CPU client uses all
cores). One JSON line per (measurement, system) goes to
benchmarks/results/side_by_side.jsonl, with the ratio mmjax/PyTorch of throughputs on the
mmjax lines. MFU uses the model FLOPs of `mmjax.flops` (the same for both systems) over
the float32 matmul rate measured in the same run.
"""

import dataclasses
import importlib.util
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import harness
from mmjax import convert, decoding, flops, sharding, train
from mmjax.checkpoints import flat_params
from mmjax.models.flamingo import Flamingo, generate
from mmjax.models.perceiver import PerceiverResampler, ResamplerConfig
from mmjax.models.xattn import (GatedCrossAttentionBlock, XAttnConfig, media_attention_mask,
                                media_index)

SIZES = {
    # configs/flamingo.py "tiny" shapes, with IDEFICS's LLaMA-style LM and batch.
    "default": dict(lm=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=4, vocab_size=1024),
                    vision=dict(embed_dim=128, image_size=64, patch_size=8,
                                num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=512),
                    perceiver=dict(resampler_depth=2, resampler_n_heads=4,
                                   resampler_head_dim=32, resampler_n_latents=16),
                    batch=16, seq_len=64, images=4, new_tokens=16),
    # Width 768, 12 layers; a ViT-B/16 at 224px; the paper's perceiver.
    "base": dict(lm=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, vocab_size=32000),
                 vision=dict(embed_dim=768, image_size=224, patch_size=16,
                             num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072),
                 perceiver=dict(resampler_depth=6, resampler_n_heads=8, resampler_head_dim=64,
                                resampler_n_latents=64),
                 batch=8, seq_len=128, images=2, new_tokens=16),
}

def reference_model(size: dict, path: str):
  """A random IDEFICS of `size`, saved to `path`: `(torch model, mmjax FlamingoConfig,
  mmjax params)`, the same weights in both."""
  import torch
  import transformers
  torch.manual_seed(0)
  lm = size["lm"]
  model = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(
      **lm, additional_vocab_size=2, max_position_embeddings=2048, cross_layer_interval=1,
      use_resampler=True, alpha_type="float", vision_config=size["vision"],
      perceiver_config=size["perceiver"]))
  with torch.no_grad():  # open gates, so the gated blocks compute what they would trained
    for name, p in model.named_parameters():
      if "alpha" in name:
        p.fill_(0.5)
  model.save_pretrained(path)
  media, endofchunk = lm["vocab_size"], lm["vocab_size"] + 1
  cfg, params = convert.convert_idefics(path, media_token_id=media,
                                        endofchunk_token_id=endofchunk)
  return model, cfg, params


def interleaved_tokens(size: dict, media: int, endofchunk: int, vocab: int,
                       rng: np.random.Generator) -> np.ndarray:
  """`"b t"` rows of `size`: per image, `<image>` then text ending in `<|endofchunk|>`."""
  b, t, n = size["batch"], size["seq_len"], size["images"]
  tokens = rng.integers(3, vocab, size=(b, t))
  chunk = t // n
  for i in range(n):
    tokens[:, i * chunk] = media
    tokens[:, (i + 1) * chunk - 1] = endofchunk
  return tokens.astype(np.int32)


def example_batch(size: dict, cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Interleaved rows and their images."""
  b, n, side = size["batch"], size["images"], cfg.vision.image_size
  return {"tokens": interleaved_tokens(size, cfg.media_token_id, cfg.endofchunk_token_id,
                                       cfg.lm.vocab_size - 2, rng),
          "images": rng.normal(size=(b, n, 1, side, side, 3)).astype(np.float32),
          "num_images": np.full((b,), n, np.int32)}


def recipe(cfg, size: dict, task: str = "flamingo"):
  """The mmjax recipe config training `cfg` (or its LM alone) on `size`'s batches."""
  from mmjax.configs import flamingo as flamingo_config
  config = flamingo_config.get_config("tiny")
  config.task = task
  config.model = dataclasses.asdict(cfg if task == "flamingo" else cfg.lm)
  config.trainable = config.trainable if task == "flamingo" else ".*"
  config.init = {}
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  config.data.batch_size, config.data.seq_len = size["batch"], size["seq_len"]
  config.data.max_images = size["images"]
  config.optim.warmup_steps = 0
  return config


def step_inputs(task: str, params: dict, batch: dict) -> tuple[dict, dict]:
  """`(parameters, data)` of `MmjaxStep` training the Flamingo (`task` "flamingo") or its
  LM alone ("lm") on `batch`: next-token targets, the last position masked."""
  loaded = params if task == "flamingo" else {
      k: v for k, v in params["lm"].items() if not k.startswith("xattn_")}
  data = {"tokens": batch["tokens"], "targets": np.roll(batch["tokens"], -1, axis=1),
          "loss_mask": np.ones(batch["tokens"].shape, np.float32)}
  if task == "flamingo":
    data |= {"images": batch["images"], "num_images": batch["num_images"]}
  data["loss_mask"][:, -1] = 0
  return loaded, data


class MmjaxStep:
  """The `mmjax.train` step of `config` on one device, with `params` (the model's whole
  tree) loaded, on `data` (one global batch, as the recipe's pipeline gives it)."""

  def __init__(self, config, params, data):
    self.config = config
    self.parts = train.build(config, jax.devices()[:1])
    state = train.init_state(config, self.parts, pretrained=False)
    trainable, frozen = train.partition_params(params, config.trainable)
    # Placed as the step's outputs are, so that it compiles once.
    self.state = jax.device_put({**state, "params": trainable, "frozen": frozen},
                                self.parts.shardings)
    self.state["opt_state"] = jax.jit(self.parts.tx.init, out_shardings=self.parts.shardings[
        "opt_state"])(self.state["params"])
    self.batch = sharding.global_batch(data, sharding.batch_sharding(self.parts.mesh,
                                                                     self.parts.rules))
    self.step = train.make_train_step(config, self.parts)

  def __call__(self):
    self.state, metrics, _ = self.step(self.state, self.batch)
    jax.block_until_ready(metrics["loss"])

  def model_flops(self) -> float:
    params = {**flat_params(self.parts.abstract["params"]),
              **flat_params(self.parts.abstract["frozen"])}
    return flops.train_step_flops(self.config, params)["total"]


class TorchStep:
  """The same step in PyTorch: frozen vision tower and LM, AdamW on the perceiver and the
  gated blocks (everything, for the LM alone), gradient clipping at the recipe's norm."""

  def __init__(self, model, cfg, batch, optim, lm_alone: bool = False):
    import torch
    self.torch = torch
    self.model = model.train()
    media = cfg.media_token_id
    tokens = torch.tensor(batch["tokens"], dtype=torch.long)
    if lm_alone:
      import transformers
      text = transformers.LlamaConfig(**{k: getattr(model.config, k) for k in (
          "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "rms_norm_eps")}, vocab_size=cfg.lm.vocab_size, max_position_embeddings=2048)
      self.model = transformers.LlamaForCausalLM(text).train()
      self.inputs = dict(input_ids=tokens)
      trainable = list(self.model.parameters())
    else:
      model.requires_grad_(False)
      trainable = [p for n, p in model.named_parameters()
                   if n.startswith(("model.perceiver_resampler", "model.gated_cross_attn"))]
      for p in trainable:
        p.requires_grad_(True)
      images = batch["images"][:, :, 0].transpose(0, 1, 4, 2, 3)  # b T c h w
      valid = np.arange(images.shape[1])[None] < batch["num_images"][:, None]
      mask = media_attention_mask(media_index(jnp.asarray(batch["tokens"]), media),
                                  jnp.asarray(valid))
      self.inputs = dict(input_ids=tokens, pixel_values=torch.tensor(images),
                         image_attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long))
    self.targets = tokens[:, 1:].reshape(-1)
    self.trainable = trainable
    self.optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=(optim.b1, optim.b2),
                                       eps=optim.eps, weight_decay=optim.weight_decay)
    self.clip_norm = optim.clip_norm

  def __call__(self):
    self.optimizer.zero_grad(set_to_none=True)
    # Next-token cross-entropy over the whole vocabulary (IDEFICS's own `labels` loss
    # mis-shapes its logits when it has additional tokens).
    logits = self.model(**self.inputs).logits[:, :-1]
    loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  self.targets)
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.trainable, self.clip_norm)
    self.optimizer.step()


def alternate(systems: dict, rounds: int, runs: int) -> dict[str, dict]:
  """Times each system `runs` times per round, alternating, after two warm-up calls each
  (compilation, and the first step's allocations): `{name: timed_runs-like summary over
  all rounds}`."""
  times = {name: [] for name in systems}
  for fn in systems.values():
    fn()
    fn()
  for _ in range(rounds):
    for name, fn in systems.items():
      times[name] += [harness.timed_runs(fn, warmup=0, runs=1)["median_s"]
                      for _ in range(runs)]
  return {name: {"median_s": float(np.median(t)), "min_s": min(t), "max_s": max(t),
                 "runs": len(t)} for name, t in times.items()}


def record_systems(family: str, common: dict, kind: str, timing: dict[str, dict],
                   per_call: float, *, peak: float, model_flops: float | dict | None = None,
                   unit: str = "tokens", out: str | None = None) -> list[dict]:
  """Records one line per system of measurement `kind` (`timing` as `alternate` gives it,
  `per_call` units of work per call), with its MFU when `model_flops` per call are given
  (one number for both systems, or `{system: number}` where they compute different
  things) and, on the mmjax line, the ratio of throughputs mmjax/PyTorch."""
  rates = {system: per_call / t["median_s"] for system, t in timing.items()}
  lines = []
  for system, t in timing.items():
    line = {**common, "measurement": kind, "system": system, "step_s": t["median_s"],
            "step_min_s": t["min_s"], "step_max_s": t["max_s"], "runs": t["runs"],
            f"{unit}_per_s": rates[system]}
    flops_per_call = model_flops.get(system) if isinstance(model_flops, dict) else model_flops
    if flops_per_call:
      line |= {"model_flops_per_step": flops_per_call,
               "mfu": flops_per_call / t["median_s"] / peak}
    if system == "mmjax":
      line["speedup_vs_torch"] = rates["mmjax"] / rates["torch"]
    lines.append(harness.record(family, line, out))
  return lines


def run(size: dict, *, name: str, rounds: int, runs: int,
        only: tuple[str, ...] = ("train", "lm", "generate", "openflamingo"),
        out: str | None = None
        ) -> list[dict]:
  """Measures `only` at `size` (a `SIZES` entry) and records one line per measurement and
  system; returns the lines."""
  import torch
  torch.set_num_threads(os.cpu_count())
  peak = harness.matmul_peak(jnp.float32)
  common = {"size": name, "batch": size["batch"], "seq_len": size["seq_len"],
            "num_images": size["images"], "threads": os.cpu_count(),
            "torch": torch.__version__, "peak_flops": peak}
  with tempfile.TemporaryDirectory() as path:
    model, cfg, params = reference_model(size, path)
  batch = example_batch(size, cfg, np.random.default_rng(0))
  lines = []

  def report(kind, timing, per_call, model_flops=None, unit="tokens"):
    lines.extend(record_systems("side_by_side", common, kind, timing, per_call, peak=peak,
                                model_flops=model_flops, unit=unit, out=out))

  tokens_per_step = size["batch"] * size["seq_len"]
  for kind, task in (("train_step", "flamingo"), ("lm_train_step", "lm")):
    if ("train" if task == "flamingo" else "lm") not in only:
      continue
    config = recipe(cfg, size, task)
    ours = MmjaxStep(config, *step_inputs(task, params, batch))
    theirs = TorchStep(model, cfg, batch, config.optim, lm_alone=task == "lm")
    report(kind, alternate({"mmjax": ours, "torch": theirs}, rounds, runs), tokens_per_step,
           ours.model_flops())
    del ours, theirs
  if "generate" in only:
    report("generation", alternate(generators(model.eval(), cfg, params, batch, size), rounds,
                                   runs), size["batch"] * size["new_tokens"])
  if "openflamingo" in only:
    for kind, (systems, per_call, unit) in openflamingo_modules(size).items():
      report(kind, alternate(systems, rounds, runs), per_call, unit=unit)
  return lines


def generators(model, cfg, params, batch, size):
  """Greedy decoding of `new_tokens` tokens after the first half of each row (which
  holds half of its images), in both systems."""
  import torch
  prompt_len, new = size["seq_len"] // 2, size["new_tokens"]
  prompt = batch["tokens"][:, :prompt_len]
  images = batch["images"][:, :, 0]
  num_images = np.minimum(batch["num_images"], size["images"] // 2)
  mask = media_attention_mask(media_index(jnp.asarray(prompt), cfg.media_token_id),
                              jnp.arange(size["images"])[None] < num_images[:, None])
  torch_inputs = dict(
      input_ids=torch.tensor(prompt, dtype=torch.long),
      attention_mask=torch.ones(prompt.shape, dtype=torch.long),
      pixel_values=torch.tensor(images.transpose(0, 1, 4, 2, 3)),
      image_attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long))
  flamingo = Flamingo(cfg)
  lengths = jnp.full((prompt.shape[0],), prompt_len, jnp.int32)

  def ours():
    out = generate(flamingo, params, jnp.asarray(prompt), lengths, jax.random.key(0),
                   images=jnp.asarray(batch["images"]), num_images=jnp.asarray(num_images),
                   max_new_tokens=new, stop_ids=(), pad_id=0, sampling=decoding.GREEDY)
    jax.block_until_ready(out.tokens)

  def theirs():
    with torch.no_grad():
      model.generate(**torch_inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                     pad_token_id=0)

  return {"mmjax": ours, "torch": theirs}


def open_flamingo_helpers():
  """open_flamingo's `helpers.py` (its perceiver and gated block), loaded from its file:
  the package's `__init__` imports open_clip, which the CPU torch build cannot load."""
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None:
    raise ImportError("open_flamingo is not installed: pip install --no-deps "
                      "open_flamingo==2.0.1")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "src" / "helpers.py"
  module_spec = importlib.util.spec_from_file_location("open_flamingo_helpers", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def openflamingo_modules(size: dict) -> dict:
  """`{measurement: ({system: call}, work per call, unit)}`: forward and backward of
  open_flamingo's perceiver (parameter gradients; `images` per row of patch features)
  and gated block (parameter and input gradients; the batch's text over each row's
  resampled images) against mmjax's, random weights of the same shapes."""
  import torch
  helpers = open_flamingo_helpers()
  per, vis, lm = size["perceiver"], size["vision"], size["lm"]
  e, d = vis["embed_dim"], lm["hidden_size"]
  heads, head_dim, latents = (per["resampler_n_heads"], per["resampler_head_dim"],
                              per["resampler_n_latents"])
  images = size["batch"] * size["images"]
  patches = (vis["image_size"] // vis["patch_size"]) ** 2
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  media, media_grad = normal(images, 1, 1, patches, e), normal(images, 1, latents, e)
  text, text_grad = normal(size["batch"], size["seq_len"], d), normal(size["batch"],
                                                                      size["seq_len"], d)
  media_tokens = normal(size["batch"], size["images"], latents, e)
  tokens = interleaved_tokens(size, 1, 2, lm["vocab_size"], np.random.default_rng(0))
  locations = tokens == 1

  ours_resampler = PerceiverResampler(ResamplerConfig(
      depth=per["resampler_depth"], num_heads=heads, head_dim=head_dim, num_latents=latents))
  resampler_params = ours_resampler.init(jax.random.key(0), media)["params"]
  resampler_grad = jax.jit(jax.grad(lambda p, x: jnp.sum(
      ours_resampler.apply({"params": p}, x) * media_grad)))
  theirs_resampler = helpers.PerceiverResampler(
      dim=e, depth=per["resampler_depth"], dim_head=head_dim, heads=heads,
      num_latents=latents)
  media_t, media_grad_t = torch.tensor(media), torch.tensor(media_grad)

  def torch_resampler():
    theirs_resampler.zero_grad(set_to_none=True)
    (theirs_resampler(media_t) * media_grad_t).sum().backward()

  xattn = XAttnConfig(num_heads=8, head_dim=64)  # open_flamingo's fixed block shape
  ours_block = GatedCrossAttentionBlock(xattn)
  mask = jnp.repeat(media_attention_mask(media_index(jnp.asarray(tokens), 1),
                                         jnp.ones((size["batch"], size["images"]), bool)),
                    latents, axis=-1)
  flat_media = media_tokens.reshape(size["batch"], -1, e)
  block_params = jax.tree_util.tree_map(  # open gates, as after training
      lambda x: x + 0.5, ours_block.init(jax.random.key(1), text, flat_media, mask)["params"])
  block_grad = jax.jit(jax.grad(lambda p, x: jnp.sum(ours_block.apply(
      {"params": p}, x, flat_media, mask) * text_grad), argnums=(0, 1)))
  theirs_block = helpers.GatedCrossAttentionBlock(dim=d, dim_visual=e)
  with torch.no_grad():
    theirs_block.attn_gate.fill_(0.5)
    theirs_block.ff_gate.fill_(0.5)
  text_t = torch.tensor(text, requires_grad=True)
  media_tokens_t, locations_t = torch.tensor(media_tokens), torch.tensor(locations)
  text_grad_t = torch.tensor(text_grad)

  def torch_block():
    theirs_block.zero_grad(set_to_none=True)
    text_t.grad = None
    (theirs_block(text_t, media_tokens_t, media_locations=locations_t) * text_grad_t
     ).sum().backward()

  return {
      "openflamingo_perceiver": ({
          "mmjax": lambda: jax.block_until_ready(resampler_grad(resampler_params, media)),
          "torch": torch_resampler}, images, "images"),
      "openflamingo_gated_block": ({
          "mmjax": lambda: jax.block_until_ready(block_grad(block_params, text)),
          "torch": torch_block}, size["batch"] * size["seq_len"], "tokens"),
  }


def main(argv):
  del argv
  f = flags.FLAGS
  run(SIZES[f.size], name=f.size, rounds=f.rounds, runs=f.runs, only=tuple(f.only), out=f.out)


if __name__ == "__main__":
  # Defined here, not at import, so that the measurement functions import cleanly anywhere.
  flags.DEFINE_enum("size", "default", sorted(SIZES), "Model and batch size.")
  flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
  flags.DEFINE_integer("runs", 3, "Timed calls per system per round.")
  flags.DEFINE_list("only", ["train", "lm", "generate", "openflamingo"],
                    "Measurements to run.")
  flags.DEFINE_string("out", None, "Results file (default: benchmarks/results/"
                      "side_by_side.jsonl).")
  app.run(main)
