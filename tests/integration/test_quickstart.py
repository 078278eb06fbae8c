"""The embedded default: built offline, trained through the same train path, scored before/after."""

from __future__ import annotations

import json
import re

import pytest

from chattune.cli import main
from chattune.commands.quickstart import METRIC


def independent_exact_match(out) -> float:
    """Share of held-out sums answered right, computed without chattune's scoring code."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    rows = pq.read_table(next((out / "data" / "data").glob("test_gen-*.parquet"))).to_pylist()
    right = 0
    for row in rows:
        msgs = row["messages"]
        prompt = msgs[:next(i for i, m in enumerate(msgs) if m["role"] == "assistant")]
        a, b = map(int, re.findall(r"-?\d+", prompt[-1]["content"])[:2])
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        reply = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        numbers = re.findall(r"-?\d+", reply)
        right += bool(numbers) and int(numbers[-1]) == a + b
    return right / len(rows)


def test_quickstart_builds_trains_and_scores(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--output-dir", str(out), "--max-steps", "80", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["metric"] == METRIC
    assert report["n"] == 200 and report["sample"]["question"] and "reply" in report["sample"]
    assert report["steps"] == 80 and report["seed"] == 3
    # the "after" score, recomputed independently: transformers' own greedy generate on each held-out question,
    # one at a time (chattune batches them with left padding; float rounding may flip a near-tie: 2 of 200 allowed)
    assert report["after"] == pytest.approx(independent_exact_match(out), abs=0.01)
    assert f"before {report['before']:.1%} -> after {report['after']:.1%}" in printed
    assert "assistant:" in printed
    # a model directory transformers loads, next to the assets it was built from
    assert (out / "model.safetensors").is_file() and (out / "base-model" / "model.safetensors").is_file()
    assert (out / "data" / "README.md").is_file()
    # training moved the held-out loss well below the base model's on the same tokens
    results = json.loads((out / "results.json").read_text())
    assert report["eval_loss_after"] == results["eval"]["eval_loss"] < 0.5 * results["baseline"]["eval_loss"]

    # a second run into the same directory keeps the earlier quickstart unless --overwrite, which moves it aside
    capsys.readouterr()
    assert main(["quickstart", "--output-dir", str(out), "--max-steps", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "eval.json").read_text() == json.dumps(report, indent=2)
    assert main(["quickstart", "--output-dir", str(out), "--max-steps", "2", "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("qs.replaced-")]
    assert len(aside) == 1 and json.loads((aside[0] / "eval.json").read_text()) == report
    assert json.loads((out / "eval.json").read_text())["steps"] == 2


def test_quickstart_refuses_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["quickstart", "--output-dir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").exists()
