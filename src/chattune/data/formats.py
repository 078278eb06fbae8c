"""Source shapes to chattune's one canonical form: a list of {"role", "content"} messages, plus, for tool
use, the conversation's tool definitions and the messages' tool calls and results (data/tools.py).

Each converter is a small pure function of one row; `to_canonical` converts and validates.
`detect_format` picks the shape from the column names; `--format` forces one, and `data.columns`
renames columns ({"messages": "dialog"}).
"""

from __future__ import annotations

import json

from chattune.config import FORMATS
from chattune.data.tools import ToolFormatError, normalize_calls, normalize_tools
from chattune.data.validate import Reason, RowError, check_messages, check_text
from chattune.errors import DataError

__all__ = ["FORMATS", "detect_format", "to_canonical"]

FORMAT_HELP = (
    "messages (column 'messages' of {role, content}, the OpenAI/ultrachat shape); "
    "sharegpt (column 'conversations' of {from, value}); "
    "alpaca (columns 'instruction', 'output', optional 'input', 'system', 'history'); "
    "prompt_completion (columns 'prompt' and 'completion'); "
    "text (column 'text', for continued pre-training)"
)

# sharegpt speaker names to canonical roles
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "system": "system",
    "function_call": "assistant",  # the model's own tool call: its value {name, arguments} becomes a tool call
    "observation": "tool", "tool": "tool", "function": "tool",
}
CALL_SPEAKERS = {"function_call"}
# formats whose rows may carry a conversation-level 'tools' column
TOOL_FORMATS = {"messages", "sharegpt", "prompt_completion"}


def detect_format(column_names: list[str], columns: dict | None = None, where: str = "data set") -> str:
    """Choose the format from column names. Messages wins over a stray 'prompt' column (ultrachat has both)."""
    cols = set(column_names)
    c = columns or {}

    def has(*names):
        return all(c.get(n, n) in cols for n in names)

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction", "output"):
        return "alpaca"
    if has("prompt", "completion"):
        return "prompt_completion"
    if has("text"):
        return "text"
    raise DataError(
        f"{where} has no usable chat columns: found {sorted(cols)}. Accepted formats: {FORMAT_HELP}. "
        "Rename columns with data.columns in the config, e.g. columns: {messages: dialog}"
    )


def required_columns(fmt: str, columns: dict | None = None) -> list[str]:
    c = columns or {}
    names = {"messages": ["messages"], "sharegpt": ["conversations"], "alpaca": ["instruction", "output"],
             "prompt_completion": ["prompt", "completion"], "text": ["text"]}[fmt]
    return [c.get(n, n) for n in names]


def optional_columns(fmt: str, columns: dict | None = None) -> list[str]:
    c = columns or {}
    names = {"alpaca": ["input", "system", "history"], "sharegpt": ["system", "tools"], "messages": ["tools"],
             "prompt_completion": ["tools"]}.get(fmt, [])
    return [c.get(n, n) for n in names]


# ---- converters: one row (a dict) to a list of messages; raise RowError with the reason ---------


def _listish(value, name: str, shape: str) -> list:
    """A list of turns; a JSON string holding one is read too (CSV files can only hold strings)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError("malformed row", f"'{name}' is a string that is not valid JSON") from None
        except RecursionError:
            raise RowError("nested too deeply", f"'{name}' holds JSON nested too deeply to read") from None
    if value is None:
        raise RowError("empty conversation", f"'{name}' is null")
    if not isinstance(value, list):
        raise RowError("malformed row", f"'{name}' is {type(value).__name__}, expected a list of {shape}")
    return value


def from_messages(row: dict, c: dict) -> list[dict]:
    """OpenAI's / transformers' messages, tool calls (arguments a JSON string or an object) and results included."""
    name = c.get("messages", "messages")
    out = []
    for i, m in enumerate(_listish(row[name], name, "{role, content}")):
        if not isinstance(m, dict):
            raise RowError("malformed row", f"message {i} is {type(m).__name__}, expected {{role, content}}")
        msg = {"role": m.get("role"), "content": m.get("content")}
        calls = normalize_calls(m.get("tool_calls"))
        if calls:
            msg["tool_calls"] = calls
            if msg["content"] is None:  # OpenAI sends null content with a call; canonical is ""
                msg["content"] = ""
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None and msg["role"] == "tool":
                msg[key] = m[key]
        out.append(msg)
    return out


def from_sharegpt(row: dict, c: dict) -> list[dict]:
    name = c.get("conversations", "conversations")
    turns = _listish(row[name], name, "{from, value}")
    out = []
    system = row.get(c.get("system", "system"))
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError("malformed row", f"turn {i} is {type(t).__name__}, expected {{from, value}}")
        speaker = t.get("from")
        if speaker is None:
            raise RowError("missing role", f"turn {i} has no 'from' (the speaker)")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise RowError("unknown role", f"turn {i} has unknown speaker 'from': {speaker!r} "
                                           f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
        if str(speaker).lower() in CALL_SPEAKERS:
            try:
                calls = normalize_calls(t.get("value"))
            except ToolFormatError as e:
                raise RowError(e.kind, f"turn {i} ({speaker}): {e}") from None
            if not calls:
                raise RowError("invalid tool call", f"turn {i} ({speaker}) holds no call")
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        msg = {"role": role, "content": t.get("value")}
        if role == "tool" and out and out[-1].get("tool_calls") and len(out[-1]["tool_calls"]) == 1:
            msg["name"] = out[-1]["tool_calls"][0]["function"]["name"]  # the function this result is from
        out.append(msg)
    return out


def from_alpaca(row: dict, c: dict) -> list[dict]:
    out = []
    system = row.get(c.get("system", "system"))
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    history = row.get(c.get("history", "history")) or []
    if not isinstance(history, list):
        raise RowError("malformed row", f"'history' is {type(history).__name__}, expected a list of "
                                        "[question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError("malformed row", f"history entry {i} is not a [question, answer] pair")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = row.get(c.get("instruction", "instruction"))
    extra = row.get(c.get("input", "input"))
    if isinstance(instruction, str) and isinstance(extra, str) and extra:
        # one newline, as LLaMA-Factory's alpaca converter joins them ("prompt\nquery"): the same file gives
        # the same prompts in both tools
        instruction = "\n".join(part for part in (instruction, extra) if part)
    out += [{"role": "user", "content": instruction},
            {"role": "assistant", "content": row.get(c.get("output", "output"))}]
    return out


def from_prompt_completion(row: dict, c: dict) -> list[dict]:
    prompt, completion = row[c.get("prompt", "prompt")], row[c.get("completion", "completion")]
    # TRL's conversational prompt/completion: lists of messages
    if isinstance(prompt, list) and isinstance(completion, list):
        return from_messages({"messages": prompt + completion}, {})
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


CONVERTERS = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
}


def to_canonical(row: dict, fmt: str, columns: dict, strict_tools: bool = False):
    """One row in format `fmt` to (value, None) when valid, or (None, Reason) when not; the value is
    {"messages": [...], "tools": [...] or None} for chat formats, or a string for the text format."""
    if fmt == "text":
        value = row.get(columns.get("text", "text"))
        reason = check_text(value)
        return (None, reason) if reason else (value, None)
    try:
        messages = CONVERTERS[fmt](row, columns)
        tools = normalize_tools(row.get(columns.get("tools", "tools"))) if fmt in TOOL_FORMATS else None
    except (RowError, ToolFormatError) as e:
        return None, Reason(e.kind, str(e))
    except KeyError as e:
        return None, Reason("malformed row", f"the row has no {e.args[0]!r} column")
    except RecursionError:  # a value nested past Python's limit: a bad row, not a crash
        return None, Reason("nested too deeply", "a value is nested too deeply to read")
    reason = check_messages(messages, tools, strict_tools)
    return (None, reason) if reason else ({"messages": messages, "tools": tools}, None)
