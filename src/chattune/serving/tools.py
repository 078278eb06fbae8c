"""Tool calling in the OpenAI-compatible API: a request's `tools` and `tool_choice` become what the prompt
renders and how the reply is read (`ToolPlan`), and the generated text becomes `message.tool_calls`
(`reply_message`) or, streamed, `tool_calls` deltas (`DeltaStream`).

The model writes calls in the layout chattune's template trains (Hermes/Qwen: `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>`); inference/toolcalls.py reads them. tool_choice:
  "auto" (the default with tools)  the tools are rendered and calls are parsed from the reply;
  "none"                           the tools are rendered, the call tag is banned (when it is one token) and the
                                   reply is text;
  "required"                       the reply is made to begin with the call tag: it calls some tool;
  {"type": "function", "function": {"name": N}}   the reply begins with the call tag and N's name: it calls N.
A call whose JSON does not read as a call stays in the content as text (as chat and generate treat it).
"""

from __future__ import annotations

from dataclasses import dataclass

from chattune.data.template import CALL_START
from chattune.data.tools import call_json, to_wire
from chattune.inference.toolcalls import CallStream, parse_tool_calls
from chattune.serving.schemas import RequestError

CHOICES = ("none", "auto", "required")


@dataclass
class ToolPlan:
    tools: list[dict] | None  # definitions rendered into the prompt (OpenAI's shape, as the template takes them)
    parse: bool  # read calls from the reply
    reply_start: str = ""  # text the reply is made to begin with (its tokens end the prompt)
    ban_call_tag: bool = False  # tool_choice "none": the call tag may not be generated
    parallel: bool = True  # False: only the first call is returned


def plan(body) -> ToolPlan:
    """The request's tools and tool_choice, checked (a RequestError names the field)."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    names = [t["function"]["name"] for t in tools]
    if (dup := next((n for n in names if names.count(n) > 1), None)) is not None:
        raise RequestError(f"tools defines the function {dup!r} twice; function names must be unique", "tools")
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    named = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                               '{"name": NAME}}', "tool_choice")
        named = fn["name"]
    elif choice not in CHOICES:
        raise RequestError(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                           f'{{"name": NAME}}}}, got {choice!r}', "tool_choice")
    if not tools and (named is not None or choice == "required"):
        raise RequestError("tool_choice asks for a tool call, but the request has no tools: send tools too",
                           "tool_choice")
    if named is not None and named not in names:
        raise RequestError(f"tool_choice names the function {named!r}, which tools does not define (defined: "
                           f"{', '.join(names)})", "tool_choice")
    parallel = body.parallel_tool_calls is not False
    if named is not None:  # the call's opening as the model writes it, up to its arguments (the space before them
        # is left to the model: byte-level BPE tokenizers attach it to the next word, ' {"')
        head = call_json({"name": named, "arguments": "\0"}).split("\0")[0].rstrip()
        return ToolPlan(tools, True, f"{CALL_START}\n{head}", parallel=parallel)
    if choice == "required":
        return ToolPlan(tools, True, f"{CALL_START}\n", parallel=parallel)
    return ToolPlan(tools or None, choice == "auto" and bool(tools), ban_call_tag=choice == "none" and bool(tools),
                    parallel=parallel)


def reply_message(plan: ToolPlan, text: str, finish: str, id_prefix: str) -> tuple[dict, str]:
    """The assistant message for a whole reply and its finish reason ("tool_calls" when it calls and stopped)."""
    if not plan.parse:
        return {"role": "assistant", "content": text}, finish
    parsed = parse_tool_calls(plan.reply_start + text, id_prefix=id_prefix)
    calls = parsed.tool_calls if plan.parallel else parsed.tool_calls[:1]
    if not calls:
        return {"role": "assistant", "content": parsed.content}, finish
    return ({"role": "assistant", "content": parsed.content or None, "tool_calls": to_wire(calls)},
            "tool_calls" if finish == "stop" else finish)


class DeltaStream:
    """One streamed choice: generated text in, OpenAI's `delta` objects out. Text outside call blocks streams as
    it comes (a possible start of the call tag is held back until it is known); a call is sent when its block
    closes and reads as a call: a delta with its index, id, type and name (arguments ""), then one with its
    arguments. `finish(reason)` flushes what is left and gives the last finish reason. As in `reply_message`,
    the content is stripped: leading whitespace is dropped and trailing whitespace is held back until more text
    follows (the newline before a call is the template's, and a client that sends the message back must not
    change the prompt)."""

    def __init__(self, plan: ToolPlan, id_prefix: str):
        self.plan, self.calls, self.started, self.space = plan, 0, False, ""
        self.parser = CallStream(id_prefix) if plan.parse else None
        if self.parser is not None and plan.reply_start:
            assert not self.parser.feed(plan.reply_start)  # the start of a call block: nothing to send yet

    def feed(self, text: str) -> list[dict]:
        if self.parser is None:
            return [{"content": text}] if text else []
        return self._deltas(self.parser.feed(text))

    def finish(self, reason: str) -> tuple[list[dict], str]:
        deltas = self._deltas(self.parser.finish()) if self.parser is not None else []
        return deltas, "tool_calls" if self.calls and reason == "stop" else reason

    def _deltas(self, events) -> list[dict]:
        out = []
        for kind, value in events:
            if kind == "content":
                text = value if self.started else value.lstrip()
                body = text.rstrip()
                if body:
                    out.append({"content": self.space + body})
                    self.started, self.space = True, ""
                self.space += text[len(body):]
                continue
            self.space = ""  # whitespace before a call (sent or not) is the template's
            if self.plan.parallel or not self.calls:
                (wire,) = to_wire([value])
                fn = wire["function"]
                out += [{"tool_calls": [{"index": self.calls, "id": wire["id"], "type": "function",
                                         "function": {"name": fn["name"], "arguments": ""}}]},
                        {"tool_calls": [{"index": self.calls, "function": {"arguments": fn["arguments"]}}]}]
                self.calls += 1
        return out

