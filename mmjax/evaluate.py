"""Few-shot evaluation of a trained Flamingo on held-out shapes-world data.

  python -m mmjax.evaluate --workdir=/tmp/flamingo [--shots=0,1,2,4] [--episodes=64]

Reads the config in force from `workdir/config.json` and the latest checkpoint, prints
the table and writes it to `workdir/eval-<step>-<UTC time>.json`, next to the earlier
ones (the `eval.json` written at the end of training included), never over them. Tasks,
each prompted with k solved examples followed by the query and answered by greedy
generation:

  naming      2-way in-context naming: support images are named with made-up words bound
              to their colour for this episode only ("this is a red dax."); the model
              completes the query's "this is a" with a colour and a name. `accuracy`: the
              name is right, which needs the query's colour perceived and its name
              retrieved from the prompt; `colour`: the colour is right; `chance`: the
              accuracy of answering a random name seen in the support.
  vqa         question answering on held-out (shape, colour) pairs, exact match.
  captioning  captions of held-out pairs: exact match, and the fraction of the
              caption's attribute words (count, size, colour, shape) reproduced.

A language-model run (`configs/lm.py`) is evaluated on the text of the naming task: the
query's colour is written out ("... this is a red") and the model's next token must be
the name the prompt bound to it (`recall`), the skill Flamingo's naming builds on.
"""

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from mmjax import checkpoints, cli
from mmjax import config as config_lib
from mmjax.data import shapes_world as sw
from mmjax.data.sequences import right_pad
from mmjax.data.tokenizer import Tokenizer, make_tokenizer
from mmjax.models.flamingo import Flamingo, generate
from mmjax.tasks import flamingo as flamingo_task
from mmjax.tasks import lm as lm_task

IMG, EOC = sw.MEDIA_TOKEN, sw.ENDOFCHUNK_TOKEN


class Stopped(Exception):
  """The evaluation was asked to stop (`should_stop`), e.g. by SIGTERM during training."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  images: np.ndarray  # "n h w 3"
  answer: str
  colour: str = ""  # naming: the query's colour


def naming_prompts(world: sw.ShapesWorld, shots: int, episodes: int, *,
                   with_colour: bool = False) -> tuple[list[Prompt], float]:
  """Naming prompts ending at the query's "this is a" (or, `with_colour`, at its colour)."""
  prompts, chance = [], []
  for i in range(episodes):
    ep = world.naming_episode("eval", i, shots=shots, ways=2)
    text = few_shot_text([sw.naming_text(c, n) for c, n in zip(ep.support_colours,
                                                                ep.support_names, strict=True)],
                         sw.naming_text() + (f" {ep.query_colour}" if with_colour else ""))
    images = np.concatenate([ep.support_images, ep.query_image[None]])
    prompts.append(Prompt(text, images, ep.answer, ep.query_colour))
    seen = set(ep.support_names)
    chance.append(1 / len(seen) if ep.answer in seen else 0.0)
  return prompts, float(np.mean(chance))


# How examples are written, as in the recipe's training documents (`ShapesWorld.document`):
# "<image>a small red circle on the left.<|endofchunk|>",
# "<image>question: what colour is the circle? answer: red<|endofchunk|>".
def chunk_text(task: str, question: str = "", answer: str | None = None) -> str:
  """The text after one image of a "captioning" or "vqa" prompt: a solved example's, with
  its `answer` (the caption), or else the query's, which ends where the answer starts."""
  if task == "captioning":
    return answer or ""
  if task == "vqa":
    return f"question: {question} answer:" + ("" if answer is None else f" {answer}")
  raise ValueError(f"Unknown task {task!r}; expected 'captioning' or 'vqa'.")


def few_shot_text(solved: list[str], query: str) -> str:
  """`<image>` and `<|endofchunk|>` around each solved example's text, then `<image>`
  and the query's text: one `<image>` per image, in order."""
  return "".join(f"{IMG}{text}{EOC}" for text in solved) + IMG + query


def example_prompts(world: sw.ShapesWorld, shots: int, episodes: int, task: str) -> list[Prompt]:
  """VQA or captioning prompts; support examples are other held-out examples."""
  answer = lambda e: e.answer if task == "vqa" else e.caption
  prompts = []
  for i in range(episodes):
    support = [world.example("eval", 10_000 + (shots + 1) * i + j) for j in range(shots)]
    query = world.example("eval", i)
    text = few_shot_text([chunk_text(task, e.question, answer(e)) for e in support],
                         chunk_text(task, query.question))
    images = np.stack([e.image for e in support] + [query.image])
    prompts.append(Prompt(text, images, answer(query)))
  return prompts


def answer_text(tokenizer: Tokenizer, tokens: np.ndarray, length: int, task: str) -> str:
  text = tokenizer.decode(tokens[:length]).split(EOC)[0]
  if task == "naming":
    text = text.split(".")[0]
  return text.strip()


def naming_scores(answers: list[str], prompts: list[Prompt]) -> dict[str, float]:
  """Name and colour accuracy of "<colour> <name>" answers."""
  words = [a.split() for a in answers]
  return {
      "accuracy": float(np.mean([w[-1:] == [p.answer] for w, p in zip(words, prompts, strict=True)])),
      "colour": float(np.mean([w[:1] == [p.colour] for w, p in zip(words, prompts, strict=True)]))}


def encode_prompts(tokenizer: Tokenizer, texts: list[str], length: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids `"b t"` of the texts (each after BOS), right-padded to `length` or the
  longest, and their lengths `"b"`."""
  ids = [tokenizer.encode(text, bos=True) for text in texts]
  lengths = np.array([len(i) for i in ids], np.int32)
  length = max(length, int(lengths.max()))
  return np.stack([right_pad(i, length, tokenizer.pad_id) for i in ids]), lengths


def make_answer_fn(model: Flamingo, tokenizer: Tokenizer, max_new_tokens: int):
  """`(params, prompts, task, length, max_images) -> answers`: greedy generation, compiled
  once per shape; prompts are padded to `length` tokens and `max_images` images (padding
  images are masked out), so that every (task, shots) cell of an evaluation shares one
  compilation."""

  @jax.jit
  def answer(params, tokens, lengths, images, num_images):
    out = generate(model, params, tokens, lengths, jax.random.key(0), images=images,
                   num_images=num_images, max_new_tokens=max_new_tokens,
                   stop_ids=(tokenizer.endofchunk_id, tokenizer.eos_id),
                   pad_id=tokenizer.pad_id)
    return out.tokens, out.lengths

  def run(params, prompts: list[Prompt], task: str, length: int, max_images: int):
    tokens, lengths = encode_prompts(tokenizer, [p.text for p in prompts], length)
    images = np.zeros((len(prompts), max_images, 1, *prompts[0].images.shape[1:]), np.uint8)
    for i, p in enumerate(prompts):
      images[i, :len(p.images), 0] = p.images
    num_images = np.array([len(p.images) for p in prompts], np.int32)
    tokens_out, lengths_out = map(np.asarray, answer(params, tokens, lengths, images,
                                                     num_images))
    return [answer_text(tokenizer, t, n, task)
            for t, n in zip(tokens_out, lengths_out, strict=True)]

  return run


def _is_attribute(word: str) -> bool:
  singular = {word, word.removesuffix("s"), word.removesuffix("es")}
  return (word in sw.COLOURS or word in sw.SIZES or word in sw.COUNT_WORDS
          or bool(singular & set(sw.SHAPES)))


def attribute_recall(prediction: str, reference: str) -> float:
  """Fraction of the reference caption's count/size/colour/shape words in the prediction."""
  words = [w for w in reference.rstrip(".").split() if _is_attribute(w)]
  predicted = set(prediction.rstrip(".").split())
  return float(np.mean([w in predicted for w in words])) if words else 0.0


def lm_recall(config: ml_collections.ConfigDict, params, shots: list[int],
              episodes: int, should_stop: Callable[[], bool] = lambda: False) -> dict:
  """{"naming": {shots: {"recall", "chance"}}}: the language model's next token after the
  text of a naming prompt that ends with the query's colour."""
  model = lm_task.build_model(config)
  tokenizer = make_tokenizer(config)
  world = sw.ShapesWorld(seed=config.evaluate.seed, image_size=16)  # images are not used
  apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
  cells = []
  for k in shots:
    if should_stop():
      raise Stopped
    cells.append((k, *naming_prompts(world, k, episodes, with_colour=True)))
  # Right padding leaves a causal LM's logits at the prompts' last tokens unchanged: one
  # length for every shot count, one compilation.
  length = max(len(tokenizer.encode(p.text, bos=True)) for c in cells for p in c[1])
  results = {}
  for k, prompts, chance in cells:
    if should_stop():
      raise Stopped
    tokens, lengths = encode_prompts(tokenizer, [p.text for p in prompts], length)
    logits = np.asarray(apply(jnp.asarray(tokens)))
    predicted = logits[np.arange(len(prompts)), lengths - 1].argmax(-1)
    expected = [tokenizer.word_id(p.answer) for p in prompts]
    results[k] = {"recall": float(np.mean(predicted == expected)), "chance": chance}
  return {"naming": results}


def evaluate(config: ml_collections.ConfigDict, params, *, shots=None, episodes=None,
             should_stop: Callable[[], bool] = lambda: False) -> dict:
  """{task: {shots: {metric: value}}} for a Flamingo or LM config and its parameters.

  Raises:
    Stopped: `should_stop()` turned true; it is asked before each (task, shots) cell.
  """
  e = config.evaluate
  shots = [int(s) for s in (shots or e.shots)]
  episodes = episodes or e.episodes
  if config.task == "lm":
    return lm_recall(config, params, shots, episodes, should_stop)
  model = flamingo_task.build_model(config)
  tokenizer = make_tokenizer(config)
  world = sw.ShapesWorld(seed=e.seed, image_size=config.data.image_size)
  cells = []  # (task, shots, prompts, chance)
  for k in shots:
    if should_stop():
      raise Stopped
    cells.append(("naming", k, *naming_prompts(world, k, episodes)))
    cells += [(task, k, example_prompts(world, k, episodes, task), None)
              for task in ("vqa", "captioning")]
  length = max(len(tokenizer.encode(p.text, bos=True)) for c in cells for p in c[2])
  answer = make_answer_fn(model, tokenizer, e.max_new_tokens)
  results: dict = {"naming": {}, "vqa": {}, "captioning": {}}
  for task, k, prompts, chance in cells:
    if should_stop():
      raise Stopped
    answers = answer(params, prompts, task, length, max(shots) + 1)
    if task == "naming":
      results[task][k] = {**naming_scores(answers, prompts), "chance": chance}
      continue
    exact = float(np.mean([a == p.answer for a, p in zip(answers, prompts, strict=True)]))
    results[task][k] = {"exact_match": exact}
    if task == "captioning":
      results[task][k]["attribute_recall"] = float(np.mean(
          [attribute_recall(a, p.answer) for a, p in zip(answers, prompts, strict=True)]))
  return results


def format_table(results: dict) -> str:
  shots = sorted({k for task in results.values() for k in task})
  if set(results) == {"naming"}:  # a language model's
    rows = [("naming (text)", "recall"), ("naming (text)", "chance")]
  else:
    rows = [("naming (in-context)", "accuracy"), ("naming (in-context)", "chance"),
            ("naming (in-context)", "colour"),
            ("vqa", "exact_match"), ("captioning", "exact_match"),
            ("captioning", "attribute_recall")]
  lines = [f"{'task':<20} {'metric':<17}" + "".join(f"{f'{k}-shot':>9}" for k in shots)]
  for task, metric in rows:
    key = task.split()[0]
    lines.append(f"{task:<20} {metric:<17}" + "".join(
        f"{results[key][k][metric]:>9.3f}" for k in shots))
  return "\n".join(lines)


def evaluate_workdir(workdir: str | pathlib.Path, shots=None, episodes=None) -> dict:
  """Evaluates the latest checkpoint of the run in `workdir` with the config it was
  trained with; the results also go to `workdir/eval-<step>-<UTC time>.json`.

  Raises:
    cli.UserError: `workdir` holds no run or no checkpoint, its config is invalid, or a
      shot count or episode count is.
  """
  workdir = pathlib.Path(workdir)
  try:
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  except FileNotFoundError:
    raise cli.UserError(f"{workdir} holds no training run (no config.json); give the "
                        "--workdir of a `python -m mmjax.train` run.") from None
  if config.get("task") not in ("flamingo", "lm") or "evaluate" not in config:
    raise cli.UserError(f"The run in {workdir} (task {config.get('task')!r}) has no few-shot "
                        "evaluation; Flamingo and LM recipes have one.")
  if shots is not None:
    try:
      config.evaluate.shots = tuple(int(s) for s in shots)
    except ValueError:
      raise cli.UserError(f"--shots={','.join(shots)}: shot counts are integers, e.g. "
                          "--shots=0,1,2,4.") from None
  if episodes is not None:
    config.evaluate.episodes = episodes
  config.init = {}  # where the run's backbones came from does not matter here
  config_lib.validate(config)
  step, params, _ = checkpoints.load(workdir)  # the newest verified step
  results = evaluate(config, params)
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  report(results, workdir, f"eval-{step}-{stamp}.json")
  return results


def report(results: dict, workdir: pathlib.Path, name: str = "eval.json") -> None:
  """Prints the table and writes it to `workdir/<name>` (process 0 of several does
  both)."""
  if jax.process_index() == 0:
    print(format_table(results), flush=True)
    (workdir / name).write_text(json.dumps(results, indent=2))
    print(f"Written to {workdir / name}.", flush=True)


def main(argv):
  del argv
  f = flags.FLAGS
  with cli.native_stderr_held():  # libtpu's start-up lines on a host without TPUs
    jax.devices()
  evaluate_workdir(f.workdir, shots=f.shots, episodes=f.episodes)


if __name__ == "__main__":
  # Defined here, not at import: the trainer imports this module and has its own flags.
  flags.DEFINE_string("workdir", None, "A Flamingo training run's workdir.")
  flags.DEFINE_list("shots", None, "Shot counts (default: config.evaluate.shots).")
  flags.DEFINE_integer("episodes", None, "Queries per task and shot count.", lower_bound=1)
  flags.mark_flag_as_required("workdir")
  cli.run(main)
