"""A run of the real CLI stopped by SIGTERM, resumed, killed with SIGKILL, its newest checkpoint
truncated by hand, and resumed again must end with exactly (bitwise, on CPU) the weights of the
uninterrupted run."""

from __future__ import annotations

import json
import shlex
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.outputs import CHECKPOINT_MANIFEST, CHECKPOINT_STAGING
from chattune.training.checkpoints import newest_complete, problem

STEPS = 12


def args_for(model_dir, ultrachat_dir, out) -> list[str]:
    return ["train", "--model", str(model_dir), "--dataset", str(ultrachat_dir), "--train-split", "train_gen",
            "--output-dir", str(out), "--batch-size", "4", "--max-steps", str(STEPS), "--save-steps", "3",
            "--save-total-limit", "3", "--logging-steps", "1", "--lr", "1e-3", "--no-eval-baseline"]


def wait_for(condition, proc, what: str, log: Path, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def assert_same_weights(out: Path, reference: dict):
    final = load_file(out / "model.safetensors")
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), name


@pytest.fixture(scope="module")
def uninterrupted(run_cli, model_dir, ultrachat_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    proc = run_cli(*args_for(model_dir, ultrachat_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out / "model.safetensors")


def test_sigterm_then_sigkill_then_a_truncated_checkpoint_end_with_the_uninterrupted_weights(
        run_cli, start_cli, model_dir, ultrachat_dir, tmp_path, uninterrupted):
    out = tmp_path / "out"
    # 1. SIGTERM (a preempted job): the current step ends, a checkpoint is saved, the message says how to resume
    log = tmp_path / "stderr.txt"
    proc = start_cli(*args_for(model_dir, ultrachat_dir, out), log=log)
    wait_for(lambda: any(s >= 2 for s in logged_steps(out)), proc, "step 2 was logged", log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = log.read_text()
    assert proc.returncode == 143, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("interrupted by SIGTERM at step"))
    step = int(line.split("at step ")[1].split(":")[0])
    assert 2 <= step < STEPS
    assert f"checkpoint saved to {out / f'checkpoint-{step}'}" in line
    assert problem(out / f"checkpoint-{step}") is None  # complete: every file matches its manifest
    assert not (out / "model.safetensors").exists()
    command = shlex.split(line.split("resume with: ")[1])
    assert command[:2] == ["chattune", "train"] and command[-1] == "--resume"

    # 2. the printed command resumes; SIGKILL (no handler runs) once a later checkpoint exists
    later = out / f"checkpoint-{(step // 3 + 1) * 3}"
    proc = start_cli(*command[1:], log=log)
    wait_for(later.is_dir, proc, f"{later.name} appeared", log)
    proc.kill()
    proc.wait(timeout=60)
    err = log.read_text()
    assert f"resuming from {out / f'checkpoint-{step}'}" in err
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"

    # 3. the newest checkpoint truncated by hand is skipped for the previous complete one
    newest, _ = newest_complete(out)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    previous, _ = newest_complete(out)
    assert previous is not None and previous != newest
    resumed = run_cli(*command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping {newest.name}: model.safetensors has" in resumed.stderr
    assert f"resuming from {previous}" in resumed.stderr

    assert_same_weights(out, uninterrupted)  # bitwise, after three interruptions
    # the rewritten checkpoint replaced the truncated one, and nothing half-written is left
    assert problem(newest) is None and (newest / CHECKPOINT_MANIFEST).is_file()
    assert not (out / CHECKPOINT_STAGING).exists()
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
