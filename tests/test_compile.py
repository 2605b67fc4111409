"""Ahead-of-time compilation for TPU topologies on this CPU host, and the analytic FLOP
count it reports."""

import jax
import pytest
from test_train import flamingo_config, lm_config

from mmjax import cli, flops, train
from mmjax import compile as aot
from mmjax.checkpoints import flat_params


def _params(parts: train.Parts) -> dict:
  return {**flat_params(parts.abstract["params"]), **flat_params(parts.abstract["frozen"])}


@pytest.mark.parametrize("make_config", [flamingo_config, lm_config])
def test_analytic_flops_match_xla_cost_analysis_of_the_train_step(make_config):
  """XLA also counts elementwise work (norms, softmax, GELU, Adam) that the analytic
  count leaves out, so it is a little higher; matmul FLOPs dominate both."""
  config = make_config()
  config.data.batch_size = 8
  parts = train.build(config, jax.devices()[:1])
  compiled = train.make_train_step(config, parts).lower(
      parts.abstract, aot.abstract_batch(config, parts)).compile()
  xla = compiled.cost_analysis()
  xla = (xla[0] if isinstance(xla, list) else xla)["flops"]
  analytic = flops.train_step_flops(config, _params(parts))
  assert analytic["total"] <= xla <= 1.35 * analytic["total"], (xla, analytic)


def test_flamingo_flops_follow_what_trains():
  """Frozen ViT forward only; resampler and gated blocks x3; the frozen LM above the
  first gated block x2 (activation backward), below it x1."""
  config = flamingo_config()
  parts = {prefix: f for prefix, f, _ in flops.components(config)}
  totals = flops.train_step_flops(config, _params(train.build(config, jax.devices()[:1])))
  vision = sum(f for p, f in parts.items() if p.startswith("vision/"))
  trainable = sum(f for p, f in parts.items() if p.startswith(("resampler/", "lm/xattn_")))
  # xattn.every=2 in openflamingo placement: the first block sits before layer 1.
  assert "lm/xattn_1" in parts and "lm/xattn_0" not in parts
  below, above = parts["lm/layers_0"], parts["lm/layers_1"] + parts["lm/embed"]
  assert totals["frozen_forward_only"] == vision + below
  assert totals["trainable"] == 3 * trainable
  assert totals["frozen_backprop"] == 2 * above


@pytest.mark.parametrize("name, expected", [
    ("v5p-128", ("v5p", "v5p:4x4x4")), ("v5p-8", ("v5p", "v5p:2x2x1")),
    ("v5litepod-256", ("v5e", "v5e:16x16")), ("v4-64", ("v4", "v4:2x4x4")),
    ("v6e:2x4", ("v6e", "v6e:2x4"))])
def test_tpu_topology_names(name, expected):
  assert aot.parse_topology(name) == expected


def test_unknown_topologies_are_refused_with_examples():
  with pytest.raises(ValueError, match="expected e.g. v5p-128"):
    aot.parse_topology("h100-8")
  with pytest.raises(ValueError, match="power-of-two"):
    aot.parse_topology("v5e-12")


def _tpu(topology):
  pytest.importorskip("libtpu", reason="libtpu is not installed (it comes with the dev "
                      "extra where a wheel exists for this platform)")
  try:
    return aot.tpu_devices(topology)
  except cli.UserError as error:  # a libtpu that does not match the installed jax
    pytest.skip(str(error))


def test_the_train_step_compiles_for_a_tpu_slice_without_a_tpu():
  config = flamingo_config()
  config.data.batch_size = 8
  config.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
  config.remat = "full"
  generation, devices = _tpu("v5e-4")
  assert len(devices) == 4 and devices[0].platform == "tpu"
  report = aot.compile_train_step(config, devices, generation)
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  memory = report["memory_per_chip"]
  assert 0 < memory["arguments_gib"] < memory["total_gib"] < 16 and report["fits"]
  # Full remat recomputes the forward pass: more compiled than model FLOPs.
  assert report["compiled_flops"] > report["model_flops"] > 0
  assert "memory per chip" in aot.format_report("v5e-4", report)


def test_a_step_too_large_for_the_chips_is_reported_not_raised():
  config = flamingo_config()
  config.data.batch_size = 2 ** 16  # activations of ~10^5 sequences on one 16 GiB chip
  generation, devices = _tpu("v5e-1")
  report = aot.compile_train_step(config, devices, generation)
  assert report["fits"] is False and "RESOURCE_EXHAUSTED" in report["error"]
  assert report["temporaries_gib"] > report["hbm_gib"] > report["state_gib_per_chip"] > 0
  assert "DOES NOT FIT" in aot.format_report("v5e-1", report)
