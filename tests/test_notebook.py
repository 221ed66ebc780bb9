"""notebooks/quickstart.ipynb runs top to bottom (so it cannot rot)."""

import os

import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO


def test_quickstart_notebook_executes():
  path = os.path.join(REPO, "notebooks", "quickstart.ipynb")
  nb = nbformat.read(path, as_version=4)
  os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={
      "metadata": {
          "path": REPO
      }
  }).execute()
  outputs = "".join(
      o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "removal support of target 0:" in outputs
  assert "solver iterations:" in outputs
