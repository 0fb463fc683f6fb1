"""The Colab notebook runs top to bottom with a tiny config and shows a report."""

import os

import nbclient
import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "launch", "colab.ipynb")


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs exactly one 'parameters' cell"
  return cells[0]


def test_notebook_trains_and_shows_report(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "run"
  _parameters_cell(nb).source += (
      f"\nWORKDIR = {str(workdir)!r}\nTINY = True\n")
  try:
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3").execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"notebook cell failed: {e}")

  shown = "".join(
      out.get("data", {}).get("text/markdown", "")
      for out in nb.cells[-1].get("outputs", []))
  report = (workdir / "report.md").read_text()
  assert shown == report, "the last cell must display the run's report.md"
  assert "AUROC" in report
  assert (workdir / "metrics.jsonl").exists()
