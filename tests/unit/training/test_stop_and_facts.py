"""Ctrl-C saves and exits without an evaluation first, saying what it saves (issue 11, case 17); the run's
facts come from the trainer's final state: the steps run, one final evaluation, the epochs run, and a
loss curve that shows even with one point (case 19)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from transformers import TrainerControl, TrainerState

from chattune.artifacts.card import build_card
from chattune.commands.train import run_train
from chattune.config import Config
from chattune.training.interrupts import StepControl, StopSignals, TrainingInterrupted


def run_config(model_dir, ultrachat_dir, out, **train) -> Config:
    cfg = Config()
    cfg.model.name = str(model_dir)
    cfg.data.dataset, cfg.data.train_split, cfg.data.eval_split = str(ultrachat_dir), "train_gen", "test_gen"
    t = cfg.train
    t.output_dir, t.batch_size, t.lr, t.eval_baseline, t.group_by_length = str(out), 8, 1e-3, False, False
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


# ---- case 17 ---------------------------------------------------------------------------------------------

def test_a_stop_signal_cancels_the_evaluation_due_at_that_step():
    args = type("Args", (), {"device": "cpu"})()
    with StopSignals() as signals:
        ctl = StepControl(signals)
        os.kill(os.getpid(), signal.SIGINT)
        control = TrainerControl(should_evaluate=True)  # the Trainer's own flow asked for one at this step
        ctl.on_step_end(args, TrainerState(global_step=3), control)
    assert control.should_save and control.should_training_stop and not control.should_evaluate
    control.should_save = False
    control = TrainerControl(should_evaluate=True, should_save=True)  # the epoch ends right after the stop
    ctl.on_epoch_end(args, TrainerState(global_step=3), control)
    assert not control.should_evaluate and not control.should_save  # saved already, at the step


def test_ctrl_c_saves_the_checkpoint_without_evaluating(model_dir, ultrachat_dir, tmp_path, monkeypatch, caplog):
    from chattune.training.trainer import ChattuneTrainer

    evaluations, steps = [], []
    real_step, real_eval = ChattuneTrainer.training_step, ChattuneTrainer.evaluate

    def training_step(self, *a, **kw):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2
        return real_step(self, *a, **kw)

    def evaluate(self, *a, **kw):
        evaluations.append(self.state.global_step)
        return real_eval(self, *a, **kw)

    monkeypatch.setattr(ChattuneTrainer, "training_step", training_step)
    monkeypatch.setattr(ChattuneTrainer, "evaluate", evaluate)
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="chattune"), pytest.raises(TrainingInterrupted) as e:
        run_train(run_config(model_dir, ultrachat_dir, out, max_steps=20))  # evaluates at each epoch's end
    assert "interrupted by SIGINT at step 2" in str(e.value)
    assert evaluations == []
    assert "saving checkpoint-2 ..." in caplog.text
    assert (out / "checkpoint-2").is_dir()


# ---- case 19 ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_of_12_steps(model_dir, ultrachat_dir, tmp_path_factory):
    """64 training conversations at batch 8: 8 steps an epoch, so 12 steps are 1.5 epochs; logged at steps
    1, 5 and 10 only; evaluated at each epoch's end (steps 8 and 12)."""
    out = tmp_path_factory.mktemp("facts") / "out"
    run_train(run_config(model_dir, ultrachat_dir, out, max_steps=12, logging_steps=5, save_steps=12))
    return out


def test_the_final_evaluation_runs_once(run_of_12_steps):
    records = [json.loads(line) for line in (run_of_12_steps / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [8, 12]
    results = json.loads((run_of_12_steps / "results.json").read_text())
    last = next(r for r in reversed(records) if "eval_loss" in r)
    assert results["eval"]["eval_loss"] == last["eval_loss"]


def test_report_and_card_state_the_steps_and_epochs_run(run_of_12_steps):
    results = json.loads((run_of_12_steps / "results.json").read_text())
    assert results["train"]["global_step"] == 12 and results["train"]["epoch"] == pytest.approx(1.5)
    report = (run_of_12_steps / "report.md").read_text()
    assert "for 12 optimizer steps" in report and "| optimizer steps | 12 |" in report
    card = build_card(run_of_12_steps, "me/tiny")
    assert "| epochs run | 1.5 |" in card and "| steps run | 12 |" in card
    assert "| epochs | 1.0 |" not in card


def test_a_one_point_loss_curve_is_drawn_with_a_marker(tmp_path, monkeypatch):
    import matplotlib.figure

    from chattune.artifacts.report import plot_curves

    figures = []
    real = matplotlib.figure.Figure.savefig

    def savefig(self, *a, **kw):
        figures.append(self)
        return real(self, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    plot_curves(tmp_path, [{"step": 1, "loss": 2.5, "lr": 1e-3}], [])
    line = figures[0].axes[0].lines[0]
    assert len(line.get_xdata()) == 1 and line.get_marker() not in ("None", "", " ", None)
