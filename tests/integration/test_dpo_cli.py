"""The real CLI end to end: `chattune train` on an ultrachat-layout directory, then `chattune dpo` from its output on
an ultrafeedback-layout directory: a complete model directory (AutoModelForCausalLM loads it) with report.md,
the README card and TRL's reward metrics in metrics.jsonl; then `chattune eval` on the preference pairs; bad pairs
stop the run with a report before any weights load."""

from __future__ import annotations

import json

from conftest import ONE_THREAD


def test_train_then_dpo_then_eval(tmp_path, run_cli, model_dir, ultrachat_dir, ultrafeedback_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft, out = tmp_path / "sft", tmp_path / "dpo"
    r = run_cli("train", "--model", model_dir, "--dataset", ultrachat_dir, "--train-split", "train_gen",
                "--eval-split", "test_gen", "--output-dir", sft, "--max-steps", 60, "--batch-size", 8, "--lr", 3e-3,
                "--warmup", 0.1, "--no-eval-baseline", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    r = run_cli("dpo", "--model", sft, "--dataset", ultrafeedback_dir, "--output-dir", out, "--max-steps", 24,
                "--batch-size", 8, "--lr", 1e-3, "--beta", 0.1, "--logging-steps", 4, "--eval-steps", 12,
                env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "splits: train train_prefs, eval test_prefs" in r.stderr
    assert "held-out preference accuracy" in r.stderr

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if "loss" in x]
    evals = [x for x in records if "eval_loss" in x]
    assert len(train) >= 6 and [x["step"] for x in evals][:2] == [12, 24]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert key in train[-1] and f"eval_{key}" in evals[-1], key
    results = json.loads((out / "results.json").read_text())
    before, after = results["preference"]["before"], results["preference"]["after"]
    # held-out pairs move the right way: the chosen reply gains on the rejected one against the starting model
    assert after["margin"] > before["margin"] and after["reward_margin"] > 0
    report = (out / "report.md").read_text()
    assert "![Rewards of chosen and rejected replies" in report and "## Sample pairs" in report
    assert (out / "plots" / "rewards.png").is_file() and (out / "plots" / "loss.png").is_file()
    assert "- dpo" in (out / "README.md").read_text()

    r = run_cli("eval", out, "--baseline", sft, "--json", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    scored = json.loads(r.stdout)
    assert scored["pairs"] == 16 and abs(scored["preference"]["accuracy"] - after["accuracy"]) < 1e-6
    assert abs(scored["preference"]["reward_margin"] - after["reward_margin"]) < 1e-4


def test_bad_pairs_stop_with_a_report(tmp_path, run_cli, model_dir):
    from chattune.demo import assets

    good = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    rows = [good, {**good, "rejected": None}, {**good, "chosen": "   "}]
    data = assets.write_hub_layout({"train_prefs": rows, "test_prefs": [good]}, tmp_path / "bad")
    r = run_cli("dpo", "--model", model_dir, "--dataset", data, "--output-dir", tmp_path / "out", env=ONE_THREAD)
    assert r.returncode == 2, r.stderr
    assert "2 invalid row(s) of 3" in r.stderr and "train_prefs-00000-of-00001.parquet row 1: the row has no " \
                                                    "rejected reply" in r.stderr
    assert "row 2: prompt: message 1 (assistant) has empty content" not in r.stderr  # blamed on the reply
    assert "row 2: chosen: message 1 (assistant) has empty content" in r.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, run_cli, trained_dir, ultrafeedback_dir):
    import sys

    import pytest

    def dpo(out, batch, launcher):
        r = run_cli("dpo", "--model", trained_dir, "--dataset", ultrafeedback_dir, "--output-dir", out,
                    "--max-steps", 3, "--logging-steps", 1, "--lr", 1e-3, "--grad-accum", 2, "--batch-size", batch,
                    "--max-eval-samples", 12, "--save-steps", 3, launcher=launcher, env=ONE_THREAD, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    one = dpo(tmp_path / "one", 4, [sys.executable])
    two = dpo(tmp_path / "two", 2, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", "29573"])
    train_one, train_two = ([(r["step"], r["loss"], r["rewards/margins"]) for r in x if "loss" in r] for x in
                            (one, two))
    assert [s for s, *_ in train_one] == [s for s, *_ in train_two] == [1, 2, 3]  # rank 0 writes once per step
    for (_, la, ma), (_, lb, mb) in zip(train_one, train_two):
        assert lb == pytest.approx(la, rel=1e-5) and mb == pytest.approx(ma, abs=1e-5)
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["preference"] for d in ("one", "two"))
    for when in ("before", "after"):  # scored by rank 0 (in batches of --batch-size: float order differs)
        assert a[when]["accuracy"] == b[when]["accuracy"]
        assert a[when]["margin"] == pytest.approx(b[when]["margin"], abs=1e-4)
    assert (tmp_path / "two" / "train.log").read_text().count("model saved to") == 1
