"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient), in the
notebooks folder, on its toy settings; notebooks are committed without outputs."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the dev extra")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the dev extra")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert not any(c.outputs for c in code), f"{path.name} is committed with outputs"
  # A notebook's own run, not a run named in the environment.
  monkeypatch.delenv("MMJAX_FLAMINGO_RUN", raising=False)
  monkeypatch.delenv("MMJAX_BLIP2_RUN", raising=False)
  monkeypatch.delenv("MMJAX_CLIP_RUN", raising=False)
  monkeypatch.delenv("MMJAX_MEDCLIP_STEPS", raising=False)
  monkeypatch.delenv("MMJAX_MMBCD_STEPS", raising=False)
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError naming the cell on the first failure
  if any("display(" in c.source for c in code):
    assert any(o.output_type == "display_data" for c in code for o in c.outputs), \
        f"{path.name} displays nothing"
