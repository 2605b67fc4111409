"""Running an evaluation: tasks x shots x trials for a model's parameters, the table, and
`eval.json` with every prediction beside the scores."""

import dataclasses
import importlib
import json
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from mmjax import cli, decoding, peft
from mmjax.data import shapes_world as sw
from mmjax.data.sources import resize_center_crop
from mmjax.data.tokenizer import make_tokenizer
from mmjax.evaluate import (benchmarks, instruct, prompt_learning, prompts, rices, scoring,
                            shapes, zeroshot)
from mmjax.evaluate import protocol as protocol_lib
from mmjax.evaluate.tasks import FewShotTask, max_prompt_images
from mmjax.evaluate.prompts import encode_prompts
from mmjax.models import lm as lm_model
from mmjax.models.flamingo import FlamingoConfig
from mmjax.tasks import blip2 as blip2_task
from mmjax.tasks import flamingo as flamingo_task
from mmjax.tasks import lm as lm_task
from mmjax.tasks import model_config


class Stopped(Exception):
  """The evaluation was asked to stop (`should_stop`), e.g. by SIGTERM during training."""


@dataclasses.dataclass
class Results:
  """`scores[task][shots][metric]` (the mean over trials, with `_std` over trials and `_se`
  over test examples), `predictions[task][shots]`: one record per test example and trial,
  and `info`: the protocol and each cell's evaluation time."""

  scores: dict = dataclasses.field(default_factory=dict)
  predictions: dict = dataclasses.field(default_factory=dict)
  info: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return {"scores": self.scores, "info": self.info, "predictions": self.predictions}


def protocol_of(config: ml_collections.ConfigDict) -> protocol_lib.Protocol:
  e = config.evaluate
  return protocol_lib.Protocol(
      shots=tuple(int(k) for k in e.shots), trials=e.get("trials", 1), seed=e.seed,
      num_samples=e.episodes, query_set_size=e.get("query_set_size", 2048),
      demos=e.get("demos", "random"))


SHAPES_TASKS = ("naming", "vqa", "captioning")


def make_tasks(config: ml_collections.ConfigDict, names: Sequence[str],
               protocol: protocol_lib.Protocol, params=None) -> list:
  """The tasks `names` of a run with `config`: the shapes-world ones (`SHAPES_TASKS`), or
  benchmarks read from `config.evaluate.data_dir/<name>` (`benchmarks.LAYOUTS`), with the
  prompt formats `config.evaluate.formats` names (`{task: prompts.FORMATS key}`). With
  `demos="rices"`, demonstrations are retrieved with `config.evaluate.rices_tower` (a
  CLIP run or converted checkpoint) or else the run's own vision tower in `params`."""
  e = config.evaluate
  image_size = config.data.get("image_size", 64)
  world = sw.ShapesWorld(seed=e.seed, image_size=image_size)
  tasks = []
  for name in names:
    if name == "naming":
      tasks.append(shapes.NamingTask(world, ways=e.get("ways", 4),
                                     with_colour=config.task == "lm"))
    elif name in ("vqa", "captioning"):
      tasks.append(shapes.example_task(world, name, protocol))
    else:
      tasks.append(benchmarks.make_task(name, e.get("data_dir", ""), image_size))
  for task in tasks:  # a published setting's prompts, by name (prompts.FORMATS)
    if isinstance(task, FewShotTask) and task.name in e.get("formats", {}):
      task.format = prompts.prompt_format(e.formats[task.name])
  if protocol.demos == "rices":
    encoder = (rices.load_clip_image_encoder(e.rices_tower) if e.get("rices_tower")
               else rices.clip_image_encoder(model_config(FlamingoConfig, config).vision,
                                             params["vision"]))
    for task in tasks:
      if isinstance(task, FewShotTask):
        task.demo_fn = rices_demo_fn(task, encoder, cli.cache_root() / "rices")
  return tasks


def rices_demo_fn(task: FewShotTask, encoder: rices.ClipImageEncoder, cache_dir
                  ) -> protocol_lib.DemoFn:
  """Each test example's demonstrations: the `k` training examples whose images are the
  most similar to its own (over the whole training split, as OpenFlamingo retrieves them),
  the most similar last."""
  by_key = {item.image_key or item.id: item for item in task.support}
  size = encoder.image_size
  load = lambda items: np.stack([_sized(item.image(), size) for item in items])
  retrieval = rices.Rices(encoder, [item.image_key or item.id for item in task.support],
                          lambda keys: load([by_key[k] for k in keys]), cache_dir=cache_dir)

  def demos(query_set, tests, k, rng):
    del query_set, rng
    return retrieval.find(load([task.test[i] for i in tests]), k)

  return demos


def _sized(image: np.ndarray, size: int) -> np.ndarray:
  return image if image.shape[0] == size else resize_center_crop(Image.fromarray(image), size)


class Progress:
  """Queries done, elapsed time and ETA on stderr: a line at most every `every` seconds
  and at the end of each cell."""

  def __init__(self, total: int, every: float = 10.0, enabled: bool = True):
    self.total, self.done, self.every, self.enabled = total, 0, every, enabled
    self.start = self.last = time.monotonic()

  def update(self, n: int, label: str, force: bool = False):
    self.done += n
    now = time.monotonic()
    if not self.enabled or (not force and now - self.last < self.every):
      return
    self.last = now
    elapsed = now - self.start
    eta = elapsed * (self.total - self.done) / max(self.done, 1)
    print(f"evaluation: {label}, {self.done}/{self.total} queries "
          f"({100 * self.done / self.total:.0f}%), {cli.duration(elapsed)} so far, "
          f"ETA {cli.duration(eta)}", file=sys.stderr, flush=True)


def _batches(prompts: list, batch_size: int):
  """Fixed-size batches (the last one padded by repeating its last prompt) and their real
  sizes: one compilation for every batch."""
  for start in range(0, len(prompts), batch_size):
    batch = prompts[start:start + batch_size]
    yield batch + [batch[-1]] * (batch_size - len(batch)), len(batch)


def _model_fns(config, params):
  """`(answer, rank, tokenizer)` for the run's model: a Flamingo's generation and class
  ranking, or a text-only LM's next tokens (images ignored)."""
  tokenizer = make_tokenizer(config)
  if config.task == "lm":
    model = peft.from_config(config, lm_task.build_model(config))

    @jax.jit
    def next_token(tokens, lengths):
      return lm_model.generate(model, params, tokens, lengths, jax.random.key(0),
                               max_new_tokens=1, pad_id=tokenizer.pad_id).tokens

    def answer(params_, prompts, length, max_images, task="", max_new_tokens=None):
      del params_, max_images, task, max_new_tokens
      tokens, lengths = encode_prompts(tokenizer, [p.text for p in prompts], length)
      return [tokenizer.decode(row).strip() for row in np.asarray(next_token(tokens, lengths))]

    return answer, None, tokenizer
  e = config.evaluate
  beams = (decoding.BeamConfig(e.num_beams, e.get("length_penalty", 0.0))
           if e.get("num_beams", 1) > 1 else None)
  if config.task == "blip2":
    model = peft.from_config(config, blip2_task.build_model(config))
    return scoring.make_answer_fn(model, tokenizer, e.max_new_tokens, beams), None, tokenizer
  model = peft.from_config(config, flamingo_task.build_model(config))
  answer = scoring.make_answer_fn(model, tokenizer, e.max_new_tokens, beams)
  return answer, scoring.make_rank_fn(model, tokenizer), tokenizer


def evaluate(config: ml_collections.ConfigDict, params, *, tasks: Sequence[str] | None = None,
             should_stop: Callable[[], bool] = lambda: False, progress: bool = True,
             model_state: dict | None = None) -> Results:
  """Evaluates a Flamingo, LM or BLIP-2 run's `params` few-shot, or a contrastive (CLIP)
  run's zero-shot (`mmjax.evaluate.zeroshot`), on `tasks` (default
  `config.evaluate.tasks`) with the protocol of `config.evaluate`.

  Raises:
    Stopped: `should_stop()` turned true; it is asked before each batch.
  """
  protocol = protocol_of(config)
  if config.task in ("clip", "medclip"):
    return _evaluate_contrastive(config, params, tasks, protocol, should_stop, progress,
                                 model_state)
  if config.task == "coop":
    return _evaluate_prompt_learning(config, params, tasks, protocol)
  if config.task == "llava":
    return _evaluate_instruct(config, params, tasks, protocol, should_stop, progress)
  if config.task in HELD_OUT:
    return _evaluate_held_out(config, params, tasks, protocol, should_stop, progress,
                              model_state)
  names = list(tasks or config.evaluate.get("tasks", SHAPES_TASKS))
  if config.task == "lm" and set(names) != {"naming"}:
    raise ValueError(f"A language model is evaluated on the text of the naming task only "
                     f"(--tasks=naming), not on {sorted(set(names) - {'naming'})}.")
  answer, rank, tokenizer = _model_fns(config, params)
  batch_size = config.evaluate.get("batch_size", 32)
  built = [(task, task.cells(protocol))
           for task in make_tasks(config, names, protocol, params)]
  bar = Progress(sum(len(c.prompts) for _, cells in built for c in cells), enabled=progress)
  results = Results(info={"protocol": dataclasses.asdict(protocol), "seconds": {}})
  for task, cells in built:
    length = max(len(tokenizer.encode(p.text, bos=True)) for c in cells for p in c.prompts)
    max_images = max_prompt_images(cells)
    by_shots: dict[int, list] = {}
    for cell in cells:
      start, outputs = time.monotonic(), []
      for batch, n in _batches(cell.prompts, batch_size):
        if should_stop():
          raise Stopped
        if task.mode == "rank":
          out = rank(params, batch, length, max_images, task.classes, task.rank_prefix)
        else:
          out = answer(params, batch, length, max_images, task.name, task.max_new_tokens)
        outputs += list(out[:n])
        bar.update(n, f"{task.name} {cell.shots}-shot")
      scores, per_example = task.score(cell, outputs)
      by_shots.setdefault(cell.shots, []).append((cell, scores, per_example))
      seconds = results.info["seconds"].setdefault(task.name, {})
      seconds[cell.shots] = seconds.get(cell.shots, 0.0) + time.monotonic() - start
    if getattr(task, "tokenizer", ""):  # captioning: "ptb", or "simple" without Java
      results.info.setdefault("caption_tokenizer", {})[task.name] = task.tokenizer
    results.scores[task.name], results.predictions[task.name] = {}, {}
    for k, trials in by_shots.items():
      per_example = {name: np.concatenate([np.asarray(t[2][name], np.float64) for t in trials])
                     for name in trials[0][2] if name not in ("prediction", "answer")}
      results.scores[task.name][k] = protocol_lib.aggregate([t[1] for t in trials], per_example)
      results.predictions[task.name][k] = [
          {"trial_seed": cell.seed, "id": i, "prompt": p.text, "target": _jsonable(target),
           **{name: _jsonable(v[j]) for name, v in ex.items()}}
          for cell, _, ex in trials
          for j, (i, p, target) in enumerate(zip(cell.ids, cell.prompts, cell.targets,
                                                 strict=True))]
  return results


def _evaluate_contrastive(config, params, tasks, protocol, should_stop, progress,
                          model_state) -> Results:
  evaluation = zeroshot.Evaluation(
      config, params, list(tasks or config.evaluate.get("tasks", zeroshot.TASKS)), protocol,
      model_state)
  bar = Progress(evaluation.size, enabled=progress)

  def step(n: int, label: str) -> None:
    if should_stop():
      raise Stopped
    bar.update(n, label)

  scores, predictions, info = evaluation.run(step)
  return Results(scores, predictions, {"protocol": dataclasses.asdict(protocol), **info})


def _check_single_task(config, tasks, task: str, what: str) -> None:
  """Refuses `tasks` (default `config.evaluate.tasks`) other than the one `task` a run of
  its kind is evaluated on; `what` says on what."""
  names = list(tasks or config.evaluate.get("tasks", (task,)))
  if names != [task]:
    raise cli.UserError(f"{what} (--tasks={task}), not on {names}.")


def _single_task_results(task: str, total: int, run, protocol, should_stop, progress
                         ) -> Results:
  """`run(step)` -> `(scores, predictions)` of one task with a progress bar over `total`
  items (`step(n, label)` after each batch; it raises `Stopped` when `should_stop()`),
  as `Results` with the time it took."""
  bar = Progress(total, enabled=progress)
  start = time.monotonic()

  def step(n: int, label: str) -> None:
    if should_stop():
      raise Stopped
    bar.update(n, label)

  scores, predictions = run(step)
  return Results({task: {0: scores}}, {task: {0: predictions}},
                 {"protocol": dataclasses.asdict(protocol),
                  "seconds": {task: {0: time.monotonic() - start}}})


def _evaluate_instruct(config, params, tasks, protocol, should_stop, progress) -> Results:
  _check_single_task(config, tasks, instruct.TASK,
                     "A LLaVA run is evaluated on held-out conversations")
  items = instruct.questions(config, config.evaluate.episodes)
  return _single_task_results(
      instruct.TASK, len(items), lambda step: instruct.evaluate(config, params, items,
                                                                step=step),
      protocol, should_stop, progress)


# Runs evaluated on one held-out task of their own: config.task -> (the module in
# mmjax.evaluate, with TASK, count(config) and evaluate(config, params, model_state, step=)),
# and what the task scores.
HELD_OUT = {"mmbcd": ("classify", "An MMBCD run is evaluated on held-out cases"),
            "vqvae": ("reconstruct", "A VQ-VAE run is evaluated on held-out clips"),
            "segment": ("segment", "A segmentation run is evaluated on held-out labelled "
                                   "frames")}


def _evaluate_held_out(config, params, tasks, protocol, should_stop, progress,
                       model_state) -> Results:
  name, what = HELD_OUT[config.task]
  # Imported here: these modules read the data pipeline.
  module = importlib.import_module(f"mmjax.evaluate.{name}")
  _check_single_task(config, tasks, module.TASK, what)
  return _single_task_results(
      module.TASK, module.count(config),
      lambda step: module.evaluate(config, params, model_state, step=step),
      protocol, should_stop, progress)


def _evaluate_prompt_learning(config, params, tasks, protocol) -> Results:
  _check_single_task(config, tasks, "base_to_new",
                     "A prompt-learning run is evaluated base-to-new")
  start = time.monotonic()
  scores = prompt_learning.evaluate_run(config, params)
  return Results({"base_to_new": {0: scores}}, {},
                 {"protocol": dataclasses.asdict(protocol),
                  "seconds": {"base_to_new": {0: time.monotonic() - start}}})


def _jsonable(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, sw.NamingEpisode):
    return value.answer
  return value


# Rows of the table: (task, metric) in this order when present; others follow.
ORDER = ("accuracy", "chance", "ceiling", "colour", "CIDEr", "BLEU-4", "top1", "top5",
         "base", "new", "h",
         "roc_auc", "f1", "nll", "nll_scaled", "ece", "ece_scaled", "temperature",
         *(f"{direction}/R@{k}" for direction in ("image_to_text", "text_to_image")
                      for k in zeroshot.RECALL_AT))


def format_table(scores: dict) -> str:
  """Tasks and metrics by rows, shots by columns; `± se` beside each per-example metric."""
  shots = sorted({int(k) for task in scores.values() for k in task})
  width = max([12] + [len(m) for task in scores.values() for cell in task.values()
                      for m in cell if not m.endswith(("_std", "_se"))])
  lines = [f"{'task':<12} {'metric':<{width}}" + "".join(f"{f'{k}-shot':>16}" for k in shots)]
  for task, by_shots in scores.items():
    metrics = {m for cell in by_shots.values() for m in cell if not m.endswith(("_std", "_se"))}
    for metric in sorted(metrics, key=lambda m: (ORDER.index(m) if m in ORDER else 99, m)):
      row = f"{task:<12} {metric:<{width}}"
      for k in shots:
        cell = by_shots.get(k, by_shots.get(str(k), {}))
        if metric not in cell:
          row += f"{'-':>16}"
          continue
        se = cell.get(f"{metric}_se")
        row += f"{cell[metric]:>9.3f}" + (f" ±{se:.3f}" if se is not None else " " * 7)
      lines.append(row)
  return "\n".join(lines)


def report(results: Results, workdir: pathlib.Path, name: str = "eval.json") -> None:
  """Prints the table and writes `workdir/<name>` (process 0 of several does both)."""
  if jax.process_index() == 0:
    print(format_table(results.scores), flush=True)
    (workdir / name).write_text(json.dumps(results.to_json(), indent=1))
    print(f"Written to {workdir / name}.", flush=True)
