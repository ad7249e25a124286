"""The notebooks under notebooks/ are stored without outputs and execute, producing their
plots and displays (nbclient, a real ipykernel).  Lint: ``ruff check notebooks`` (.ci/run)."""

import os

import nbformat
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
ALL = sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))


def test_there_are_notebooks():
    assert "analyze_run.ipynb" in ALL and "interop.ipynb" in ALL


@pytest.mark.parametrize("name", ALL)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"
        assert not cell.metadata.get("execution"), f"{name}: execution metadata stored"


def _outputs(nb, mime: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if mime in o.get("data", {})]


@pytest.mark.parametrize("name", ALL)
def test_notebook_executes(name, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    # the kernel is this interpreter (jupyter_client runs "python" kernels with sys.executable),
    # started in notebooks/ so that relative paths work as they do for a user
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    stderr = [o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stderr"]
    assert not [s for s in stderr if "Warning" in s], stderr
    if name == "analyze_run.ipynb":
        assert len(_outputs(nb, "image/png")) >= 3  # plot_telemetry, the xarray plot, plot_states
        html = "".join(o["data"]["text/html"] for o in _outputs(nb, "text/html"))
        for needed in ("CheckpointManager", "deconv-branch", "CheckpointView", "CheckpointDiff", "xarray.Dataset"):
            assert needed in html, needed
        assert "deblur-i000000000600" in html and "distance_to_last" in html  # the run states section
