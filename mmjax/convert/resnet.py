"""torchvision ResNet weights (a state dict saved by `torch.save`, or safetensors): ResNet-18
to -152 and any other stage depths, with torchvision's classifier `fc`, a bias-free `fc`
(MedCLIP's projection) or none.

The state dict holds no config: the keys give the stage depths (`layer<s>.<i>.*`) and the
block kind (`conv3` only in bottlenecks), the shapes give the width and the head. BatchNorm's
running statistics become the "batch_stats" collection; its `num_batches_tracked` counters
are ignored (they matter only to BatchNorm with momentum None, a cumulative average).
Wide ResNets and ResNeXt (other inner widths, grouped convolutions) are refused by shape.
"""

import pathlib
import re

import numpy as np

from mmjax.convert import common
from mmjax.models.resnet import ResNet, ResNetConfig

IGNORED_TENSORS = {
    r"(.*\.)?num_batches_tracked": "BatchNorm's step counters, used only with momentum=None "
                                   "(a cumulative average); torchvision's ResNets use 0.1",
}


def resnet_config(state: dict[str, np.ndarray], **overrides) -> ResNetConfig:
  """The `ResNetConfig` a torchvision ResNet state dict holds (`overrides`: fields the
  weights do not say, like `pixel_mean`, `frozen_bn`)."""
  if "conv1.weight" not in state:
    raise common.ConversionError(
        "Not a torchvision ResNet state dict: no conv1.weight (keys start with "
        f"{sorted({k.split('.')[0] for k in state})[:8]}).")
  blocks: dict[int, set[int]] = {}
  for key in state:
    m = re.match(r"layer(\d+)\.(\d+)\.", key)
    if m:
      blocks.setdefault(int(m[1]), set()).add(int(m[2]))
  stages = sorted(blocks)
  if stages != list(range(1, len(stages) + 1)) or not stages or any(
      blocks[s] != set(range(len(blocks[s]))) for s in stages):
    raise common.ConversionError(
        "The ResNet state dict's stages and blocks are not numbered layer1.0, layer1.1, ... "
        f"without gaps: {({s: sorted(b) for s, b in blocks.items()})}.")
  fields = {"depths": tuple(len(blocks[s]) for s in stages),
            "width": int(state["conv1.weight"].shape[0]),
            "block": "bottleneck" if "layer1.0.conv3.weight" in state else "basic"}
  if "fc.weight" in state:
    fields["num_classes" if "fc.bias" in state else "output_dim"] = int(
        state["fc.weight"].shape[0])
  return ResNetConfig(**(fields | overrides))


def _conv(read: common.Reader, name: str, out: int, inp: int, k: int) -> dict:
  """A torch Conv2d weight `"o i kh kw"` as a Flax kernel `"kh kw i o"`."""
  return {"kernel": np.transpose(read(name + ".weight", (out, inp, k, k)), (2, 3, 1, 0))}


def batch_norm(read: common.Reader, name: str, c: int, params: dict, stats: dict, to: str
               ) -> None:
  """A torch BatchNorm `name` (`c` channels) as `params[to]` (`scale`, `bias`) and its
  running statistics as `stats[to]` (`mean`, `var`)."""
  params[to] = {"scale": read(name + ".weight", (c,)), "bias": read(name + ".bias", (c,))}
  stats[to] = {"mean": read(name + ".running_mean", (c,)),
               "var": read(name + ".running_var", (c,))}


def resnet_params(read: common.Reader, cfg: ResNetConfig) -> tuple[dict, dict]:
  """`(params, batch_stats)` of a ResNet read by `read` (its prefix set); the caller
  finishes the reader."""
  params, stats = {"conv1": _conv(read, "conv1", cfg.width, 3, 7)}, {}
  batch_norm(read, "bn1", cfg.width, params, stats, "bn1")
  channels = cfg.width
  for s, depth in enumerate(cfg.depths):
    planes = cfg.width * 2 ** s
    for i in range(depth):
      p, name = f"layer{s + 1}.{i}.", f"layer{s + 1}_{i}"
      bp = params[name] = {}
      bs = stats[name] = {}
      if cfg.block == "bottleneck":
        convs = ((channels, planes, 1), (planes, planes, 3), (planes, planes * 4, 1))
      else:
        convs = ((channels, planes, 3), (planes, planes, 3))
      for j, (c_in, c_out, k) in enumerate(convs, 1):
        bp[f"conv{j}"] = _conv(read, f"{p}conv{j}", c_out, c_in, k)
        batch_norm(read, f"{p}bn{j}", c_out, bp, bs, f"bn{j}")
      out = convs[-1][1]
      if (s and not i) or channels != out:
        bp["downsample_conv"] = _conv(read, p + "downsample.0", out, channels, 1)
        batch_norm(read, p + "downsample.1", out, bp, bs, "downsample_bn")
      channels = out
  if cfg.output_dim is not None:
    params["fc"] = common.linear(read, "fc", (channels,), (cfg.output_dim,))
  elif cfg.num_classes is not None:
    params["fc"] = common.linear(read, "fc", (channels,), (cfg.num_classes,), bias=True)
  return params, stats


def check_resnet(cfg: ResNetConfig, params: dict, batch_stats: dict) -> None:
  """Refuses parameters or statistics that are not the trees `ResNet(cfg).init` builds."""
  import jax.numpy as jnp
  images = jnp.zeros((1, 32, 32, 3))
  common.check_tree(params, ResNet(cfg), images)
  common.check_tree(batch_stats, ResNet(cfg), images, collection="batch_stats")


def convert_resnet(path: str | pathlib.Path, **overrides
                   ) -> tuple[ResNetConfig, dict, dict]:
  """`(ResNetConfig, params, {"batch_stats": ...})` of a torchvision ResNet state dict file
  (`.pth`/`.pt` from `torch.save`, or `.safetensors`); `overrides` set config fields the
  weights do not hold (`pixel_mean`, `pixel_std`, `image_size`, `frozen_bn`, ...)."""
  state = common.read_state_file(path)
  if any(isinstance(v, dict) for v in state.values()):
    raise common.ConversionError(f"{path} holds a dict of state dicts "
                                 f"({sorted(state)[:6]}), not a ResNet's state dict.")
  cfg = resnet_config(state, **overrides)
  read = common.Reader(state)
  params, stats = resnet_params(read, cfg)
  read.finish(IGNORED_TENSORS, hint="Check that it is a torchvision ResNet (not a wide "
              "ResNet or ResNeXt) with all of its keys.")
  check_resnet(cfg, params, stats)
  return cfg, params, {"batch_stats": stats}
