"""The notebooks run from top to bottom (nbclient, the ``python3`` kernel of this interpreter)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
#: Smaller settings for the test run, put in place of the notebook's own (same names).
TEST_SETTINGS = {"N_PATIENTS": "120", "EPOCHS": "2"}


def _shrink(notebook) -> None:
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for name, value in TEST_SETTINGS.items():
            cell.source = re.sub(rf"(?m)^{name} = \S+", f"{name} = {value}", cell.source)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name, tmp_path, monkeypatch):
    # The kernel inherits this environment: one thread per library (few, busy cores), the
    # simulated cohort (fast and always there), and this interpreter for the "python3" kernel.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SYNTHMED_QUICKSTART_SIMULATED", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.setenv("MPLBACKEND", "agg")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    _shrink(notebook)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    # jupyter_client starts kernels whose argv begins with "python" with sys.executable, so the
    # kernel runs in this environment (its synthmed, its ipykernel).
    assert Path(sys.executable).exists()
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the report's plots are shown inline"
    assert (tmp_path / "quickstart-report.html").exists() or name != "quickstart.ipynb"
