"""What every `python -m mmjax.<tool>` entry point shares: a mistake the user can fix is
reported as one clear message (what was wrong, where, how to fix it) instead of a
traceback, and library chatter stays off the console unless asked for.

    from mmjax import cli
    ...
    if __name__ == "__main__":
      cli.run(main)

`MMJAX_TRACEBACK=1` shows the full traceback of a `UserError` too.
"""

import os
import sys

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


def run(main) -> None:
  """`absl.app.run(main)`, with `UserError`s printed as `error: <message>` and exit
  status 2."""

  def guarded(argv):
    quiet_logging()
    try:
      return main(argv)
    except UserError as e:
      if os.environ.get("MMJAX_TRACEBACK"):
        raise
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(guarded)
