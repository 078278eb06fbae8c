"""The training and evaluation data of a run: one source (`data.dataset`), or several mixed
(`data.datasets`), each with its own split, format, column names and share of the mix.

Sampling is deterministic: the same config and seed always pick the same rows.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np

from chattune.errors import ConfigError, DataError

ENTRY_KEYS = ("dataset", "split", "samples", "fraction", "format", "columns", "config_name", "revision", "eval_split")


@dataclass
class SourceSpec:
    dataset: str
    split: str = "train"
    format: str = "auto"
    columns: dict = field(default_factory=dict)
    config_name: str | None = None
    revision: str | None = None
    samples: int | None = None
    fraction: float | None = None
    eval_split: str | None = None


def _entry(i: int, e, d) -> SourceSpec:
    from chattune.data.formats import FORMATS

    where = f"data.datasets[{i}]"
    if isinstance(e, str):
        e = {"dataset": e}
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{dataset: PATH, samples: 1000}}, got {e!r}")
    for key in e:
        if key not in ENTRY_KEYS:
            close = difflib.get_close_matches(key, ENTRY_KEYS, n=1)
            raise ConfigError(f"{where}: unknown setting '{key}'" + (f" (did you mean '{close[0]}'?)" if close else
                                                                      f" (known: {', '.join(ENTRY_KEYS)})"))
    if not isinstance(e.get("dataset"), str) or not e["dataset"]:
        raise ConfigError(f"{where}.dataset: give the data set (hub id, directory or files)")
    samples, fraction = e.get("samples"), e.get("fraction")
    if samples is not None and fraction is not None:
        raise ConfigError(f"{where}: give samples or fraction, not both")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ConfigError(f"{where}.samples must be a whole number of at least 1, got {samples!r}")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction <= 1):
        raise ConfigError(f"{where}.fraction must be a number in (0, 1], got {fraction!r}")
    fmt = e.get("format", d.format)
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"{where}.format must be auto or one of {', '.join(FORMATS)}; got {fmt!r}")
    columns = e.get("columns", d.columns) or {}
    if not isinstance(columns, dict):
        raise ConfigError(f"{where}.columns must be a mapping {{format_column: your_column}}, got {columns!r}")
    for key in ("split", "config_name", "revision", "eval_split"):
        if e.get(key) is not None and not isinstance(e[key], str):
            raise ConfigError(f"{where}.{key} must be a string, got {e[key]!r}")
    return SourceSpec(dataset=e["dataset"], split=e.get("split") or d.train_split, format=fmt, columns=columns,
                      config_name=e.get("config_name"), revision=e.get("revision"), samples=samples,
                      fraction=None if fraction is None else float(fraction), eval_split=e.get("eval_split"))


def parse_entries(d) -> list[SourceSpec]:
    """data.datasets as specs; each error names the entry and the field."""
    if d.dataset and d.datasets:
        raise ConfigError("give data.dataset (--dataset) or data.datasets (a mix), not both")
    if not isinstance(d.datasets, list):
        raise ConfigError(f"data.datasets must be a list of data sets, got {d.datasets!r}")
    return [_entry(i, e, d) for i, e in enumerate(d.datasets)]


def sources(d) -> list[SourceSpec]:
    """The run's sources: the mix, or the one --dataset with the run's own split settings."""
    if d.datasets:
        return parse_entries(d)
    if not d.dataset:
        raise DataError("no data set given: pass --dataset (a hub id, a local directory or files), or list several "
                        "under data.datasets in the config")
    return [SourceSpec(dataset=d.dataset, split=d.train_split, format=d.format, columns=d.columns or {},
                       config_name=d.config_name, revision=d.revision, eval_split=d.eval_split)]


def _sample(loaded, spec: SourceSpec, seed: int, index: int):
    n = len(loaded.dataset)
    if spec.samples is None and spec.fraction is None:
        return loaded.dataset, n
    want = spec.samples if spec.samples is not None else max(1, round(spec.fraction * n))
    if want > n:
        raise DataError(f"data.datasets[{index}] ({loaded.name}) asks for {want} samples but has {n} valid rows; "
                        "lower samples, or use fraction")
    picks = np.sort(np.random.default_rng([seed, index]).permutation(n)[:want])
    return loaded.dataset.select(picks), want


def _combine(parts: list, name: str):
    """The splits of every source as one; each part is (dataset after sampling, its LoadedSplit)."""
    from chattune.data import concat_splits

    return concat_splits([d for d, _ in parts], {f for _, s in parts for f in s.format.split("+")}, name,
                         [r for _, s in parts for r in s.rejected],
                         {c for _, s in parts for c in s.info.get("ignored_columns", [])})


def load_training_data(cfg):
    """Train and eval splits as canonical conversations, validated, before any model is loaded."""
    from chattune.data import LoadedSplit, holdout_split, load_conversations

    d = cfg.data
    specs = sources(d)
    mixed = bool(d.datasets)
    train_parts, eval_parts, names, eval_names = [], [], [], []
    for i, s in enumerate(specs):
        common = dict(fmt=s.format, columns=s.columns, config_name=s.config_name, revision=s.revision,
                      skip_invalid=d.skip_invalid)
        loaded = load_conversations(s.dataset, s.split, max_samples=None if mixed else d.max_train_samples, **common)
        ds, n = _sample(loaded, s, cfg.train.seed, i)
        train_parts.append((ds, loaded))
        names.append(f"{loaded.name} ({n})" if mixed else loaded.name)
        if s.eval_split:
            ev = load_conversations(s.dataset, s.eval_split, max_samples=None if mixed else d.max_eval_samples,
                                    **common)
            eval_parts.append((ev.dataset, ev))
            eval_names.append(ev.name)
    train = _combine(train_parts, " + ".join(names))
    if mixed and d.max_train_samples is not None and len(train.dataset) > d.max_train_samples:
        keep = np.random.default_rng([cfg.train.seed, len(specs)]).permutation(len(train.dataset))
        train.dataset = train.dataset.select(np.sort(keep[: d.max_train_samples]))
    evaluation = _combine(eval_parts, " + ".join(eval_names)) if eval_parts else None
    if evaluation is None and d.eval_fraction > 0:
        train.dataset, held = holdout_split(train.dataset, d.eval_fraction)
        evaluation = LoadedSplit(dataset=held, format=train.format, name=f"{train.name} (held out)", rejected=[])
    if evaluation is not None and d.max_eval_samples is not None and len(evaluation.dataset) > d.max_eval_samples:
        evaluation.dataset = evaluation.dataset.select(range(d.max_eval_samples))
    return train, evaluation
