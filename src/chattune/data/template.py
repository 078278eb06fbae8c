"""Chat template: give a tokenizer chattune's template when it has none, and render conversations
to text with the character spans that carry loss (assistant replies, tool calls included, with their
end-of-turn token; tool results never carry loss).

Training, evaluation and chat all format conversations through the template saved with the
tokenizer, so a conversation becomes the same tokens everywhere.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from jinja2.exceptions import SecurityError
from transformers.utils.chat_template_utils import render_jinja_template

from chattune.data.chatml import (  # noqa: F401  (re-exported: the template's names live with its Python twin)
    CALL_END,
    CALL_START,
    END_OF_TURN,
    TURN_START,
    cut_point,
    render_chatml,
    render_chatml_columns,
    tools_system_text,
)
from chattune.errors import ChattuneError

PAD = "<|pad|>"

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class BlockedTemplate(ChattuneError):
    """A chat template that transformers' Jinja sandbox refused to run."""


def template_source(tokenizer) -> str:
    """Where a tokenizer's chat template was read from, for messages: the --chat-template file, the model
    directory's chat_template.jinja or tokenizer_config.json, or the model's name."""
    given = getattr(tokenizer, "_chattune_template_file", None)
    if given:
        return str(given)
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    for name in ("chat_template.jinja", "tokenizer_config.json"):  # transformers reads them in this order
        if str(folder) and (folder / name).is_file():
            return str(folder / name)
    return f"the chat template of {folder}"


@contextlib.contextmanager
def sandbox_errors(tokenizer):
    """Inside, a template that transformers' sandbox blocks (it reads attributes such as __class__, which a
    chat template has no business with) stops with one line naming the template's file."""
    try:
        yield
    except SecurityError as e:
        raise BlockedTemplate(f"{template_source(tokenizer)}: transformers' sandbox blocked the chat template "
                              f"({e}); a chat template may only format the messages: fix it, or pass --chat-template "
                              "FILE (training) with one that works") from None


@lru_cache(maxsize=1)
def chattune_template() -> str:
    return resources.files("chattune.data").joinpath("chat_template.jinja").read_text()


def has_generation_tags(template: str | None) -> bool:
    return bool(template) and bool(_GENERATION_TAG.search(template))


def is_chattune_template(template: str | None) -> bool:
    return bool(template) and template.strip() == chattune_template().strip()


@dataclass
class TemplateSetup:
    """What prepare_tokenizer did, for the run log and for the model's config."""

    source: str  # "chattune", "model" or a file path
    end_of_turn: str
    added_tokens: list[str]
    pad_token: str


def prepare_tokenizer(tokenizer, template_file: str | None = None) -> TemplateSetup:
    """Make `tokenizer` ready for chat training, in place.

    A tokenizer with its own chat template keeps it (unless `template_file` overrides it); one without
    (gpt2) gets chattune's ChatML template, whose <|im_start|>/<|im_end|> are added as special tokens
    (and <tool_call>/</tool_call> as plain added tokens) and <|im_end|> becomes the eos token the model
    learns to emit. The pad token never equals the
    end-of-turn token: labels come from the assistant mask, and a distinct pad keeps that obvious.
    """
    added: list[str] = []
    if template_file:
        path = Path(template_file)
        if not path.is_file():
            raise ChattuneError(f"chat template file not found: {path}")
        tokenizer.chat_template = path.read_text()
        tokenizer._chattune_template_file = str(path)  # named when the sandbox blocks it
        source = str(path)
    elif tokenizer.chat_template:
        source = "model"
    else:
        original_eos = tokenizer.eos_token
        new = [t for t in (TURN_START, END_OF_TURN) if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new})
            added += new
        # one token each for the tool-call tags: a call starts with one decision, and they are plain (not special)
        # tokens so decoded replies keep them for the parser; bench/toolcall_tokens.py measured the choice
        tags = [t for t in (CALL_START, CALL_END) if t not in tokenizer.get_vocab()]
        if tags:
            tokenizer.add_tokens(tags)
            added += tags
        tokenizer.chat_template = chattune_template()
        tokenizer.eos_token = END_OF_TURN
        if tokenizer.pad_token is None and original_eos and original_eos != END_OF_TURN:
            # gpt2's <|endoftext|> no longer ends anything: it is free to pad with
            tokenizer.pad_token = original_eos
        source = "chattune"
    end_of_turn = tokenizer.eos_token
    if end_of_turn is None:
        raise ChattuneError("the tokenizer has no eos token, so a reply could never end; set one or "
                            "use --chat-template with a template that ends turns with a special token")
    if tokenizer.pad_token is None or tokenizer.pad_token == end_of_turn:
        if tokenizer.unk_token is not None and tokenizer.unk_token != end_of_turn:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            if PAD not in tokenizer.get_vocab():
                added.append(PAD)
            tokenizer.add_special_tokens({"pad_token": PAD})
    return TemplateSetup(source=source, end_of_turn=end_of_turn, added_tokens=added, pad_token=tokenizer.pad_token)


def _template_kwargs(tokenizer) -> dict:
    return {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}


def _jinja(tokenizer, conversations: list[list[dict]], tools: list | None, **kw):
    """render_jinja_template with each conversation's own tools (transformers takes one tools list per call)."""
    kw = {**_template_kwargs(tokenizer), "chat_template": tokenizer.chat_template, **kw}
    with sandbox_errors(tokenizer):
        if not tools or not any(tools):
            return render_jinja_template(conversations=conversations, **kw)
        texts, spans = [], []
        for conv, t in zip(conversations, tools):
            text, span = render_jinja_template(conversations=[conv], tools=t or None, **kw)
            texts += text
            spans += span if span else []
        return texts, spans


def render(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False,
           tools: list | None = None) -> list[str]:
    """Render conversations to text with the tokenizer's template (no loss spans); tools: each conversation's
    tool definitions (or None), handed to the template as transformers' `tools=`."""
    return _jinja(tokenizer, conversations, tools, add_generation_prompt=add_generation_prompt)[0]


def render_with_spans(tokenizer, conversations: list[list[dict]], tools: list | None = None
                      ) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Render conversations (with each one's tools, if any) and return, for each, the character spans that
    carry loss.

    With generation tags the template marks the spans itself. Without them (a model's own template),
    each assistant reply's span is what rendering up to that reply adds to rendering the history
    with the generation prompt; templates that rewrite earlier turns cannot be split this way.
    """
    with sandbox_errors(tokenizer):
        return _render_with_spans(tokenizer, conversations, tools)


def _render_with_spans(tokenizer, conversations, tools):
    template = tokenizer.chat_template
    if not template:
        raise ChattuneError("the tokenizer has no chat template; call prepare_tokenizer first")
    if is_chattune_template(template):
        return render_chatml(conversations, tools)
    if has_generation_tags(template):
        texts, spans = _jinja(tokenizer, conversations, tools, return_assistant_tokens_mask=True)
        return texts, [list(s) for s in spans]
    texts, all_spans = [], []
    for c, conv in enumerate(conversations):
        t = [tools[c]] if tools else None
        spans = []
        full = _jinja(tokenizer, [conv], t)[0][0]
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            before = _jinja(tokenizer, [conv[:i]], t, add_generation_prompt=True)[0][0] if i else ""
            upto = _jinja(tokenizer, [conv[: i + 1]], t)[0][0]
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ChattuneError(
                    "the model's chat template rewrites earlier turns, so assistant replies cannot be located for "
                    "the loss mask; pass --chat-template with a template that marks replies with "
                    "{% generation %}...{% endgeneration %}")
            spans.append((len(before), len(upto)))
        texts.append(full)
        all_spans.append(spans)
    return texts, all_spans


def check_roles(tokenizer, roles: dict[str, str]) -> None:
    """Refuse data whose roles the chat template cannot express; `roles` maps each role in the data
    to where it first occurs (for the message).

    chattune's template renders any role. A model's own template may raise on a role (tool results,
    say) or render the turn without its content; training on such data would silently lose turns, so
    a probe conversation per role finds out first.
    """
    template = tokenizer.chat_template
    if not template or is_chattune_template(template):
        return
    for role in sorted(set(roles) - {"user", "assistant"}):
        where = roles[role]
        marker = f"chattune-probe-{role}-7d1f"
        probe = ([{"role": "system", "content": marker}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}] if role == "system" else
                 [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
                  {"role": role, "content": marker, "tool_call_id": "call_0", "name": _PROBE_TOOL["function"]["name"]},
                  {"role": "assistant", "content": "done"}])
        try:
            text = render_with_spans(tokenizer, [probe], [[_PROBE_TOOL]] if role == "tool" else None)[0][0]
        except BlockedTemplate:
            raise
        except Exception as e:  # jinja's raise_exception and template bugs alike
            raise ChattuneError(f"the model's chat template cannot express '{role}' turns such as {where} (rendering "
                                f"one fails: {str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                f"{_ROLE_HINT}") from None
        if marker not in text:
            raise ChattuneError(f"the model's chat template drops the content of '{role}' turns such as {where}, so "
                                f"the model would never see them; {_ROLE_HINT}")


_PROBE_TOOL = {"type": "function", "function": {"name": "chattune_probe_fn_7d1f",
                                                "description": "chattune-probe-doc-7d1f",
                                                "parameters": {"type": "object", "properties": {}}}}
_PROBE_CALL = {"id": "call_0", "type": "function",
               "function": {"name": "chattune_probe_fn_7d1f", "arguments": {"chattune_probe_arg": 1}}}


def check_tools(tokenizer, where: str) -> None:
    """Refuse tool data when the model's own template would not show the model its tools or calls: transformers
    hands a template `tools=` and assistant `tool_calls`, and a template without tool support ignores them."""
    problem = tool_template_problem(tokenizer, f"such as {where}", f"the data has them, e.g. {where}")
    if problem:
        raise ChattuneError(f"{problem}; {_TOOL_HINT}")


def tool_template_problem(tokenizer, such: str = "", has: str = "") -> str | None:
    """Why the model's chat template cannot show a model its tools or calls, or None when it can (chattune's own
    template, or a template that renders both); `such` and `has` add context to the text ("such as X", "the data
    has them")."""
    template = tokenizer.chat_template
    if not template or is_chattune_template(template):
        return None
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}]
    try:
        text = render_with_spans(tokenizer, [probe], [[_PROBE_TOOL]])[0][0]
    except BlockedTemplate:
        raise
    except Exception as e:  # jinja's raise_exception and template bugs alike
        return (f"the model's chat template cannot render tool calls{' ' + such if such else ''} (rendering one "
                f"fails: {str(e).splitlines()[0] if str(e) else type(e).__name__})")
    for what, needle in (("tool definitions", "chattune-probe-doc-7d1f"), ("tool calls", "chattune_probe_arg")):
        if needle not in text:
            return (f"the model's chat template ignores {what}{f' ({has})' if has else ''}, so the model would never "
                    "see them")
    return None


_TOOL_HINT = ("pass --chat-template with a template that renders tools= and tool_calls (chattune's own does, in the "
              "Hermes/Qwen <tool_call> layout), or train a model whose template supports tools")
_ROLE_HINT = ("pass --chat-template with a template that renders every role (chattune's own renders any role), or "
              "remove those turns from the data (sharegpt 'observation' turns become 'tool' messages)")
