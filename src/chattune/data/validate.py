"""Checks on canonical conversations before any model is loaded.

A legal conversation: an optional system message first, then turns that start with the user, with each
user message answered by the assistant, ending with an assistant reply. Content is a non-empty string,
except that an assistant message that calls tools may have none. An assistant message with tool calls is
followed by the tools' results (role tool, one or more), which the assistant then answers; a result's
tool_call_id, when it has one, names one of those calls. A call's arguments are a JSON object, and a call
to a function the conversation's tools do not declare is counted (an error with strict_tools).

`check_messages` is the rule, one conversation at a time, and says what is wrong; `suspect_rows`
applies the same rule to a whole Arrow column of plain {role, content} messages at once (numpy and Arrow
compute), so that at ultrachat scale only the rows it flags are read into Python and explained.
"""

from __future__ import annotations

import numpy as np

from chattune.data.tools import ToolFormatError, normalize_calls, tool_names

ROLES = ("system", "user", "assistant", "tool")

# which roles may follow which; None is the start of the conversation, "call" an assistant message with tool
# calls (answered by tool results only)
_NEXT = {
    None: {"system", "user"},
    "system": {"user"},
    "user": {"assistant"},
    "assistant": {"user"},
    "call": {"tool"},
    "tool": {"tool", "assistant"},
}

# each kind of problem, and how to fix it (the report shows the fix once per kind)
FIXES = {
    "unreadable file": "check that the file is complete and of the type its name says",
    "invalid JSON": "make each line one complete JSON object (JSON Lines: one object per line)",
    "invalid UTF-8": "save the file as UTF-8 (or remove the line)",
    "nested too deeply": "flatten the row: a chat row needs a list of messages, not deeply nested values",
    "malformed row": "give each row the format's columns, with the documented types",
    "empty conversation": "give the row a user message and an assistant reply, or remove it",
    "missing role": "give every message a 'role': system, user, assistant or tool",
    "unknown role": "use the roles system, user, assistant and tool (sharegpt's human, gpt, system, "
                    "function_call and observation are mapped to them)",
    "null content": "give every message its text in 'content'",
    "non-string content": "make 'content' a string (join multi-part content into one text)",
    "empty content": "remove empty messages or give them text",
    "role order": "start with an optional system message, then alternate user and assistant turns (tool results "
                  "follow the assistant's call)",
    "invalid tools": "give 'tools' as a list of function definitions {name, description, parameters} (or OpenAI's "
                     "{type: function, function: {...}}), as a list or a JSON string",
    "invalid tool call": "give each call a function name and its arguments as a JSON object (or a JSON string of "
                         "one), e.g. {\"name\": \"add\", \"arguments\": {\"a\": 1}}",
    "misplaced tool call": "only assistant messages call tools: move tool_calls to the assistant message",
    "tool result without call": "put each tool result (role tool, sharegpt observation) right after the assistant "
                                "message that calls the tool, with a tool_call_id that names one of its calls",
    "unanswered tool call": "follow every assistant tool call with the tool's result (role tool), or end the "
                            "conversation with the call",
    "undeclared tool": "declare every called function in the conversation's tools, or drop --strict-tools to "
                       "only count such calls",
    "no assistant reply": "end each conversation with the assistant's reply: it is what the model learns",
    "invalid text": "give every row a non-empty string in the text column",
    # preference pairs (preferences.py)
    "missing chosen": "give every row a chosen reply next to the rejected one",
    "missing rejected": "give every row a rejected reply next to the chosen one",
    "identical chosen and rejected": "remove pairs whose two replies are the same text: they carry no preference",
    "not ending with an assistant reply": "end chosen and rejected with the assistant reply being compared",
    "prompts differ": "chosen and rejected must share the conversation before the last reply; fix or remove the row",
    "no prompt": "give the row a prompt (a string, or the messages before the reply)",
}


class Reason(str):
    """A problem's description (a plain string), with its kind for counting and for the fix."""

    kind: str

    def __new__(cls, kind: str, text: str):
        obj = super().__new__(cls, text)
        obj.kind = kind
        return obj

    def __reduce__(self):  # stays a Reason through pickling (datasets' worker processes)
        return (Reason, (self.kind, str(self)))


class RowError(ValueError):
    """Raised by the format converters for a row they cannot read."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


def check_messages(messages, tools=None, strict_tools: bool = False) -> Reason | None:
    """The first problem with a conversation (canonical messages, and the conversation's canonical tools), as a
    short reason, or None when it is valid. strict_tools: a call to an undeclared function is a problem too."""
    if messages is None:
        return Reason("empty conversation", "no messages (the value is null)")
    if not isinstance(messages, list) or not messages:
        return Reason("empty conversation", "empty conversation: no messages")
    prev, call_ids = None, set()  # the previous message's state, and the ids of the calls results answer
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return Reason("malformed row", f"message {i} is {type(m).__name__}, expected {{role, content}}")
        role, content = m.get("role"), m.get("content")
        if role is None:
            return Reason("missing role", f"message {i} has no role")
        if role not in ROLES:
            return Reason("unknown role", f"message {i} has unknown role {role!r} (known: {', '.join(ROLES)})")
        calls = m.get("tool_calls")
        if calls and role != "assistant":
            return Reason("misplaced tool call", f"message {i} ({role}) has tool_calls: only assistant messages call "
                                                 "tools")
        reason = _check_content(i, role, content, bool(calls)) or \
            (_check_calls(i, calls, tools, strict_tools) if calls else None) or _check_order(i, role, prev, m, call_ids)
        if reason:
            return reason
        if calls:
            call_ids = {c.get("id") for c in calls if isinstance(c, dict) and c.get("id")}
        prev = "call" if calls else role
    if prev not in ("assistant", "call"):
        return Reason("no assistant reply",
                      f"no assistant reply at the end (last message is {prev!r}): nothing to train on")
    return None


def _check_content(i: int, role: str, content, calls: bool) -> Reason | None:
    if content is None:
        return None if calls else Reason("null content", f"message {i} ({role}) has null content")
    if not isinstance(content, str):
        return Reason("non-string content",
                      f"message {i} ({role}) content is {type(content).__name__}, expected a string")
    if not content.strip() and not calls:
        return Reason("empty content", f"message {i} ({role}) has empty content")
    return None


def _check_calls(i: int, calls, tools, strict: bool) -> Reason | None:
    try:
        calls = normalize_calls(calls)
    except ToolFormatError as e:
        return Reason(e.kind, f"message {i}: {e}")
    if strict:
        declared = tool_names(tools)
        for c in calls:
            name = c["function"]["name"]
            if name not in declared:
                return Reason("undeclared tool", f"message {i} calls {name!r}, which the conversation's tools do not "
                                                 f"declare ({', '.join(sorted(declared)) or 'no tools declared'})")
    return None


def _check_order(i: int, role: str, prev, m: dict, call_ids: set) -> Reason | None:
    if role == "tool":
        if prev not in ("call", "tool"):
            return Reason("tool result without call", f"message {i} is a tool result that follows no assistant tool "
                                                      "call")
        cid = m.get("tool_call_id")
        if cid and call_ids and cid not in call_ids:
            ids = ", ".join(sorted(call_ids))
            return Reason("tool result without call", f"message {i} answers tool_call_id {cid!r}, which no call of the "
                                                      f"assistant message before it has ({ids})")
        return None
    if prev == "call":
        return Reason("unanswered tool call", f"message {i - 1} calls a tool, but message {i} ({role}) is not its "
                                              "result")
    if role not in _NEXT[prev]:
        after = f"after a {prev} message" if prev else "at the start"
        return Reason("role order", f"message {i}: role {role!r} cannot come {after} "
                                    f"(expected {' or '.join(sorted(_NEXT[prev]))})")
    return None


def undeclared_calls(messages: list[dict], tools) -> list[str]:
    """Names of the functions a (valid, canonical) conversation calls without declaring them in its tools."""
    declared = tool_names(tools)
    return [c["function"]["name"] for m in messages for c in m.get("tool_calls") or []
            if c["function"]["name"] not in declared]


def check_text(text) -> Reason | None:
    if text is None:
        return Reason("invalid text", "text is null")
    if not isinstance(text, str):
        return Reason("invalid text", f"text is {type(text).__name__}, expected a string")
    if not text.strip():
        return Reason("invalid text", "text is empty")
    return None


# ---- the same rules over a whole Arrow column -------------------------------------------------

# exactly the characters Python's str.isspace() accepts (a test holds this), as an RE2 class
_BLANK = (r"^[\t\n\x{0b}\x{0c}\r\x{1c}-\x{1f} \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
          r"\x{205f}\x{3000}]*$")
_START = len(ROLES)
_LEGAL = np.zeros((len(ROLES) + 1, len(ROLES)), dtype=bool)  # [previous role (or start), role]
for _prev, _allowed in _NEXT.items():
    if _prev == "call":  # plain {role, content} messages never call: a tool result there is always flagged
        continue
    for _role in _allowed:
        _LEGAL[_START if _prev is None else ROLES.index(_prev), ROLES.index(_role)] = True


def fast_checkable(arrow_type) -> bool:
    """Whether a column type is a list of {role: string, content: string} (what suspect_rows reads)."""
    import pyarrow as pa

    if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)):
        return False
    item = arrow_type.value_type
    if not pa.types.is_struct(item) or {item.field(i).name for i in range(item.num_fields)} != {"role", "content"}:
        return False
    return all(pa.types.is_string(item.field(n).type) or pa.types.is_large_string(item.field(n).type)
               for n in ("role", "content"))


def _blank(strings):
    import pyarrow.compute as pc

    return pc.or_kleene(pc.is_null(strings), pc.match_substring_regex(strings, _BLANK)).fill_null(True)


def suspect_rows(column) -> np.ndarray:
    """Row indices of a conversations column (fast_checkable type) that check_messages could reject.
    Every row it rejects is among them; the caller asks check_messages why."""
    import pyarrow.compute as pc

    bad_rows, base = [], 0
    for chunk in column.chunks:
        n = len(chunk)
        lengths = pc.list_value_length(chunk).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        row_bad = chunk.is_null().to_numpy(zero_copy_only=False) | (lengths == 0)
        flat = chunk.flatten()  # the messages of this chunk's rows, in order
        if len(flat):
            role, content = flat.field("role"), flat.field("content")
            code = pc.index_in(role, value_set=_roles_array()).fill_null(-1).to_numpy(zero_copy_only=False)
            bad = (code < 0) | flat.is_null().to_numpy(zero_copy_only=False) | \
                _blank(content).to_numpy(zero_copy_only=False)
            starts = np.r_[0, np.cumsum(lengths)[:-1]]
            prev = np.empty_like(code)
            prev[1:] = code[:-1]
            prev[starts[lengths > 0]] = _START
            bad |= ~_LEGAL[np.where(prev < 0, _START, prev), np.clip(code, 0, None)]
            owner = np.repeat(np.arange(n), lengths)
            row_bad |= np.bincount(owner[bad], minlength=n).astype(bool)
            last = np.cumsum(lengths) - 1
            nonempty = lengths > 0
            row_bad[nonempty] |= code[last[nonempty]] != ROLES.index("assistant")
        bad_rows.append(np.flatnonzero(row_bad) + base)
        base += n
    return np.concatenate(bad_rows) if bad_rows else np.zeros(0, dtype=np.int64)


def suspect_texts(column) -> np.ndarray:
    """Row indices of a string column that check_text could reject."""
    return np.flatnonzero(_blank(column).to_numpy(zero_copy_only=False)) if len(column) else np.zeros(0, np.int64)


def _roles_array():
    import pyarrow as pa

    return pa.array(ROLES)
