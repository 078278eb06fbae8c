"""Source shapes to chattune's one canonical form: a list of {"role", "content"} messages.

Each converter is a small pure function of one row. `detect_format` picks the shape from the column
names; `--format` forces one, and `data.columns` renames columns ({"messages": "dialog"}).
"""

from __future__ import annotations

from chattune.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")

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
    "function_call": "assistant",  # the model's own tool call: trained on like any reply
    "observation": "tool", "tool": "tool", "function": "tool",
}


def column(fmt: str, name: str, columns: dict) -> str:
    """The dataset column holding format field `name`, after the user's renames."""
    return columns.get(name, name)


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
    names = {"alpaca": ["input", "system", "history"], "sharegpt": ["system"]}.get(fmt, [])
    return [c.get(n, n) for n in names]


# ---- converters: one row (a dict) to a list of messages; raise ValueError with the reason --------


def from_messages(row: dict, c: dict) -> list[dict]:
    msgs = row[c.get("messages", "messages")]
    if not isinstance(msgs, list):
        raise ValueError(f"'messages' is {type(msgs).__name__}, expected a list of {{role, content}}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is {type(m).__name__}, expected {{role, content}}")
        out.append({"role": m.get("role"), "content": m.get("content")})
    return out


def from_sharegpt(row: dict, c: dict) -> list[dict]:
    turns = row[c.get("conversations", "conversations")]
    if not isinstance(turns, list):
        raise ValueError(f"'conversations' is {type(turns).__name__}, expected a list of {{from, value}}")
    out = []
    system = row.get(c.get("system", "system"))
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ValueError(f"turn {i} is {type(t).__name__}, expected {{from, value}}")
        speaker = t.get("from")
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise ValueError(f"turn {i} has unknown speaker 'from': {speaker!r} "
                             f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
        out.append({"role": role, "content": t.get("value")})
    return out


def from_alpaca(row: dict, c: dict) -> list[dict]:
    out = []
    system = row.get(c.get("system", "system"))
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    history = row.get(c.get("history", "history")) or []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"history entry {i} is not a [question, answer] pair")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = row.get(c.get("instruction", "instruction"))
    extra = row.get(c.get("input", "input"))
    if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
        instruction = f"{instruction}\n\n{extra}"
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
