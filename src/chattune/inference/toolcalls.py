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


class CallStream:
    """Streaming counterpart of parse_tool_calls: feed text as it is generated; get back ("content", text) events
    for text outside call blocks (a possible start of a call tag is held back until it is known) and ("call",
    canonical call) when a block closes with valid JSON. A block that is not a valid call is released as content
    and counted in `invalid`. finish() flushes what is left (an unclosed block at the end is parsed too)."""

    def __init__(self, id_prefix: str = "call"):
        self.id_prefix, self.buffer, self.inside, self.calls, self.invalid = id_prefix, "", False, 0, 0

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buffer += text
        events = []
        while self.buffer:
            if self.inside:
                end = self.buffer.find(CALL_END)
                if end < 0:
                    break
                events += self._block(self.buffer[:end], closed=True)
                self.buffer = self.buffer[end + len(CALL_END):]
                self.inside = False
                continue
            start = self.buffer.find(CALL_START)
            if start >= 0:
                if start:
                    events.append(("content", self.buffer[:start]))
                self.buffer, self.inside = self.buffer[start + len(CALL_START):], True
                continue
            keep = _partial_tag(self.buffer)  # a tail that may be the start of <tool_call>
            if len(self.buffer) > keep:
                events.append(("content", self.buffer[:len(self.buffer) - keep]))
                self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return events

    def finish(self) -> list[tuple[str, object]]:
        rest, inside = self.buffer, self.inside
        self.buffer, self.inside = "", False
        if inside:
            return self._block(rest, closed=False)
        return [("content", rest)] if rest else []

    def _block(self, inner: str, closed: bool) -> list[tuple[str, object]]:
        try:
            call = normalize_call(json.loads(inner.strip()))
        except (ValueError, ToolFormatError, RecursionError):
            self.invalid += 1
            return [("content", CALL_START + inner + (CALL_END if closed else ""))]
        call["id"] = f"{self.id_prefix}_{self.calls}"
        self.calls += 1
        return [("call", call)]


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of the call tag."""
    for k in range(min(len(text), len(CALL_START) - 1), 0, -1):
        if CALL_START.startswith(text[-k:]):
            return k
    return 0
