"""Checkpoint completeness records, picking the newest complete checkpoint, a failed save (disk full)
that keeps the previous one, a NaN that stops the run at its step, and the step-boundary controls."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerControl, TrainerState

from chattune.commands.train import run_train
from chattune.config import Config
from chattune.outputs import CHECKPOINT_MANIFEST, CHECKPOINT_STAGING
from chattune.training.checkpoints import CheckpointError, check_resume_target, newest_complete, problem, write_manifest
from chattune.training.interrupts import NonFiniteLoss, StepControl, StopSignals, TrainingInterrupted, resume_command
from chattune.training.rundir import resolve_resume


def fake_checkpoint(root, step):
    """A checkpoint with small files that load (resume checks that they do)."""
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    save_file({"w": torch.zeros(25)}, d / "model.safetensors")
    torch.save({"state": {}, "param_groups": []}, d / "optimizer.pt")
    write_manifest(d, step)
    return d


def test_manifest_detects_missing_truncated_and_unfinished(tmp_path):
    d = fake_checkpoint(tmp_path, 3)
    assert problem(d) is None
    files = json.loads((d / CHECKPOINT_MANIFEST).read_text())["files"]
    sizes = {name: (d / name).stat().st_size for name in ("model.safetensors", "optimizer.pt")}
    assert {name: f["size"] for name, f in files.items()} == sizes
    (d / "optimizer.pt").unlink()
    assert problem(d) == "optimizer.pt is missing"
    d2 = fake_checkpoint(tmp_path, 4)
    (d2 / "model.safetensors").write_bytes(b"w" * 40)
    assert f"model.safetensors has 40 bytes where {sizes['model.safetensors']} were written" in problem(d2)
    d3 = tmp_path / "checkpoint-5"
    d3.mkdir()
    (d3 / "model.safetensors").write_bytes(b"w")
    assert "no completion record" in problem(d3)


def test_resume_picks_the_newest_complete_checkpoint(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    good = fake_checkpoint(tmp_path, 10)  # numeric order, not name order
    bad = fake_checkpoint(tmp_path, 12)
    (bad / "model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint-14").mkdir()  # a save that never finished
    (tmp_path / CHECKPOINT_STAGING / "checkpoint-16").mkdir(parents=True)  # never a candidate
    found, skipped = newest_complete(tmp_path)
    assert found == good
    assert [p.name for p, _ in skipped] == ["checkpoint-14", "checkpoint-12"]
    assert resolve_resume(True, tmp_path) == str(good)
    with pytest.raises(Exception, match="already holds checkpoints"):
        resolve_resume(False, tmp_path)
    with pytest.raises(CheckpointError, match="cannot be resumed from: model.safetensors has 0 bytes"):
        check_resume_target(bad)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(True, tmp_path / "empty")


def small_run(model_dir, ultrachat_dir, out, **train) -> Config:
    cfg = Config()
    cfg.model.name = str(model_dir)
    cfg.data.dataset, cfg.data.train_split = str(ultrachat_dir), "train_gen"
    t = cfg.train
    t.output_dir, t.batch_size, t.max_steps, t.save_steps, t.logging_steps, t.lr = str(out), 4, 6, 2, 1, 1e-3
    t.save_total_limit, t.eval_baseline = 5, False
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(model_dir, ultrachat_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if "checkpoint-4" in str(f):
            with open(f, "wb") as fh:  # part of the file reaches the disk, then the disk is full
                fh.write(b"x" * 10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError) as e:
        run_train(small_run(model_dir, ultrachat_dir, out))
    msg = str(e.value)
    assert "could not write checkpoint-4" in msg and "No space left on device" in msg
    assert f"the previous checkpoint, {out / 'checkpoint-2'}, is intact" in msg and "--resume" in msg
    assert problem(out / "checkpoint-2") is None
    assert not (out / "checkpoint-4").exists() and not (out / CHECKPOINT_STAGING).exists()

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues from checkpoint-2
    cfg = small_run(model_dir, ultrachat_dir, out, resume=True)
    run_train(cfg)
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


def test_nan_loss_stops_at_its_step_without_saving_it(model_dir, ultrachat_dir, tmp_path, monkeypatch):
    from chattune.training.trainer import ChattuneTrainer

    out = tmp_path / "out"
    real = ChattuneTrainer.compute_loss
    calls = {"n": 0}

    def compute_loss(self, *a, **kw):  # the 5th micro-batch (step 5) yields a NaN loss
        calls["n"] += 1
        loss = real(self, *a, **kw)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(ChattuneTrainer, "compute_loss", compute_loss)
    with pytest.raises(NonFiniteLoss) as e:
        run_train(small_run(model_dir, ultrachat_dir, out, max_steps=8))
    msg = str(e.value)
    assert "NaN or infinite at step 5" in msg and f"{out / 'checkpoint-4'}, is kept" in msg
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "model.safetensors").exists()
    weights = load_file(out / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert math.isnan(losses[5]) and max(losses) == 5


def control_args():
    return SimpleNamespace(device="cpu")


def test_save_timer_asks_for_a_checkpoint_after_the_interval():
    ctl = StepControl(save_minutes=0.5 / 60)
    state, control = TrainerState(global_step=1), TrainerControl()
    ctl.on_train_begin(control_args(), state, control)
    ctl.on_step_end(control_args(), state, control)
    assert not control.should_save
    time.sleep(0.6)
    ctl.on_step_end(control_args(), state, control)
    assert control.should_save and not control.should_training_stop
    control.should_save = False
    ctl.on_save(control_args(), state, control)
    ctl.on_step_end(control_args(), state, control)
    assert not control.should_save


def test_sigterm_sets_save_and_stop_at_the_next_step_boundary():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        ctl = StepControl(signals)
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process keeps running
        state, control = TrainerState(global_step=7), TrainerControl()
        ctl.on_step_end(control_args(), state, control)
    assert control.should_save and control.should_training_stop
    assert ctl.stopped_at == 7 and ctl.stop_signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # restored afterwards


def test_nonfinite_micro_batch_stops_without_saving():
    ctl = StepControl()
    state, control = TrainerState(global_step=3), TrainerControl(should_save=True)
    ctl.observe_loss(torch.tensor(1.0))
    ctl.observe_loss(torch.tensor(float("inf")))
    ctl.observe_loss(torch.tensor(2.0))
    ctl.on_step_end(control_args(), state, control)
    assert ctl.nonfinite_step == 3 and control.should_training_stop and not control.should_save


def test_resume_command_repeats_the_arguments_with_resume():
    assert resume_command(["train", "--output-dir", "o b", "--lr", "1e-3"]) == \
        "chattune train --output-dir 'o b' --lr 1e-3 --resume"
    assert resume_command(["train", "--resume", "o/checkpoint-3", "--lr", "1"]) == "chattune train --lr 1 --resume"
    assert resume_command(["train", "--resume", "--lr", "1"]) == "chattune train --lr 1 --resume"
    assert "train.resume" in resume_command(["-f", "kernel.json"])  # a notebook calling run_train
    assert TrainingInterrupted("x", signal.SIGINT).exit_code == 130
    assert TrainingInterrupted("x", signal.SIGTERM).exit_code == 143
