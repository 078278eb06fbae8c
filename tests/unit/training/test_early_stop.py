"""Early stopping and --load-best: settings that cannot work are refused naming the flags, and a run whose
evaluation loss plateaus stops after `patience` evaluations, keeps its best checkpoint through rotation, ends
with it as the final model and says so in results.json and report.md."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from chattune.config import Config, validate
from chattune.errors import ChattuneError, ConfigError
from chattune.training import early_stop


def _cfg(model_dir, ultrachat_dir, out, eval_split="test_gen", **train) -> Config:
    cfg = Config()
    cfg.model.name = str(model_dir)
    cfg.data.dataset, cfg.data.train_split, cfg.data.eval_split = str(ultrachat_dir), "train_gen", eval_split
    cfg.train.output_dir = str(out)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return validate(cfg)


@pytest.mark.parametrize("settings,message", [
    (dict(eval_split=None, early_stopping_patience=3),
     "--early-stopping-patience needs evaluation data: give --eval-split or --eval-fraction"),
    (dict(load_best=True, eval_steps=20, save_steps=50),
     "--load-best needs a checkpoint at every evaluation: --save-steps (50) does not match --eval-steps (20)"),
    (dict(early_stopping_patience=2, save_steps=50),
     "--save-steps (50) does not match the evaluations (once an epoch: no --eval-steps)"),
])
def test_settings_that_cannot_keep_the_best_checkpoint_are_refused(tmp_path, settings, message):
    cfg = _cfg("m", "d", tmp_path / "o", **settings)
    with pytest.raises(ChattuneError) as err:
        early_stop.check(cfg)
    assert message in str(err.value)


def test_config_checks_and_trainer_arguments(tmp_path):
    with pytest.raises(ConfigError, match="train.early_stopping_patience must be at least 1"):
        _cfg("m", "d", tmp_path, early_stopping_patience=0)
    with pytest.raises(ConfigError, match="train.early_stopping_threshold must be >= 0"):
        _cfg("m", "d", tmp_path, early_stopping_patience=1, early_stopping_threshold=-0.1)
    assert early_stop.trainer_kwargs(_cfg("m", "d", tmp_path), has_eval=True) == {}
    kw = early_stop.trainer_kwargs(_cfg("m", "d", tmp_path, early_stopping_patience=2, eval_steps=10), has_eval=True)
    assert kw["metric_for_best_model"] == "eval_loss" and kw["greater_is_better"] is False
    assert (kw["save_strategy"], kw["save_steps"], kw["load_best_model_at_end"]) == ("steps", 10, False)
    with pytest.raises(ChattuneError, match="no evaluation conversation keeps an assistant token"):
        early_stop.trainer_kwargs(_cfg("m", "d", tmp_path, load_best=True), has_eval=False)


def test_sentences_for_the_report():
    s = {"patience": 3, "threshold": 0.0, "stopped_early": True, "step": 120, "max_steps": 500,
         "best_eval_loss": 0.41, "best_step": 60, "best_checkpoint": "checkpoint-60", "final_is_best": True}
    assert early_stop.describe(s) == (
        "Stopped early at step 120 of 500: the evaluation loss did not improve by more than 0 for 3 evaluations in a "
        "row; best evaluation loss 0.4100 at step 60 (checkpoint-60), which is the final model.")
    s.update(stopped_early=False, step=500, final_is_best=False)
    assert early_stop.describe(s) == ("Early stopping (patience 3) did not trigger; the run went to step 500; best "
                                      "evaluation loss 0.4100 at step 60 (checkpoint-60), while the final model is "
                                      "step 500's.")
    assert early_stop.describe(None) is None


def test_plateau_stops_early_keeps_the_best_checkpoint_and_loads_it(model_dir, ultrachat_dir, tmp_path):
    from chattune.commands.train import run_train

    out = tmp_path / "plateau"
    # lr 1e-12 moves no weight by a representable amount in the loss: evaluation loss is flat from the first
    # evaluation on, so the first one (step 2) stays the best and the run stops after two more (steps 4, 6)
    cfg = _cfg(model_dir, ultrachat_dir, out, max_steps=40, batch_size=8, lr=1e-12, lr_scheduler="constant",
               logging_steps=2, eval_steps=2, save_total_limit=2, group_by_length=False, eval_baseline=False,
               early_stopping_patience=2, load_best=True)
    run_train(cfg)
    stopping = json.loads((out / "results.json").read_text())["stopping"]
    assert stopping == {"patience": 2, "threshold": 0.0, "stopped_early": True, "step": 6, "max_steps": 40,
                        "best_eval_loss": pytest.approx(stopping["best_eval_loss"]), "best_step": 2,
                        "best_checkpoint": "checkpoint-2", "final_is_best": True}
    # rotation (limit 2) kept the oldest checkpoint because it is the best, and dropped checkpoint-4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(out / "checkpoint-2")
    # --load-best: the final weights are checkpoint-2's, bit for bit, not the last step's
    final, best, last = (load_file(p / "model.safetensors") for p in (out, out / "checkpoint-2", out / "checkpoint-6"))
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)
    report = (out / "report.md").read_text()
    assert ("Stopped early at step 6 of 40: the evaluation loss did not improve by more than 0 for 2 evaluations in "
            "a row; best evaluation loss") in report
    assert "at step 2 (checkpoint-2), which is the final model." in report
