"""python -m mmjax.evaluate --workdir=DIR [--tasks=...] [--shots=0,4,8] ... (see the
package docstring)."""

import jax
from absl import flags

from mmjax import cli
from mmjax.evaluate.workdir import evaluate_workdir

flags.DEFINE_string("workdir", None, "A training run's workdir, or a converted checkpoint.")
flags.DEFINE_list("tasks", None, "Tasks, e.g. naming,vqa,captioning (the shapes world) or "
                  "coco,vqav2,okvqa,imagenet,hateful_memes with --data_dir; for a CLIP "
                  "run, zeroshot,retrieval (the shapes world, or with --data_dir its "
                  "imagenet/ and coco/) (default: config.evaluate.tasks).")
flags.DEFINE_list("shots", None, "Shot counts (default: config.evaluate.shots).")
flags.DEFINE_integer("episodes", None, "Test examples per task, shot count and trial "
                     "(-1: a benchmark's whole test split).")
flags.DEFINE_integer("trials", None, "Trials, each with its own seed.", lower_bound=1)
flags.DEFINE_enum("demos", None, ["random", "rices"], "How demonstrations are chosen.")
flags.DEFINE_string("data_dir", None, "A folder holding the benchmarks' own layouts, one "
                    "subfolder per task (coco/, vqav2/, ...; see the README).")
flags.DEFINE_string("templates", None, "CLIP zero-shot: a prompt template set "
                    "(openai_imagenet, simple_imagenet, shapes_world) or a file of one "
                    "template per line with {} for the class name (default: the data's own).")
flags.DEFINE_string("prompt", None, "CLIP zero-shot: one template, e.g. 'a photo of a {}.': "
                    "the single-prompt classifier instead of the ensemble.")
flags.DEFINE_string("tokenizer", None, "A Hugging Face tokenizer directory (needed for a "
                    "converted checkpoint).")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  f = flags.FLAGS
  with cli.native_stderr_held():  # libtpu's start-up lines on a host without TPUs
    jax.devices()
  settings = {name: getattr(f, name) for name in ("data_dir", "templates", "prompt")
              if getattr(f, name)}
  if f.templates and not f.prompt:
    settings["prompt"] = ""  # the set asked for, not a single prompt the run's config names
  evaluate_workdir(f.workdir, tasks=f.tasks, shots=f.shots, episodes=f.episodes,
                   trials=f.trials, demos=f.demos, tokenizer=f.tokenizer, **settings)


if __name__ == "__main__":
  cli.run(main)
