"""Checkpoints: the train state, the data iterator and the run's metadata saved together by
Orbax, verified when read back; and the parameters of a finished run grafted into another
model (pretrained backbones).

Every checkpoint holds four items:
  state      the train state (Orbax's standard PyTree format: OCDBT + zarr3)
  data       the Grain iterator state of each process
  meta       a JSON dict of the caller's (the run's config, counts, flags)
  checksums  a fingerprint of every array of `state` and of `meta`

Orbax and TensorStore check the framing of what they read (OCDBT manifests, zarr3 shard
indices) but not the chunks themselves: a flipped byte in an array file is read back as a
wrong number. So each array's fingerprint (`fingerprints`) is saved with it and recomputed
after every restore. A step that cannot be read completely and verifiably is skipped, with
a warning that names it and why, in favour of the newest one that can (`restore_latest`).
"""

import functools
import hashlib
import json
import pathlib
import re
import shlex
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from mmjax.cli import UserError
from mmjax.data.pipeline import resplit_position

ITEMS = ("state", "data", "meta", "checksums")
DAMAGED = "damaged"  # damaged steps are moved to checkpoints/damaged/<step>, out of Orbax's view


def manager(workdir: str | pathlib.Path, keep: int | None = None) -> ocp.CheckpointManager:
  """Checkpoints under `workdir/checkpoints`. Orbax writes each step to a temporary
  directory and renames it when complete, so a half-written step is never listed."""
  return ocp.CheckpointManager(
      pathlib.Path(workdir).absolute() / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
      item_names=ITEMS)


# ---------------------------------------------------------------------------------------
# Fingerprints: 64 bits per array, computed where the array lives.
# ---------------------------------------------------------------------------------------
def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words: same shape for 1-, 2- and 4-byte dtypes (zero
  extended), a trailing axis of 2 for 8-byte ones."""
  if jnp.issubdtype(x.dtype, jax.dtypes.extended):  # typed PRNG keys
    x = jax.random.key_data(x)
  if jnp.iscomplexobj(x):
    x = jnp.stack([x.real, x.imag], axis=-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  info = jnp.finfo(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype)
  if info.bits < 8:  # int4, float4: widen losslessly
    x = x.astype(jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: every input bit affects every output bit."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _fingerprint(x: jax.Array) -> jax.Array:
  """uint32[2] of `x`: `sum_i w_i (2i + 1)` and `sum_i mix(w_i ^ i * phi)` over its words
  `w_i` at row-major positions `i`, all mod 2**32. Any change of one word changes the
  first (an odd weight is invertible mod 2**32); the second catches changes that cancel
  in the first. Integer sums are exact in any order, so the value does not depend on how
  the array is sharded; there is no reshape, so nothing moves between devices."""
  w = _words(x)
  index, stride = jnp.zeros(w.shape, jnp.uint32), 1
  for axis in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(stride)
    stride = stride * w.shape[axis] % 2**32
  first = jnp.sum(w * (2 * index + 1), dtype=jnp.uint32)
  second = jnp.sum(_mix(w ^ (index * np.uint32(0x9E3779B9))), dtype=jnp.uint32)
  return jnp.stack([first, second])


@functools.partial(jax.jit, static_argnums=1)
def _fingerprint_leaves(leaves: list, replicated) -> jax.Array:
  out = jnp.stack([_fingerprint(x) for x in leaves])
  return out if replicated is None else jax.lax.with_sharding_constraint(out, replicated)


def _path(keypath) -> str:
  """'/'-joined names of a JAX key path: `opt_state/1/0/mu/embed/embedding`, as Orbax's
  metadata names the same leaf."""
  return "/".join(str(next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)),
                           k)) for k in keypath)


def fingerprints(tree) -> dict[str, str]:
  """`{path: 16 hex digits}` of every array leaf of `tree` (see `_fingerprint`), computed
  in one jit on the devices that hold the arrays and replicated, so that every process
  gets the same answer. Costs one read of each array."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    return {}
  mesh = next((x.sharding.mesh for _, x in leaves
               if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)), None)
  replicated = (None if mesh is None
                else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  values = np.asarray(_fingerprint_leaves([x for _, x in leaves], replicated))
  return {_path(p): f"{int(a):08x}{int(b):08x}" for (p, _), (a, b) in zip(leaves, values)}


def _meta_digest(meta: dict) -> str:
  return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------------------
def save(mngr: ocp.CheckpointManager, step: int, state, iterator=None, *,
         meta: dict | None = None) -> bool:
  """Saves (asynchronously) `state`, the `iterator`'s position (if given), `meta` (a dict
  that `json.dumps` accepts; `restore_latest` returns it) and the fingerprints of both,
  unless `step` is already saved. Returns whether it saved."""
  if step in mngr.all_steps():
    return False
  meta = dict(meta or {})
  try:
    digest = _meta_digest(meta)
  except (TypeError, ValueError) as e:
    raise TypeError(f"Checkpoint meta must be a JSON-serialisable dict: {e}") from e
  items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta),
           "checksums": ocp.args.JsonSave({"step": int(step), "meta": digest,
                                           "arrays": fingerprints(state)})}
  if iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(iterator)
  return mngr.save(step, force=True, args=ocp.args.Composite(**items))


# ---------------------------------------------------------------------------------------
# Reading one step: every check before the arrays are read, and the arrays verified after.
# ---------------------------------------------------------------------------------------
class DamagedCheckpoint(UserError):
  """A checkpoint step that cannot be read completely and verifiably."""

  def __init__(self, step_dir, reason: str):
    super().__init__(f"The checkpoint at step {epath.Path(step_dir).name} ({step_dir}) "
                     f"cannot be used: {reason}.")
    self.step_dir, self.reason = epath.Path(step_dir), reason


def _short(error: BaseException, limit: int = 300) -> str:
  """One line of `error`, without the TensorStore spec that its errors append."""
  text = " ".join(f"{type(error).__name__}: {error}".split())
  text = re.sub(r" \[tensorstore_spec=.*", "", text)
  return text if len(text) <= limit else text[:limit] + " ..."


class _Contents(NamedTuple):
  """What a step holds besides its arrays, read and checked."""

  meta: dict
  checksums: dict | None  # None: saved before checksums were (unverifiable)
  tree: dict  # Orbax's metadata of the `state` item: leaves have .shape and .dtype


def _read_json(step_dir: epath.Path, name: str, what: str):
  path = step_dir / name
  try:
    return json.loads(path.read_text())
  except FileNotFoundError as e:
    raise DamagedCheckpoint(step_dir, f"{what} is missing ({name})") from e
  except (ValueError, UnicodeDecodeError) as e:
    raise DamagedCheckpoint(step_dir, f"{what} is not valid JSON ({_short(e)})") from e


def _inspect(step_dir: epath.Path, need_data: bool) -> _Contents:
  """Reads and checks everything of a step but the arrays; raises `DamagedCheckpoint`."""
  fail = lambda reason: DamagedCheckpoint(step_dir, reason)
  if not any(step_dir.iterdir()):
    raise fail("its directory is empty")
  info = _read_json(step_dir, "_CHECKPOINT_METADATA", "Orbax's _CHECKPOINT_METADATA")
  items = info.get("item_handlers") if isinstance(info, dict) else None
  if not isinstance(items, dict):
    raise fail("its _CHECKPOINT_METADATA lists no items")
  for name in ("state", "data") if need_data else ("state",):
    if name not in items:
      raise fail(f"it has no '{name}' item")
  for name in items:
    if not (step_dir / name).is_dir():
      raise fail(f"its '{name}' item is missing ({step_dir / name})")
  meta, checksums = {}, None
  if "meta" in items:
    meta = _read_json(step_dir, "meta/metadata", "its 'meta' item")
  if "checksums" in items:
    checksums = _read_json(step_dir, "checksums/metadata", "its 'checksums' item")
    if not (isinstance(checksums, dict) and isinstance(checksums.get("arrays"), dict)
            and isinstance(checksums.get("step"), int)):
      raise fail("its 'checksums' item is not a dict with 'step' and 'arrays'")
    if checksums["step"] != int(step_dir.name):
      raise fail(f"it holds the checkpoint of step {checksums['step']} (renamed?)")
    if checksums.get("meta") != (_meta_digest(meta) if isinstance(meta, dict) else None):
      raise fail("its 'meta' item differs from the checksum saved with it")
  if not isinstance(meta, dict):
    raise fail("its 'meta' item is not a JSON object")
  try:
    tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state").tree
  except Exception as e:  # noqa: BLE001 (whatever Orbax raises on a damaged file)
    raise fail(f"the metadata of its arrays cannot be read ({_short(e)})") from e
  return _Contents(meta, checksums, tree)


def _leaves(tree) -> dict[str, Any]:
  return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _verify(step_dir: epath.Path, contents: _Contents, restored: dict) -> None:
  """Raises `DamagedCheckpoint` unless every restored array matches its saved
  fingerprint; `restored` may be a part of the state (its paths are the state's)."""
  if contents.checksums is None:
    logging.warning("The checkpoint at %s was saved without checksums (by an older mmjax): "
                    "restored without verifying its arrays.", step_dir)
    return
  got, saved = fingerprints(restored), contents.checksums["arrays"]
  unlisted = sorted(set(got) - set(saved))
  if unlisted:
    raise DamagedCheckpoint(step_dir, f"{len(unlisted)} array(s) have no saved checksum, "
                            f"first {unlisted[:3]}")
  bad = sorted(k for k in got if got[k] != saved[k])
  if bad:
    raise DamagedCheckpoint(step_dir, f"{len(bad)} array(s) differ from the checksums "
                            f"saved with them (corrupted bytes), first {bad[:3]}")


class Resumed(NamedTuple):
  step: int
  state: Any  # shaped, typed and sharded as the `abstract_state` asked
  meta: dict  # what `save` was given (`{}` for a checkpoint saved without it)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, iterator=None, *,
            config: dict | None = None) -> Resumed:
  """Restores step `step`: the state, the `iterator`'s position in place (if given) and
  the meta dict, with every array checked against its saved fingerprint.

  Arrays come back with the shardings of `abstract_state` (a tree of
  `jax.ShapeDtypeStruct`), whatever mesh saved them. Iterator states saved by another
  number of processes are re-split over this run's processes (`resplit_position`).
  Raises `DamagedCheckpoint` if the step cannot be read completely and verifiably, and
  `UserError` naming the parameters (and the fields of `config`, the run's config as a
  dict) that differ if the checkpoint does not fit `abstract_state`.
  """
  step_dir = epath.Path(mngr.directory) / str(step)
  contents = _inspect(step_dir, need_data=iterator is not None)
  _check_fits(step_dir, contents, abstract_state, config)
  try:
    saved = {int(p.name.split("-of-")[0].removeprefix("process_")): p
             for p in (step_dir / "data").glob("process_*-of-*.json")}
    if iterator is None or len(saved) in (0, jax.process_count()):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(iterator)
      state = mngr.restore(step, args=ocp.args.Composite(**items))["state"]
    else:
      state = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"]
      states = [json.loads(saved[i].read_text()) for i in sorted(saved)]
      iterator.set_state(resplit_position(states, jax.process_index(), jax.process_count()))
  except Exception as e:  # noqa: BLE001 (TensorStore, Orbax, Grain and JSON errors alike)
    raise DamagedCheckpoint(step_dir, f"reading it failed ({_short(e)})") from e
  _verify(step_dir, contents, state)
  return Resumed(int(step), state, contents.meta)


# ---------------------------------------------------------------------------------------
# A checkpoint that does not fit the model: name what differs, in parameters and config.
# ---------------------------------------------------------------------------------------
def _flat_config(tree, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix.rstrip("."): tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat_config(value, f"{prefix}{key}."))
  return out


def _listed(items: list[str], limit: int = 4) -> str:
  return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit
                                     else "")


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """`[(dotted field, saved value, current value)]` of two configs (as dicts), with
  `None` for a field that one of them lacks; compared after a JSON round trip, so that
  tuples equal lists."""
  normal = lambda c: _flat_config(json.loads(json.dumps(c, default=str)))
  saved, current = normal(saved), normal(current)
  return [(k, saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
          if saved.get(k) != current.get(k)]


def _check_fits(step_dir: epath.Path, contents: _Contents, abstract_state,
                config: dict | None) -> None:
  """Raises `UserError` naming the parameters (missing, unexpected, other shape or dtype)
  and the config fields that differ, if the saved state is not shaped as
  `abstract_state`."""
  saved, want = _leaves(contents.tree), _leaves(abstract_state)
  # Parameters first: an optimizer state differs wherever they do.
  order = lambda k: (not k.startswith(("params/", "frozen/")), k)
  missing = sorted(set(want) - set(saved), key=order)
  unexpected = sorted(set(saved) - set(want), key=order)
  shapes = [f"{k} {tuple(saved[k].shape)} {np.dtype(saved[k].dtype).name} in the "
            f"checkpoint, {tuple(want[k].shape)} {np.dtype(want[k].dtype).name} in the model"
            for k in sorted(set(want) & set(saved), key=order)
            if (tuple(saved[k].shape), np.dtype(saved[k].dtype))
            != (tuple(want[k].shape), np.dtype(want[k].dtype))]
  if not (missing or unexpected or shapes):
    return
  parts = [f"{what}: {_listed(items)}" for what, items in (
      (f"{len(shapes)} differ in shape or dtype", shapes),
      (f"{len(missing)} of the model are not in the checkpoint", missing),
      (f"{len(unexpected)} of the checkpoint are not in the model", unexpected)) if items]
  message = (f"The checkpoint at step {step_dir.name} ({step_dir}) does not fit this model; "
             f"its arrays: {'; '.join(parts)}.")
  saved_config, source = contents.meta.get("config"), "saved with that checkpoint"
  config_json = step_dir.parent.parent / "config.json"
  if not isinstance(saved_config, dict) and config_json.exists():
    try:  # checkpoints saved before they carried their config
      saved_config = json.loads(config_json.read_text())
      source = f"in {config_json} (written by the last run started in this workdir)"
    except ValueError:
      saved_config = None
  if not isinstance(saved_config, dict):
    message += " No config was saved with it to compare with."
  elif config is not None:
    differences = config_differences(saved_config, config)
    shown = [f"{k} ({json.dumps(old)} then, {json.dumps(new)} now)"
             for k, old, new in differences]
    if shown:
      message += f" Config fields that differ from the config {source}: {_listed(shown, 8)}."
      old_values = " ".join(f"--config.{k}={shlex.quote(str(old))}"
                            for k, old, _ in differences[:8]
                            if isinstance(old, (int, float, str)))
      if old_values:
        message += f" To resume this run, restore the old values ({old_values})."
    else:
      message += f" The config {source} has the same values as this one."
  raise UserError(message + " To train the changed model, use another --workdir.")


# ---------------------------------------------------------------------------------------
# Resuming: the newest step that can be read completely and verifiably.
# ---------------------------------------------------------------------------------------
def _everywhere(ok: bool) -> bool:
  """Whether `ok` on every process: all processes must choose the same step."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _aside(directory: epath.Path, steps: list[int]) -> dict[int, epath.Path]:
  """Unused destinations `directory/damaged/<step>[.n]` for `steps`."""
  out, taken = {}, set()
  for step in steps:
    dest, n = directory / DAMAGED / str(step), 0
    while dest.exists() or dest in taken:
      n += 1
      dest = directory / DAMAGED / f"{step}.{n}"
    out[step] = dest
    taken.add(dest)
  return out


def _move_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> dict[int, epath.Path]:
  """Moves damaged steps to `checkpoints/damaged/`, out of Orbax's list, so that they
  neither hide the good ones (`latest_step`) nor block or outlive later saves."""
  directory = epath.Path(mngr.directory)
  _sync("mmjax_checkpoints_before_move")
  dests = _aside(directory, steps)
  if jax.process_index() == 0:
    (directory / DAMAGED).mkdir(parents=True, exist_ok=True)
    for step, dest in dests.items():
      (directory / str(step)).rename(dest)
  _sync("mmjax_checkpoints_after_move")
  mngr.reload()
  return dests


def _has_files(path: epath.Path) -> bool:
  return any(p.is_file() or (p.is_dir() and _has_files(p)) for p in path.iterdir())


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, iterator=None, *,
                   config: dict | None = None) -> Resumed | None:
  """The newest step that can be read completely and verifiably (`restore`), or None
  when there is no checkpoint yet.

  Newer steps that cannot be read are reported (step, directory, why) and moved to
  `checkpoints/damaged/`, so that later saves of the same steps go ahead. If no step can
  be read, nothing is moved and `UserError` says which steps are damaged and how to set
  them aside (starting from scratch would lose the run), unless they are empty
  directories only, which are set aside and None returned. A checkpoint that does not
  fit `abstract_state` (a changed model) raises `UserError` at once (see `restore`):
  an older step of the same run would not fit either.
  """
  mngr.reload()
  directory = epath.Path(mngr.directory)
  steps = sorted(mngr.all_steps(), reverse=True)
  damaged: dict[int, str] = {}
  for step in steps:
    try:
      resumed, reason = restore(mngr, step, abstract_state, iterator, config=config), None
    except DamagedCheckpoint as e:
      resumed, reason = None, e.reason
    if not _everywhere(reason is None):
      reason = reason or "another process could not read it completely"
    if reason is not None:
      logging.warning("Skipping the checkpoint at step %d (%s): %s.", step,
                      directory / str(step), reason)
      damaged[step] = reason
      continue
    message = f"Resumed from step {step}"
    if damaged:
      dests = _move_aside(mngr, list(damaged))
      message += "; " + "; ".join(f"skipped step {s}: {why} (moved to {dests[s]})"
                                  for s, why in damaged.items())
    print(message + ".", flush=True)
    return resumed
  if not damaged:
    return None
  if not any(_has_files(directory / str(s)) for s in damaged):
    dests = _move_aside(mngr, list(damaged))
    print(f"Starting from scratch: the checkpoint directories {sorted(damaged)} were empty "
          f"(moved to {directory / DAMAGED}).", flush=True)
    return None
  dests = _aside(directory, list(damaged))
  listing = "; ".join(f"step {s} ({directory / str(s)}): {why}" for s, why in damaged.items())
  q = lambda path: shlex.quote(str(path))
  moves = " && ".join(f"mv {q(directory / str(s))} {q(dests[s])}" for s in damaged)
  raise UserError(
      f"No checkpoint under {directory} can be read completely and verifiably: {listing}. "
      f"Starting from scratch would lose the run, so nothing was changed. To keep the "
      f"damaged steps for inspection and start this run from scratch, run\n"
      f"  mkdir -p {q(directory / DAMAGED)} && {moves}\n"
      f"and re-run the same command; or use another --workdir.")


# ---------------------------------------------------------------------------------------
# Parameters of a finished run, for grafting into another model.
# ---------------------------------------------------------------------------------------
class Loaded(NamedTuple):
  step: int
  params: dict  # trainable and frozen parameters together, as numpy arrays
  meta: dict  # the meta dict saved with that step (`{}` if none)
  # The model's non-parameter collections (`{"batch_stats": ...}`), `{}` if it has none.
  model_state: dict = {}

  @property
  def variables(self) -> dict:
    """`{"params": ..., **model_state}`: what `model.apply` takes."""
    return {"params": self.params, **self.model_state}


def _read_params(step_dir: epath.Path) -> Loaded:
  """The parameters of one step, read onto this process's first device, verified and
  copied to the host; raises `DamagedCheckpoint`."""
  contents = _inspect(step_dir, need_data=False)
  parts = {k: contents.tree[k] for k in ("params", "frozen", "model_state")
           if k in contents.tree}
  if "params" not in parts:
    raise UserError(f"The checkpoint at {step_dir} holds no parameters (its state has "
                    f"{sorted(contents.tree)}).")
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), parts)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    state = handler.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=target, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  except Exception as e:  # noqa: BLE001 (whatever Orbax or TensorStore raise)
    raise DamagedCheckpoint(step_dir, f"reading it failed ({_short(e)})") from e
  finally:
    handler.close()
  _verify(step_dir, contents, state)
  flat = {**flat_params(state.get("frozen") or {}), **flat_params(state["params"])}
  model_state = jax.tree_util.tree_map(np.asarray, state.get("model_state") or {})
  return Loaded(int(step_dir.name), tree_params({k: np.asarray(v) for k, v in flat.items()}),
                contents.meta, model_state)


def load(workdir: str | pathlib.Path, step: int | None = None) -> Loaded:
  """The parameters (trainable and frozen) and meta dict of a run's checkpoint, on
  whatever mesh or number of processes saved it: step `step`, or the newest one that can
  be read completely and verifiably (newer damaged ones are reported and skipped; the
  meta dict says whether the run had finished). Raises `UserError` if there is none."""
  mngr = manager(workdir)
  directory, steps = epath.Path(mngr.directory), sorted(mngr.all_steps(), reverse=True)
  mngr.close()
  if step is not None:
    if step not in steps:
      raise UserError(f"No checkpoint of step {step} under {directory}; it has steps "
                      f"{sorted(steps) or 'none'}.")
    return _read_params(directory / str(step))
  if not steps:
    raise UserError(f"No complete checkpoint under {directory}: check the path. It should "
                    "be the --workdir of a run (python -m mmjax.train --workdir=...) or the "
                    "--output of a conversion (python -m mmjax.convert --output=...).")
  damaged = []
  for s in steps:
    try:
      loaded = _read_params(directory / str(s))
    except DamagedCheckpoint as e:
      logging.warning("Skipping the checkpoint at step %d (%s): %s.", s, e.step_dir, e.reason)
      damaged.append(f"step {s}: {e.reason}")
      continue
    if damaged:
      print(f"Loaded the parameters of step {s} of {workdir}; skipped "
            f"{'; '.join(damaged)}.", flush=True)
    return loaded
  raise UserError(f"No checkpoint under {directory} can be read completely and verifiably: "
                  f"{'; '.join(damaged)}.")


def load_params(workdir: str | pathlib.Path, step: int | None = None) -> dict[str, Any]:
  """All parameters (trainable and frozen) of a run's checkpoint as numpy arrays (`load`)."""
  return load(workdir, step).params


def flat_params(tree) -> dict[str, Any]:
  """`{"a/b/kernel": leaf}`: the '/'-joined paths that freezing and grafting patterns match."""
  return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def tree_params(flat: dict[str, Any]) -> dict:
  """The inverse of `flat_params`."""
  return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def param_mismatches(expected, params) -> list[str]:
  """Where `params` differ from the `expected` tree (e.g. `jax.eval_shape` of an init) in
  names or shapes: "missing a/b", "unexpected a/c", "a/d is (2, 3), the config makes
  (3, 3)"; empty if they agree."""
  want = {k: tuple(v.shape) for k, v in flat_params(expected).items()}
  have = {k: tuple(np.shape(v)) for k, v in flat_params(params).items()}
  problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
  problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
  return problems + [f"{k} is {have[k]}, the config makes {want[k]}"
                     for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]


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
