"""ResNet against a PyTorch reference from random weights, through the converter.

The reference (benchmarks/medclip_torch.py) is a plain-torch ResNet (Conv2d, BatchNorm2d,
MaxPool2d) with torchvision's module names (`conv1`, `bn1`, `layer1.0.conv1`,
`layer1.0.downsample.0`, `fc`, ...) and structure, so its state dict is a torchvision
ResNet's; why not torchvision itself is in its docstring.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.medclip_torch import TorchResNet, randomise, to_torch
from mmjax.convert import ConversionError
from mmjax.convert.resnet import convert_resnet
from mmjax.models.resnet import ResNet, ResNetConfig


def converted(model: nn.Module, tmp_path, name="resnet.pt", **overrides):
  path = tmp_path / name
  torch.save(model.state_dict(), path)
  return convert_resnet(path, **overrides)


def images(b=2, size=64, c=3, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(b, size, size, c)).astype(np.float32)


def train_apply(cfg: ResNetConfig, variables, x):
  """`(outputs, {"batch_stats": updated})` of one forward in train mode."""
  return jax.jit(lambda v, x: ResNet(cfg).apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, jnp.asarray(x))


@pytest.mark.parametrize("depths,width,bottleneck,fc", [
    ((1, 2, 1, 1), 8, True, "nobias"), ((1, 2, 1, 1), 8, False, "bias"),
    ((3, 4, 6, 3), 64, True, None)], ids=["bottleneck-projection", "basic-classifier",
                                          "resnet50"])
def test_eval_matches_torch(tmp_path, depths, width, bottleneck, fc):
  torch.manual_seed(0)
  ref = randomise(TorchResNet(depths, width, bottleneck, fc, 12)).eval()
  cfg, params, state = converted(ref, tmp_path)
  assert cfg.depths == depths and cfg.width == width
  assert cfg.block == ("bottleneck" if bottleneck else "basic")
  assert (cfg.output_dim, cfg.num_classes) == {"nobias": (12, None), "bias": (None, 12),
                                               None: (None, None)}[fc]
  x = images(size=32)
  out = jax.jit(ResNet(cfg).apply)({"params": params, **state}, jnp.asarray(x))
  with torch.no_grad():
    want = ref(to_torch(x)).numpy()
  assert out["pooled"].shape == want.shape == (2, cfg.pooled_dim)
  assert out["features"].shape == (2, 1, 1, cfg.feature_dim)
  np.testing.assert_allclose(out["pooled"], want, atol=1e-4, rtol=1e-4)


def test_train_step_matches_torch_statistics(tmp_path):
  torch.manual_seed(1)
  ref = randomise(TorchResNet((1, 1, 1, 1), 8, True, "nobias", 6), seed=1).train()
  cfg, params, state = converted(ref, tmp_path)
  x = images(4, 32, seed=1)
  out, updated = train_apply(cfg, {"params": params, **state}, x)
  with torch.no_grad():
    want = ref(to_torch(x)).numpy()
  np.testing.assert_allclose(out["pooled"], want, atol=1e-4, rtol=1e-4)
  torch_stats = {k: v.numpy() for k, v in ref.state_dict().items() if "running" in k}
  ours = updated["batch_stats"]
  assert np.max(np.abs(ours["bn1"]["var"] - state["batch_stats"]["bn1"]["var"])) > 1e-3
  for key, value in torch_stats.items():  # e.g. layer2.0.downsample.1.running_var
    parts = key.replace("downsample.0", "downsample_conv").replace(
        "downsample.1", "downsample_bn").split(".")
    if parts[0].startswith("layer"):
      parts = [f"{parts[0]}_{parts[1]}", *parts[2:]]
    *path, stat = parts
    node = ours
    for p in path:
      node = node[p]
    np.testing.assert_allclose(node[stat.removeprefix("running_")], value, atol=1e-5,
                               rtol=1e-5, err_msg=key)


def test_frozen_bn_and_grey_inputs(tmp_path):
  torch.manual_seed(2)
  ref = randomise(TorchResNet((1, 1, 1, 1), 8, False), seed=2).eval()
  cfg, params, state = converted(ref, tmp_path, frozen_bn=True, pixel_mean=(0.5,) * 3,
                                 pixel_std=(0.25,) * 3)
  variables = {"params": params, **state}
  grey = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
  out, updated = train_apply(cfg, variables, grey)
  jax.tree.map(np.testing.assert_array_equal, updated["batch_stats"], state["batch_stats"])
  normalised = (np.repeat(grey, 3, -1).astype(np.float32) / 255 - 0.5) / 0.25
  with torch.no_grad():
    want = ref(to_torch(normalised)).numpy()
  np.testing.assert_allclose(out["pooled"], want, atol=1e-4, rtol=1e-4)


def test_resnet50_layout_and_init():
  """The real ResNet-50 layout (torchvision's parameter count) and torchvision's
  initialisation: fan-out Kaiming normal convolutions, zero_init_residual."""
  cfg = ResNetConfig(num_classes=1000)
  variables = jax.eval_shape(lambda: ResNet(cfg).init(jax.random.key(0),
                                                       jnp.zeros((1, 64, 64, 3))))
  count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert count == 25_557_032  # sum(p.numel() for p in torchvision's resnet50().parameters())
  assert jax.tree.map(lambda x: x.shape, variables["batch_stats"]["layer4_2"]["bn3"]) == {
      "mean": (2048,), "var": (2048,)}
  small = ResNetConfig((1,), 16, block="basic", zero_init_residual=True)
  key = jax.random.key(0, impl="unsafe_rbg")  # compiles in a fraction of threefry's time
  params = jax.jit(ResNet(small).init)(key, jnp.zeros((1, 8, 8, 3)))["params"]
  params = flax.linen.meta.unbox(params)
  assert not np.any(params["layer1_0"]["bn2"]["scale"])
  assert np.all(params["layer1_0"]["bn1"]["scale"] == 1)
  kernel = params["layer1_0"]["conv1"]["kernel"]  # 3x3, 16 -> 16 channels
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (9 * 16)), rtol=0.1)


def test_conversion_is_strict(tmp_path):
  torch.manual_seed(0)
  state = TorchResNet((1, 1, 1, 1), 8).state_dict()
  extra = dict(state, **{"layer1.0.extra.weight": torch.zeros(3)})
  torch.save(extra, tmp_path / "extra.pt")
  with pytest.raises(ConversionError, match="unexpected parameters.*layer1.0.extra"):
    convert_resnet(tmp_path / "extra.pt")
  missing = {k: v for k, v in state.items() if k != "layer2.0.bn2.running_var"}
  torch.save(missing, tmp_path / "missing.pt")
  with pytest.raises(ConversionError, match="missing parameters.*layer2.0.bn2.running_var"):
    convert_resnet(tmp_path / "missing.pt")
  wide = dict(state, **{"layer1.0.conv1.weight": torch.zeros(16, 8, 1, 1)})
  torch.save(wide, tmp_path / "wide.pt")
  with pytest.raises(ConversionError, match="shape mismatches.*layer1.0.conv1.weight"):
    convert_resnet(tmp_path / "wide.pt")
  torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
  with pytest.raises(ConversionError, match="no conv1.weight"):
    convert_resnet(tmp_path / "other.pt")


def test_parameters_shard_under_fsdp_and_compute_in_bfloat16():
  """Conv kernels split their input channels over fsdp (where the mesh divides them: not
  the stem's 3), BatchNorm statistics stay float32 under a bfloat16 compute dtype."""
  from mmjax import sharding
  cfg = ResNetConfig((1, 1), 8, output_dim=16, dtype="bfloat16")
  x = jnp.zeros((2, 32, 32, 3))
  boxed = jax.eval_shape(lambda: ResNet(cfg).init(jax.random.key(0), x))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1),
                           sharding.MESH_AXES)
  specs = sharding.tree_shardings(boxed["params"], mesh, sharding.rules("fsdp"))
  spec = lambda *path: tuple(functools.reduce(dict.get, path, specs).spec)
  assert spec("layer1_0", "conv2", "kernel") == (None, None, "fsdp", None)
  assert spec("conv1", "kernel") == (None, None, None, None)
  assert spec("fc", "kernel") == ("fsdp", None)
  out = jax.eval_shape(ResNet(cfg).apply, flax.linen.meta.unbox(boxed), x)
  assert out["features"].dtype == out["pooled"].dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(boxed["batch_stats"]))


def test_sharded_gradients_equal_the_single_device_gradients():
  """On a data x fsdp x tensor mesh under `fsdp_tensor` (batch over data x fsdp, kernel
  input channels over fsdp, BatchNorm and kernel output channels over tensor), the gradients
  of a train-mode forward are one device's. Without the convolutions' input constraint,
  XLA's partitioner returned wrong input gradients from the second convolution on."""
  from mmjax import sharding
  model = ResNet(ResNetConfig((1,), 8, output_dim=8))
  x = jnp.asarray(images(b=8, size=8))
  variables = model.init(jax.random.key(0), x, train=True)
  params = flax.linen.meta.unbox(variables["params"])

  def loss(params, x):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(3 * out["pooled"]))

  expected = jax.jit(jax.grad(loss))(params, x)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  rule_set = sharding.rules("fsdp_tensor")
  shardings = (sharding.tree_shardings(variables["params"], mesh, rule_set),
               sharding.batch_sharding(mesh, rule_set))
  grad = jax.jit(sharding.with_rules(jax.grad(loss), mesh, rule_set),
                 in_shardings=shardings)
  got = grad(*sharding.place((params, x), shardings))
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
      jax.device_get(got), jax.device_get(expected))
