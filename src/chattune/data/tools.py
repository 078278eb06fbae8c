"""Tool calling in canonical data: tool definitions, calls and results, in one shape wherever they come from.

In memory (converters' output, what chat templates receive; transformers' chat-template convention):
  a conversation's tools   [{"type": "function", "function": {"name", "description", "parameters"}}]
  an assistant message     {"role": "assistant", "content": str ("" when it only calls), "tool_calls": [
                             {"id": str | None, "type": "function", "function": {"name": str, "arguments": dict}}]}
  a tool message           {"role": "tool", "content": str, "tool_call_id": str | None, "name": str | None}
Arguments are a dict here; on the wire (the HTTP API, the rows `generate` writes) they are a JSON string, as in
OpenAI's API. In Arrow (datasets) `tool_calls` and the conversation's `tools` are JSON strings: schemas and
arguments differ from row to row, and Arrow structs would give every row every other row's keys as nulls.
"""

from __future__ import annotations

import json

# the per-message fields a tool conversation adds to {role, content}
MESSAGE_FIELDS = ("tool_calls", "tool_call_id", "name")


class ToolFormatError(ValueError):
    """A tool definition or call that cannot be read; `kind` names the problem for counting."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


def _json_value(value, what: str, kind: str):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ToolFormatError(kind, f"{what} is a string that is not valid JSON: {value[:80]!r}") from None
        except RecursionError:
            raise ToolFormatError(kind, f"{what} is nested too deeply to read") from None
    return value


def drop_nulls(value):
    """A value with None-valued keys removed, at any depth: rows read through Arrow get every key that any
    other row has, as null (a schema's explicit `null` is lost too; it carries no meaning in a tool schema)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def normalize_tools(value) -> list[dict] | None:
    """Tool definitions (a list, or a JSON string holding one; OpenAI's {type, function} shape or the bare
    {name, description, parameters} one) in the OpenAI shape; None when there are none."""
    value = _json_value(value, "'tools'", "invalid tools")
    if value is None or value == []:
        return None
    if isinstance(value, dict):  # a single definition
        value = [value]
    if not isinstance(value, list):
        raise ToolFormatError("invalid tools", f"'tools' is {type(value).__name__}, expected a list of function "
                                               "definitions")
    out = []
    for i, tool in enumerate(drop_nulls(value)):
        if not isinstance(tool, dict):
            raise ToolFormatError("invalid tools", f"tool {i} is {type(tool).__name__}, expected an object")
        fn = tool.get("function") if "function" in tool else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise ToolFormatError("invalid tools", f"tool {i} has no function name")
        out.append({"type": tool.get("type", "function"), "function": fn})
    return out


def tool_names(tools: list[dict] | None) -> set[str]:
    return {t["function"]["name"] for t in tools or []}


def normalize_call(call, i: int = 0) -> dict:
    """One tool call (OpenAI's {id, type, function: {name, arguments}} or a bare {name, arguments}; arguments a
    dict or a JSON string) in the canonical shape, arguments a dict."""
    call = _json_value(call, f"tool call {i}", "invalid tool call")
    if not isinstance(call, dict):
        raise ToolFormatError("invalid tool call", f"tool call {i} is {type(call).__name__}, expected an object")
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolFormatError("invalid tool call", f"tool call {i} has no function name")
    raw = fn.get("arguments", fn.get("parameters", {}))
    # arguments given as a dict went through Arrow in a table: its null keys are other rows' arguments
    args = drop_nulls(raw) if isinstance(raw, dict) else _json_value(raw, f"the arguments of tool call {i} ({name})",
                                                                     "invalid tool call")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ToolFormatError("invalid tool call", f"the arguments of tool call {i} ({name}) are "
                                                   f"{type(args).__name__}, expected a JSON object")
    return {"id": call.get("id"), "type": "function", "function": {"name": name, "arguments": args}}


def normalize_calls(value) -> list[dict] | None:
    """A message's tool calls (a list, a single call, or a JSON string of either) canonical; None when none."""
    value = _json_value(value, "'tool_calls'", "invalid tool call")
    if value is None or value == []:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ToolFormatError("invalid tool call", f"'tool_calls' is {type(value).__name__}, expected a list")
    return [normalize_call(c, i) for i, c in enumerate(value)]


def call_json(call: dict) -> str:
    """A call as the model writes it: {"name": ..., "arguments": {...}} (arguments kept as given when a string)."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    return ('{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": '
            + (args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)) + "}")


class Conversation(list):
    """A list of messages that carries the conversation's tool definitions (`tools`, or None), for code that
    passes conversations around as plain lists (sample prompts of the report and of `eval --samples`)."""

    def __init__(self, messages=(), tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools


def has_tools(messages: list[dict], tools) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


# ---- Arrow storage: JSON strings for the fields whose shape varies ---------------------------------------


def to_arrow(messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], str | None]:
    """A canonical conversation as the wide Arrow row: every message has every field, calls as JSON."""
    rows = []
    for m in messages:
        calls = m.get("tool_calls")
        rows.append({"role": m.get("role"), "content": m.get("content"),
                     "tool_calls": json.dumps(calls, ensure_ascii=False) if calls else None,
                     "tool_call_id": m.get("tool_call_id"), "name": m.get("name")})
    return rows, json.dumps(tools, ensure_ascii=False) if tools else None


def message_from_arrow(m: dict) -> dict:
    """One stored message back in the canonical shape: calls decoded, absent fields left out."""
    out = {"role": m["role"], "content": m["content"]}
    for key in MESSAGE_FIELDS:
        value = m.get(key)
        if value is not None:
            out[key] = json.loads(value) if key == "tool_calls" else value
    return out


def from_arrow(messages: list[dict], tools: str | None = None) -> tuple[list[dict], list[dict] | None]:
    """A stored row (messages, tools column) as (canonical messages, tools)."""
    return [message_from_arrow(m) for m in messages], json.loads(tools) if tools else None


def rows_of(batch: dict) -> tuple[list[list[dict]], list | None]:
    """A batch of stored rows ({"messages": [...], optional "tools": [...]}) as conversations and their tools
    (None when the data has no tools column)."""
    tools = batch.get("tools")
    convs, out_tools = [], []
    for i, messages in enumerate(batch["messages"]):
        conv, t = from_arrow(messages, tools[i] if tools is not None else None)
        convs.append(conv)
        out_tools.append(t)
    return convs, out_tools if tools is not None else None


def to_wire(calls: list[dict] | None) -> list[dict] | None:
    """Canonical calls in OpenAI's wire shape: arguments as a JSON string."""
    if not calls:
        return None
    return [{"id": c.get("id"), "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}} for c in calls]
