"""Data stage: load a source, convert rows to canonical messages, validate them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from chattune.data.formats import CONVERTERS, detect_format, required_columns
from chattune.data.sources import list_splits, load_split
from chattune.data.validate import check_messages, check_text
from chattune.errors import DataError

MAX_SHOWN = 5


@dataclass
class LoadedSplit:
    dataset: object  # datasets.Dataset with one column: 'messages' (or 'text' for the text format)
    format: str
    name: str
    rejected: list  # (row index, reason, original row) for rows skipped with skip_invalid


def _normalize(ds, fmt: str, columns: dict):
    if fmt == "text":
        col = columns.get("text", "text")
        ds = ds.select_columns([col])
        return ds.rename_column(col, "text") if col != "text" else ds
    if fmt == "messages" and columns.get("messages", "messages") == "messages":
        return ds.select_columns(["messages"])  # already canonical: keep only what training needs
    convert = CONVERTERS[fmt]

    def fn(batch):
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        out = []
        for row in rows:
            try:
                out.append(convert(row, columns))
            except (ValueError, KeyError, TypeError) as e:
                out.append([{"role": "__invalid__", "content": str(e)}])
        return {"messages": out}

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"Converting {fmt}")


def load_conversations(source: str, split: str, fmt: str = "auto", columns: dict | None = None,
                       config_name: str | None = None, revision: str | None = None,
                       skip_invalid: bool = False, max_samples: int | None = None) -> LoadedSplit:
    columns = columns or {}
    name = f"{source} [{split}]"
    raw = load_split(source, split, config_name, revision)
    if fmt == "auto":
        fmt = detect_format(raw.column_names, columns, where=name)
    else:
        missing = [c for c in required_columns(fmt, columns) if c not in raw.column_names]
        if missing:
            raise DataError(f"{name}: format {fmt} needs column(s) {missing}, found {sorted(raw.column_names)}")
    if max_samples is not None and max_samples < len(raw):
        raw = raw.select(range(max_samples))
    ds = _normalize(raw, fmt, columns)
    problems = []
    col = "text" if fmt == "text" else "messages"
    check = check_text if fmt == "text" else check_messages
    for start in range(0, len(ds), 2048):
        batch = ds[start:start + 2048][col]
        for j, value in enumerate(batch):
            if fmt != "text" and value and value[0].get("role") == "__invalid__":
                reason = value[0]["content"]
            else:
                reason = check(value)
            if reason:
                problems.append((start + j, reason))
    rejected = []
    if problems:
        if not skip_invalid:
            shown = "; ".join(f"row {i}: {r}" for i, r in problems[:MAX_SHOWN])
            more = f" (and {len(problems) - MAX_SHOWN} more)" if len(problems) > MAX_SHOWN else ""
            raise DataError(f"{name}: {len(problems)} invalid row(s) of {len(ds)}: {shown}{more}. Fix the rows, or "
                            "pass --skip-invalid to train on the valid ones")
        bad = {i for i, _ in problems}
        rejected = [(i, r, raw[i]) for i, r in problems]
        ds = ds.select([i for i in range(len(ds)) if i not in bad])
    if len(ds) == 0:
        raise DataError(f"{name}: no usable rows ({len(problems)} invalid) - nothing to train on")
    return LoadedSplit(dataset=ds, format=fmt, name=name, rejected=rejected)


def _content_key(value) -> int:
    """A stable hash of a conversation's content: duplicates land on the same side of a split."""
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big")


def holdout_split(ds, fraction: float):
    """Deterministic held-out split by content hash: the same data always splits the same way, and
    a conversation that appears twice is never on both sides."""
    col = "text" if "text" in ds.column_names else "messages"
    keys = [_content_key(v) for v in ds[col]]
    cut = int(fraction * 2**64)
    held = [i for i, k in enumerate(keys) if k < cut]
    if not held:  # a tiny set: take the row with the smallest key
        held = [min(range(len(keys)), key=keys.__getitem__)]
    held_set = set(held)
    train = [i for i in range(len(keys)) if i not in held_set]
    if not train:
        raise DataError(f"--eval-fraction {fraction} leaves no training rows out of {len(keys)}")
    return ds.select(train), ds.select(held)


__all__ = ["holdout_split", "load_conversations", "list_splits", "LoadedSplit", "detect_format"]
