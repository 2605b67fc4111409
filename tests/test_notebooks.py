"""Every notebook runs top to bottom (code cells in order, in the notebooks folder)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
  cells = json.loads(path.read_text())["cells"]
  source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
  lines = [l for l in source.splitlines() if not l.lstrip().startswith(("!", "%"))]
  monkeypatch.chdir(path.parent)
  # A notebook's own run, not a run named in the environment.
  monkeypatch.delenv("MMJAX_FLAMINGO_RUN", raising=False)
  shown = []  # `display` is a builtin of Jupyter and Colab kernels
  exec(compile("\n".join(lines), str(path), "exec"), {"__name__": "__main__",
                                                      "display": shown.append})
  if "display(" in source:
    assert shown, f"{path.name} displays nothing"
