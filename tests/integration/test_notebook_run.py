"""The Colab notebook run headless, as CI runs it: papermill sets the parameters cell to the tiny test model
and data (no install, no network) and every cell must succeed, leaving a model directory behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import CLI_ENV, ROOT

NOTEBOOK = ROOT / "notebooks" / "chattune_colab.ipynb"


def test_notebook_runs_headless_and_leaves_a_model(model_dir, ultrachat_dir, tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    # the kernel inherits this environment: offline, and `chattune` from this interpreter's environment
    for key, value in CLI_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "chat-tiny"
    ran = tmp_path / "ran.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(ran), cwd=str(tmp_path), kernel_name="python3", progress_bar=False,
        parameters=dict(model=str(model_dir), dataset=str(ultrachat_dir), train_split="train_gen",
                        eval_split="test_gen", max_steps=2, output_dir=str(out), eval_samples=8, chat_tokens=8,
                        install=False, config=str(ROOT / "configs" / "tutorial.yaml"), hub_repo=""))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chattune.yaml", "report.md"):
        assert (out / name).is_file(), name
    text = "\n".join(o.get("text", "") for c in nbformat.read(ran, as_version=4).cells if c.cell_type == "code"
                     for o in c.outputs)
    assert "training precision: fp32" in text  # the device cell
    assert "dry run:" in text and (tmp_path / "chat-tiny-upload-preview" / "README.md").is_file()  # no token: no push
