"""Chat about an image with a LLaVA in the terminal, answers printed as they are generated.

  python -m mmjax.chat --workdir=/tmp/llava --image=photo.png
  python -m mmjax.chat --workdir=/models/llava-1.5-7b --tokenizer=/hf/llava-1.5-7b-hf \\
      --image=photo.png --temperature=0.2 --max_new_tokens=512

`--workdir` is a LLaVA run's workdir or a converted checkpoint (`mmjax.load`'s `path`);
`--tokenizer` is needed for the latter. Each line read is a question; the conversation
(`mmjax.inference.Conversation`) keeps the earlier turns and renders them with the run's
template. Commands:

  /reset        a new conversation about the same image
  /image PATH   a new conversation about another image
  /quit         leave (so does end of input, Ctrl-D)

With stdin not a terminal (a pipe or a file) questions are read line by line and no
prompt is shown, so a script can drive it: `printf 'what is it?\\n/quit\\n' | python -m
mmjax.chat ...`.
"""

import pathlib
import sys

from absl import flags

from mmjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A LLaVA run's workdir or a converted "
                               "checkpoint.", required=True)
_IMAGE = flags.DEFINE_string("image", None, "The image file to talk about.", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A Hugging Face tokenizer directory "
                                 "(needed for a converted checkpoint).")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens only.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample from the smallest set of tokens whose "
                            "probability reaches p only.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "The most tokens an answer "
                                       "gets (default: 256, fewer where the model's learned "
                                       "positions end sooner).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (each answer uses seed + its turn).")

HELP = "Commands: /reset (new conversation), /image PATH (new image), /quit."


def read_line(interactive: bool) -> str | None:
  """The next line without its newline; None at end of input."""
  if interactive:
    try:
      return input("user> ")
    except EOFError:
      print()
      return None
  line = sys.stdin.readline()
  return None if not line else line.rstrip("\r\n")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"Unexpected arguments {argv[1:]}; questions are read from stdin.")
  from mmjax import inference  # JAX only once the flags are good
  workdir = pathlib.Path(_WORKDIR.value).expanduser()
  task = inference.read_config(workdir).get("task")
  if task != "llava":  # said before anything is loaded
    raise cli.UserError(f"{workdir} holds a model of task {task!r}; mmjax.chat talks with "
                        "LLaVA runs and converted LLaVA checkpoints (task 'llava'). For the "
                        "others, use mmjax.load.")
  image = pathlib.Path(_IMAGE.value).expanduser()
  if not image.is_file():
    raise cli.UserError(f"No image file {image} (--image).")
  interactive = sys.stdin.isatty()
  with cli.native_stderr_held():
    vlm = inference.load(workdir, tokenizer=_TOKENIZER.value, step=_STEP.value)
  chat = vlm.conversation(image)
  options = {"max_new_tokens": _MAX_NEW_TOKENS.value, "temperature": _TEMPERATURE.value,
             "top_k": _TOP_K.value, "top_p": _TOP_P.value}
  if interactive:
    print(f"{vlm!r}, template {vlm.format.template}, image {image}. {HELP}")
  while (line := read_line(interactive)) is not None:
    text = line.strip()
    if not text:
      continue
    if text == "/quit":
      break
    if text == "/reset":
      chat.reset()
      print("(new conversation)", flush=True)
      continue
    if text == "/image" or text.startswith("/image "):
      path = text[len("/image"):].strip()
      if not path:
        print("(/image needs a path: /image PATH)", flush=True)
        continue
      try:
        chat.reset(path)
      except cli.UserError as error:  # a bad path mid-chat: say so, keep the old image
        print(f"error: {error}", flush=True)
        continue
      print(f"(new conversation about {path})", flush=True)
      continue
    if text.startswith("/"):
      print(f"(unknown command {text.split()[0]}; {HELP})", flush=True)
      continue
    try:
      pieces = chat.ask(text, stream=True, seed=_SEED.value + len(chat.turns) // 2, **options)
      if interactive:
        print("assistant> ", end="", flush=True)
      for piece in pieces:
        print(piece, end="", flush=True)
      print(flush=True)
    except cli.UserError as error:  # e.g. a conversation longer than the model's positions
      print(f"\nerror: {error}", flush=True)


if __name__ == "__main__":
  cli.run(main)
