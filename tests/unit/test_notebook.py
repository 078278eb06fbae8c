"""The committed Colab notebook: valid, outputs cleared, and a papermill `parameters` cell with what the
headless run sets (tests/integration/test_notebook_run.py executes it)."""

from __future__ import annotations

import ast

import nbformat

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "chattune_colab.ipynb"
PARAMETERS = {"model", "dataset", "train_split", "eval_split", "max_steps", "output_dir", "install", "config"}


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_first_code_cell_holds_the_parameters():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    assigned = {t.id for node in ast.parse(first.source).body if isinstance(node, ast.Assign) for t in node.targets}
    assert PARAMETERS <= assigned
