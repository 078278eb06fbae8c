"""Loading a split: read a source, convert rows to canonical messages, validate them.

Every problem is found before any model is loaded, and reported with where it is (file and line or
row), what is wrong and how to fix it; `skip_invalid` trains on the valid rows instead and keeps
the rejected ones, each with its reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from chattune.data.digest import code_digest
from chattune.data.formats import detect_format, optional_columns, required_columns, to_canonical
from chattune.data.sources import Part, load_parts
from chattune.data.tools import Conversation, from_arrow, has_tools, to_arrow
from chattune.data.validate import (
    FIXES,
    Reason,
    check_messages,
    check_text,
    fast_checkable,
    suspect_rows,
    suspect_texts,
    undeclared_calls,
)
from chattune.errors import DataError

MAX_SHOWN = 5


@dataclass
class Problem:
    where: str  # "data/train.jsonl line 7", "ds [train] row 12"
    reason: Reason  # str, with .kind
    row: object  # the original row, or the text of a line that is not JSON


@dataclass
class LoadedSplit:
    # datasets.Dataset: column 'messages' of {role, content} (or 'text' for the text format); tool data has the
    # wide schema instead (canonical_features(tools=True): a 'tools' column, tool fields on every message)
    dataset: object
    format: str
    name: str
    rejected: list  # Problems skipped with skip_invalid
    info: dict = field(default_factory=dict)  # notes for the log (ignored columns, undeclared tool calls)


def concat_splits(datasets: list, formats: set, name: str, rejected: list, ignored: set,
                  undeclared: list | None = None) -> LoadedSplit:
    """Canonical datasets of one or several sources as one split; plain text cannot join chat data."""
    from datasets import concatenate_datasets

    if "preference" in formats and len(formats) > 1:
        raise DataError(f"{name}: preference pairs cannot be mixed with chat data in one run (formats found: "
                        f"{', '.join(sorted(formats))})")
    if "text" in formats and len(formats) > 1:
        raise DataError(f"{name}: plain-text (continued pre-training) data cannot be mixed with chat data in one "
                        f"run (formats found: {', '.join(sorted(formats))})")
    if len(datasets) > 1:
        if formats == {"preference"}:  # preferences.py: canonical pairs, no tool fields
            target = canonical_features("preference")
            datasets = [d if d.features == target else d.cast(target) for d in datasets]
        else:
            wide = any("tools" in d.column_names for d in datasets)
            target = canonical_features("text" if formats == {"text"} else "messages", tools=wide)
            # plain chat joining tool data gets the tool fields, all null (datasets' cast adds missing struct fields)
            datasets = [d if d.features == target else _with_tools_column(d, wide).cast(target) for d in datasets]
    info = {"ignored_columns": sorted(ignored)} if ignored else {}
    if undeclared:
        info["undeclared_tool_calls"] = undeclared
    return LoadedSplit(dataset=datasets[0] if len(datasets) == 1 else concatenate_datasets(datasets),
                       format="+".join(sorted(formats)), name=name, rejected=rejected, info=info)


def _with_tools_column(ds, wide: bool):
    return ds.add_column("tools", [None] * len(ds)) if wide and "tools" not in ds.column_names else ds


def canonical_features(fmt: str, tools: bool = False):
    """The canonical schema: plain chat keeps {role, content} messages (the fast Arrow paths read it); tool data
    adds tool_calls (JSON), tool_call_id and name to every message and a 'tools' column (JSON) per conversation."""
    from datasets import Features, List, Value

    if fmt == "text":
        return Features({"text": Value("string")})
    if tools:
        fields = {k: Value("string") for k in ("role", "content", "tool_calls", "tool_call_id", "name")}
        return Features({"messages": List(fields), "tools": Value("string")})
    messages = List({"role": Value("string"), "content": Value("string")})
    if fmt == "preference":  # preferences.py: the canonical pair
        return Features({"prompt": messages, "chosen": messages, "rejected": messages})
    return Features({"messages": messages})


def has_tool_schema(ds) -> bool:
    return "tools" in ds.column_names


def _narrow(ds):
    """A wide (tool-schema) dataset without any tool content back to plain {role, content} messages, in Arrow."""
    import pyarrow as pa

    def narrow(table):
        col = table.column("messages").combine_chunks()
        values = col.flatten()
        struct = pa.StructArray.from_arrays([values.field("role"), values.field("content")], names=["role", "content"])
        offsets = pa.array(col.offsets.to_numpy() - col.offsets[0].as_py())
        return pa.table({"messages": pa.ListArray.from_arrays(offsets, struct)})

    return ds.with_format("arrow").map(narrow, batched=True, features=canonical_features("messages"),
                                       remove_columns=ds.column_names, desc="Canonical form").with_format(None)


def _undeclared_note(where: str, names: list[str]) -> str:
    return f"{where}: calls {', '.join(repr(n) for n in dict.fromkeys(names))} without declaring it in its tools"



def _resolve_format(columns_found: list[str], fmt: str, columns: dict, where: str) -> str:
    if fmt == "auto":
        return detect_format(columns_found, columns, where=where)
    missing = [c for c in required_columns(fmt, columns) if c not in columns_found]
    if missing:
        raise DataError(f"{where}: format {fmt} needs column(s) {missing}, found {sorted(columns_found)}. Rename "
                        "columns with data.columns in the config, e.g. columns: {messages: dialog}")
    return fmt


def _from_python(part: Part, fmt: str, columns: dict, limit: int | None, strict_tools: bool = False):
    """A JSON file Arrow could not read: convert and check each parsed row in Python."""
    from datasets import Dataset

    rows = part.rows[:limit] if limit is not None else part.rows
    found = sorted({k for r in rows if isinstance(r, dict) for k in r})
    fmt = _resolve_format(found, fmt, columns, part.label)
    values, problems, undeclared = [], [], []
    for i, row in enumerate(rows):
        if i in part.bad:
            reason, raw = part.bad[i]
            problems.append(Problem(part.locate(i), reason, raw))
            continue
        value, reason = to_canonical(row, fmt, columns, strict_tools)
        if reason:
            problems.append(Problem(part.locate(i), reason, row))
            continue
        values.append(value)
        if fmt != "text":
            names = undeclared_calls(value["messages"], value["tools"])
            if names:
                undeclared.append(_undeclared_note(part.locate(i), names))
    if fmt == "text":
        return Dataset.from_dict({"text": values}, features=canonical_features(fmt)), fmt, problems, len(rows), \
            found, undeclared
    wide = any(has_tools(v["messages"], v["tools"]) for v in values)
    if wide:
        pairs = [to_arrow(v["messages"], v["tools"]) for v in values]
        data = {"messages": [m for m, _ in pairs], "tools": [t for _, t in pairs]}
    else:
        data = {"messages": [[{"role": m["role"], "content": m["content"]} for m in v["messages"]] for v in values]}
    return Dataset.from_dict(data, features=canonical_features(fmt, tools=wide)), fmt, problems, len(rows), found, \
        undeclared


def _from_arrow(part: Part, fmt: str, columns: dict, limit: int | None, strict_tools: bool = False):
    raw = part.dataset
    if limit is not None and limit < len(raw):
        raw = raw.select(range(limit))
    fmt = _resolve_format(raw.column_names, fmt, columns, part.label)
    col = columns.get(fmt, fmt)
    problems = []
    if fmt in ("messages", "text") and col in raw.column_names:
        arrow_type = raw.features.arrow_schema.field(col).type
        fast = fast_checkable(arrow_type) if fmt == "messages" else (str(arrow_type) in ("string", "large_string"))
        if fast:
            # already canonical: keep the column (no copy), check it with Arrow, explain the suspects in Python
            ds = raw.select_columns([col])
            if col != fmt:
                ds = ds.rename_column(col, fmt)
            table = ds.with_format("arrow")[:]
            suspects = suspect_rows(table.column(fmt)) if fmt == "messages" else suspect_texts(table.column(fmt))
            check = check_messages if fmt == "messages" else check_text
            for i in suspects.tolist():
                reason = check(ds[i][fmt])
                if reason:
                    problems.append((i, reason))
            return _keep_valid(ds, problems), fmt, _problems(part, problems), len(raw), raw.column_names, []
    convert = _Converter(fmt, columns, strict_tools)

    import pyarrow.compute as pc
    from datasets import Features, Value

    # named by data, format and converter code: datasets' own hash of `convert` would miss code changes
    fingerprint = hashlib.sha256(json.dumps([raw._fingerprint, fmt, columns, strict_tools, code_digest()],
                                            sort_keys=True).encode()).hexdigest()[:32]
    features = Features({**canonical_features(fmt, tools=fmt != "text"), "_kind": Value("string"),
                         "_reason": Value("string"), "_tools": Value("bool"), "_undeclared": Value("string")})
    mapped = raw.map(convert, batched=True, remove_columns=raw.column_names, new_fingerprint=fingerprint,
                     features=features, desc=f"Converting {fmt}")
    table = mapped.with_format("arrow")[:]
    bad = np.flatnonzero(pc.is_valid(table.column("_reason")).to_numpy(zero_copy_only=False))
    kinds, reasons = table.column("_kind").take(bad).to_pylist(), table.column("_reason").take(bad).to_pylist()
    problems = [(i, Reason(k, r)) for i, k, r in zip(bad.tolist(), kinds, reasons)]
    flagged = np.flatnonzero(pc.is_valid(table.column("_undeclared")).to_numpy(zero_copy_only=False))
    undeclared = [_undeclared_note(part.locate(int(i)), names.split("\n"))
                  for i, names in zip(flagged.tolist(), table.column("_undeclared").take(flagged).to_pylist())]
    if fmt == "text":
        ds = mapped.select_columns(["text"])
    elif pc.any(table.column("_tools")).as_py():
        ds = mapped.select_columns(["messages", "tools"])
    else:  # no row uses tools: the plain schema, which the fast paths read
        ds = _narrow(mapped.select_columns(["messages", "tools"]))
    return _keep_valid(ds, problems), fmt, _problems(part, problems), len(raw), raw.column_names, undeclared


class _Converter:
    """The map function of _from_arrow: a batch of source rows to canonical rows, with each row's problem."""

    def __init__(self, fmt: str, columns: dict, strict_tools: bool):
        self.fmt, self.columns, self.strict_tools = fmt, columns, strict_tools

    def __call__(self, batch):
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        out = {"messages": [], "tools": [], "text": [], "_kind": [], "_reason": [], "_tools": [], "_undeclared": []}
        for row in rows:
            value, reason = to_canonical(row, self.fmt, self.columns, self.strict_tools)
            out["_kind"].append(reason.kind if reason else None)
            out["_reason"].append(str(reason) if reason else None)
            if self.fmt == "text":
                out["text"].append(value if reason is None else "")
                continue
            messages, tools = (value["messages"], value["tools"]) if reason is None else ([], None)
            stored, stored_tools = to_arrow(messages, tools)
            out["messages"].append(stored)
            out["tools"].append(stored_tools)
            out["_tools"].append(has_tools(messages, tools))
            names = undeclared_calls(messages, tools) if reason is None else []
            out["_undeclared"].append("\n".join(names) if names else None)
        if self.fmt == "text":
            return {k: out[k] for k in ("text", "_kind", "_reason")} | {"_tools": [False] * len(rows),
                                                                          "_undeclared": [None] * len(rows)}
        return {k: v for k, v in out.items() if k != "text"}


def _keep_valid(ds, problems: list):
    if not problems:
        return ds
    keep = np.ones(len(ds), dtype=bool)
    keep[[i for i, _ in problems]] = False
    return ds.select(np.flatnonzero(keep))


def _problems(part: Part, found: list) -> list[Problem]:
    return [Problem(part.locate(i), reason, part.raw(i)) for i, reason in found]


def report(name: str, problems: list[Problem], total: int, valid: int) -> str:
    """Problems counted by kind, with the fix for each, then the first few with where they are."""
    counts = Counter(p.reason.kind for p in problems)
    lines = [f"{name}: {len(problems)} invalid row(s) of {total}"]
    for kind, n in counts.most_common():
        lines.append(f"  {kind}: {n} (fix: {FIXES.get(kind, 'see the reason')})")
    lines.append("  first problems:")
    lines += [f"    {p.where}: {p.reason}" for p in problems[:MAX_SHOWN]]
    if len(problems) > MAX_SHOWN:
        lines.append(f"    ... and {len(problems) - MAX_SHOWN} more")
    lines.append(f"Fix these rows, or pass --skip-invalid to train on the {valid} valid row(s) (each rejected row is "
                 "written to OUTPUT/rejected.jsonl with its reason)" if valid else
                 "No row is usable, so there is nothing to train on.")
    return "\n".join(lines)


def load_conversations(source: str, split: str, fmt: str = "auto", columns: dict | None = None,
                       config_name: str | None = None, revision: str | None = None,
                       skip_invalid: bool = False, max_samples: int | None = None,
                       strict_tools: bool = False) -> LoadedSplit:
    """One split of a source as canonical conversations (or texts), every row checked.

    max_samples reads only the first rows (across the source's files, in order). Calls to functions a
    conversation does not declare are listed in info['undeclared_tool_calls'], or rejected with strict_tools."""
    columns = columns or {}
    name = f"{source} [{split}]"
    pieces, formats, problems, read, ignored, undeclared = [], set(), [], 0, set(), []
    for part in load_parts(source, split, config_name, revision):
        limit = None if max_samples is None else max_samples - read
        if limit is not None and limit <= 0:
            break
        loader = _from_python if part.rows is not None else _from_arrow
        ds, f, found, n, cols, names = loader(part, fmt, columns, limit, strict_tools)
        undeclared += names
        pieces.append(ds)
        formats.add(f)
        problems += found
        read += n
        used = set(required_columns(f, columns) + optional_columns(f, columns))
        ignored |= {c for c in cols if c not in used}
    valid = sum(len(d) for d in pieces)
    if problems and not (skip_invalid and valid):
        raise DataError(report(name, problems, read, valid))
    if valid == 0:
        raise DataError(f"{name}: no rows - nothing to train on")
    return concat_splits(pieces, formats, name, problems if skip_invalid else [], ignored, undeclared)


def _content_key(value) -> int:
    """A stable hash of a conversation's content: duplicates land on the same side of a split."""
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big")


def holdout_split(ds, fraction: float):
    """Deterministic held-out split by content hash: the same data always splits the same way, and
    a conversation that appears twice is never on both sides."""
    # preference pairs by their prompt: pairs on one prompt never straddle the split
    col = next(c for c in ("text", "prompt", "messages") if c in ds.column_names)
    keys = np.array([_content_key(v) for batch in ds.select_columns([col]).iter(batch_size=4096)
                     for v in batch[col]], dtype=np.uint64)
    cut = np.uint64(min(int(fraction * 2**64), 2**64 - 1))
    held = np.flatnonzero(keys < cut)
    if not len(held):  # a tiny set: take the row with the smallest key
        held = np.array([int(np.argmin(keys))])
    train = np.setdiff1d(np.arange(len(keys)), held)
    if not len(train):
        raise DataError(f"--eval-fraction {fraction} leaves no training rows out of {len(keys)}")
    return ds.select(train), ds.select(held)



def sample_prompts(rows, n: int) -> list[tuple[list[dict], str]]:
    """(conversation up to its last assistant reply, that reply) for the first n conversations of a canonical
    dataset (or a list of its messages). Tool calls come back decoded, and a conversation with tools comes as
    a Conversation that carries them, which generate_replies renders with them."""
    tools = None
    if hasattr(rows, "column_names"):
        rows = rows.select(range(min(n, len(rows))))
        tools = rows["tools"] if "tools" in rows.column_names else None
        rows = rows["messages"]
    out = []
    for i, conv in enumerate(rows[:n]):
        conv, _ = from_arrow(conv)
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        out.append((Conversation(conv[:last], tools=from_arrow([], tools[i])[1] if tools else None),
                    conv[last]["content"]))
    return out
