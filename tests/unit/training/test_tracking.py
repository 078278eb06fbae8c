"""--report-to: names checked with the config, a missing tracker package stops the run before anything loads,
the run name defaults to the output directory's, and chattune's tokens/s rides on the Trainer's log."""

from __future__ import annotations

import importlib.util
import types

import pytest

from chattune.config import Config, validate
from chattune.errors import ChattuneError, ConfigError
from chattune.training import tracking
from chattune.training.args import trainer_kwargs


def _cfg(tmp_path, **train) -> Config:
    cfg = Config()
    cfg.model.name, cfg.data.dataset = "unused-model", "unused-data"
    cfg.train.output_dir = str(tmp_path / "my-run")
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_report_to_names_and_lists(tmp_path):
    assert tracking.report_to_list("none") == [] and tracking.report_to_list(None) == []
    assert tracking.report_to_list("TensorBoard, wandb,tensorboard") == ["tensorboard", "wandb"]
    validate(_cfg(tmp_path, report_to="tensorboard,mlflow,trackio"))
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker 'comet'; give none or one or more of "
                                          r"tensorboard, wandb, mlflow, trackio"):
        validate(_cfg(tmp_path, report_to="tensorboard,comet"))


def test_trainer_arguments_name_the_run_after_the_output_dir(tmp_path):
    kw = trainer_kwargs(_cfg(tmp_path, report_to="tensorboard"), "fp32", has_eval=True, use_cpu=True)
    assert kw["report_to"] == ["tensorboard"] and kw["run_name"] == "my-run"
    kw = trainer_kwargs(_cfg(tmp_path, run_name="sweep-3"), "fp32", has_eval=True, use_cpu=True)
    assert kw["report_to"] == [] and kw["run_name"] == "sweep-3"


def test_missing_tracker_package_is_one_line_before_any_data_or_weights_load(tmp_path, monkeypatch):
    from chattune.commands.train import run_train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = _cfg(tmp_path, report_to="tensorboard,wandb")  # the model and data do not exist: never reached
    with pytest.raises(ChattuneError) as err:
        run_train(cfg)
    assert str(err.value) == "--report-to wandb needs wandb installed: pip install wandb (or drop it from --report-to)"
    assert not (tmp_path / "my-run").exists()


class _Base:
    def log(self, logs, start_time=None):
        self.logged = logs


class _Trainer(tracking.ThroughputLog, _Base):
    def __init__(self):
        self.args = types.SimpleNamespace(include_num_input_tokens_seen="non_padding")
        self.state = types.SimpleNamespace(num_input_tokens_seen=0)
        self._initial_num_input_tokens_seen = 0


def test_tokens_per_second_is_added_to_each_training_log(monkeypatch):
    clock = iter([102.0, 108.0])
    monkeypatch.setattr(tracking.time, "time", lambda: next(clock))
    t = _Trainer()
    t.state.num_input_tokens_seen = 400
    t.log({"loss": 1.0}, start_time=100.0)  # since the start of training: 400 tokens in 2 s
    assert t.logged["tokens_per_second"] == 200.0
    t.state.num_input_tokens_seen = 1200
    t.log({"loss": 0.9}, start_time=100.0)  # since the previous log: 800 tokens in 6 s (from the start: 150/s)
    assert t.logged["tokens_per_second"] == round(800 / 6, 1)
    t.log({"eval_loss": 0.8})  # evaluations carry no throughput
    assert "tokens_per_second" not in t.logged
