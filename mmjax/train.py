"""Trains a recipe: python -m mmjax.train --config=configs/<recipe>.py[:variant] --workdir=DIR

Reads top to bottom: config -> mesh -> data -> model and parameters (trainable / frozen,
initialised directly sharded) -> optimizer -> train step (one `jax.jit` with in/out
shardings and donated state) -> checkpoints -> loop. Re-running the same command resumes from
the latest complete checkpoint and follows exactly the loss curve of an uninterrupted
run; SIGTERM saves a checkpoint and exits cleanly. A run that completed its steps and its
evaluation records itself in `workdir/finished.json`; re-running it does nothing more.

Config overrides come from the command line: `--config.optim.lr=1e-4`,
`--config.init.lm.workdir=DIR`, `--config.data.datasets.pairs.weight=0`; the config is
checked at start-up (`mmjax.config.validate`). The mesh and the
sharding preset are config too (`--config.mesh.fsdp=-1 --config.mesh.data=1`; see
`mmjax.sharding`); several hosts are started by the scripts in launch/.
"""

import hashlib
import importlib
import json
import pathlib
import re
import signal
import time
from typing import Any, NamedTuple

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import checkpoints, cli, evaluate, losses, peft, sharding
from mmjax import config as config_lib
from mmjax.data import conversation, regions, video
from mmjax.data.keywords import KeywordMask
from mmjax.data.pipeline import DataHealth, Dataset, dataset_from_config, make_dataset
from mmjax.data.sequences import SequenceSpec
from mmjax.data.tokenizer import make_tokenizer
from mmjax.tasks import get_task


class NonFiniteError(FloatingPointError):
  """Raised (with the step and the offending part) when the policy is to abort."""


# ---------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------
def sequence_spec(config) -> SequenceSpec:
  d = config.data
  mode = d.get("mode", "interleaved")
  return SequenceSpec(seq_len=d.seq_len, max_images=d.get("max_images", 0),
                      image_size=d.get("image_size", 0), mode=mode,
                      conversation=conversation.format_of(config)
                      if mode == "conversation" else None,
                      regions=regions.spec_of(config) if mode == "regions" else None,
                      video=video.spec_of(config) if mode in video.MODES else None)


def keyword_mask(config, training: list[Dataset]) -> KeywordMask | None:
  """`config.data.keyword_mask` (mode "none", "fixed" or "random"; top, rate, seed) fitted
  on the texts of the `training` datasets' sources, or None when masking is off."""
  settings = dict(config.data.get("keyword_mask") or {})
  mode = settings.pop("mode", "none")
  if mode == "none":
    return None
  texts = []
  for dataset in training:
    if not hasattr(dataset.source, "texts"):
      raise cli.UserError(f"config.data.keyword_mask.mode={mode!r} fits its keywords on the "
                          f"training texts, but dataset {dataset.name!r} "
                          f"({type(dataset.source).__name__}) has no texts(); set "
                          "--config.data.keyword_mask.mode=none.")
    texts += dataset.source.texts()
  return KeywordMask.fit(texts, mode, **settings)


def datasets(config, field: str = "datasets") -> list[Dataset]:
  """The mixture `config.data.<field>` (a mapping of dataset names to entries), in name
  order, without the entries whose `weight` is 0."""
  out = []
  entries = config.data.get(field) or {}
  for name, entry in sorted(entries.items()):  # a ConfigDict's order: resumes see the same
    entry = {"name": name, **(entry.to_dict() if hasattr(entry, "to_dict") else entry)}
    if entry.get("weight", 1.0) == 0:
      continue
    try:
      out.append(dataset_from_config(entry))
    except (TypeError, ValueError, OSError) as e:  # a source's arguments, paths, files
      raise cli.UserError(f"config.data.{field}.{name}: {e}") from e
  return out


def make_data(config, field: str = "datasets", *, seed: int, health: DataHealth
              ) -> grain.IterDataset:
  """Per-process batches of the mixture `config.data.<field>` (see `datasets`); the
  training mixture ("datasets") has its keywords masked (`keyword_mask`), others never."""
  mixture, spec = datasets(config, field), sequence_spec(config)
  return make_dataset(
      mixture, make_tokenizer(config) if spec.needs_tokenizer else None, spec,
      batch_size=config.data.batch_size // jax.process_count(), seed=seed,
      process_index=jax.process_index(), process_count=jax.process_count(), health=health,
      keyword_mask=keyword_mask(config, mixture) if field == "datasets" else None)


# ---------------------------------------------------------------------------------------
# Parameters: which train, which stay frozen.
# ---------------------------------------------------------------------------------------
def partition_params(params, trainable: str) -> tuple[dict, dict]:
  """Splits params by a regex on '/'-joined paths into (trainable, frozen) trees."""
  flat = checkpoints.flat_params(params)
  train = {k: v for k, v in flat.items() if re.search(trainable, k)}
  if not train:
    raise cli.UserError(f"config.trainable={trainable!r} matches no parameter; paths look "
                        f"like {sorted(flat)[:3]}.")
  frozen = {k: v for k, v in flat.items() if k not in train}
  return checkpoints.tree_params(train), checkpoints.tree_params(frozen)


def merge_params(trainable: dict, frozen: dict) -> dict:
  return checkpoints.tree_params({**checkpoints.flat_params(frozen),
                                  **checkpoints.flat_params(trainable)})


def token_row_masks(config, trainable: dict, frozen: dict) -> dict[str, np.ndarray]:
  """`{path: bool "v 1"}`: the rows of the LM's input embedding (`embed/embedding`, under
  `lm/` in Flamingo) that train, for the token ids `config.trainable_token_rows`; the
  embedding's other rows stay frozen. `{}` when no ids are listed."""
  ids = [int(i) for i in config.get("trainable_token_rows") or ()]
  if not ids:
    return {}
  flat = {**checkpoints.flat_params(frozen), **checkpoints.flat_params(trainable)}
  paths = [k for k in flat if re.search(r"(^|/)embed/embedding$", k)]
  if len(paths) != 1:
    raise cli.UserError(f"config.trainable_token_rows needs one LM input embedding "
                        f"('embed/embedding'); the model has {paths or 'none'}.")
  path, rows = paths[0], flat[paths[0]].shape[0]
  if path not in checkpoints.flat_params(trainable):
    raise cli.UserError(f"config.trainable_token_rows trains rows of {path}, which "
                        f"config.trainable={config.trainable!r} leaves frozen; set "
                        f"--config.trainable='(?:{config.trainable})|^{path}$'.")
  if not all(0 <= i < rows for i in ids):
    raise cli.UserError(f"config.trainable_token_rows={tuple(ids)} has ids outside the "
                        f"{rows} rows of {path}.")
  mask = np.zeros((rows, 1), bool)
  mask[ids] = True
  return {path: mask}


# ---------------------------------------------------------------------------------------
# Optimizer: AdamW with warmup + cosine, clipping, decay on selected parameters.
# ---------------------------------------------------------------------------------------
def make_optimizer(config, trainable: dict):
  o, steps = config.optim, config.train.steps
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=max(steps, o.warmup_steps + 1), end_value=o.lr * o.final_lr_fraction)
  decay_mask = checkpoints.tree_params(
      {k: re.search(o.decay_pattern, k) is not None for k in checkpoints.flat_params(trainable)})
  # clip_norm 0: no clipping (MMBCD's reference clips nothing).
  clip = optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity()
  tx = optax.chain(
      clip,
      optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=decay_mask))
  return tx, schedule


# ---------------------------------------------------------------------------------------
# Mesh, model and the sharded train state.
# ---------------------------------------------------------------------------------------
class Parts(NamedTuple):
  """What the train and eval steps are built from. `shardings` and `abstract` are trees
  shaped like the train state `{"step", "params", "frozen", "opt_state"}` (plus
  `"model_state"` for a model with non-parameter collections, e.g. BatchNorm's
  `batch_stats`): where each leaf lives on the mesh, and its shape and dtype (with that
  sharding)."""

  task: Any
  model: nn.Module
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  shardings: dict
  abstract: dict
  init_variables: Any  # rng -> the model's collections, boxed with their logical axis names
  token_rows: dict  # `token_row_masks`: the embedding rows that train, by parameter path


def build(config, devices=None) -> Parts:
  """Mesh, model and optimizer of `config`, and the layout of its train state; nothing
  is allocated."""
  mesh = sharding.make_mesh(config.get("mesh") or {"data": -1}, devices)
  rules = sharding.rules(config.get("sharding", "fsdp"))
  task = get_task(config.task)
  model = peft.from_config(config, task.build_model(config))  # config.peft: LoRA, adapters
  args, kwargs = task.init_inputs(config)
  init_variables = lambda rng: dict(model.init(rng, *args, **kwargs))
  variables = jax.eval_shape(init_variables, jax.random.key(0))
  boxed, model_state = variables.pop("params"), nn.unbox(variables)
  param_sh = sharding.tree_shardings(boxed, mesh, rules)
  params = nn.unbox(boxed)
  trainable, frozen = partition_params(params, config.trainable)
  trainable_sh, frozen_sh = partition_params(param_sh, config.trainable)
  token_rows = token_row_masks(config, trainable, frozen)
  tx, schedule = make_optimizer(config, trainable)
  opt_state = jax.eval_shape(tx.init, trainable)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_state, trainable_sh,
                                 transform_non_params=lambda _: replicated)
  shardings = {"step": replicated, "params": trainable_sh, "frozen": frozen_sh,
               "opt_state": opt_sh}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": trainable,
              "frozen": frozen, "opt_state": opt_state}
  if model_state:  # BatchNorm statistics and the like: carried, sharded and checkpointed
    shardings["model_state"] = sharding.tree_shardings(variables, mesh, rules)
    abstract["model_state"] = model_state
  abstract = jax.tree_util.tree_map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings)
  return Parts(task, model, mesh, rules, tx, schedule, shardings, abstract, init_variables,
               token_rows)


def init_state(config, parts: Parts, *, pretrained: bool = True) -> dict:
  """A fresh train state, each array created on its own devices (never whole on one
  host), with `config.init`'s pretrained backbones grafted in when `pretrained`."""
  param_sh = merge_params(parts.shardings["params"], parts.shardings["frozen"])
  state_sh = parts.shardings.get("model_state", {})
  init = jax.jit(lambda rng: nn.unbox(parts.init_variables(rng)),
                 out_shardings={"params": param_sh, **state_sh})
  variables = init(jax.random.key(config.seed))
  params = variables.pop("params")
  loaded: set[str] = set()
  if pretrained:
    params = load_pretrained(params, config, loaded, model_state=variables)
  if hasattr(parts.task, "initial_params"):
    params = parts.task.initial_params(params, loaded)
  params = sharding.place(params, param_sh)
  trainable, frozen = partition_params(params, config.trainable)
  opt_state = jax.jit(parts.tx.init, out_shardings=parts.shardings["opt_state"])(trainable)
  step = jax.device_put(jnp.int32(0), parts.shardings["step"])
  state = {"step": step, "params": trainable, "frozen": frozen, "opt_state": opt_state}
  if "model_state" in parts.abstract:
    state["model_state"] = variables
  return state


# ---------------------------------------------------------------------------------------
# The train step: exact gradient accumulation, non-finite detection.
# ---------------------------------------------------------------------------------------
def make_train_step(config, parts: Parts):
  """`(state, batch) -> (state, metrics, nonfinite_grads)`: one `jax.jit` over the mesh;
  the state is donated, the batch is a global array split along its examples."""
  task, model, tx, schedule = parts.task, parts.model, parts.tx, parts.schedule
  accum = config.optim.accum_steps
  skip_nonfinite = config.train.nonfinite == "skip"

  def loss_sum(trainable, frozen, batch, rng, model_state):
    params = merge_params(trainable, frozen)
    # LoRA dropout, where config.peft asks for it, from a key of its own (the task's `rng`
    # stays as it was).
    with peft.training(jax.random.fold_in(rng, 0x10A)):
      if model_state is None:
        total, count, terms = task.loss_terms(model, params, batch, rng)
      else:  # the collections come back updated (BatchNorm's running statistics)
        total, count, terms, model_state = task.loss_terms(
            model, params, batch, rng, model_state=model_state, train=True)
    return total, (count, terms, model_state)

  def only_token_rows(tree):
    # Applied to the gradients, so that clipping and Adam see only the rows that train,
    # and to the updates, so that weight decay cannot move the frozen rows either.
    flat = checkpoints.flat_params(tree)
    for path, rows in parts.token_rows.items():
      flat[path] = jnp.where(rows, flat[path], 0)
    return checkpoints.tree_params(flat)

  def micro_batches(x):
    # Micro-batch j takes rows j, j + accum, ...: each device's contiguous rows hold a
    # share of every micro-batch, so splitting the batch moves no data between devices.
    x = jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

  def step(state, batch):
    # Micro-batches are summed, then divided by the total token count: the same update
    # as one batch of `accum` times the size.
    micro = jax.tree_util.tree_map(micro_batches, batch)
    # Randomness inside the loss (BLIP-2's hard negatives) is a function of the step and
    # the micro-batch, so a resumed run draws what an uninterrupted one would.
    rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])

    def accumulate(carry, mb_index):
      # Non-parameter collections pass from one micro-batch to the next, as they would
      # through `accum` steps of the smaller batch.
      grads, total, count, model_state = carry
      mb, index = mb_index
      (t, (c, terms, model_state)), g = jax.value_and_grad(loss_sum, has_aux=True)(
          state["params"], state["frozen"], mb, jax.random.fold_in(rng, index), model_state)
      return (jax.tree_util.tree_map(jnp.add, grads, g), total + t, count + c,
              model_state), terms

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
    zero = jnp.zeros((), jnp.float32)
    carry = (zeros, zero, zero, state.get("model_state"))
    if accum == 1:  # no loop: XLA:CPU runs a convolution inside one several times slower
      (grads, total, count, model_state), terms = accumulate(
          carry, jax.tree_util.tree_map(lambda x: x[0], (micro, jnp.arange(1))))
      terms = jax.tree_util.tree_map(lambda x: x[None], terms)
    else:
      (grads, total, count, model_state), terms = jax.lax.scan(accumulate, carry,
                                                               (micro, jnp.arange(accum)))
    grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(count, 1.0), grads)
    grads = only_token_rows(grads)
    loss = losses.safe_mean(total, count)
    # Each parameter's squared gradient norm serves the global norm and says which
    # parameters' gradients are not finite (a square that overflows counts as not finite):
    # one reduction per parameter instead of two.
    squares = {k: jnp.sum(jnp.square(g)) for k, g in checkpoints.flat_params(grads).items()}
    grad_norm = jnp.sqrt(sum(squares.values()))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    updates = only_token_rows(updates)
    update_norm = optax.tree.norm(updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    params = optax.apply_updates(state["params"], updates)
    if hasattr(task, "project_params"):
      params = task.project_params(config, params)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree_util.tree_map(
          lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
      model_state = keep(model_state, state.get("model_state"))
    nonfinite_grads = {k: ~jnp.isfinite(v) for k, v in squares.items()}
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    if model_state is not None:
      new_state["model_state"] = model_state
    # The task's own terms (each loss of a multi-objective task), averaged over micro-batches.
    terms = {f"loss/{name}": jnp.mean(value) for name, value in terms.items()}
    metrics = {**terms, "loss": loss, "grad_norm": grad_norm, "update_norm": update_norm,
               "lr": schedule(state["step"]), "loss_terms": count, "finite": finite}
    return new_state, metrics, nonfinite_grads

  replicated = NamedSharding(parts.mesh, PartitionSpec())
  return jax.jit(sharding.with_rules(step, parts.mesh, parts.rules),
                 in_shardings=(parts.shardings, sharding.batch_sharding(parts.mesh, parts.rules)),
                 out_shardings=(parts.shardings, replicated, replicated), donate_argnums=0)


def make_eval_step(parts: Parts):
  """`(trainable, frozen, batch, model_state) -> (loss_sum, count)`; a model with
  non-parameter collections evaluates with them as they are (`train=False`: BatchNorm's
  running statistics) and leaves them unchanged."""
  def step(trainable, frozen, batch, model_state=None):
    params = merge_params(trainable, frozen)
    if model_state is None:
      total, count, _ = parts.task.loss_terms(parts.model, params, batch, jax.random.key(0))
    else:
      total, count, _, _ = parts.task.loss_terms(parts.model, params, batch, jax.random.key(0),
                                                 model_state=model_state, train=False)
    return total, count
  return jax.jit(sharding.with_rules(step, parts.mesh, parts.rules))


def check_finite(step: int, metrics, nonfinite_grads) -> None:
  if bool(metrics["finite"]):
    return
  bad = [k for k, v in nonfinite_grads.items() if bool(v)]
  if bad:
    where = f"non-finite gradients in {len(bad)} parameter(s), first {bad[:5]}"
  elif np.isfinite(float(metrics["loss"])):
    where = (f"loss and gradients are finite but the update is not "
             f"(update_norm={float(metrics['update_norm'])}): check optim.lr")
  else:
    where = "the loss is not finite but its gradients are"
  raise NonFiniteError(
      f"Non-finite training step {step}: loss={float(metrics['loss'])}, "
      f"grad_norm={float(metrics['grad_norm'])}; {where}. Lower optim.lr or raise "
      "optim.warmup_steps, or set train.nonfinite='skip' to skip such updates.")


# ---------------------------------------------------------------------------------------
# Pretrained backbones: each `config.init.<target>` grafts a finished run's parameters.
# ---------------------------------------------------------------------------------------
class Interrupted(Exception):
  """SIGTERM stopped a backbone's pretraining (its checkpoint saved): the run that needs
  the backbone exits, and resumes the pretraining when started again."""


def backbone_recipe(init) -> ml_collections.ConfigDict:
  """The config of `configs/<init.recipe>.py:<init.variant>`, with `init.steps` (if not
  -1) as its `train.steps`."""
  recipe = importlib.import_module(f"mmjax.configs.{init['recipe']}").get_config(
      init.get("variant") or None)
  steps = init.get("steps", -1)
  if steps > 0:
    recipe.train.steps = steps
  config_lib.validate(recipe)  # the backbone's mistakes, named before any training
  return recipe


def pretrained_workdir(target: str, init) -> pathlib.Path:
  """The run behind `config.init.<target>`: `init.workdir` if given, else its recipe
  trained once and cached under a hash of its config. The cached run is used only once
  finished (`finished`); an interrupted one resumes first.

  Raises:
    Interrupted: SIGTERM stopped the backbone's pretraining.
  """
  if init.get("workdir"):
    return pathlib.Path(init["workdir"])
  recipe = backbone_recipe(init)
  digest = hashlib.sha256(recipe.to_json(sort_keys=True).encode()).hexdigest()[:12]
  workdir = cli.cache_root() / "backbones" / f"{init['recipe']}-{digest}"
  if not finished(workdir, recipe):
    print(f"Pretraining '{target}' with configs/{init['recipe']}.py:"
          f"{init.get('variant') or 'tiny'} for {recipe.train.steps} steps (cached in "
          f"{workdir}).", flush=True)
    run(recipe, workdir)
    if not finished(workdir, recipe):
      raise Interrupted(f"The pretraining of '{target}' was stopped and is saved in "
                        f"{workdir}; the same command resumes it.")
  return workdir


def load_pretrained(params: dict, config, loaded: set[str] | None = None,
                    model_state: dict | None = None) -> dict:
  """`params` with each `config.init.<target>` subtree replaced by its backbone's
  (`init.steps=0`: left as initialised); the '/'-joined paths of the parameters taken from
  a backbone are added to `loaded`. The backbone's non-parameter collections (BatchNorm
  statistics) replace the same subtrees of `model_state`'s, in place."""
  for target, init in (config.get("init") or {}).items():
    if not init.get("workdir") and init.get("steps", -1) == 0:
      print(f"Left '{target}' as initialised (config.init.{target}.steps=0).", flush=True)
      continue
    workdir = pretrained_workdir(target, init)
    field = f"config.init.{target}"
    try:
      backbone = checkpoints.load(workdir)
      source = backbone.params
      parts = list(filter(None, init.get("source", "").split("/")))
      for part in parts:
        if part not in source:
          raise cli.UserError(f"has no {part!r} subtree to take as {field}.source; it "
                              f"has {sorted(source)}")
        source = source[part]
      for name, collection in backbone.model_state.items():
        for part in parts:
          collection = collection.get(part, {})
        if collection and model_state is not None and name in model_state:
          model_state[name] = checkpoints.graft(model_state[name], target, collection,
                                                origin=f"the {name} of {workdir}")
      if init.get("drop"):
        source = checkpoints.tree_params({
            k: v for k, v in checkpoints.flat_params(source).items()
            if not re.search(init["drop"], k)})
      params = checkpoints.graft(params, target, source, may_stay_new=config.trainable,
                                 origin=f"the checkpoint of {workdir}")
      if loaded is not None:
        loaded.update(f"{target}/{k}" for k in checkpoints.flat_params(source))
    except (FileNotFoundError, ValueError) as e:  # no checkpoint there, or not this model's
      raise cli.UserError(f"{field} ({workdir}): {e}") from e
    print(f"Initialised '{target}' from {workdir}.", flush=True)
  return params


# ---------------------------------------------------------------------------------------
# A finished run: every step trained and evaluated.
# ---------------------------------------------------------------------------------------
FINISHED = "finished.json"


def finished(workdir: str | pathlib.Path, config) -> dict | None:
  """What `run` recorded when it completed `config.train.steps` (or more) and the final
  evaluation, else None: `{"step", "time", "metrics"}`. A record whose checkpoint has
  been removed since does not count."""
  path = pathlib.Path(workdir) / FINISHED
  if not path.exists():
    return None
  record = json.loads(path.read_text())
  saved = (pathlib.Path(workdir) / "checkpoints" / str(record["step"])).exists()
  return record if saved and record["step"] >= config.train.steps else None


def mark_finished(workdir: pathlib.Path, step: int, metrics: dict) -> None:
  if jax.process_index() == 0:
    record = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "metrics": metrics}
    tmp = workdir / f"{FINISHED}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(workdir / FINISHED)  # atomic: a marker is whole or absent


# ---------------------------------------------------------------------------------------
# Logging.
# ---------------------------------------------------------------------------------------
class MetricsLog:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl`, writes the same
  scalars as TensorBoard events under `workdir/tensorboard`, and prints a progress line.
  Throughput is measured over the steps since the previous log line (the first window
  includes compilation); tokens are input tokens, padding included. With several
  processes, process 0 writes the files for all."""

  def __init__(self, workdir: pathlib.Path, total_steps: int, start_step: int,
               examples_per_step: int, tokens_per_step: int):
    self.path = workdir / "metrics.jsonl"
    self.events = (tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
                   if jax.process_index() == 0 else None)
    self.total = total_steps
    self.examples, self.tokens = examples_per_step, tokens_per_step
    self.last_step, self.last_time = start_step, time.perf_counter()

  def write(self, step: int, values: dict[str, float]) -> None:
    if self.events is None:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **values}) + "\n")
    for name, value in values.items():
      self.events.add_scalar(name, value, step)
    self.events.flush()

  def close(self) -> None:
    if self.events is not None:
      self.events.close()

  def throughput(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return {"steps_per_s": steps_per_s, "examples_per_s": steps_per_s * self.examples,
            "tokens_per_s": steps_per_s * self.tokens}

  def progress(self, step: int, values: dict[str, float]) -> None:
    eta = (self.total - step) / max(values["steps_per_s"], 1e-9)
    terms = "".join(f" {k[5:]} {v:.4f}" for k, v in values.items() if k.startswith("loss/"))
    terms = f" ({terms[1:]})" if terms else ""
    print(f"step {step}/{self.total} | loss {values['loss']:.4f}{terms} | lr {values['lr']:.2e} | "
          f"grad_norm {values['grad_norm']:.3f} | {values['examples_per_s']:.1f} ex/s "
          f"{values['tokens_per_s']:.0f} tok/s | ETA {cli.duration(eta)}",
          flush=True)


# ---------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        devices=None) -> dict[str, float]:
  """Trains `config` in `workdir` on `devices` (default: all), resuming from its latest
  checkpoint, whatever mesh saved it, then evaluates it and records it as finished
  (`finished`); returns the last logged metrics. A finished run is not trained or
  evaluated again: its recorded metrics are returned.

  SIGTERM saves a checkpoint and returns; during the evaluation, it stops it between
  episodes' batches (the next run evaluates the saved checkpoint); during a backbone's
  pretraining, it saves the backbone's checkpoint and raises `Interrupted`.

  Raises:
    cli.UserError: the config is invalid (`mmjax.config.validate`), or a backbone or
      data source it names cannot be used.
  """
  workdir = pathlib.Path(workdir)
  config_lib.validate(config, process_count=jax.process_count(),
                      num_devices=len(jax.devices() if devices is None else devices))
  done = finished(workdir, config)
  if done:
    print(f"{workdir} is finished: trained for {done['step']} steps and evaluated "
          f"({done['time']}); nothing to do. `python -m mmjax.evaluate "
          f"--workdir={workdir}` evaluates it again.", flush=True)
    return done["metrics"]
  workdir.mkdir(parents=True, exist_ok=True)
  # Installed first, so that a SIGTERM while backbones are loaded or the step compiles
  # is also answered by a checkpoint (a backbone's own run installs its own meanwhile).
  stop = {"requested": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
  try:
    return _train(config, workdir, devices, stop)
  finally:
    signal.signal(signal.SIGTERM, previous)


def _train(config, workdir: pathlib.Path, devices, stop: dict) -> dict[str, float]:
  health = DataHealth()
  train_data = make_data(config, seed=config.seed, health=health)
  iterator = iter(train_data)

  manager = checkpoints.manager(workdir, keep=config.train.keep_checkpoints)
  parts = build(config, devices)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  print(f"{config.task}: {count(parts.abstract['params']):,} trainable and "
        f"{count(parts.abstract['frozen']):,} frozen parameters on a mesh "
        f"{dict(parts.mesh.shape)}.", flush=True)
  # A resumed run gets every parameter from its newest readable and verified checkpoint,
  # resharded; a checkpoint of another model is refused naming what differs.
  config_dict = json.loads(config.to_json_best_effort())
  resumed = checkpoints.restore_latest(manager, parts.abstract, iterator, config=config_dict)
  start, state = (resumed.step, resumed.state) if resumed else (0, init_state(config, parts))
  if jax.process_index() == 0:  # after the check above, which compares with the old one
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  def checkpoint_meta() -> dict:
    # Saved with every checkpoint, returned by `checkpoints.restore_latest` as
    # `resumed.meta`. Whatever else a resumed run needs back goes here too.
    return {"config": config_dict}

  train_step = make_train_step(config, parts)
  eval_step = make_eval_step(parts)
  batch_sharding = sharding.batch_sharding(parts.mesh, parts.rules)
  log = MetricsLog(workdir, config.train.steps, start, config.data.batch_size,
                   config.data.batch_size * config.data.seq_len)
  should_stop = lambda: stop["requested"]
  last: dict[str, float] = {}
  try:
    step = start
    while step < config.train.steps:
      if stop["requested"]:
        checkpoints.save(manager, step, state, iterator, meta=checkpoint_meta())
        manager.wait_until_finished()
        print(f"SIGTERM: saved the checkpoint at step {step}; exiting.", flush=True)
        return last
      batch = sharding.global_batch(next(iterator), batch_sharding)
      state, metrics, nonfinite_grads = train_step(state, batch)
      if config.train.nonfinite == "abort":
        check_finite(step + 1, metrics, nonfinite_grads)
      step += 1
      if step % config.train.log_every == 0 or step == config.train.steps:
        values = {k: float(v) for k, v in metrics.items()}
        values.update(log.throughput(step))
        values.update({f"data/{k}": v for k, v in health.counts().items()})
        log.write(step, values)
        log.progress(step, values)
        last = values
      if step % config.train.checkpoint_every == 0 or step == config.train.steps:
        checkpoints.save(manager, step, state, iterator, meta=checkpoint_meta())
      try:  # a SIGTERM stops these evaluations; the loop's next turn saves and exits
        if config.train.eval_every and step % config.train.eval_every == 0:
          last["eval_loss"] = evaluate_loss(config, eval_step, state, batch_sharding,
                                            should_stop)
          log.write(step, {"eval_loss": last["eval_loss"]})
          print(f"step {step}: eval loss {last['eval_loss']:.4f}", flush=True)
        every = config.train.get("few_shot_every")
        if config.get("evaluate") and every and step % every == 0 and step < config.train.steps:
          results = evaluate.evaluate(config, merge_params(state["params"], state["frozen"]),
                                      should_stop=should_stop,
                                      model_state=state.get("model_state"))
          log.write(step, few_shot_scalars(results.scores))
          print(f"step {step}: few-shot evaluation\n{evaluate.format_table(results.scores)}",
                flush=True)
      except evaluate.Stopped:
        continue
    manager.wait_until_finished()
    if config.get("evaluate"):
      try:
        results = evaluate.evaluate(
            config, merge_params(state["params"], state["frozen"]), should_stop=should_stop,
            model_state=state.get("model_state"))
      except evaluate.Stopped:
        print(f"SIGTERM: stopped the final evaluation; the checkpoint at step {step} is "
              "saved, and the same command evaluates it.", flush=True)
        return last
      last["few_shot"] = results.scores
      log.write(step, few_shot_scalars(results.scores))
      evaluate.report(results, workdir)
    mark_finished(workdir, step, last)
  finally:
    manager.close()
    log.close()
  return last


def few_shot_scalars(results: dict) -> dict[str, float]:
  """`{"few_shot/<task>/<metric>/<k>shot": value}` of an `evaluate.evaluate` result's
  scores."""
  return {f"few_shot/{task}/{metric}/{k}shot": value
          for task, by_shots in results.items() for k, metrics in by_shots.items()
          for metric, value in metrics.items()}


def evaluate_loss(config, eval_step, state, batch_sharding, should_stop=lambda: False
                  ) -> float:
  """Mean loss over the first `train.eval_batches` batches of `data.eval_datasets`.

  Raises:
    evaluate.Stopped: `should_stop()` turned true (it is asked between batches).
  """
  data = make_data(config, "eval_datasets", seed=config.seed, health=DataHealth())
  total = count = 0.0
  for _, batch in zip(range(config.train.eval_batches), data, strict=False):
    if should_stop():
      raise evaluate.Stopped
    t, c = eval_step(state["params"], state["frozen"],
                     sharding.global_batch(batch, batch_sharding), state.get("model_state"))
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def main(argv):
  del argv
  with cli.native_stderr_held():  # libtpu's start-up lines on a host without TPUs
    sharding.initialize_distributed()
    jax.devices()
  try:
    run(flags.FLAGS.config, flags.FLAGS.workdir)
  except Interrupted as e:  # SIGTERM during a backbone's pretraining: a clean exit
    print(f"SIGTERM: {e}", flush=True)


if __name__ == "__main__":
  # Defined here, not at import, so that other entry points can import the trainer.
  config_lib.define_flag()
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the config go here.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main, flags_parser=config_lib.parse_flags)
