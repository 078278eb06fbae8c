"""The run report never fails silently (issue 11, case 16): held-out conversations longer than the model's
context are cut from the left for the sample replies (the report is written and the base model scored), and a
report that cannot be written makes `chattune train` exit non-zero with one line, after the model is saved."""

from __future__ import annotations

import json

import pytest

from chattune.artifacts import report
from chattune.cli import main

from conftest import SHARED_DATA

GLAIVE = SHARED_DATA / "glaive_toolcall_en_demo.json"


def _train_args(model_dir, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "2", "--logging-steps", "1", *map(str, extra)]


@pytest.mark.skipif(not GLAIVE.is_file(), reason="../shared/data is not present")
def test_report_on_conversations_longer_than_the_context(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # glaive's tool-calling chats run to thousands of tokens; the tiny model's context is 128, and with the tool
    # definitions in the prompt most conversations keep no assistant token: enough held out that a few do
    assert main(_train_args(model_dir, GLAIVE, out, "--eval-fraction", "0.2", "--max-eval-samples", "30")) == 0
    capsys.readouterr()
    text = (out / "report.md").read_text()
    assert "## Sample exchanges" in text and "cut from the left to leave room for the reply" in text
    assert text.count("_cut to fit the model's context: ") == 3
    assert "the tool definitions left out" in text  # they alone fill the 64 tokens a sample prompt may take
    assert "baseline" in json.loads((out / "results.json").read_text())  # the base model was scored too
    assert "| base model |" in text


def test_a_report_that_cannot_be_written_fails_the_run_after_the_model_is_saved(model_dir, ultrachat_dir, tmp_path,
                                                                                monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "_write", no_space)
    out = tmp_path / "out"
    code = main(_train_args(model_dir, ultrachat_dir, out, "--train-split", "train_gen", "--no-eval-baseline"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith(f"error: the model is saved in {out}, but its report") and "No space left" in err[-1]
    assert (out / "model.safetensors").is_file() and (out / "results.json").is_file()
