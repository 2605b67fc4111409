"""Evaluating a run's (or a converted checkpoint's) directory: `python -m mmjax.evaluate`."""

import os
import pathlib
import time
from collections.abc import Sequence

import ml_collections

from mmjax import checkpoints, cli
from mmjax import config as config_lib
from mmjax.configs import blip2, clip, coop, flamingo, lm, medclip, mmbcd
from mmjax.evaluate.run import Results, evaluate, report

RECIPES = {"flamingo": flamingo, "lm": lm, "blip2": blip2}  # their evaluation settings
RECIPES["clip"] = clip  # zero-shot classification and retrieval (mmjax.evaluate.zeroshot)
RECIPES["coop"] = coop  # base-to-new accuracy (mmjax.evaluate.prompt_learning)
RECIPES["medclip"] = medclip  # findings-world zero-shot and retrieval (zeroshot)
RECIPES["mmbcd"] = mmbcd  # held-out cases and calibration (mmjax.evaluate.classify)
# Runs that carry their evaluation settings in their own config (no converted checkpoints
# to evaluate): held-out masks (mmjax.evaluate.segment).
OWN_SETTINGS = ("segment",)


def eval_config(workdir: pathlib.Path, tokenizer: str | None) -> ml_collections.ConfigDict:
  """The config a run was trained with; for a converted checkpoint (whose config.json
  holds only its task and model), its recipe's evaluation settings around its model,
  with the Hugging Face `tokenizer` directory it was converted with. A run whose config
  has no evaluation settings (a CLIP run from before its recipe had them) gets its
  recipe's."""
  from mmjax.inference import read_config  # noqa: PLC0415 (inference imports this package)
  config = read_config(workdir)
  task = config.get("task")
  if task in OWN_SETTINGS and "evaluate" in config:
    return config
  if task not in RECIPES or (task == "blip2" and not config.model.get("lm")):
    raise cli.UserError(f"The run in {workdir} (task {task!r}) has no evaluation; "
                        "Flamingo, LM and stage-2 BLIP-2 runs (few-shot), CLIP and "
                        "MedCLIP runs (zero-shot), prompt-learning runs (base-to-new), "
                        "MMBCD runs (held-out cases) and their converted checkpoints, and "
                        "segmentation runs (held-out masks) have one.")
  if "evaluate" not in config and "data" in config and task in ("clip", "coop"):
    config.evaluate = RECIPES[task].get_config().evaluate
  if "evaluate" not in config:  # a converted checkpoint
    recipe = RECIPES[task].get_config("paper" if task == "mmbcd" else None)
    recipe.model = config.model
    if task in ("clip", "medclip"):  # its images and context length, not the recipe's
      recipe.data.image_size = config.model.vision.image_size
      # CLIP: its learned context; MedCLIP: its tokenizer's 77 (BERT's 512 positions).
      recipe.data.seq_len = (config.model.text.max_len if task == "clip"
                             else min(config.model.text.max_len, 77))
    elif task == "mmbcd":  # crops at its tower's size; RoBERTa's ids unless it says
      recipe.data.regions.region_size = config.model.vision.image_size
      recipe.tokens = config.get("tokens", dict(pad=1, bos=0, eos=2))
      recipe.model.pad_id = recipe.tokens.pad
    else:
      recipe.tokens = config.get("tokens", recipe.tokens)
    config = recipe
    if tokenizer is None:
      raise cli.UserError(f"{workdir} is a converted checkpoint, whose config names no "
                          "tokenizer: pass --tokenizer=<the Hugging Face directory it was "
                          "converted from>.")
  if tokenizer is not None:
    config.tokenizer = os.fspath(tokenizer)
  return config


def evaluate_workdir(workdir: str | os.PathLike, *, tasks: Sequence[str] | None = None,
                     shots: Sequence[str] | None = None, episodes: int | None = None,
                     trials: int | None = None, demos: str | None = None,
                     tokenizer: str | None = None, progress: bool = True,
                     **settings) -> Results:
  """Evaluates the newest verified checkpoint in `workdir`; the results also go to
  `workdir/eval-<step>-<UTC time>.json`, beside earlier ones, never over them. `settings`
  set other fields of `config.evaluate` (e.g. `data_dir="/data"`).

  Raises:
    cli.UserError: `workdir` holds no run or no checkpoint, or a setting is invalid.
  """
  workdir = pathlib.Path(workdir)
  config = eval_config(workdir, tokenizer)
  e = config.evaluate
  if shots is not None:
    try:
      e.shots = tuple(int(s) for s in shots)
    except ValueError:
      raise cli.UserError(f"--shots={','.join(shots)}: shot counts are integers, e.g. "
                          "--shots=0,4,8.") from None
  with e.ignore_type():
    for key, value in dict(episodes=episodes, trials=trials, demos=demos, **settings).items():
      if value is not None:
        e[key] = value
  if tasks is not None:
    e.tasks = tuple(tasks)
  config.init = {}  # where the run's backbones came from does not matter here
  config_lib.validate(config)
  loaded = checkpoints.load(workdir)  # the newest verified step
  try:
    results = evaluate(config, loaded.params, progress=progress,
                       model_state=loaded.model_state)
  except ValueError as error:
    raise cli.UserError(str(error)) from None
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  report(results, workdir, f"eval-{loaded.step}-{stamp}.json")
  return results
