"""The notebooks run end to end on the real model with small inputs, and are stored without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_stored_without_outputs():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.real
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("GATESKIP_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("GATESKIP_NOTEBOOK_TEXTS", "2")
    monkeypatch.setenv("GATESKIP_NOTEBOOK_BLOCKS", "1")
    monkeypatch.setenv("GATESKIP_NOTEBOOK_ENTRIES", "60")
    monkeypatch.setenv("GATESKIP_NOTEBOOK_PARAGRAPHS", "24")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert any(tmp_path.glob("*.csv"))
