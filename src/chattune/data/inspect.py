"""`chattune data inspect` and `chattune data validate`: what a data set holds and what the model
would be trained on, before any training.

Token statistics use the model's tokenizer and chat template exactly as training does; an example
conversation is shown token by token with the tokens that carry loss marked.
"""

from __future__ import annotations

import copy
import os
import sys
from collections import Counter

import numpy as np

from chattune.data.loading import report
from chattune.data.mixture import load_training_data
from chattune.data.template import is_chattune_template, render_with_spans
from chattune.data.tokenize import encode_conversations, encode_texts
from chattune.data.tools import rows_of
from chattune.errors import ChattuneError, DataError
from chattune.outputs import IGNORE_INDEX

PERCENTILES = (50, 90, 95, 99)
GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"


def _pick(split_name: str, train, evaluation):
    if split_name == "eval":
        if evaluation is None:
            raise DataError("this data set has no evaluation split: give --eval-split or --eval-fraction")
        return evaluation
    return train


def _turn_stats(ds, fmt: str) -> dict:
    if fmt == "text":
        return {}
    table = ds.with_format("arrow")[:]
    col = table.column("messages")
    lengths = np.concatenate([c.value_lengths().to_numpy(zero_copy_only=False) for c in col.chunks]) \
        if col.num_chunks else np.zeros(0)
    roles = Counter()
    for chunk in col.chunks:
        roles.update(dict(zip(*np.unique(chunk.flatten().field("role").to_numpy(zero_copy_only=False),
                                         return_counts=True))))
    return {"messages_per_conversation": {"mean": round(float(lengths.mean()), 2), "min": int(lengths.min()),
                                          "max": int(lengths.max())},
            "roles": {str(k): int(v) for k, v in sorted(roles.items())}}


def _with_tools(rows: dict) -> tuple[list, list | None]:
    """Stored rows as (conversations, tools) for the encoders: tool calls decoded, tools per conversation."""
    return rows_of(rows) if "tools" in rows else (rows["messages"], None)


def _tool_stats(ds) -> dict:
    """For tool data: conversations that declare tools, assistant calls and tool results."""
    if "tools" not in ds.column_names:
        return {}
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    flat = table.column("messages").combine_chunks().flatten()

    def count(mask) -> int:
        return int(pc.sum(mask).as_py() or 0)

    return {"tool_use": {"conversations_with_tools": count(pc.is_valid(table.column("tools"))),
                         "assistant_messages_with_calls": count(pc.is_valid(flat.field("tool_calls"))),
                         "tool_results": count(pc.equal(flat.field("role"), "tool"))}}


def _sample_indices(n: int, sample: int | None, seed: int) -> np.ndarray:
    if not sample or sample >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:sample])


def token_stats(ds, fmt: str, tokenizer, max_length: int, sample: int | None, seed: int = 0) -> dict:
    """Full token lengths (no truncation) over a sample, and what max_length would cut away."""
    idx = _sample_indices(len(ds), sample, seed)
    lengths, lost, loss_total, cut, emptied = [], 0, 0, 0, 0
    for start in range(0, len(idx), 512):
        rows = ds.select(idx[start:start + 512])[:]
        if fmt == "text":
            enc = encode_texts(tokenizer, rows["text"])
        else:
            convs, tools = _with_tools(rows)
            enc = encode_conversations(tokenizer, convs, tools=tools)
        for labels in enc["labels"]:
            lab = np.asarray(labels)
            loss = lab != IGNORE_INDEX
            lengths.append(len(lab))
            loss_total += int(loss.sum())
            if len(lab) > max_length:
                cut += 1
                lost += int(loss[max_length:].sum())
                emptied += int(not loss[:max_length].any())
    arr = np.asarray(lengths)
    return {
        "sampled": int(len(idx)),
        "tokens": {"mean": round(float(arr.mean()), 1), "max": int(arr.max()),
                   **{f"p{p}": int(np.percentile(arr, p)) for p in PERCENTILES}},
        "truncation": {"max_length": max_length, "conversations_cut": cut, "conversations_cut_share": cut / len(arr),
                       "assistant_tokens_lost": lost, "assistant_tokens_lost_share": lost / max(loss_total, 1),
                       "conversations_left_without_loss": emptied},
    }


def example(ds, fmt: str, tokenizer, index: int, max_length: int) -> dict:
    """One conversation as the model sees it: text, tokens, ids and the loss mask (1 = trained on)."""
    if not 0 <= index < len(ds):
        raise ChattuneError(f"--example {index} is out of range: the split has {len(ds)} rows")
    row = ds[index]
    if fmt == "text":
        text = row["text"]
        enc = encode_texts(tokenizer, [text])
    else:
        convs, tools = _with_tools({k: [v] for k, v in row.items()})
        text = render_with_spans(tokenizer, convs, tools)[0][0]
        enc = encode_conversations(tokenizer, convs, None, tools)
    ids = enc["input_ids"][0]
    ends = [b for _, b in tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).offsets]
    # each token shown with the text since the previous one ended, so the pieces join to the whole text
    pieces = [text[a:b] for a, b in zip([0] + ends[:-1], ends)] + [tokenizer.decode(t) for t in ids[len(ends):]]
    return {"index": index, "text": text, "ids": ids, "tokens": pieces,
            "loss_mask": [int(x != IGNORE_INDEX) for x in enc["labels"][0]], "max_length": max_length}


def inspect_data(cfg, tokenizer, max_length: int, split: str = "train", sample: int | None = 2000,
                 index: int = 0) -> dict:
    train, evaluation = load_training_data(cfg)
    loaded = _pick(split, train, evaluation)
    ds, fmt = loaded.dataset, loaded.format
    kind = "text" if fmt == "text" else "messages"
    return {"data": loaded.name, "split": split, "format": fmt, "rows": len(ds),
            "rejected": len(loaded.rejected), "chat_template": _template_name(tokenizer),
            **_turn_stats(ds, kind), **(_tool_stats(ds) if kind == "messages" else {}),
            "undeclared_tool_calls": len(loaded.info.get("undeclared_tool_calls", [])),
            **token_stats(ds, kind, tokenizer, max_length, sample, cfg.train.seed),
            "example": example(ds, kind, tokenizer, index, max_length)}


def _template_name(tokenizer) -> str:
    return "chattune" if is_chattune_template(tokenizer.chat_template) else "model"


def _use_colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def render_example(ex: dict, colour: bool) -> str:
    """Tokens with loss in bold green (or inside ⟦ ⟧ without colour); a bar marks the max-length cut."""
    out, inside = [], False
    for i, (piece, m) in enumerate(zip(ex["tokens"], ex["loss_mask"])):
        if i == ex["max_length"]:
            out.append(("\033[0m" if colour else "⟧" if inside else "") + "▌[cut at max length]▐")
            inside = False
        if colour:
            out.append((GREEN if m else DIM) + piece + RESET)
        else:
            if m and not inside:
                out.append("⟦")
            elif not m and inside:
                out.append("⟧")
            inside = bool(m)
            out.append(piece)
    if inside and not colour:
        out.append("⟧")
    return "".join(out)


def format_inspect(r: dict, colour: bool | None = None) -> str:
    colour = _use_colour() if colour is None else colour
    t, tr = r["tokens"], r["truncation"]
    lines = [f"{r['data']}: {r['rows']} conversations, format {r['format']}"
             + (f", {r['rejected']} invalid rows skipped" if r["rejected"] else "")]
    if "roles" in r:
        m = r["messages_per_conversation"]
        lines.append(f"messages per conversation: mean {m['mean']}, min {m['min']}, max {m['max']}")
        lines.append("roles: " + ", ".join(f"{k} {v}" for k, v in r["roles"].items()))
    if "tool_use" in r:
        u = r["tool_use"]
        lines.append(f"tools: {u['conversations_with_tools']} conversations declare tools; "
                     f"{u['assistant_messages_with_calls']} assistant messages call tools (trained on), "
                     f"{u['tool_results']} tool results (not trained on)"
                     + (f"; {r['undeclared_tool_calls']} conversations call an undeclared function"
                        if r.get("undeclared_tool_calls") else ""))
    sampled = "" if r["sampled"] == r["rows"] else f" (a sample of {r['sampled']})"
    lines.append(f"tokens per conversation{sampled}, {r['chat_template']} template: "
                 + ", ".join(f"{k} {t[k]}" for k in ("mean", *[f"p{p}" for p in PERCENTILES], "max")))
    lines.append(f"--max-length {tr['max_length']}: cuts {tr['conversations_cut']} conversations "
                 f"({tr['conversations_cut_share']:.1%}) and {tr['assistant_tokens_lost_share']:.1%} of assistant "
                 f"tokens; {tr['conversations_left_without_loss']} would keep no assistant token (dropped)")
    ex = r["example"]
    legend = "trained-on tokens in green" if colour else "trained-on tokens inside ⟦ ⟧"
    lines += ["", f"example {ex['index']} ({len(ex['ids'])} tokens, {sum(ex['loss_mask'])} trained on; {legend}):",
              render_example(ex, colour)]
    return "\n".join(lines)


def validate_data(cfg, loader=None) -> dict:
    """Every check training runs on its data, without a model: per split the valid and invalid row
    counts, and the problems by kind (an unusable source raises, as training would). `loader` reads a split
    (preferences.load_preferences for preference pairs; default: chat data)."""
    cfg = copy.deepcopy(cfg)  # the caller's config is left as given
    cfg.data.skip_invalid = True  # collect every problem instead of stopping at the first split
    splits = [s for s in (load_training_data(cfg, loader) if loader else load_training_data(cfg)) if s is not None]
    problems = [p for s in splits for p in s.rejected]
    result = {"ok": not problems,
              "splits": [{"name": s.name, "format": s.format, "valid": len(s.dataset), "invalid": len(s.rejected)}
                         for s in splits],
              "problems": dict(Counter(p.reason.kind for p in problems).most_common()),
              "first": [{"where": p.where, "kind": p.reason.kind, "reason": str(p.reason)} for p in problems[:20]],
              "undeclared_tool_calls": [n for s in splits for n in s.info.get("undeclared_tool_calls", [])]}
    if problems:
        valid = sum(x["valid"] for x in result["splits"])
        result["report"] = report(" + ".join(s.name for s in splits if s.rejected), problems, valid + len(problems),
                                  valid)
    return result


def format_validate(r: dict) -> str:
    lines = [f"{s['name']}: {s['valid']} valid {'pairs' if s['format'] == 'preference' else 'conversations'}, "
             f"format {s['format']}"
             + (f", {s['invalid']} invalid" if s["invalid"] else "") for s in r["splits"]]
    undeclared = r.get("undeclared_tool_calls")
    if undeclared:  # not a problem by default: counted, and an error with --strict-tools
        lines.append(f"{len(undeclared)} conversation(s) call a function their tools do not declare (first: "
                     f"{undeclared[0]}); --strict-tools rejects them")
    return "\n".join(lines + ([r["report"]] if not r["ok"] else ["no problems found"]))
