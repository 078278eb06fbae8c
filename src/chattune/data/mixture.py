"""The training and evaluation data of a run: one source (`data.dataset`), or several mixed
(`data.datasets`), each with its own split, format, column names and share of the mix.

Sampling is deterministic: the same config and seed always pick the same rows.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from chattune.config import DatasetEntry
from chattune.data.loading import LoadedSplit, concat_splits, holdout_split, load_conversations
from chattune.data.sources import fresh_reads
from chattune.errors import DataError


def sources(d) -> list[DatasetEntry]:
    """The run's sources with every field resolved: the mix's entries (unset fields from the data
    section), or the one --dataset with the run's own split settings."""
    if d.datasets:
        return [dataclasses.replace(e, split=e.split or d.train_split, format=e.format or d.format,
                                    columns=d.columns if e.columns is None else e.columns) for e in d.datasets]
    if not d.dataset:
        raise DataError("no data set given: pass --dataset (a hub id, a local directory or files), or list several "
                        "under data.datasets in the config")
    return [DatasetEntry(dataset=d.dataset, split=d.train_split, format=d.format, columns=d.columns or {},
                         config_name=d.config_name, revision=d.revision, eval_split=d.eval_split)]


def _sample(loaded, spec: DatasetEntry, seed: int, index: int):
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
    return concat_splits([d for d, _ in parts], {f for _, s in parts for f in s.format.split("+")}, name,
                         [r for _, s in parts for r in s.rejected],
                         {c for _, s in parts for c in s.info.get("ignored_columns", [])},
                         [n for _, s in parts for n in s.info.get("undeclared_tool_calls", [])])


def load_training_data(cfg, loader=load_conversations):
    """Train and eval splits as canonical conversations, validated, before any model is loaded; with
    data.cache off (--no-cache), read without any of datasets' caches. `loader` reads one split of one source
    (load_conversations' signature; preferences.load_preferences for preference pairs)."""
    with contextlib.nullcontext() if cfg.data.cache else fresh_reads():
        return _load_training_data(cfg, loader)


def _load_training_data(cfg, load_conversations=load_conversations):
    d = cfg.data
    specs = sources(d)
    mixed = bool(d.datasets)
    train_parts, eval_parts, names, eval_names = [], [], [], []
    for i, s in enumerate(specs):
        common = dict(fmt=s.format, columns=s.columns, config_name=s.config_name, revision=s.revision,
                      skip_invalid=d.skip_invalid, strict_tools=d.strict_tools)
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
