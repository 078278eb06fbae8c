"""The real CLI on a tiny GPT-2 built in the test: train, reload with transformers, generate,
resume, and clear one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from chattune.cli import main

from conftest import ROOT

SECRET = "hf_testsecret0123456789"
CONV = [{"role": "user", "content": "What is 12 + 34?"}, {"role": "assistant", "content": "12 + 34 = 46."},
        {"role": "user", "content": "And 10 + 10?"}, {"role": "assistant", "content": "10 + 10 = 20."}]


@pytest.fixture(scope="module")
def cli(run_cli):
    """The CLI with a token in the environment, which must never reach any output."""
    return lambda *args, **kw: run_cli(*args, env={"HF_TOKEN": SECRET}, **kw)


def train_args(model_dir, ultrachat_dir, out, *extra):
    return ["train", "--model", model_dir, "--dataset", ultrachat_dir, "--train-split", "train_gen",
            "--eval-split", "test_gen", "--output-dir", out, "--batch-size", 4, *extra]


@pytest.fixture(scope="module")
def trained(cli, model_dir, ultrachat_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = cli(*train_args(model_dir, ultrachat_dir, out, "--max-steps", 3, "--lr", "1e-3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_output_is_a_complete_model_directory(trained):
    out, _ = trained
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chattune.yaml", "metrics.jsonl", "train.log"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) or all(p.name == "training_args.bin" for p in out.glob("*.bin"))
    # a checkpoint was written, and TRL's card with it was not (it names no base model for a local path)
    assert list(out.glob("checkpoint-*")), sorted(p.name for p in out.iterdir())
    assert not (out / "README.md").exists()


def test_output_loads_marks_assistant_turns_and_generates(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == eot
    assert tok.pad_token_id is not None and tok.pad_token_id != eot

    enc = tok.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    runs, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tok.decode(r) for r in runs] == ["12 + 34 = 46.<|im_end|>", "10 + 10 = 20.<|im_end|>"]

    prompt = tok.apply_chat_template(CONV[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]


def test_metrics_log_has_training_and_eval_records(trained):
    out, _ = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert train and evals
    assert {"step", "loss", "lr", "tokens_per_second"} <= set(train[0])
    assert evals[-1]["step"] == 3
    # evaluation is a mean over every held-out assistant token, and perplexity its exponential
    results = json.loads((out / "results.json").read_text())
    assert evals[-1]["eval_tokens"] == results["data"]["eval"]["loss_tokens"] > 0
    for r in evals:
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-9)
    # one record per logged step, steps increasing
    assert [r["step"] for r in train] == sorted({r["step"] for r in train})


def test_one_progress_display_and_no_library_noise(trained):
    """datasets' and transformers' bars and notices stay off: chattune's lines, then the Trainer's bar."""
    _, proc = trained
    err = proc.stderr
    for noise in ("Tokenizing", "Converting", "Saving the dataset", "Generating train split", "Loading weights",
                  "Writing model shards", "new embeddings will be initialized", "loss_type=None", "attention_mask",
                  "Warning:", "warn("):
        assert noise not in err, noise
    lines = err.replace("\r", "\n").splitlines()
    bars = [line for line in lines if "|" in line and ("it/s]" in line or "s/it]" in line)]
    assert bars and all(line.lstrip()[0].isdigit() and "/3 [" in line for line in bars), bars  # no other bar
    assert "[chattune] device cpu" in err


def test_no_token_in_any_output_file(trained):
    out, proc = trained
    assert SECRET not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_tutorial_config_runs_on_cpu_even_with_its_fp16(cli, model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "tut"
    proc = cli("train", "--config", ROOT / "configs" / "tutorial.yaml", "--model", model_dir, "--dataset",
                   ultrachat_dir, "--output-dir", out, "--max-steps", 2, "--precision", "fp16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = (out / "chattune.yaml").read_text()
    assert "max_length: 128" in saved and "grad_accum: 4" in saved
    log = (out / "train.log").read_text()
    assert "fp16 mixed precision needs a CUDA GPU; training in fp32" in log and "precision fp32" in log


def test_resume_continues_to_the_same_weights(cli, model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "r"
    args = train_args(model_dir, ultrachat_dir, out, "--max-steps", 6, "--save-steps", 3, "--lr", "1e-3",
                      "--logging-steps", 1)
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    uninterrupted = load_file(out / "model.safetensors")
    # as if the run had died after step 3: only checkpoint-3 survives
    shutil.rmtree(out / "checkpoint-6")
    (out / "model.safetensors").unlink()

    again = cli(*args)  # without --resume: refuses to mix runs
    assert again.returncode == 2 and "pass --resume" in again.stderr

    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-3" in resumed.stderr
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    final = load_file(out / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def _one_line_error(capsys, argv, expected):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err


def test_bad_inputs_give_one_clear_line(capsys, model_dir, ultrachat_dir, tmp_path):
    base = ["train", "--output-dir", str(tmp_path / "o")]
    _one_line_error(capsys, base + ["--model", str(tmp_path / "missing-model"), "--dataset", str(ultrachat_dir),
                                    "--train-split", "train_gen"], "model directory not found")
    _one_line_error(capsys, base + ["--model", str(model_dir), "--dataset", str(tmp_path / "missing-data")],
                    "data set not found")
    _one_line_error(capsys, base + ["--model", str(model_dir), "--dataset", str(ultrachat_dir), "--train-split",
                                    "train_sft"], "available splits: ")
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"question": "q", "answer": "a"}\n')
    _one_line_error(capsys, base + ["--model", str(model_dir), "--dataset", str(cols)],
                    "found ['answer', 'question']")
    _one_line_error(capsys, base + ["--model", str(model_dir), "--dataset", str(ultrachat_dir), "--train-split",
                                    "train_gen", "--max-length", "4096"], "longer than")


def test_console_script_and_module_agree():
    exe = shutil.which("chattune")
    assert exe, "the chattune console script is not installed"
    a = subprocess.run([exe, "--version"], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "chattune", "--version"], capture_output=True, text=True)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("chattune ")
