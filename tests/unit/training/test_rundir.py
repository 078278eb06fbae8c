"""The output directory (issue 11): never written over unless asked (case 2), never the base model's own
directory; one metrics curve after a resume (case 6); write failures as one line naming the path and the
cause, advising --resume only when a checkpoint exists (case 9); a resume that would change the
learning-rate schedule (case 21); a failed run's train.log ends with its error (case 21)."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from chattune.commands.train import run_train
from chattune.config import Config
from chattune.errors import ChattuneError
from chattune.outputs import CONFIG_FILE, LOG_FILE, METRICS_FILE, REPLACED_SUFFIX
from chattune.training.rundir import check_output_dir


def small_run(model_dir, ultrachat_dir, out, **train) -> Config:
    cfg = Config()
    cfg.model.name = str(model_dir)
    cfg.data.dataset, cfg.data.train_split = str(ultrachat_dir), "train_gen"
    t = cfg.train
    t.output_dir, t.batch_size, t.max_steps, t.save_steps, t.logging_steps, t.lr = str(out), 4, 4, 2, 1, 1e-3
    t.save_total_limit, t.eval_baseline = 5, False
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def finished_run_without_checkpoints(out):
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"precious weights")
    (out / CONFIG_FILE).write_text("train: {}\n")
    return out


# ---- case 2: silent overwrite --------------------------------------------------------------------------

def test_a_finished_run_whose_checkpoints_were_deleted_is_not_written_over(model_dir, ultrachat_dir, tmp_path):
    out = finished_run_without_checkpoints(tmp_path / "out")
    with pytest.raises(ChattuneError, match="--overwrite") as e:
        run_train(small_run(model_dir, ultrachat_dir, out))
    assert "\n" not in str(e.value) and str(out) in str(e.value)
    assert (out / "model.safetensors").read_bytes() == b"precious weights"


def test_an_unrelated_non_empty_directory_is_not_written_over(model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpg")
    with pytest.raises(ChattuneError, match="not empty and not a chattune run .*holiday.jpg"):
        run_train(small_run(model_dir, ultrachat_dir, out))
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_a_directory_holding_only_someone_elses_runs_folder_is_not_written_over(model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "experiments"
    (out / "runs").mkdir(parents=True)  # another tool's TensorBoard runs, no chattune file beside them
    (out / "runs" / "events.out").write_bytes(b"x")
    with pytest.raises(ChattuneError, match="not empty and not a chattune run .*runs"):
        run_train(small_run(model_dir, ultrachat_dir, out))
    assert sorted(p.name for p in out.iterdir()) == ["runs"]


def test_the_base_models_own_directory_is_refused_even_with_overwrite(model_dir, ultrachat_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    weights = (base / "model.safetensors").read_bytes()
    for out, overwrite in ((base, False), (base, True), (base / "sub", True)):
        with pytest.raises(ChattuneError) as e:
            run_train(small_run(model_dir=base, ultrachat_dir=ultrachat_dir, out=out, overwrite=overwrite))
        msg = str(e.value)
        assert "base model" in msg and str(base) in msg and "--output-dir" in msg, msg
    assert (base / "model.safetensors").read_bytes() == weights


def test_a_base_model_inside_a_checkpoint_of_the_run_is_refused(model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(model_dir, out / "checkpoint-2")
    with pytest.raises(ChattuneError, match="checkpoint rotation"):
        run_train(small_run(out / "checkpoint-2", ultrachat_dir, out, resume=True))


def test_overwrite_moves_the_earlier_run_aside(model_dir, ultrachat_dir, tmp_path, caplog):
    out = finished_run_without_checkpoints(tmp_path / "out")
    with caplog.at_level("INFO", logger="chattune"):
        run_train(small_run(model_dir, ultrachat_dir, out, overwrite=True))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out" + REPLACED_SUFFIX)]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == b"precious weights"
    assert str(aside[0]) in caplog.text
    assert (out / "model.safetensors").read_bytes() != b"precious weights"  # the new run's model


def test_a_failed_attempt_without_checkpoint_or_model_is_simply_retried(model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / CONFIG_FILE).write_text("train: {}\n")
    (out / LOG_FILE).write_text("an earlier attempt that failed on its data\n")
    (out / "runs").mkdir()  # its TensorBoard events (--report-to tensorboard)
    run_train(small_run(model_dir, ultrachat_dir, out, max_steps=2))
    assert (out / LOG_FILE).read_text().startswith("an earlier attempt")  # kept, appended to


def test_inputs_inside_the_output_directory_are_not_in_the_way(model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "qs"
    shutil.copytree(model_dir, out / "base-model")
    shutil.copytree(ultrachat_dir, out / "data")
    cfg = small_run(out / "base-model", out / "data", out)
    assert check_output_dir(cfg) == []  # nothing to move aside: the run's own inputs
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ChattuneError, match="not empty and not a chattune run .*notes.txt"):
        check_output_dir(cfg)
    cfg.train.overwrite = True
    assert check_output_dir(cfg) == [out / "notes.txt"]  # --overwrite would move the notes, never the inputs


def test_resume_and_overwrite_together_are_refused(model_dir, ultrachat_dir, tmp_path):
    with pytest.raises(ChattuneError, match="--resume or --overwrite"):
        run_train(small_run(model_dir, ultrachat_dir, tmp_path / "o", resume=True, overwrite=True))


# ---- case 6: metrics.jsonl after a resume ----------------------------------------------------------------

def test_a_resume_leaves_one_curve_in_metrics_jsonl(model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "out"
    run_train(small_run(model_dir, ultrachat_dir, out, max_steps=6))
    for step in (4, 6):  # as if the run had died after checkpoint-2 was written
        shutil.rmtree(out / f"checkpoint-{step}")
    run_train(small_run(model_dir, ultrachat_dir, out, max_steps=6, resume=True))
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "train_runtime" in r] == [6]  # the first run's end record went too


# ---- case 9: disk full, read-only, file too large ------------------------------------------------------

def test_disk_full_during_the_final_save_is_one_line_with_the_path(model_dir, ultrachat_dir, tmp_path, monkeypatch):
    from chattune.training.trainer import ChattuneTrainer

    real = ChattuneTrainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if _internal_call:  # a checkpoint
            return real(self, output_dir, _internal_call)
        path = os.path.join(output_dir, "model.safetensors")
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(ChattuneTrainer, "save_model", save_model)
    out = tmp_path / "out"
    with pytest.raises(ChattuneError) as e:
        run_train(small_run(model_dir, ultrachat_dir, out))
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "model.safetensors" in msg
    assert "--resume" in msg and "checkpoint-4" in msg  # a checkpoint exists: resuming rewrites the model
    assert not (out / "model.safetensors").exists()  # nothing half-written in place

    monkeypatch.setattr(ChattuneTrainer, "save_model", real)
    run_train(small_run(model_dir, ultrachat_dir, out, resume=True))
    assert (out / "model.safetensors").stat().st_size > 100


def test_no_resume_advice_when_no_checkpoint_was_saved(model_dir, ultrachat_dir, tmp_path, monkeypatch):
    import torch

    real_save = torch.save

    def save(obj, f, *a, **kw):
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(ChattuneError) as e:
        run_train(small_run(model_dir, ultrachat_dir, tmp_path / "out"))
    msg = str(e.value)
    assert "No space left on device" in msg and "no earlier checkpoint" in msg
    assert "--resume" not in msg


def test_a_read_only_output_directory_is_one_line(model_dir, ultrachat_dir, tmp_path, monkeypatch):
    from pathlib import Path

    out = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):  # root ignores permission bits: a read-only file system is simulated
        if str(self).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(ChattuneError) as e:
        run_train(small_run(model_dir, ultrachat_dir, out))
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "Read-only file system" in msg and "--resume" not in msg


# ---- case 21: a resume that changes the schedule; the log of a failed run -------------------------------

def test_resume_with_a_different_max_steps_is_refused(model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "out"
    run_train(small_run(model_dir, ultrachat_dir, out, max_steps=4))
    with pytest.raises(ChattuneError) as e:
        run_train(small_run(model_dir, ultrachat_dir, out, max_steps=8, resume=True))
    msg = str(e.value)
    assert "\n" not in msg and "4 steps" in msg and "--max-steps 8" in msg and "schedule" in msg


def test_resume_with_more_epochs_is_refused_once_the_total_is_known(model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "out"
    cfg = small_run(model_dir, ultrachat_dir, out, max_steps=None, epochs=1.0)
    cfg.data.max_train_samples = 8  # batch 4: 2 steps an epoch
    run_train(cfg)
    cfg.train.epochs, cfg.train.resume = 2.0, True
    with pytest.raises(ChattuneError, match="run of 2 steps.*this run's 4 steps"):
        run_train(cfg)


def test_a_failed_runs_log_ends_with_its_error(model_dir, ultrachat_dir, tmp_path):
    out = tmp_path / "out"
    cfg = small_run(model_dir, ultrachat_dir, out)
    cfg.data.train_split = "no_such_split"
    with pytest.raises(ChattuneError) as e:
        run_train(cfg)
    last = (out / LOG_FILE).read_text().rstrip().splitlines()[-1]
    assert last.endswith(f"error: {e.value}")
