"""Ahead-of-time compilation for TPU topologies on this CPU host, and the analytic FLOP
count it reports."""

import jax
import pytest
from mmjax.configs import blip2 as blip2_recipe
from test_train import flamingo_config, lm_config

from mmjax import cli, flops, train
from mmjax import compile as aot
from mmjax.checkpoints import flat_params


def _params(parts: train.Parts) -> dict:
  return {**flat_params(parts.abstract["params"]), **flat_params(parts.abstract["frozen"])}


def blip2_config(variant: str):
  """A toy BLIP-2 recipe (stage 2 for "tiny", stage 1 for "stage1"), nothing pretrained."""
  config = blip2_recipe.get_config(variant)
  model = config.model.to_dict()
  model["vision"].update(image_size=32, patch_size=8, width=32, depth=1, num_heads=2)
  model["qformer"].update(width=32, depth=2, num_heads=2, num_queries=4, encoder_width=32,
                          max_len=32)
  model["embed_dim"] = 16
  if "lm" in model:
    model["lm"].update(width=32, depth=2, num_heads=2, max_len=64)
  if "t5" in model:
    model["vision"]["mlp_dim"] = 64
    model["t5"].update(vocab_size=600, width=32, depth=2, num_heads=2, head_dim=16,
                       mlp_dim=64)
  with config.unlocked():
    config.model = model
    config.init = {}
    config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    config.data.image_size = 32
    for dataset in config.data.datasets.values():
      dataset.source.image_size = 32
  return config


def blip2_stage2_config():
  return blip2_config("tiny")


def blip2_stage1_config():
  return blip2_config("stage1")


def blip2_t5_config():
  config = blip2_config("vitg-flant5xl")
  config.scan_layers = False
  return config


@pytest.mark.parametrize("make_config", [flamingo_config, lm_config, blip2_stage2_config,
                                         blip2_stage1_config, blip2_t5_config])
def test_analytic_flops_match_xla_cost_analysis_of_the_train_step(make_config):
  """XLA also counts elementwise work (norms, softmax, GELU, Adam) that the analytic
  count leaves out, so it is a little higher; matmul FLOPs dominate both. The count is
  the lowered step's (the program as traced, before XLA optimises it): the same matmuls,
  without the compile (most of a minute for BLIP-2's stage 1 on two cores)."""
  config = make_config()
  config.data.batch_size = 8
  parts = train.build(config, jax.devices()[:1])
  lowered = train.make_train_step(config, parts).lower(
      parts.abstract, aot.abstract_batch(config, parts))
  xla = lowered.cost_analysis()
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


def test_blip2_flops_follow_what_trains():
  """Frozen ViT forward only in both stages; stage 2's frozen LM x2 (the prefix trains),
  its Q-Former and lm_proj x3; stage 1's ITM pass is three ITC-sized passes."""
  for config in (blip2_t5_config(), blip2_stage2_config(), blip2_stage1_config()):
    parts = flops.components(config)
    totals = flops.train_step_flops(config, _params(train.build(config, jax.devices()[:1])))
    vision = sum(f for p, f, _ in parts if p.startswith("vision/"))
    lm = sum(f for p, f, _ in parts if p.startswith(("lm/", "t5/")))
    assert totals["frozen_forward_only"] == vision
    assert totals["frozen_backprop"] == 2 * lm
    assert totals["trainable"] == 3 * (totals["forward"] - vision - lm)
  layer0 = [f for p, f, _ in parts if p == "qformer/layers_0"]
  assert len(layer0) == 3 and layer0[1] == 3 * layer0[0] == 3 * layer0[2]  # ITC, ITM, ITG
  assert lm == 0 and any(p == "text_head" for p, _, _ in parts)


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
