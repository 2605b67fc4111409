"""VideoGPT's VQ-VAE checkpoint (wilson1yan/VideoGPT, `videogpt/vqvae.py`) as an mmjax
`VQVAE`: parameters, BatchNorm statistics ("batch_stats") and the EMA codebook
("codebook"), written with `task="vqvae"` (`python -m mmjax.convert --videogpt=...`).

The checkpoint is the reference's Lightning `.ckpt` (`VQVAE.load_from_checkpoint`'s input):
`{"state_dict": {...}, "hyper_parameters": {"args": Namespace(...)}, ...}`, where `args` is
the training script's argparse Namespace (or a dict); or a bare state dict (a `.pt` or
safetensors file, or the dict itself) with the config given. Of `args` the model reads
`n_hiddens`, `n_res_layers`, `downsample`, `embedding_dim`, `n_codes`, and the clips'
`sequence_length` and `resolution`; every other field is the script's data loading or
Lightning Trainer setting, which VideoGPT's `VQVAE` never reads. Its heads (2), commitment
weight (0.25), data variance (0.06) and EMA decay (0.99) are constants there, and
VQVAEConfig's defaults here.

Its keys (torch layout -> mmjax):
  `encoder.convs.{i}.conv.*` Conv3d `"o i kt kh kw"` -> `encoder/convs_{i}` `"kt kh kw i o"`;
  `encoder.conv_last.conv.*`, `pre_vq_conv.conv.*`, `post_vq_conv.conv.*` likewise;
  `{encoder,decoder}.res_stack.{j}.block.{0,3,6}` BatchNorm3d -> `res_{j}/norm_{0,1,2}`
  (running statistics to "batch_stats"), `.block.{2,5}.conv.weight` -> `conv_{0,1}`,
  `.block.8.attn_{w,h,t}.{w_qs,w_ks,w_vs,fc}` Linear -> `attn_*/{query,key,value,out}`;
  `{encoder,decoder}.res_stack.{L}` (the final BatchNorm) -> `norm`;
  `decoder.convts.{i}.convt.*` ConvTranspose3d `"i o kt kh kw"` -> `convts_{i}`
  `"kt kh kw o i"` (transpose_kernel);
  `codebook.embeddings`, `codebook.N`, `codebook.z_avg` -> `codebook/{embeddings, counts,
  sums}`, with `initialized` True: the converted codebook is kept when training goes on
  (VideoGPT's `_need_init` is not saved, so its `load_from_checkpoint` re-initialises the
  codebook from the first training batch).
Refused by name: a `conv_last` that takes 3 channels where the first conv gives
`n_hiddens` (the reference's loop variable when every downsampling factor is at most 2:
VideoGPT itself cannot run such a model unless `n_hiddens` is 3), and widths the mmjax
model does not build (odd `n_hiddens`: the reference's heads would be narrower).
"""

import argparse
import pathlib
import pickle
from typing import Any

import numpy as np

from mmjax.convert import common, resnet
from mmjax.models.vqvae import VQVAE, VQVAEConfig

# `args` fields the model is built from -> VQVAEConfig's.
MODEL_FIELDS = {"n_hiddens": "n_hiddens", "n_res_layers": "n_res_layers",
                "downsample": "downsample", "embedding_dim": "embedding_dim",
                "n_codes": "n_codes", "sequence_length": "frames", "resolution": "resolution"}
IGNORED_TENSORS = {
    r"(.*\.)?num_batches_tracked": "BatchNorm's step counters, used only with momentum=None "
                                   "(a cumulative average); VideoGPT's BatchNorm3d use 0.1",
}
HEADS = 2  # VideoGPT's AxialBlock(n_hiddens, 2)


def load_checkpoint(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict | None]:
  """`(state dict as float32 arrays, args as a dict or None)` of a Lightning `.ckpt` (its
  `state_dict` and `hyper_parameters.args`) or of a bare state dict file. Unpickled with
  torch's `weights_only` loader, allowing argparse Namespaces (the Lightning hparams)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise common.ConversionError(f"No VideoGPT checkpoint {path}.")
  if path.suffix == ".safetensors":
    return common.read_state_file(path), None
  import torch
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      ckpt = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # not a safe pickle
    raise common.ConversionError(
        f"{path} cannot be read with torch's safe loader ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Re-save its state dict and args "
        "(`torch.save({'state_dict': ckpt['state_dict'], 'hyper_parameters': {'args': "
        "vars(ckpt['hyper_parameters']['args'])}}, path)`) in an environment that trusts "
        "it.") from None
  if not isinstance(ckpt, dict):
    raise common.ConversionError(f"{path} holds a {type(ckpt).__name__}, not a VideoGPT "
                                 "checkpoint (a dict).")
  args = None
  if "state_dict" in ckpt:
    hparams = ckpt.get("hyper_parameters") or {}
    args = hparams.get("args", hparams or None)
    state = ckpt["state_dict"]
  else:
    state = ckpt
  if isinstance(args, argparse.Namespace):
    args = vars(args)
  bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
  if bad:
    raise common.ConversionError(f"{path}'s state dict has entries that are not tensors: "
                                 f"{bad[:6]}.")
  return {k: v.float().numpy() for k, v in state.items()}, args


def videogpt_config(args: dict[str, Any] | argparse.Namespace, **overrides) -> VQVAEConfig:
  """The `VQVAEConfig` of VideoGPT's `args` (its training script's Namespace, or a dict):
  the model's fields (`MODEL_FIELDS`), the rest VideoGPT's constants. `overrides`: any
  VQVAEConfig field (`frames`, `resolution` when `args` lacks the clips' shape)."""
  if isinstance(args, argparse.Namespace):
    args = vars(args)
  fields = common.Fields(dict(args), "VideoGPT VQ-VAE")
  values = {}
  for name, field in MODEL_FIELDS.items():
    if field in overrides:
      continue
    value = fields[name]
    values[field] = tuple(int(d) for d in value) if name == "downsample" else int(value)
  try:
    return VQVAEConfig(**(values | overrides), num_heads=HEADS)
  except ValueError as e:
    raise common.ConversionError(f"VideoGPT's args {values} give no mmjax VQ-VAE: {e}") from None


def _conv(read: common.Reader, name: str, shape: tuple[int, ...], bias: bool = True) -> dict:
  """A torch Conv3d `"o i kt kh kw"` as `{"kernel": "kt kh kw i o"[, "bias"]}`."""
  out = {"kernel": np.transpose(read(name + ".weight", shape), (2, 3, 4, 1, 0))}
  if bias:
    out["bias"] = read(name + ".bias", (shape[0],))
  return out


def _conv_transpose(read: common.Reader, name: str, shape: tuple[int, ...]) -> dict:
  """A torch ConvTranspose3d `"i o kt kh kw"` as `{"kernel": "kt kh kw o i", "bias"}` (Flax's
  `ConvTranspose(transpose_kernel=True)`)."""
  return {"kernel": np.transpose(read(name + ".weight", shape), (2, 3, 4, 1, 0)),
          "bias": read(name + ".bias", (shape[1],))}


def _res_stack(read: common.Reader, p: str, cfg: VQVAEConfig, params: dict, stats: dict
               ) -> None:
  """`{p}res_stack.*` (the attention residual blocks and the final BatchNorm) into
  `params` and `stats` (an encoder's or decoder's)."""
  n, half = cfg.n_hiddens, cfg.n_hiddens // 2
  for j in range(cfg.n_res_layers):
    b = f"{p}res_stack.{j}.block."
    bp = params[f"res_{j}"] = {}
    bs = stats[f"res_{j}"] = {}
    for k, (index, width) in enumerate(((0, n), (3, half), (6, n))):
      resnet.batch_norm(read, f"{b}{index}", width, bp, bs, f"norm_{k}")
    bp["conv_0"] = _conv(read, f"{b}2.conv", (half, n, 3, 3, 3), bias=False)
    bp["conv_1"] = _conv(read, f"{b}5.conv", (n, half, 1, 1, 1), bias=False)
    for axis in "wht":
      a = f"{b}8.attn_{axis}."
      bp[f"attn_{axis}"] = {
          name: common.linear(read, a + torch_name, (n,), (n,), bias=name == "out")
          for name, torch_name in (("query", "w_qs"), ("key", "w_ks"), ("value", "w_vs"),
                                   ("out", "fc"))}
  resnet.batch_norm(read, f"{p}res_stack.{cfg.n_res_layers}", n, params, stats, "norm")


def videogpt_params(state: dict[str, np.ndarray], cfg: VQVAEConfig) -> tuple[dict, dict]:
  """`(params, {"batch_stats": ..., "codebook": ...})` of VideoGPT's VQ-VAE state dict,
  every tensor consumed or in `IGNORED_TENSORS`."""
  n, e = cfg.n_hiddens, cfg.embedding_dim
  last = "encoder.conv_last.conv.weight"
  if last in state and state[last].shape[1] != n and cfg.num_down == 1:
    raise common.ConversionError(
        f"{last} takes {state[last].shape[1]} channels, but the encoder's only downsampling "
        f"conv gives n_hiddens={n}: VideoGPT's Encoder builds conv_last from its loop "
        f"variable, which is 3 when every downsample factor is at most 2 "
        f"(downsample={cfg.downsample}), so this model cannot run, in VideoGPT either. "
        "Train with a factor of 4 or more on some axis.")
  read = common.Reader(state)
  params, stats = {"encoder": {}, "decoder": {}}, {"encoder": {}, "decoder": {}}
  enc = params["encoder"]
  for i in range(cfg.num_down):
    enc[f"convs_{i}"] = _conv(read, f"encoder.convs.{i}.conv", (n, 3 if i == 0 else n, 4, 4, 4))
  enc["conv_last"] = _conv(read, "encoder.conv_last.conv", (n, n, 3, 3, 3))
  _res_stack(read, "encoder.", cfg, enc, stats["encoder"])
  params["pre_vq"] = _conv(read, "pre_vq_conv.conv", (e, n, 1, 1, 1))
  params["post_vq"] = _conv(read, "post_vq_conv.conv", (n, e, 1, 1, 1))
  dec = params["decoder"]
  _res_stack(read, "decoder.", cfg, dec, stats["decoder"])
  for i in range(cfg.num_down):
    out = 3 if i == cfg.num_down - 1 else n
    dec[f"convts_{i}"] = _conv_transpose(read, f"decoder.convts.{i}.convt", (n, out, 4, 4, 4))
  codebook = {"embeddings": read("codebook.embeddings", (cfg.n_codes, e)),
              "counts": read("codebook.N", (cfg.n_codes,)),
              "sums": read("codebook.z_avg", (cfg.n_codes, e)),
              "initialized": np.asarray(True)}
  read.finish(IGNORED_TENSORS, hint="Check that the args (n_hiddens, n_res_layers, "
              "downsample, embedding_dim, n_codes) belong to these weights.")
  return params, {"batch_stats": stats, "codebook": {"codebook": codebook}}


def check_videogpt(cfg: VQVAEConfig, params: dict, model_state: dict) -> None:
  """Refuses parameters or state that are not the trees `VQVAE(cfg).init` builds."""
  import jax.numpy as jnp
  args = VQVAE(cfg), jnp.zeros((1, cfg.frames, cfg.resolution, cfg.resolution, 3))
  common.check_tree(params, *args)
  for collection, tree in model_state.items():
    common.check_tree(tree, *args, collection=collection)


def convert_videogpt(source: str | pathlib.Path | dict[str, Any],
                     args: dict[str, Any] | argparse.Namespace | None = None, **overrides
                     ) -> tuple[VQVAEConfig, dict, dict]:
  """`(VQVAEConfig, params, {"batch_stats": ..., "codebook": ...})` of VideoGPT's VQ-VAE:
  `source` a Lightning `.ckpt` (its `hyper_parameters.args` the config), a bare state dict
  file or a state dict (of tensors or arrays). `args`: the config when the source has none
  (or to replace it); `overrides`: VQVAEConfig fields (see `videogpt_config`)."""
  if isinstance(source, dict):
    state = {k: v.float().numpy() if hasattr(v, "float") and hasattr(v, "numpy")
             else np.asarray(v, np.float32) for k, v in source.items()}
    saved = None
  else:
    state, saved = load_checkpoint(source)
  args = args if args is not None else saved
  if args is None:
    raise common.ConversionError(
        f"{source if not isinstance(source, dict) else 'The state dict'} holds no "
        "hyper_parameters.args: give the config (args with n_hiddens, n_res_layers, "
        "downsample, embedding_dim, n_codes, sequence_length, resolution).")
  cfg = videogpt_config(args, **overrides)
  params, model_state = videogpt_params(state, cfg)
  check_videogpt(cfg, params, model_state)
  return cfg, params, model_state
