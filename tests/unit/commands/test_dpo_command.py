"""`chattune dpo` on tiny assets: from a `chattune train` output on an ultrafeedback-layout directory to a complete
model directory; bad pairs stop before any weights load; YAML and flags share one schema with DPO's defaults."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from chattune.cli import build_parser
from chattune.commands import config_from_args
from chattune.commands.dpo import defaults, run_dpo
from chattune.errors import ConfigError, DataError


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def _cfg(model, data, out, **train):
    cfg = defaults()
    cfg.model.name, cfg.data.dataset, cfg.data.max_length = str(model), str(data), 96
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.lr, t.logging_steps, t.eval_steps = str(out), 4, 8, 1e-3, 1, 2
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def test_dpo_from_a_train_output_writes_a_complete_model_directory(tmp_path, trained_dir, ultrafeedback_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    r = run_dpo(_cfg(trained_dir, ultrafeedback_dir, out))
    # the preference splits were found by name, and the held-out pairs scored before and after
    saved = yaml.safe_load((out / "chattune.yaml").read_text())
    assert (saved["data"]["train_split"], saved["data"]["eval_split"]) == ("train_prefs", "test_prefs")
    assert saved["dpo"] == {"beta": 0.5, "loss_type": "sigmoid", "precompute_ref": False}
    assert r["preference"]["before"]["pairs"] == r["preference"]["after"]["pairs"] == 16
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["train"]["pairs"] == 64 and len(results["preference"]["samples"]) == 3
    for key in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert key in results["eval"], key
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if "loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    assert all(k in train[-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"))
    assert any("eval_rewards/margins" in x for x in records)
    report = (out / "report.md").read_text()
    assert "plots/rewards.png" in report and (out / "plots" / "rewards.png").is_file()
    assert "Held-out preference accuracy:" in report and "## Sample pairs" in report
    card = (out / "README.md").read_text()
    assert "- dpo" in card and "preference-tuned" in card and "preference accuracy" in card
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    AutoModelForCausalLM.from_pretrained(str(out))
    assert not list(out.glob("checkpoint-*/README.md"))  # no TRL card in checkpoints


def test_lora_with_precomputed_reference(tmp_path, trained_dir, ultrafeedback_dir):
    cfg = _cfg(trained_dir, ultrafeedback_dir, tmp_path / "out", max_steps=2, eval_steps=None)
    cfg.lora.enabled, cfg.dpo.precompute_ref, cfg.train.eval_baseline = True, True, False
    r = run_dpo(cfg)
    assert "eval_rewards/accuracies" in r["eval"] and r["preference"] is None
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_bad_pairs_stop_before_any_weights_load(tmp_path, trained_dir):
    from chattune.demo import assets

    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}]}
    same = {**good, "rejected": good["chosen"]}
    data = assets.write_hub_layout({"train_prefs": [good, same, same], "test_prefs": [good]}, tmp_path / "bad")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        run_dpo(_cfg(trained_dir, data, out))
    text = str(err.value)
    assert "2 invalid row(s) of 3" in text and "identical chosen and rejected: 2 (fix: remove pairs" in text
    assert "train_prefs-00000-of-00001.parquet row 1: chosen and rejected replies are the same text" in text
    assert not (out / "model.safetensors").exists()


def test_skip_invalid_trains_on_the_valid_pairs_and_records_the_rest(tmp_path, trained_dir, ultrafeedback_dir):
    import pyarrow.parquet as pq

    from chattune.demo import assets

    rows = pq.read_table(ultrafeedback_dir / "data" / "train_prefs-00000-of-00001.parquet").to_pylist()[:16]
    rows[3] = {**rows[3], "rejected": rows[3]["chosen"]}
    test = pq.read_table(ultrafeedback_dir / "data" / "test_prefs-00000-of-00001.parquet").to_pylist()[:4]
    data = assets.write_hub_layout({"train_prefs": rows, "test_prefs": test}, tmp_path / "data")
    cfg = _cfg(trained_dir, data, tmp_path / "out", max_steps=1, eval_steps=None)
    cfg.data.skip_invalid = True
    run_dpo(cfg)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["where"].endswith("train_prefs-00000-of-00001.parquet row 3")) for r in rejected] == \
        [("identical chosen and rejected", True)]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["data"]["train"]["pairs"] == 15


def test_resume_continues_from_the_newest_complete_checkpoint(tmp_path, trained_dir, ultrafeedback_dir):
    import shutil

    out = tmp_path / "out"
    cfg = _cfg(trained_dir, ultrafeedback_dir, out, save_steps=2, eval_steps=None)
    cfg.train.eval_baseline = False
    run_dpo(cfg)
    shutil.rmtree(out / "checkpoint-4")  # as if the run had stopped after step 2
    cfg.train.resume = True
    r = run_dpo(cfg)
    assert r["train"]["global_step"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


def test_yaml_and_flags_share_the_schema_with_dpo_defaults(tmp_path):
    parser = build_parser("dpo")
    cfg = config_from_args(parser.parse_args(["dpo", "--beta", "0.1"]), defaults())
    assert (cfg.dpo.beta, cfg.dpo.loss_type, cfg.train.lr, cfg.train.epochs) == (0.1, "sigmoid", 1e-6, 2.0)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"dpo": {"beta": 0.01, "loss_type": "sigmoid,sft"}, "train": {"lr": 5e-7}}))
    cfg = config_from_args(parser.parse_args(["dpo", "--config", str(path), "--epochs", "1"]), defaults())
    assert (cfg.dpo.beta, cfg.dpo.loss_types(), cfg.train.lr, cfg.train.epochs) == (0.01, ["sigmoid", "sft"], 5e-7, 1)
    with pytest.raises(ConfigError, match="dpo.loss_type: unknown sigmod"):
        config_from_args(parser.parse_args(["dpo", "--loss-type", "sigmod"]), defaults())
    with pytest.raises(ConfigError, match="dpo.beta must be positive"):
        config_from_args(parser.parse_args(["dpo", "--beta", "0"]), defaults())
    from chattune.commands import train

    plain = argparse.ArgumentParser()
    train.add_arguments(plain)
    assert "--beta" not in plain.format_help() and "--lr" in plain.format_help()  # train's flags are unchanged
