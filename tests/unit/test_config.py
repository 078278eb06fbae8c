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
    with pytest.raises(ConfigError, match=r"--lr: expected a number, got 'fast'"):
        _parse(["--lr", "fast"])
    with pytest.raises(ConfigError, match=r"--batch-size must be at least 1, got 0"):
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


# ---- issue 11, case 21 ---------------------------------------------------------------------------------

def test_eval_fraction_with_an_eval_split_is_an_error_that_says_which_to_drop():
    with pytest.raises(ConfigError, match="--eval-split or --eval-fraction, not both.*drop"):
        _parse(["--eval-split", "test", "--eval-fraction", "0.1"])


def test_errors_name_the_flag_typed_and_the_key_of_a_yaml_value(tmp_path):
    with pytest.raises(ConfigError, match=r"^--lr must be positive, got -1.0$"):
        _parse(["--lr", "-1"])
    with pytest.raises(ConfigError, match=r"^--grad-accum: expected an integer"):
        _parse(["--grad-accum", "many"])
    with pytest.raises(ConfigError, match=r"^--batch-size must be a whole number or auto, got 'many'"):
        _parse(["--batch-size", "many"])
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"^train\.lr must be positive"):
        _parse(["--config", str(f)])
    with pytest.raises(ConfigError, match=r"^--lr must be positive"):  # the flag overrides the file: its value
        _parse(["--config", str(f), "--lr", "-2"])


def test_flag_errors_come_before_the_heavy_imports(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from chattune.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    for argv in (["train", "--lr", "-1"], ["train", "--eval-split", "t", "--eval-fraction", "0.2"],
                 ["train", "--model", str(tmp_path), "--output-dir", str(tmp_path), "--dataset", "d"],
                 ["quickstart", "--max-steps", "0", "--output-dir", str(tmp_path / "qs")]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        assert proc.stdout.split() == ["2", "False", "False"], (argv, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_the_quickstart_config_file_is_what_the_quickstart_trains():
    from pathlib import Path

    from chattune.commands.quickstart import quickstart_config

    shipped = validate(apply_values(Config(), load_yaml(ROOT / "configs" / "quickstart.yaml"), "quickstart.yaml"))
    expected = quickstart_config(Path("quickstart-out"))
    for section in ("model", "data", "train", "lora"):
        a, b = getattr(shipped, section), getattr(expected, section)
        differ = {k: (v, getattr(b, k)) for k, v in vars(a).items() if v != getattr(b, k)}
        assert not differ, f"configs/quickstart.yaml {section}: (file, quickstart) {differ}"
