"""The run configuration: small nested dataclasses, one schema for YAML files and command-line flags.

Precedence: dataclass defaults < YAML file (--config) < command-line flags. Every value is
validated here, at the boundary, and errors name the field (`train.lr`). The resolved config is
written to each run's output directory; it holds no secrets (tokens come from the environment).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chattune.errors import ConfigError
from chattune.outputs import CONFIG_FILE

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")


def opt(default: Any = None, help: str = "", flag: str | None = None, choices: tuple | None = None, **kw):
    """A config field; `flag` makes it a command-line option too (same name, same parsing)."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if callable(default) and not isinstance(default, (str, int, float, bool)):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    name: str = opt("gpt2", "hub id or local directory of a causal language model", flag="--model")
    revision: str | None = opt(None, "hub revision (branch, tag or commit)", flag="--model-revision")
    trust_remote_code: bool = opt(False, "run modelling code shipped with the model (off unless you trust it)",
                                  flag="--trust-remote-code")
    chat_template: str | None = opt(None, "a .jinja file to use as chat template instead of the model's own",
                                    flag="--chat-template")


@dataclass
class DatasetEntry:
    """One source of a mix (data.datasets); unset fields take the data section's values."""

    dataset: str = opt("", "hub id, local directory or files, as --dataset")
    split: str | None = opt(None, "split to train on (default: data.train_split)")
    samples: int | None = opt(None, "take this many valid rows, drawn with train.seed")
    fraction: float | None = opt(None, "take this share of the valid rows, drawn with train.seed")
    format: str | None = opt(None, "data format (default: data.format)", choices=(None, "auto", *FORMATS))
    columns: dict | None = opt(None, "column renames (default: data.columns)")
    config_name: str | None = opt(None, "the data set's configuration (subset) name")
    revision: str | None = opt(None, "hub revision of the data set")
    eval_split: str | None = opt(None, "also evaluate on this split of the source")


@dataclass
class DataConfig:
    dataset: str | None = opt(None, "hub id, local directory laid out like a hub data set, or "
                                    ".json/.jsonl/.parquet/.csv files (a path, a glob, or paths separated by "
                                    "commas)", flag="--dataset")
    datasets: list[DatasetEntry] = opt(list, "several data sets mixed in one run, instead of --dataset: a list of "
                                             "{dataset, split, samples or fraction, format, columns, config_name, "
                                             "revision, eval_split}")
    config_name: str | None = opt(None, "the data set's configuration (subset) name", flag="--dataset-config")
    revision: str | None = opt(None, "hub revision of the data set", flag="--dataset-revision")
    train_split: str = opt("train", "split to train on", flag="--train-split")
    eval_split: str | None = opt(None, "split to evaluate on (none: no evaluation unless --eval-fraction)",
                                 flag="--eval-split")
    eval_fraction: float = opt(0.0, "hold out this fraction of the training rows for evaluation when there "
                                    "is no eval split", flag="--eval-fraction")
    format: str = opt("auto", "data format; auto detects it from the columns", flag="--format",
                      choices=("auto", *FORMATS))
    columns: dict = opt(dict, "column renames {format_column: your_column}, e.g. {messages: dialog}")
    max_length: int | None = opt(None, "truncate conversations to this many tokens "
                                       "(default: the model's context)", flag="--max-length")
    max_train_samples: int | None = opt(None, "use at most this many training conversations",
                                        flag="--max-train-samples")
    max_eval_samples: int | None = opt(None, "use at most this many evaluation conversations",
                                       flag="--max-eval-samples")
    skip_invalid: bool = opt(False, "train on the valid rows and write the rest to rejected.jsonl "
                                    "instead of stopping", flag="--skip-invalid")
    strict_tools: bool = opt(False, "reject conversations that call a function their tools do not declare "
                                    "(by default such calls are counted in the log)", flag="--strict-tools")
    cache: bool = opt(True, "reuse the tokenized data an earlier run prepared from the same data, tokenizer, "
                            "template and max length (in $CHATTUNE_CACHE, default ~/.cache/chattune)", flag="--cache")


@dataclass
class TrainConfig:
    output_dir: str = opt("out", "where the model, checkpoints, metrics and config go", flag="--output-dir")
    epochs: float = opt(1.0, "passes over the training data", flag="--epochs")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides --epochs)",
                                flag="--max-steps")
    batch_size: int = opt(4, "conversations per device per forward pass", flag="--batch-size")
    eval_batch_size: int | None = opt(None, "evaluation batch size (default: --batch-size)",
                                      flag="--eval-batch-size")
    grad_accum: int = opt(1, "forward passes per optimizer step", flag="--grad-accum")
    lr: float = opt(2e-5, "peak learning rate", flag="--lr")
    lr_scheduler: str = opt("cosine", "learning-rate schedule", flag="--lr-scheduler",
                            choices=("cosine", "linear", "constant", "constant_with_warmup"))
    warmup: float = opt(0.0, "warm-up: a fraction of the steps if below 1, else a number of steps",
                        flag="--warmup")
    weight_decay: float = opt(0.0, "AdamW weight decay", flag="--weight-decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", flag="--max-grad-norm")
    seed: int = opt(42, "random seed for initialisation, data order and dropout", flag="--seed")
    precision: str = opt("auto", "auto: bf16 on CUDA where supported, else fp16; fp32 on CPU and MPS",
                         flag="--precision", choices=("auto", "fp32", "fp16", "bf16"))
    logging_steps: int = opt(10, "log training metrics every N optimizer steps", flag="--logging-steps")
    eval_steps: int | None = opt(None, "evaluate every N steps (default: at the end of each epoch)",
                                 flag="--eval-steps")
    save_steps: int | None = opt(None, "save a checkpoint every N steps (default: at the end of each epoch)",
                                 flag="--save-steps")
    save_total_limit: int | None = opt(2, "keep at most this many checkpoints", flag="--save-total-limit")
    save_minutes: float | None = opt(None, "also save a checkpoint whenever this many minutes have passed since the "
                                           "last one", flag="--save-minutes")
    resume: bool | str = opt(False, "continue from the newest checkpoint in --output-dir, or from a given "
                                    "checkpoint directory", flag="--resume")
    group_by_length: bool = opt(True, "batch conversations of similar length together (less padding, faster; "
                                      "batches become less random)", flag="--group-by-length")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory",
                                       flag="--gradient-checkpointing")
    num_workers: int = opt(0, "data-loader worker processes", flag="--num-workers")
    attention_dropout: float | None = opt(0.0, "attention-probability dropout while training (null: the model's "
                                               "own, gpt2's 0.1). 0 lets PyTorch's fused attention run, which on a "
                                               "CPU cut a step's time by about a third and its memory by 0.8 GiB "
                                               "(bench/); recent chat models train with 0. The saved config keeps "
                                               "the model's value", flag="--attention-dropout")
    eval_baseline: bool = opt(True, "also score the base model on the evaluation split, for the before/after "
                                    "comparison in report.md (one extra evaluation pass)", flag="--eval-baseline")


@dataclass
class LoraConfig:
    enabled: bool = opt(False, "train a LoRA adapter (PEFT) instead of every weight", flag="--lora")
    qlora: bool = opt(False, "LoRA on a 4-bit base model (bitsandbytes; needs a CUDA GPU)", flag="--qlora")
    r: int = opt(16, "LoRA rank", flag="--lora-r")
    alpha: int = opt(32, "LoRA scaling alpha (the update is scaled by alpha / r)", flag="--lora-alpha")
    dropout: float = opt(0.05, "dropout on the LoRA input", flag="--lora-dropout")
    target_modules: list[str] | None = opt(None, "comma-separated module names to adapt, or all-linear (default: "
                                                 "c_attn,c_proj,c_fc for GPT-2, all linear layers otherwise)",
                                           flag="--lora-target-modules")
    merge: bool = opt(False, "after training, also write a standalone merged model to OUTPUT/merged",
                      flag="--merge")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        return path


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoraConfig}


def fields_of(section_cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(section_cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or say which field is wrong."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if tp is list or origin is list:
        inner = (typing.get_args(tp) or (Any,))[0]
        if isinstance(value, str) and not dataclasses.is_dataclass(inner):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [v if inner is Any else _coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _coerce_section(value, tp, where)
    return value


def _coerce_section(value: Any, section_cls, where: str):
    """A mapping (or an instance) as the dataclass `section_cls`; a bare string names its first field."""
    if isinstance(value, section_cls):
        value = dataclasses.asdict(value)
    fields = fields_of(section_cls)
    if isinstance(value, str):
        value = {next(iter(fields)): value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{{next(iter(fields))}: ...}}, got {value!r}")
    obj = section_cls()
    for key, v in value.items():
        if key not in fields:
            raise _unknown(key, list(fields), where)
        setattr(obj, key, _coerce(v, fields[key][1], f"{where}.{key}"))
    return obj


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
    return ConfigError(f"{where}: unknown setting '{key}'{hint}")


def apply_values(cfg: Config, values: dict, source: str) -> Config:
    """Set nested values {section: {field: value}} on cfg, coercing types; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), "
                          f"got {type(values).__name__}")
    for section, entries in values.items():
        if section not in SECTIONS:
            raise _unknown(section, list(SECTIONS), source)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {entries!r}")
        target = getattr(cfg, section)
        fields = fields_of(SECTIONS[section])
        for key, value in entries.items():
            if key not in fields:
                raise _unknown(key, list(fields), f"{source}: {section}")
            f, tp = fields[key]
            setattr(target, key, _coerce(value, tp, f"{section}.{key}"))
    return cfg


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping with sections {', '.join(SECTIONS)}")
    return data


def read_saved(directory: str | Path) -> dict:
    """The run configuration saved in a model directory (chattune.yaml), as plain values; {} when there is none."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def validate(cfg: Config) -> Config:
    """Range and consistency checks; each error names its field."""
    t, d = cfg.train, cfg.data
    positive = {"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "train.logging_steps": t.logging_steps}
    for name, v in positive.items():
        if v < 1:
            raise ConfigError(f"{name} must be at least 1, got {v}")
    for name, v in {"train.max_steps": t.max_steps, "train.eval_steps": t.eval_steps, "train.save_steps": t.save_steps,
                    "train.eval_batch_size": t.eval_batch_size, "data.max_length": d.max_length,
                    "data.max_train_samples": d.max_train_samples, "data.max_eval_samples": d.max_eval_samples,
                    "train.save_total_limit": t.save_total_limit}.items():
        if v is not None and v < 1:
            raise ConfigError(f"{name} must be at least 1 (or unset), got {v}")
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if t.epochs <= 0 and t.max_steps is None:
        raise ConfigError(f"train.epochs must be positive, got {t.epochs}")
    if t.warmup < 0:
        raise ConfigError(f"train.warmup must be >= 0, got {t.warmup}")
    if t.warmup >= 1 and not float(t.warmup).is_integer():
        raise ConfigError(f"train.warmup: {t.warmup} is neither a fraction below 1 nor a whole number of steps")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    if t.weight_decay < 0 or t.max_grad_norm < 0:
        raise ConfigError("train.weight_decay and train.max_grad_norm must be >= 0")
    if t.num_workers < 0:
        raise ConfigError(f"train.num_workers must be >= 0, got {t.num_workers}")
    if t.attention_dropout is not None and not 0 <= t.attention_dropout < 1:
        raise ConfigError(f"train.attention_dropout must be in [0, 1), got {t.attention_dropout}")
    for section in SECTIONS:
        for name, (f, _) in fields_of(SECTIONS[section]).items():
            choices = f.metadata.get("choices")
            value = getattr(getattr(cfg, section), name)
            if choices and value not in choices:
                raise ConfigError(f"{section}.{name} must be one of {', '.join(choices)}; got {value!r}")
    if not cfg.model.name:
        raise ConfigError("model.name is empty: give --model (a hub id or a local directory)")
    _check_entries(d)
    if t.save_minutes is not None and not t.save_minutes > 0:
        raise ConfigError(f"train.save_minutes must be positive (or unset), got {t.save_minutes}")
    lo = cfg.lora
    if lo.r < 1 or lo.alpha < 1:
        raise ConfigError(f"lora.r and lora.alpha must be at least 1, got r={lo.r}, alpha={lo.alpha}")
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if lo.target_modules is not None and not lo.target_modules:
        raise ConfigError("lora.target_modules is empty: name modules, use all-linear, or leave it unset")
    if lo.merge and not (lo.enabled or lo.qlora):
        raise ConfigError("lora.merge (--merge) needs an adapter run: add --lora or --qlora")
    return cfg


def _check_entries(d: DataConfig) -> None:
    # entries set from Python may be plain mappings or strings: coerced like YAML's, errors naming the entry
    d.datasets = _coerce(d.datasets, typing.get_type_hints(DataConfig)["datasets"], "data.datasets")
    if d.dataset and d.datasets:
        raise ConfigError("give data.dataset (--dataset) or data.datasets (a mix), not both")
    for i, e in enumerate(d.datasets):
        where = f"data.datasets[{i}]"
        if not e.dataset:
            raise ConfigError(f"{where}.dataset: give the data set (hub id, directory or files)")
        if e.samples is not None and e.fraction is not None:
            raise ConfigError(f"{where}: give samples or fraction, not both")
        if e.samples is not None and e.samples < 1:
            raise ConfigError(f"{where}.samples must be a whole number of at least 1, got {e.samples!r}")
        if e.fraction is not None and not 0 < e.fraction <= 1:
            raise ConfigError(f"{where}.fraction must be a number in (0, 1], got {e.fraction!r}")
        choices = fields_of(DatasetEntry)["format"][0].metadata["choices"]
        if e.format not in choices:
            raise ConfigError(f"{where}.format must be auto or one of {', '.join(FORMATS)}; got {e.format!r}")
