"""What every `python -m mmjax.<tool>` entry point shares: a mistake the user can fix is
reported as one clear message (what was wrong, where, how to fix it) instead of a
traceback, and library chatter stays off the console unless asked for.

    from mmjax import cli
    ...
    if __name__ == "__main__":
      cli.run(main)

`MMJAX_TRACEBACK=1` shows the full traceback of a `UserError` too.
"""

import contextlib
import os
import pathlib
import sys
import tempfile

from absl import app, flags, logging


class UserError(ValueError):
  """A mistake in what the user asked for (a flag value, a path, a checkpoint that does
  not fit): its message says what was wrong and how to fix it, and the entry points print
  it without a traceback. A `ValueError`, so library callers can catch either."""


def quiet_logging() -> None:
  """Warnings and errors only (Orbax logs every save and restore at INFO), unless the
  user set `--verbosity`."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def native_stderr_held():
  """Holds what is written to the process's stderr (native libraries too: libtpu's
  start-up lines on a host without TPUs) and shows it only if the block raises, or always
  with --verbosity."""
  if flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      sys.stderr.flush()
      os.dup2(saved, 2)
      held.seek(0)
      sys.stderr.write(held.read().decode(errors="replace"))
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def fail(message: str) -> None:
  """Prints `error: <message>` and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def run(main, flags_parser=app.parse_flags_with_usage) -> None:
  """`absl.app.run(main, flags_parser)`, with `UserError`s printed as
  `error: <message>` and exit status 2."""

  def guarded(argv):
    quiet_logging()
    try:
      return main(argv)
    except UserError as e:
      if os.environ.get("MMJAX_TRACEBACK"):
        raise
      fail(str(e))

  app.run(guarded, flags_parser=flags_parser)


def duration(seconds: float) -> str:
  """"1h02m", "3m07s" or "0m09s": a time left or spent, for progress lines."""
  seconds = round(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def cache_root() -> pathlib.Path:
  """`$MMJAX_CACHE` (default `~/.cache/mmjax`): pretrained backbones, RICES embeddings."""
  return pathlib.Path(os.environ.get("MMJAX_CACHE", "~/.cache/mmjax")).expanduser()
