"""Tool-call accuracy: at every assistant turn of a data set that calls tools, the model is given the conversation
so far (with its tools) and must make the same calls: the right function names with the same arguments, parsed
from its reply. Turns that answer a tool result are scored too, by exact match with the reference answer.
"""

from __future__ import annotations

import json

from chattune.data.template import CALL_END, CALL_START
from chattune.data.tools import call_json, rows_of
from chattune.inference.generate import generate_replies

MAX_TURNS = 200  # default number of call turns (and of answer turns) scored


def _key(calls: list[dict]) -> list[str]:
    """Calls compared as a multiset of (name, arguments), arguments as canonical JSON (key order ignored)."""
    return sorted(json.dumps([c["function"]["name"], c["function"]["arguments"]], sort_keys=True) for c in calls)


def scored_turns(conversations, tools) -> tuple[list, list]:
    """(call turns, answer turns), each a list of (prompt messages, tools, reference message): call turns are
    assistant messages with tool calls, answer turns assistant messages right after tool results."""
    calls, answers = [], []
    for conv, t in zip(conversations, tools or [None] * len(conversations)):
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            if m.get("tool_calls"):
                calls.append((conv[:i], t, m))
            elif i and conv[i - 1]["role"] == "tool":
                answers.append((conv[:i], t, m))
    return calls, answers


def turns_of(dataset, limit: int) -> tuple[list, list]:
    """Up to `limit` call turns and `limit` answer turns of a stored dataset, read in chunks until there are enough."""
    calls, answers = [], []
    for start in range(0, len(dataset), 256):
        c, a = scored_turns(*rows_of(dataset[start:start + 256]))
        calls, answers = calls + c, answers + a
        if len(calls) >= limit and len(answers) >= limit:
            break
    return calls[:limit], answers[:limit]


def has_tool_calls(dataset) -> bool:
    return "tools" in dataset.column_names and bool(turns_of(dataset.select(range(min(len(dataset), 1000))), 1)[0])


def _budget(tokenizer, texts: list[str]) -> int:
    """New tokens for the longest reference, with room to spare."""
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return int(longest * 1.25) + 8


def score_tool_calls(model, tokenizer, dataset, max_turns: int = MAX_TURNS, batch_size: int = 16) -> dict:
    """Tool-call accuracy of `model` on a canonical dataset (the wide tool schema), greedy decoding."""
    calls, answers = turns_of(dataset, max_turns)
    result = {"call_turns": len(calls), "answer_turns": len(answers)}
    if calls:
        refs = ["\n".join(f"{CALL_START}\n{call_json(c)}\n{CALL_END}" for c in m["tool_calls"]) for _, _, m in calls]
        replies = generate_replies(model, tokenizer, [p for p, _, _ in calls], _budget(tokenizer, refs), batch_size,
                                   tools=[t or [] for _, t, _ in calls])
        right = [_key(r["tool_calls"]) == _key(m["tool_calls"]) for r, (_, _, m) in zip(replies, calls)]
        names = [sorted(c["function"]["name"] for c in r["tool_calls"]) ==
                 sorted(c["function"]["name"] for c in m["tool_calls"]) for r, (_, _, m) in zip(replies, calls)]
        result.update(call_accuracy=sum(right) / len(calls), name_accuracy=sum(names) / len(calls),
                      parsed_rate=sum(bool(r["tool_calls"]) for r in replies) / len(calls),
                      invalid_calls=sum(r["invalid_tool_calls"] for r in replies),
                      call_examples=[{"prompt": p[-1]["content"], "expected": [call_json(c) for c in m["tool_calls"]],
                                      "reply": r["reply"], "correct": ok}
                                     for (p, _, m), r, ok in list(zip(calls, replies, right))[:3]])
    if answers:
        replies = generate_replies(model, tokenizer, [p for p, _, _ in answers],
                                   _budget(tokenizer, [m["content"] for _, _, m in answers]), batch_size,
                                   tools=[t or [] for _, t, _ in answers])
        result["answer_exact_match"] = sum(r["reply"].strip() == m["content"].strip()
                                           for r, (_, _, m) in zip(replies, answers)) / len(answers)
    return result
