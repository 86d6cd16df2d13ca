"""Every notebook in notebooks/ runs top to bottom at small sizes, and is stored with its outputs.

Notebooks read `SMALL = os.environ.get("PPL_NOTEBOOK_SMALL") == "1"` in their first code cell and
shrink their step and sample counts when it is set; `make notebooks` re-executes them in place at
full size.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_small_size(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PPL_NOTEBOOK_SMALL", "1")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_executed_with_a_plot(path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()]
    assert code and all(c.execution_count is not None for c in code), "run `make notebooks` before committing"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "a notebook shows a plot"
