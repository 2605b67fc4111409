"""Checkpoints: the train state and the data iterator saved together by Orbax, and the
parameters of a finished run grafted into another model (pretrained backbones)."""

import json
import pathlib
import re
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from mmjax.data.pipeline import resplit_position


def manager(workdir: str | pathlib.Path, keep: int | None = None) -> ocp.CheckpointManager:
  """Checkpoints under `workdir/checkpoints`. Orbax writes each step to a temporary
  directory and renames it when complete, so a half-written step is never listed."""
  return ocp.CheckpointManager(
      pathlib.Path(workdir).absolute() / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
      item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state, iterator) -> bool:
  """Saves (asynchronously) unless `step` is already saved."""
  if step in mngr.all_steps():
    return False
  return mngr.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, iterator):
  """Restores the state and, in place, the data iterator.

  Arrays come back with the shardings of `abstract_state` (a tree of
  `jax.ShapeDtypeStruct`), whatever mesh saved them. Iterator states saved by another
  number of processes are re-split over this run's processes (`resplit_position`).
  """
  saved = {int(p.name.split("-of-")[0].removeprefix("process_")): p for p in
           (pathlib.Path(mngr.directory) / str(step) / "data").glob("process_*-of-*.json")}
  if len(saved) in (0, jax.process_count()):
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["state"]
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  states = [json.loads(saved[i].read_text()) for i in sorted(saved)]
  iterator.set_state(resplit_position(states, jax.process_index(), jax.process_count()))
  return restored["state"]


def load_params(workdir: str | pathlib.Path, step: int | None = None) -> dict[str, Any]:
  """All parameters (trainable and frozen) of a run's checkpoint, as numpy arrays, on
  whatever mesh or number of processes saved it."""
  mngr = manager(workdir)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No complete checkpoint under {pathlib.Path(workdir) / 'checkpoints'}.")
  path = pathlib.Path(mngr.directory) / str(step) / "state"
  mngr.close()
  handler = ocp.PyTreeCheckpointHandler()
  metadata = handler.metadata(path)
  parts = {k: metadata[k] for k in ("params", "frozen") if k in metadata}
  # Read onto this process's first device, then to the host.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), parts)
  state = handler.restore(path, args=ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  handler.close()
  flat = {**flat_params(state.get("frozen") or {}), **flat_params(state["params"])}
  return tree_params({k: np.asarray(v) for k, v in flat.items()})


def flat_params(tree) -> dict[str, Any]:
  """`{"a/b/kernel": leaf}`: the '/'-joined paths that freezing and grafting patterns match."""
  return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def tree_params(flat: dict[str, Any]) -> dict:
  """The inverse of `flat_params`."""
  return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


# ---------------------------------------------------------------------------------------
# Scanned and per-layer layouts (mmjax.layers.scan).
# ---------------------------------------------------------------------------------------
def _group_sizes(keys) -> dict[str, int]:
  """Layers per scanned group, by the path before its `groups` segment."""
  sizes: dict[str, int] = {}
  for key in keys:
    parts = key.split("/")
    if "groups" in parts:
      i = parts.index("groups")
      match = re.fullmatch(r"layers_(\d+)", parts[i + 1])
      if match:
        prefix = "/".join(parts[:i])
        sizes[prefix] = max(sizes.get(prefix, 0), int(match[1]) + 1)
  return sizes


def _unstacked_keys(key: str, length: int, sizes: dict[str, int]) -> list[str] | None:
  """The per-layer keys of the `length` entries stacked in a scanned `key`, or None
  if `key` is not scanned. `.../layers/<rest>` entry i is `.../layers_<i>/<rest>`;
  `.../groups/<name>_<j>/<rest>` entry k is `.../<name>_<k * group + j>/<rest>`."""
  parts = key.split("/")
  if "layers" in parts:
    i = parts.index("layers")
    return ["/".join(parts[:i] + [f"layers_{n}"] + parts[i + 1:]) for n in range(length)]
  if "groups" in parts:
    i = parts.index("groups")
    name, j = parts[i + 1].rsplit("_", 1)
    group = sizes["/".join(parts[:i])]
    return ["/".join(parts[:i] + [f"{name}_{k * group + int(j)}"] + parts[i + 2:])
            for k in range(length)]
  return None


def per_layer(flat: dict[str, Any], take=lambda value, i: value[i]) -> dict[str, Any]:
  """A flat parameter dict with scanned (stacked) entries split into one per layer;
  `take(value, i)` picks entry i (the default indexes arrays)."""
  sizes = _group_sizes(flat)
  out = {}
  for key, value in flat.items():
    shape = getattr(value, "shape", None) or np.shape(value)
    names = _unstacked_keys(key, shape[0] if shape else 0, sizes)
    if names is None:
      out[key] = value
    else:
      out.update({name: take(value, i) for i, name in enumerate(names)})
  return out


def match_layout(source: dict[str, Any], target_shapes: dict[str, tuple[int, ...]]
                 ) -> tuple[dict[str, np.ndarray], set[str]]:
  """Flat `source` arrays rearranged into the layout of the flat `target_shapes`
  (scanned or per layer, either way round); returns them and the per-layer source keys
  that found no place. Target keys that cannot be filled are left out."""
  available = {k: np.asarray(v) for k, v in per_layer(source).items()}
  sizes = _group_sizes(target_shapes)
  out, used = {}, set()
  for key, shape in target_shapes.items():
    names = _unstacked_keys(key, shape[0] if shape else 0, sizes) or [key]
    if all(name in available for name in names):
      out[key] = (available[key] if names == [key]
                  else np.stack([available[name] for name in names]))
      used.update(names)
  return out, set(available) - used


# The LM parameters indexed by token id, and their vocabulary axis.
VOCAB_AXES = {r"(^|/)embed/embedding$": 0, r"(^|/)lm_head/kernel$": -1}


def extend_with_mean(value: np.ndarray, size: int, axis: int = 0) -> np.ndarray:
  """`value` extended along `axis` to `size` entries, each new one the mean of the old."""
  extra = np.repeat(value.mean(axis=axis, keepdims=True), size - value.shape[axis], axis=axis)
  return np.concatenate([value, extra], axis=axis)


def grow_vocabulary(source: dict[str, Any], target_shapes: dict[str, tuple[int, ...]]
                    ) -> dict[str, Any]:
  """`source` with its token-indexed parameters (`VOCAB_AXES`) extended to the larger
  vocabulary of `target_shapes`, the new rows set to the mean of the existing ones (as
  transformers' `resize_token_embeddings` starts them); every other entry unchanged."""
  grown = dict(source)
  for key, value in source.items():
    axis = next((a for pattern, a in VOCAB_AXES.items() if re.search(pattern, key)), None)
    shape, want = np.shape(value), target_shapes.get(key)
    if axis is None or want is None or len(want) != len(shape):
      continue
    others = [n for i, n in enumerate(shape) if i != axis % len(shape)]
    if want[axis] > shape[axis] and others == [n for i, n in enumerate(want)
                                               if i != axis % len(want)]:
      grown[key] = extend_with_mean(np.asarray(value), want[axis], axis)
      logging.warning("%s: %d token rows from the checkpoint, %d new ones start as their "
                      "mean.", key, shape[axis], want[axis] - shape[axis])
  return grown


def graft(params: dict, target: str, source: dict, *, may_stay_new: str | None = None,
          origin: str = "checkpoint") -> dict:
  """Replaces the subtree `target` ('/'-separated) of `params` with `source`.

  Every source parameter must exist in the target with the same shape; scanned and
  per-layer layouts are converted (`match_layout`). Target parameters
  absent from the source keep their initial values only if their full path matches the
  regex `may_stay_new` (e.g. Flamingo's new gated blocks); otherwise it is an error, since
  a 'pretrained' backbone would silently stay random. A model whose vocabulary is larger
  than the source's (a pretrained LM given Flamingo's `<image>`, `<|endofchunk|>` and
  `<PAD>`) gets the source's embedding and output rows, and its new rows start as their
  mean (`grow_vocabulary`).
  """
  flat = flat_params(params)
  prefix = f"{target}/" if target else ""
  target_shapes = {k[len(prefix):]: np.shape(v) for k, v in flat.items() if k.startswith(prefix)}
  source_flat, unexpected = match_layout(flat_params(source), target_shapes)
  source_flat = grow_vocabulary(source_flat, target_shapes)
  unexpected = sorted(unexpected)
  missing = sorted(k for k in set(target_shapes) - set(source_flat)
                   if not (may_stay_new and re.search(may_stay_new, prefix + k)))
  shapes = sorted(f"{k}: {np.shape(v)} in {origin}, {target_shapes[k]} in the model"
                  for k, v in source_flat.items() if np.shape(v) != target_shapes[k])
  if unexpected or missing or shapes:
    raise ValueError(
        f"Cannot load {origin} into '{target}': "
        + "; ".join(f"{what} {items[:5]}{' ...' if len(items) > 5 else ''}"
                    for what, items in (("unexpected keys", unexpected),
                                        ("missing keys", missing),
                                        ("shape mismatches", shapes)) if items)
        + ". Check that the model config matches the one the checkpoint was trained with.")
  for key, value in source_flat.items():
    flat[prefix + key] = np.asarray(value, dtype=flat[prefix + key].dtype)
  return tree_params(flat)
