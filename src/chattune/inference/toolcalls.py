"""Generated text back to structured tool calls: each `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
block (the Hermes/Qwen layout chattune's template trains) becomes a canonical call; a block whose JSON does not
read as a call stays in the text as it was, and is counted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from chattune.data.template import CALL_END, CALL_START
from chattune.data.tools import ToolFormatError, normalize_call

# a block runs to its closing tag, or to the end of the text (generation stopped at <|im_end|> before the tag)
_BLOCK = re.compile(re.escape(CALL_START) + r"(.*?)(?:" + re.escape(CALL_END) + r"|$)", re.DOTALL)


@dataclass
class ParsedReply:
    content: str  # the text outside valid call blocks, stripped ("" when the reply only calls)
    tool_calls: list[dict] = field(default_factory=list)  # canonical calls, arguments as dicts
    invalid: int = 0  # blocks whose JSON was not a call: left in `content`


def parse_tool_calls(text: str, id_prefix: str = "call") -> ParsedReply:
    """Split a reply into its text and its tool calls; call ids are f"{id_prefix}_{k}" (the caller makes the
    prefix unique where ids must be: per request, per row, per turn)."""
    calls, kept, invalid, at = [], [], 0, 0
    for match in _BLOCK.finditer(text):
        try:
            call = normalize_call(json.loads(match.group(1).strip()))
        except (ValueError, ToolFormatError, RecursionError):
            invalid += 1
            continue
        kept.append(text[at:match.start()])
        at = match.end()
        call["id"] = f"{id_prefix}_{len(calls)}"
        calls.append(call)
    kept.append(text[at:])
    return ParsedReply(content="".join(kept).strip() if calls else text.strip(), tool_calls=calls, invalid=invalid)


def assistant_message(parsed: ParsedReply) -> dict:
    """The canonical assistant message for a parsed reply (what joins a conversation's history)."""
    msg = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        msg["tool_calls"] = parsed.tool_calls
    return msg


def describe_call(call: dict) -> str:
    """One line for people: add({"a": 1, "b": 2})."""
    fn = call["function"]
    return f"{fn['name']}({json.dumps(fn['arguments'], ensure_ascii=False)})"
