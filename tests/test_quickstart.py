"""The embedded default: built offline, trained through the same train path, scored before/after."""

from __future__ import annotations

import json

from chattune.cli import main
from chattune.quickstart import METRIC


def test_quickstart_builds_trains_and_scores(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--output-dir", str(out), "--max-steps", "40"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["metric"] == METRIC
    assert 0.0 <= report["before"] <= 1.0 and 0.0 <= report["after"] <= 1.0
    assert report["n"] > 0 and report["sample"]["question"] and "reply" in report["sample"]
    assert f"before {report['before']:.1%} -> after {report['after']:.1%}" in printed
    assert "assistant:" in printed
    # a model directory transformers loads, next to the assets it was built from
    assert (out / "model.safetensors").is_file() and (out / "base-model" / "model.safetensors").is_file()
    assert (out / "data" / "README.md").is_file()
    assert report["eval_loss_after"] < 5.0

    # a second run into the same directory replaces the earlier quickstart instead of mixing with it
    assert main(["quickstart", "--output-dir", str(out), "--max-steps", "2"]) == 0


def test_quickstart_refuses_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["quickstart", "--output-dir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").exists()
