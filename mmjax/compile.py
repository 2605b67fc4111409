"""Compiles a recipe's train step ahead of time for a TPU topology, on any host.

  python -m mmjax.compile --config=configs/flamingo.py:9b --topology=v5p-128 \
      --config.mesh.data=1 --config.mesh.fsdp=-1 --config.remat=full \
      --config.compute_dtype=bfloat16 --config.data.batch_size=256

The real train step (the one `mmjax.train` runs: same mesh, sharding rules, remat
policy, donated state) is lowered for the chips of `--topology` and compiled by libtpu's
compiler on this machine, no TPU attached (`pip install libtpu`; it must match the jax
version). Printed: the mesh, the memory each chip needs (XLA's `memory_analysis`) against
its HBM, and the compiled FLOPs next to the analytic model FLOPs (`mmjax.flops`), so an
out-of-memory configuration is caught before anyone pays for chips.

Topologies are Cloud TPU accelerator types (`v5p-128`, `v5litepod-256` or `v5e-256`,
`v4-64`, `v6e-16`) or explicit chip grids (`v5p:4x4x4`, `v5e:16x16`).

The compilation needs no local accelerator: run as a command, JAX uses the CPU unless
`JAX_PLATFORMS` says otherwise, and libtpu's start-up lines (on a host without TPUs,
`E0000 ... INVALID_ARGUMENT` about worker hostnames) are shown only with `--verbosity`
or when describing the topology fails.
"""

import os

if __name__ == "__main__":  # before JAX starts: no probing for TPUs this host lacks
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402

from mmjax import cli, flops, sharding, train  # noqa: E402
from mmjax import config as config_lib  # noqa: E402
from mmjax.checkpoints import flat_params  # noqa: E402
from mmjax.data.pipeline import DataHealth  # noqa: E402

GIB = 2 ** 30
# Per chip: HBM and peak bf16 dense FLOP/s (Cloud TPU documentation).
CHIPS = {
    "v4": dict(hbm_gib=32, peak_flops=275e12, cores_per_chip=2, dims=3),
    "v5e": dict(hbm_gib=16, peak_flops=197e12, cores_per_chip=1, dims=2),
    "v5p": dict(hbm_gib=95, peak_flops=459e12, cores_per_chip=2, dims=3),
    "v6e": dict(hbm_gib=32, peak_flops=918e12, cores_per_chip=1, dims=2),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The most cubic (or square) power-of-two grid of `chips`, as Cloud TPU lays slices
  out: 64 -> (4, 4, 4), 16 -> (2, 2, 4), 4 -> (2, 2, 1), 256 (2-D) -> (16, 16)."""
  if chips < 1 or chips & (chips - 1):
    raise cli.UserError(f"{chips} chips: slices have a power-of-two number of chips.")
  grid = [1] * dims
  for i in range(int(math.log2(chips))):
    grid[i % dims] *= 2
  grid = sorted(grid)
  return tuple([g for g in grid if g > 1] + [g for g in grid if g == 1])


def parse_topology(name: str) -> tuple[str, str]:
  """`"v5p-128"` -> `("v5p", "v5p:4x4x4")`; `"v5e:4x8"` passes through."""
  if ":" in name:
    generation = _ALIASES.get(name.split(":")[0], name.split(":")[0])
    grid = name.split(":")[1]
  else:
    prefix, _, count = name.rpartition("-")
    generation = _ALIASES.get(prefix, prefix)
    if generation not in CHIPS or not count.isdigit():
      raise cli.UserError(f"Unknown TPU topology {name!r}; expected e.g. v5p-128, v5e-256, "
                          f"v4-64, v6e-16 or an explicit grid like v5p:4x4x4 "
                          f"({sorted(CHIPS)}).")
    spec = CHIPS[generation]
    chips = int(count) // spec["cores_per_chip"]
    grid = "x".join(map(str, chip_grid(chips, spec["dims"])))
  if generation not in CHIPS:
    raise cli.UserError(f"Unknown TPU generation {generation!r}; known: {sorted(CHIPS)}.")
  return generation, f"{generation}:{grid}"


def tpu_devices(topology: str) -> tuple[str, list]:
  """The (abstract) devices of a TPU topology, described by libtpu on this host."""
  from jax.experimental import topologies
  generation, grid = parse_topology(topology)
  # Compiling needs no exclusive hold on TPU hardware: let several processes load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    dims = [int(d) for d in grid.split(":")[1].split("x")]
  except ValueError:
    raise cli.UserError(f"TPU topology {topology!r}: a chip grid is written like "
                        "v5p:4x4x4.") from None
  kwargs = {}
  if math.prod(dims) < 4:  # slices smaller than one 4-chip host
    kwargs["chips_per_host_bounds"] = (*dims, 1, 1)[:3]
  try:
    desc = topologies.get_topology_desc(grid, "tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 (no libtpu, or one that does not match jax)
    raise cli.UserError(
        f"Cannot describe TPU topology {grid}: {e}. Ahead-of-time TPU compilation needs "
        "the libtpu package that matches this jax (`pip install \"jax[tpu]==<jax version>\"` "
        "or the pinned `libtpu` of the dev extra).") from e
  return generation, list(desc.devices)


def abstract_batch(config: ml_collections.ConfigDict, parts: train.Parts) -> dict:
  """The global batch's shapes and shardings, from one example of the real pipeline."""
  probe = config.copy_and_resolve_references()
  probe.data.batch_size = jax.process_count()
  example = next(iter(train.make_data(probe, seed=0, health=DataHealth())))
  batch_sharding = sharding.batch_sharding(parts.mesh, parts.rules)
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((config.data.batch_size, *x.shape[1:]), x.dtype,
                                     sharding=batch_sharding), example)


def per_chip_gib(abstract: dict) -> float:
  """Bytes of one device's shards of a tree of sharded `jax.ShapeDtypeStruct`s, in GiB."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(abstract)) / GIB


def compile_train_step(config: ml_collections.ConfigDict, devices, generation: str | None = None
                       ) -> dict:
  """Lowers and compiles the train step of `config` for `devices`; returns a report.

  A step that XLA cannot fit in the chips' memory is reported (`fits: False`, with the
  compiler's message and the train state's bytes per chip), not raised.

  Raises:
    cli.UserError: the config is invalid (`mmjax.config.validate`) for these devices.
  """
  config_lib.validate(config, num_devices=len(devices))
  parts = train.build(config, devices)
  step = train.make_train_step(config, parts)
  batch = abstract_batch(config, parts)
  report = {
      "devices": len(devices),
      "mesh": dict(parts.mesh.shape),
      "sharding": config.get("sharding"),
      "remat": config.get("remat"),
      "compute_dtype": config.get("compute_dtype"),
      "scan_layers": bool(config.get("scan_layers")),
      "batch_size": config.data.batch_size,
      "state_gib_per_chip": per_chip_gib(parts.abstract),
  }
  if generation:
    report["hbm_gib"] = CHIPS[generation]["hbm_gib"]
  start = time.perf_counter()
  try:
    compiled = step.lower(parts.abstract, batch).compile()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    needed = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(error))
    return {**report, "fits": False, "compile_s": time.perf_counter() - start,
            "error": str(error).splitlines()[0][:500],
            "temporaries_gib": float(needed[1]) if needed else None}
  compile_s = time.perf_counter() - start

  memory = compiled.memory_analysis()
  per_chip = {
      "arguments_gib": memory.argument_size_in_bytes / GIB,
      "outputs_gib": memory.output_size_in_bytes / GIB,
      "aliased_gib": memory.alias_size_in_bytes / GIB,
      "temporaries_gib": memory.temp_size_in_bytes / GIB,
      "code_gib": memory.generated_code_size_in_bytes / GIB,
  }
  # Donated state is aliased: it is counted once, as an argument.
  per_chip["total_gib"] = (per_chip["arguments_gib"] + per_chip["outputs_gib"]
                           - per_chip["aliased_gib"] + per_chip["temporaries_gib"]
                           + per_chip["code_gib"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  params = {**flat_params(parts.abstract["params"]), **flat_params(parts.abstract["frozen"])}
  analytic = flops.train_step_flops(config, params)
  report.update({
      "compile_s": compile_s,
      "memory_per_chip": per_chip,
      # XLA counts every floating-point op of the compiled program on one chip
      # (recomputation, elementwise ops and collectives' reductions included).
      "compiled_flops_per_chip": float(cost.get("flops", 0.0)),
      "compiled_flops": float(cost.get("flops", 0.0)) * len(devices),
      "model_flops": analytic["total"],
      "model_flops_by_kind": analytic,
  })
  if generation:
    chip = CHIPS[generation]
    report["fits"] = per_chip["total_gib"] <= chip["hbm_gib"]
    report["step_s_at_100pct_mfu"] = analytic["total"] / (len(devices) * chip["peak_flops"])
  return report


def format_report(topology: str, report: dict) -> str:
  header = (
      f"topology {topology}: {report['devices']} chips, mesh {report['mesh']}, sharding "
      f"{report['sharding']}, remat {report['remat']}, "
      f"{'scanned' if report['scan_layers'] else 'per-layer'} layers, "
      f"{report['compute_dtype']} compute, global batch {report['batch_size']}; train state "
      f"{report['state_gib_per_chip']:.2f} GiB per chip")
  if "error" in report:
    return f"{header}\nDOES NOT FIT: {report['error']}"
  m = report["memory_per_chip"]
  ratio = report["compiled_flops"] / report["model_flops"]
  lines = [
      f"{header}; compiled in {report['compile_s']:.1f}s",
      f"memory per chip: {m['total_gib']:.2f} GiB of {report.get('hbm_gib', '?')} GiB HBM "
      f"({'fits' if report.get('fits') else 'DOES NOT FIT'}): arguments "
      f"{m['arguments_gib']:.2f}, outputs {m['outputs_gib']:.2f}, aliased "
      f"{m['aliased_gib']:.2f}, temporaries {m['temporaries_gib']:.2f}, code "
      f"{m['code_gib']:.2f}",
      f"FLOPs per step: compiled {report['compiled_flops']:.3e} "
      f"({report['compiled_flops_per_chip']:.3e} per chip), model (analytic) "
      f"{report['model_flops']:.3e}; ratio {ratio:.2f}"
      + (" (XLA counts a scanned loop's body once, not per layer)" if report["scan_layers"]
         else ""),
  ]
  if "step_s_at_100pct_mfu" in report:
    lines.append(f"step time at 100% MFU: {report['step_s_at_100pct_mfu'] * 1e3:.1f} ms")
  return "\n".join(lines)


def main(argv):
  del argv
  topology = flags.FLAGS.topology
  with cli.native_stderr_held():
    generation, devices = tpu_devices(topology)
  report = compile_train_step(flags.FLAGS.config, devices, generation)
  print(format_report(topology, report))
  print(json.dumps({"topology": topology, **report}))


if __name__ == "__main__":
  config_lib.define_flag()
  flags.DEFINE_string("topology", None, "TPU type, e.g. v5p-128 or v5e:16x16.")
  flags.mark_flags_as_required(["config", "topology"])
  cli.run(main, flags_parser=config_lib.parse_flags)
