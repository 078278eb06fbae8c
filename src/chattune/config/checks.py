"""Range and consistency checks on a whole config, at the boundary: every error names the field."""

from __future__ import annotations

import typing

from chattune.config.schema import (
    DPO_LOSS_TYPES,
    FORMATS,
    SECTIONS,
    TRACKERS,
    Config,
    DataConfig,
    DatasetEntry,
    TrainConfig,
    fields_of,
    report_to_list,
)
from chattune.config.values import _coerce
from chattune.errors import ConfigError


def validate(cfg: Config) -> Config:
    """Range and consistency checks; each error names its field."""
    t, d = cfg.train, cfg.data
    if isinstance(t.batch_size, str) and t.batch_size != "auto":
        raise ConfigError(f"train.batch_size must be a whole number or auto, got {t.batch_size!r}")
    positive = {"train.batch_size": 1 if t.batch_size == "auto" else t.batch_size, "train.grad_accum": t.grad_accum,
                "train.logging_steps": t.logging_steps}
    for name, v in positive.items():
        if v < 1:
            raise ConfigError(f"{name} must be at least 1, got {v}")
    for name, v in {"train.max_steps": t.max_steps, "train.eval_steps": t.eval_steps, "train.save_steps": t.save_steps,
                    "train.eval_batch_size": t.eval_batch_size, "data.max_length": d.max_length,
                    "data.max_train_samples": d.max_train_samples, "data.max_eval_samples": d.max_eval_samples,
                    "train.save_total_limit": t.save_total_limit,
                    "train.early_stopping_patience": t.early_stopping_patience}.items():
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
    if t.num_workers is not None and t.num_workers < 0:
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
    if d.eval_fraction > 0 and (d.eval_split or any(e.eval_split for e in d.datasets)):
        raise ConfigError("give data.eval_split or data.eval_fraction, not both: drop data.eval_fraction to evaluate "
                          "on the split, or drop data.eval_split to hold out that fraction of the training rows")
    _check_tracking_and_stopping(t)
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
    _check_dpo(cfg)
    return cfg


def _check_dpo(cfg: Config) -> None:
    dpo = cfg.dpo
    if not dpo.beta > 0:
        raise ConfigError(f"dpo.beta must be positive, got {dpo.beta}")
    unknown = [t for t in dpo.loss_types() if t not in DPO_LOSS_TYPES]
    if unknown or not dpo.loss_types():
        raise ConfigError(f"dpo.loss_type: unknown {', '.join(unknown) or 'empty value'}; use one of "
                          f"{', '.join(DPO_LOSS_TYPES)}, or several joined by commas (e.g. sigmoid,sft)")


def _check_tracking_and_stopping(t: TrainConfig) -> None:
    unknown = [n for n in report_to_list(t.report_to) if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"train.report_to: unknown tracker {unknown[0]!r}; give none or one or more of "
                          f"{', '.join(TRACKERS)} separated by commas")
    if t.early_stopping_threshold < 0:  # when it can apply at all is checked with the run (training/early_stop.py)
        raise ConfigError(f"train.early_stopping_threshold must be >= 0, got {t.early_stopping_threshold}")


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
