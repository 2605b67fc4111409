"""The command lines: a user's mistake is one clear paragraph on stderr, no traceback, exit
status 2, before any work is done."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
FLAMINGO = f"--config={ROOT / 'configs/flamingo.py'}"

CASES = {
    "train: an enumerated value": (
        ["mmjax.train", FLAMINGO, "--workdir={tmp}", "--config.train.nonfinite=abortt"],
        "config.train.nonfinite='abortt' is not one of ('abort', 'skip')"),
    "train: a value out of range": (
        ["mmjax.train", FLAMINGO, "--workdir={tmp}", "--config.train.log_every=0"],
        "config.train.log_every=0 must be >= 1"),
    "train: a misspelt field": (
        ["mmjax.train", FLAMINGO, "--workdir={tmp}", "--config.train.stepz=3"],
        "config.train has no field 'stepz' (did you mean 'steps'?)"),
    "train: a field of a missing entry": (
        ["mmjax.train", FLAMINGO, "--workdir={tmp}", "--config.init.llm.workdir=/x"],
        "--config.init.llm.workdir: config.init has no 'llm' (did you mean 'lm'?"),
    "train: an unknown variant": (
        ["mmjax.train", f"{FLAMINGO}:huge", "--workdir={tmp}"],
        "Unknown flamingo variant 'huge'; choose from"),
    "train: a missing config file": (
        ["mmjax.train", "--config=configs/flamingoo.py", "--workdir={tmp}"],
        "--config: cannot read the config file"),
    "train: a flag value of the wrong type": (
        ["mmjax.train", FLAMINGO, "--workdir={tmp}", "--config.train.steps=many"],
        "flag --config.train.steps=many: invalid literal for int()"),
    "evaluate: a directory without a run": (
        ["mmjax.evaluate", "--workdir={tmp}"], "expected a run's workdir or a converted checkpoint"),
    "compile: an unknown topology": (
        ["mmjax.compile", FLAMINGO, "--topology=h100-8"], "Unknown TPU topology 'h100-8'"),
    "summary: a model field that does not exist": (
        ["mmjax.summary", FLAMINGO, "--config.model.lm.widht=8"],
        "config.model.lm (LMConfig) has no field 'widht' (did you mean 'width'?)"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_mistake_is_one_paragraph_without_a_traceback(name, tmp_path):
  module, *args = CASES[name][0]
  args = [a.replace("{tmp}", str(tmp_path / "run")) for a in args]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  assert result.stderr.startswith("error: "), result.stderr
  assert "\n\n" not in result.stderr.strip(), result.stderr  # one paragraph
  assert CASES[name][1] in result.stderr, result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_native_library_chatter_is_held_and_shown_only_on_failure(capfd):
  """What libtpu prints at start-up on a host without TPUs is written to file descriptor 2
  by native code; it stays off the console unless the block fails."""
  from mmjax import cli
  with cli.native_stderr_held():
    os.write(2, b"E0000 common_lib.cc:554] INVALID_ARGUMENT: worker hostnames\n")
  assert capfd.readouterr().err == ""
  with pytest.raises(RuntimeError), cli.native_stderr_held():
    os.write(2, b"E0000 the reason it failed\n")
    raise RuntimeError("no backend")
  assert "E0000 the reason it failed" in capfd.readouterr().err
