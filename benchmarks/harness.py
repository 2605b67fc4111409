"""What every benchmark shares: timing, the machine's measured peak, and the result line.

Each measurement prints one JSON line and appends it to `benchmarks/results/<family>.jsonl`.
Times are medians over `runs` calls after `warmup` calls, with the spread (min, max);
nothing here asserts a speed.
"""

import collections
import datetime
import gzip
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = pathlib.Path(__file__).parent / "results"

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), for MFU on GPUs.
GPU_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def mean_std(values) -> str:
  """`"mean ±sd"` of repeated runs' values (sd with one degree of freedom; 0 for one)."""
  values = np.asarray(values, np.float64)
  return f"{values.mean():.3f} ±{values.std(ddof=1) if len(values) > 1 else 0:.3f}"


def final_scores(workdir, task: str) -> dict[str, float]:
  """The held-out scores of `task` a finished run recorded (`finished.json`)."""
  record = json.loads((pathlib.Path(workdir) / "finished.json").read_text())
  return dict(record["metrics"]["few_shot"][task]["0"])


def timed_runs(fn: Callable[[], Any], *, warmup: int, runs: int) -> dict[str, float]:
  """Calls `fn` (which must block until its work is done) `warmup` times, then times
  `runs` calls: `{"median_s", "min_s", "max_s", "runs"}`."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "runs": runs}


def matmul_peak(dtype=jnp.float32, n: int | None = None, runs: int = 5) -> float:
  """FLOP/s of a large square matmul on the default device, measured now: the peak MFU is
  a fraction of on this machine (CPU), or a check of the datasheet's (GPU)."""
  n = n or (8192 if jax.default_backend() == "gpu" else 2048)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  t = timed_runs(lambda: matmul(a, b).block_until_ready(), warmup=2, runs=runs)
  return 2 * n ** 3 / t["median_s"]


def datasheet_peak() -> float | None:
  """The GPU's dense bf16 peak (FLOP/s), if it is a known model."""
  kind = jax.devices()[0].device_kind
  return next((peak for name, peak in GPU_BF16_PEAK.items() if name in kind), None)


def peak_memory_bytes() -> int:
  """Peak device memory in use (GPU/TPU), or the process's peak resident memory (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
  """The process's resident memory now (/proc/self/statm)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def resident_peak_bytes(reset: bool = False) -> int:
  """The process's peak resident memory (VmHWM; `reset` starts it again from now), or
  `ru_maxrss` where /proc does not allow either."""
  try:
    if reset:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict[str, Any]:
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": device.device_kind,
          "devices": jax.device_count(), "cpus": os.cpu_count(), "host": platform.node(),
          "jax": jax.__version__}


def record(family: str, result: dict[str, Any], out: str | None = None) -> dict[str, Any]:
  """Prints `result` (with the date and machine) as one JSON line and appends it to the
  family's results file (or `out`)."""
  line = {"family": family, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"), **result, "machine": machine()}
  text = json.dumps(line, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
  print(text, flush=True)
  path = pathlib.Path(out) if out else RESULTS / f"{family}.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("a") as f:
    f.write(text + "\n")
  return line


def profile_ops(fn: Callable[[], Any], trace_dir: str, top: int = 25
                ) -> list[tuple[str, float, int]]:
  """Runs `fn` under `jax.profiler` (the trace stays in `trace_dir` for TensorBoard or
  Perfetto) and returns where the time went: `(kind, ms, count)` rows, the `top` kinds by
  total time, after `("all", ms, count)`. On a GPU the rows are its kernels (on the
  devices' streams); on a CPU, XLA's operations. A kind is a name without its numeric
  suffix (`copy_fusion.12` -> `copy_fusion`), so that e.g. all transposing copies add up."""
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  fn()
  jax.profiler.stop_trace()
  trace = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))[-1]
  events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
  # GPU processes: a "/device:" process with kernel streams (libtpu adds a "/device:CUSTOM"
  # process on any machine, which has none).
  devices = {pid for (pid, tid), name in names.items() if tid is not None
             and name.startswith("Stream") and "/device:" in names.get((pid, None), "")}

  def wanted(e):
    if devices:  # kernels, on the devices' streams
      return e["pid"] in devices and names.get((e["pid"], e.get("tid")), "").startswith(
          "Stream")
    return not e["name"].startswith(  # host-side Python and runtime spans are not ops
        ("$", "ThunkExecutor", "SlinkyThreadPool", "Pjit", "PjRt", "Thunk"))

  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and wanted(e):
      kind = re.sub(r"[._]\d+$", "", e["name"])
      total[kind] += e["dur"] / 1e3
      count[kind] += 1
  return [("all", sum(total.values()), sum(count.values()))] + [
      (kind, ms, count[kind]) for kind, ms in total.most_common(top)]
