"""Early stopping and the best checkpoint, through transformers' own machinery.

transformers' EarlyStoppingCallback counts evaluations without an improvement of `metric_for_best_model`
(here the evaluation loss, lower is better) and stops the run after `patience` of them; the Trainer records
the best value, its step and its checkpoint, keeps that checkpoint through rotation (save_total_limit) and,
with load_best_model_at_end (--load-best), loads it as the final model. What chattune adds: the checks that
make this sound (evaluation data, a checkpoint saved at every evaluation, so the best one exists), and the
facts for results.json and the report (when and why the run stopped, which checkpoint is the final model).
"""

from __future__ import annotations

import logging
from pathlib import Path

from chattune.errors import ChattuneError

log = logging.getLogger("chattune")
METRIC = "eval_loss"


def wanted(cfg) -> bool:
    return cfg.train.early_stopping_patience is not None or cfg.train.load_best


def _flag(cfg) -> str:
    return "--early-stopping-patience" if cfg.train.early_stopping_patience is not None else "--load-best"


def check(cfg) -> None:
    """Before any data loads: evaluation data is configured, and every evaluation saves a checkpoint (the best
    checkpoint is chosen at an evaluation; with a save between evaluations it would not exist)."""
    if not wanted(cfg):
        return
    t, d = cfg.train, cfg.data
    if not (d.eval_split or d.eval_fraction or any(e.eval_split for e in d.datasets)):
        raise ChattuneError(f"{_flag(cfg)} needs evaluation data: give --eval-split or --eval-fraction")
    if t.save_steps is not None and t.save_steps != t.eval_steps:
        evals = f"--eval-steps ({t.eval_steps})" if t.eval_steps else "the evaluations (once an epoch: no --eval-steps)"
        raise ChattuneError(f"{_flag(cfg)} needs a checkpoint at every evaluation: --save-steps ({t.save_steps}) "
                            f"does not match {evals}; give --eval-steps and --save-steps the same value, or leave "
                            "--save-steps unset")


def trainer_kwargs(cfg, has_eval: bool) -> dict:
    """TrainingArguments fields for the best-checkpoint bookkeeping; {} when neither option is on."""
    if not wanted(cfg):
        return {}
    if not has_eval:  # evaluation rows were configured but none survived preparation
        raise ChattuneError(f"{_flag(cfg)} needs evaluation data, and no evaluation conversation keeps an assistant "
                            "token: check --eval-split / --eval-fraction and --max-length")
    t = cfg.train
    return dict(metric_for_best_model=METRIC, greater_is_better=False, load_best_model_at_end=t.load_best,
                save_strategy="steps" if t.eval_steps else "epoch", save_steps=t.eval_steps or 500,
                # a resumed run keeps counting evaluations without improvement where it stopped
                restore_callback_states_from_checkpoint=t.early_stopping_patience is not None)


def callbacks(cfg) -> list:
    if cfg.train.early_stopping_patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(cfg.train.early_stopping_patience, cfg.train.early_stopping_threshold)]


def summary(cfg, trainer) -> dict | None:
    """What results.json records about stopping and the best checkpoint (taken right after training)."""
    if not wanted(cfg):
        return None
    from transformers import EarlyStoppingCallback

    state = trainer.state
    stopper = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None)
    best_dir = state.best_model_checkpoint
    return {
        "patience": cfg.train.early_stopping_patience, "threshold": cfg.train.early_stopping_threshold,
        "stopped_early": bool(stopper and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience
                              and state.global_step < state.max_steps),
        "step": state.global_step, "max_steps": state.max_steps,
        "best_eval_loss": state.best_metric, "best_step": state.best_global_step,
        "best_checkpoint": Path(best_dir).name if best_dir else None,
        "final_is_best": bool(cfg.train.load_best and best_dir),
    }


def describe(s: dict | None) -> str | None:
    """One sentence for the log and the report, e.g. 'Stopped early at step 120: the evaluation loss did not
    improve by more than 0 for 3 evaluations; best 0.4100 at step 60 (checkpoint-60), which is the final model.'"""
    if not s:
        return None
    if s["best_step"] is None or s["best_eval_loss"] is None:
        return "No evaluation ran, so there is no best checkpoint; the final model is the last step's."
    best = f"best evaluation loss {s['best_eval_loss']:.4f} at step {s['best_step']}"
    best += f" ({s['best_checkpoint']})" if s["best_checkpoint"] else " (no checkpoint was saved there)"
    final = "which is the final model" if s["final_is_best"] else f"while the final model is step {s['step']}'s"
    if s["stopped_early"]:
        head = (f"Stopped early at step {s['step']} of {s['max_steps']}: the evaluation loss did not improve by more "
                f"than {s['threshold']:g} for {s['patience']} evaluations in a row")
    elif s["patience"] is not None:
        head = f"Early stopping (patience {s['patience']}) did not trigger; the run went to step {s['step']}"
    else:
        head = f"The run went to step {s['step']}"
    return f"{head}; {best}, {final}."
