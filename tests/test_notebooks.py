"""The notebooks in colabs/ run top to bottom, as CI runs them, and are stored without outputs.

Each notebook is executed by nbclient in a fresh temporary working directory, on a Jupyter kernel
that runs this interpreter (so it sees the same virtualenv and the editable install), and any
cell error fails its test. ``pytest tests/test_notebooks.py -s`` prints each notebook's time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLABS = Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
KERNEL_NAME = "autosparse-jax-test"
CELL_TIMEOUT_S = 600


def test_notebooks_exist():
  names = {p.name for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "gradient_annealing.ipynb", "inspect_run.ipynb"} <= names


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory) -> str:
  """A kernelspec that starts ipykernel with ``sys.executable``, found first on JUPYTER_PATH."""
  root = tmp_path_factory.mktemp("jupyter")
  spec_dir = root / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": f"Python 3 ({sys.executable})",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JUPYTER_PATH", str(root))
    yield KERNEL_NAME


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_clean(path):
  """Outputs are not committed, and the first code cell is the install cell."""
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs"
  assert "%pip install" in code[0].source, f"{path.name}: the first code cell must install"
  assert "untime" in nb.cells[0].source, f"{path.name}: the first cell must state the runtime"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_name, tmp_path):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name=kernel_name,
    resources={"metadata": {"path": str(tmp_path)}},
  )
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError on the first cell that fails
  print(f"\n{path.name}: executed in {time.perf_counter() - start:.1f}s")
