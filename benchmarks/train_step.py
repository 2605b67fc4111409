"""Train-step throughput, memory and MFU of any recipe: the real jitted step of
`mmjax.train` (sharded state, donated buffers, the recipe's optimizer) on a batch of the
recipe's own data, repeated.

  python -m benchmarks.train_step --config=configs/flamingo.py:base \
      --config.data.batch_size=8 --config.data.seq_len=256 --config.data.max_images=4

  # GPU, a 3B-shaped Flamingo in bf16 with cuDNN attention:
  python -m benchmarks.train_step --config=configs/flamingo.py:3b \
      --config.compute_dtype=bfloat16 --config.remat=full --attention=cudnn \
      --config.data.batch_size=16 --config.data.seq_len=256 --config.data.max_images=4

Prints one JSON line (appended to benchmarks/results/train_step.jsonl): compile time,
step time (median, min, max over --runs after --warmup), examples/s, tokens/s, peak
memory, the model FLOPs of one step (`mmjax.flops`: frozen vision forward-only, frozen LM
layers above the first gated block activation-backward, trainable parts full backward)
and MFU: those FLOPs per second over the peak, which is measured in the same run on a
CPU (a large float32 matmul) and the datasheet's dense bf16 figure on a GPU (the measured
bf16 matmul rate is recorded beside it).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import harness
from mmjax import flops, sharding, train
from mmjax.checkpoints import flat_params
from mmjax.train import DataHealth

def real_batch(config, parts: train.Parts) -> dict:
  """The global batch: the recipe pipeline's first examples, repeated to the batch size
  (throughput depends on shapes, not on which examples)."""
  probe = config.copy_and_resolve_references()
  probe.data.batch_size = 1
  example = next(iter(train.make_data(probe, seed=0, health=DataHealth())))
  batch = {k: np.repeat(v, config.data.batch_size, axis=0) for k, v in example.items()}
  return sharding.global_batch(batch, sharding.batch_sharding(parts.mesh, parts.rules))


def measure(config, *, warmup: int, runs: int, profile: str | None = None,
            devices=None) -> dict:
  """Builds, compiles and times the train step of `config` on `devices` (default: all)."""
  parts = train.build(config, devices or jax.devices())
  state = train.init_state(config, parts, pretrained=False)
  step = train.make_train_step(config, parts)
  batch = real_batch(config, parts)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  def one_step():
    nonlocal state
    state, metrics, _ = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])

  timing = harness.timed_runs(one_step, warmup=warmup, runs=runs)
  if profile:
    for kind, ms, count in harness.profile_ops(one_step, profile):
      print(f"{ms:10.2f} ms {count:6d}  {kind}")
  params = {**flat_params(parts.abstract["params"]), **flat_params(parts.abstract["frozen"])}
  model_flops = flops.train_step_flops(config, params)["total"]
  b, t = config.data.batch_size, config.data.seq_len
  step_s = timing["median_s"]
  gpu = jax.default_backend() == "gpu"
  measured_peak = harness.matmul_peak(jnp.bfloat16 if gpu else jnp.float32)
  peak = (harness.datasheet_peak() or measured_peak) if gpu else measured_peak
  return {
      "task": config.task, "variant": config.get("variant"), "mesh": dict(parts.mesh.shape),
      "batch": b, "seq_len": t, "num_images": config.data.get("max_images"),
      "compute_dtype": config.get("compute_dtype"), "remat": config.get("remat"),
      "scan_layers": bool(config.get("scan_layers")), "attention": config.get("attention_impl"),
      "accum_steps": config.optim.get("accum_steps", 1),
      "compile_s": compile_s, "step_s": step_s, "step_min_s": timing["min_s"],
      "step_max_s": timing["max_s"], "runs": runs, "examples_per_s": b / step_s,
      "tokens_per_s": b * t / step_s, "peak_memory_gib": harness.peak_memory_bytes() / 2**30,
      "model_flops_per_step": model_flops, "model_flops_per_s": model_flops / step_s,
      "peak_flops": peak, "measured_matmul_flops": measured_peak,
      "mfu": model_flops / step_s / peak,
  }


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  if f.attention:
    config.attention_impl = f.attention
  result = measure(config, warmup=f.warmup, runs=f.runs, profile=f.profile)
  harness.record("train_step", {"system": f.label, **result}, f.out)


if __name__ == "__main__":
  # Defined here, not at import, so that the measurement functions import cleanly anywhere.
  config_flags.DEFINE_config_file("config", None, "Recipe config file.", lock_config=False)
  flags.DEFINE_enum("attention", None, ["xla", "cudnn"], "jax.nn.dot_product_attention "
                    "implementation (default: XLA's choice).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_integer("runs", 10, "Timed steps.")
  flags.DEFINE_string("out", None, "Results file (default: benchmarks/results/"
                      "train_step.jsonl).")
  flags.DEFINE_string("label", "mmjax", "Names the measured system in the result.")
  flags.DEFINE_string("profile", None, "Also trace one step with jax.profiler into this "
                      "folder and print the operations that took longest.")
  flags.mark_flag_as_required("config")
  app.run(main)
