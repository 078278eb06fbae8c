"""Request bodies of the OpenAI-compatible API, validated with pydantic, and the one place where request
messages become the {role, content} messages the chat template renders (`template_messages`).

Fields the official client may send that the server does not use (user, metadata, ...) are
accepted and ignored (`extra="allow"`), so later features only add fields here and extend
`template_messages`. Fields whose values change what a client gets back and that the server cannot honour
(n > 1, logprobs, penalties, ...) are refused with a 400 naming them (`unsupported`), not silently dropped.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chattune.inference.decoding import SamplingParams


def _more_than_one(v) -> bool:
    return v is not None and v > 1


# fields whose values the server cannot honour -> whether a given value asks for it
UNSUPPORTED = {"n": _more_than_one, "logprobs": bool, "top_logprobs": bool, "presence_penalty": bool,
               "frequency_penalty": bool}


class RequestError(ValueError):
    """A request the server cannot answer as sent; becomes a 400 with `param` naming the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # assistant: earlier calls (arguments a JSON string); read by serving/tools
    tool_call_id: str | None = None  # tool: the call this result answers


class FunctionDefinition(_Open):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict | None = None  # a JSON schema object


class ToolDefinition(_Open):
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(_Open):
    include_usage: bool = False


class _Sampling(_Open):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    unsupported_fields: ClassVar[dict] = UNSUPPORTED

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, value in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids (integers as strings), got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"values must be between -100 and 100, got {value} for token {key}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def sampling(self, vocab_size: int) -> SamplingParams:
        """The engine's settings for this request; OpenAI's defaults are temperature 1 and top_p 1."""
        bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        if (too_big := [k for k in bias if k >= vocab_size]):
            raise RequestError(f"logit_bias names token {too_big[0]}, but the model's vocabulary has {vocab_size} "
                               "tokens", "logit_bias")
        return SamplingParams(max_tokens=self.token_limit, temperature=1.0 if self.temperature is None else
                              self.temperature, top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
                              stop=tuple(self.stop or ()), logit_bias=bias)

    def unsupported(self) -> None:
        """Raise RequestError for the first field whose value asks for something this server does not do."""
        for name, used in self.unsupported_fields.items():
            value = getattr(self, name, None)
            if value is None and self.model_extra:
                value = self.model_extra.get(name)
            if used(value):
                raise RequestError(f"{name}={value!r} is not supported by this server; leave {name} out", name,
                                   "unsupported_parameter")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict | None = None  # checked with the tools (serving/tools.py): its errors name the field
    parallel_tool_calls: bool | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    unsupported_fields: ClassVar[dict] = {**UNSUPPORTED, "echo": bool, "best_of": _more_than_one, "suffix": bool}

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        return prompts


def _text(content, i: int, role: str, empty_ok: bool = False) -> str:
    if content is None:
        if empty_ok:
            return ""
        raise RequestError(f"messages[{i}] ({role}) has no content", f"messages.{i}.content")
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise RequestError(f"messages[{i}] has a {part.type!r} content part; this server takes text only",
                               f"messages.{i}.content")
        parts.append(part.text)
    return "".join(parts)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The conversation as the chat template takes it: {role, content} with text content, and chattune's
    canonical tool fields (data/tools.py): an assistant message's `tool_calls` with arguments as objects, a tool
    message's `tool_call_id` and `name` (the name of the call it answers). OpenAI's 'developer' role is the
    system prompt of newer models, so it renders as 'system'. A tool message must answer a call of the
    assistant message before it (tool messages in between)."""
    from chattune.data.tools import ToolFormatError, normalize_call

    out, calls = [], {}  # calls: id -> function name, of the last assistant message with calls
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        calling = role == "assistant" and bool(m.tool_calls)
        msg = {"role": role, "content": _text(m.content, i, m.role, empty_ok=calling)}
        if m.tool_calls and role != "assistant":
            raise RequestError(f"messages[{i}] ({role}) has tool_calls: only assistant messages call tools",
                               f"messages.{i}.tool_calls")
        if calling:
            msg["tool_calls"] = []
            for k, call in enumerate(m.tool_calls):
                try:
                    msg["tool_calls"].append(normalize_call(call, k))
                except ToolFormatError as e:
                    raise RequestError(f"messages[{i}]: {e}", f"messages.{i}.tool_calls.{k}") from None
            calls = {c["id"]: c["function"]["name"] for c in msg["tool_calls"]}
        elif role == "tool":
            if not out or not (out[-1].get("tool_calls") or out[-1]["role"] == "tool") or not calls:
                raise RequestError(f"messages[{i}] (tool) must answer a call: it follows an assistant message with "
                                   "tool_calls (or another tool message)", f"messages.{i}")
            if m.tool_call_id is not None and m.tool_call_id not in calls:
                raise RequestError(f"messages[{i}] answers tool_call_id {m.tool_call_id!r}, which the assistant "
                                   f"message before it does not make (its calls: {', '.join(map(str, calls))})",
                                   f"messages.{i}.tool_call_id")
            name = m.name or calls.get(m.tool_call_id) or (next(iter(calls.values())) if len(calls) == 1 else None)
            msg.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", name)) if v is not None})
        else:
            calls = {}
        out.append(msg)
    return out
