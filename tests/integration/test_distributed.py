"""The same `chattune train` under torchrun (2 CPU processes, gloo): the loss curve of one process
with the same global batch, exact evaluation sums, and files written by rank 0 only. The shipped
accelerate configurations are checked with accelerate's own launch-time validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chattune.model.manifest import check_complete
from chattune.outputs import LOCK_FILE
from chattune.training.checkpoints import problem
from chattune.training.lock import RunLock

from conftest import ROOT

CONFIGS = ROOT / "configs" / "accelerate"
# per-step losses differ only by float summation order (gradients all-reduced vs one batch)
LOSS_RTOL = 1e-5


def train(run_cli, launcher: list[str], model_dir, ultrachat_dir, out, batch: int) -> subprocess.CompletedProcess:
    args = ["train", "--model", str(model_dir), "--dataset", str(ultrachat_dir), "--train-split", "train_gen",
            "--eval-split", "test_gen", "--max-eval-samples", "13", "--output-dir", str(out), "--batch-size",
            str(batch), "--grad-accum", "2", "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1",
            "--lr", "1e-3", "--no-eval-baseline"]
    return run_cli(*args, launcher=launcher, env={"OMP_NUM_THREADS": "1"}, timeout=900)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(run_cli, model_dir, ultrachat_dir, tmp_path):
    one = train(run_cli, [sys.executable], model_dir, ultrachat_dir, tmp_path / "one", batch=4)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561"]
    two = train(run_cli, torchrun, model_dir, ultrachat_dir, tmp_path / "two", batch=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process 1 of 2 (MULTI_CPU" in two.stderr

    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    train_a = [(r["step"], r["loss"]) for r in a if "loss" in r]
    train_b = [(r["step"], r["loss"]) for r in b if "loss" in r]
    assert [s for s, _ in train_a] == [s for s, _ in train_b] == [1, 2, 3, 4]  # one record per step: rank 0 only
    for (_, la), (_, lb) in zip(train_a, train_b):
        assert lb == pytest.approx(la, rel=LOSS_RTOL)
    eval_a, eval_b = [r for r in a if "eval_loss" in r], [r for r in b if "eval_loss" in r]
    # 13 evaluation rows over 2 processes x batch 2: padding must not count any row twice
    assert eval_a[-1]["eval_tokens"] == eval_b[-1]["eval_tokens"]
    assert eval_b[-1]["eval_loss"] == pytest.approx(eval_a[-1]["eval_loss"], rel=LOSS_RTOL)

    log = (tmp_path / "two" / "train.log").read_text()
    assert log.count("data: ") == 1 and log.count("model saved to") == 1
    ckpt = tmp_path / "two" / "checkpoint-4"
    assert problem(ckpt) is None
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    check_complete(tmp_path / "two", content=True)  # the final model, gathered and placed by rank 0
    assert not (tmp_path / "two" / LOCK_FILE).exists()  # rank 0 held the lock and released it


def test_every_process_stops_when_the_output_directory_is_in_use(run_cli, model_dir, ultrachat_dir, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29562"]
    with RunLock(tmp_path / "busy", command="another run"):  # held by this test process
        proc = train(run_cli, torchrun, model_dir, ultrachat_dir, tmp_path / "busy", batch=2)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "in use by another chattune run" in errors[0], proc.stderr[-3000:]


@pytest.mark.parametrize("name, kind", [("ddp", "multi_gpu"), ("multi_node", "multi_gpu"), ("fsdp", "use_fsdp"),
                                        ("deepspeed_zero2", "use_deepspeed"), ("deepspeed_zero3", "use_deepspeed")])
def test_shipped_accelerate_configs_pass_accelerates_launch_validation(name, kind, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))  # unknown keys are errors here
    assert config.num_processes >= 2
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "chattune", "train"])
    args, _, _ = _validate_launch_command(args)
    assert getattr(args, kind) and not args.cpu and args.module
    if name == "multi_node":
        assert args.num_machines == 2 and args.main_process_port
    if name == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        for key, value in prepare_multi_gpu_env(args).items():
            if key.startswith("FSDP_"):
                monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
    if name.startswith("deepspeed"):
        assert int(args.zero_stage) == int(name[-1])
