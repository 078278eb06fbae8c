"""One schema for YAML and flags: precedence, validation messages that name the field, shipped configs."""

from __future__ import annotations

import pytest
import yaml

from chattune.cli import build_parser
from chattune.commands import config_from_args
from chattune.config import Config, apply_values, load_yaml, validate
from chattune.errors import ConfigError
from chattune.outputs import CONFIG_FILE

from conftest import ROOT


def _parse(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.001\n  batch_size: 8\ndata:\n  max_length: 64\n")
    cfg = _parse(["--config", str(f), "--lr", "3e-4", "--max-steps", "7"])
    assert cfg.train.lr == 3e-4  # flag beats YAML
    assert cfg.train.batch_size == 8  # YAML beats default
    assert cfg.data.max_length == 64
    assert cfg.train.max_steps == 7
    assert cfg.train.grad_accum == Config().train.grad_accum  # untouched default


def test_resume_flag_with_and_without_path():
    assert _parse(["--resume"]).train.resume is True
    assert _parse(["--resume", "out/checkpoint-4"]).train.resume == "out/checkpoint-4"
    assert _parse([]).train.resume is False


def test_unknown_yaml_key_names_the_field_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train: unknown setting 'lrr' \(did you mean 'lr'\?\)"):
        _parse(["--config", str(f)])


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'fast'"):
        _parse(["--lr", "fast"])
    with pytest.raises(ConfigError, match=r"train\.batch_size must be at least 1, got 0"):
        _parse(["--batch-size", "0"])
    with pytest.raises(ConfigError, match=r"train\.warmup"):
        validate(apply_values(Config(), {"train": {"warmup": 2.5}}, "test"))


def test_saved_config_round_trips(tmp_path):
    cfg = _parse(["--model", "m", "--dataset", "d", "--lr", "1e-4"])
    path = cfg.save(tmp_path)
    assert path.name == CONFIG_FILE
    again = validate(apply_values(Config(), yaml.safe_load(path.read_text()), str(path)))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = validate(apply_values(Config(), load_yaml(path), str(path)))
    assert cfg.model.name and cfg.data.dataset


def test_tutorial_config_is_the_tutorial_recipe():
    cfg = validate(apply_values(Config(), load_yaml(ROOT / "configs" / "tutorial.yaml"), "tutorial"))
    assert (cfg.model.name, cfg.data.dataset) == ("gpt2", "HuggingFaceH4/ultrachat_200k")
    assert (cfg.data.train_split, cfg.data.eval_split, cfg.data.max_length) == ("train_gen", "test_gen", 128)
    t = cfg.train
    assert (t.batch_size, t.grad_accum, t.epochs, t.lr, t.lr_scheduler, t.warmup) == (4, 4, 3, 2e-5, "cosine", 0.05)
    assert t.precision == "auto"
