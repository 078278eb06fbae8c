"""Chat template: give a tokenizer chattune's template when it has none, and render conversations
to text with the character spans that carry loss (assistant replies with their end-of-turn token).

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

from chattune.errors import ChattuneError

TURN_START = "<|im_start|>"
END_OF_TURN = "<|im_end|>"
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


def cut_point(text: str, start: int) -> int:
    """The first position >= start where a space follows a non-space character, else len(text): where
    tokenizers that split text at spaces (tokenize.prefix_safe) can cut it without changing a token."""
    pos = text.find(" ", max(start, 1))
    while pos != -1 and text[pos - 1].isspace():
        pos = text.find(" ", pos + 1)
    return len(text) if pos == -1 else pos


def render_chatml(conversations: list[list[dict]]) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """chattune's own template rendered in plain Python, with the same text and loss spans as the
    jinja renderer (a test holds them equal): jinja costs ~0.1 ms a conversation, as much as
    tokenizing the first 128 tokens of it."""
    bounds = [0]
    for conv in conversations:
        bounds.append(bounds[-1] + len(conv))
    texts, spans, _ = render_chatml_columns([m["role"] for c in conversations for m in c],
                                            [m["content"] for c in conversations for m in c], bounds)
    return texts, spans


def render_chatml_columns(roles: list[str], contents: list[str], bounds, budget: int | None = None):
    """render_chatml for conversations given as flat role and content lists, conversation i being
    messages bounds[i]:bounds[i + 1] (the layout of an Arrow list column).

    With a budget, a text stops at the first cut point past `budget` characters: an exact prefix of
    the whole text, enough when only the first tokens are needed. Returns texts, loss spans (clipped
    to the text) and, per text, whether it was cut short."""
    texts, all_spans, partial = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        parts, spans, at, cut = [], [], 0, False
        for role, content in zip(roles[a:b], contents[a:b]):
            head = f"{TURN_START}{role}\n"
            if budget is not None and at + len(head) + len(content) > budget:
                k = cut_point(content, budget - at - len(head))
                if k < len(content):
                    parts += [head, content[:k]]
                    if role == "assistant":
                        spans.append((at + len(head), at + len(head) + k))
                    cut = True
                    break
            if role == "assistant":
                start = at + len(head)
                end = start + len(content) + len(END_OF_TURN)
                parts += [head, content, END_OF_TURN, "\n"]
                spans.append((start, end))
                at = end + 1
            else:
                piece = f"{head}{content}{END_OF_TURN}\n"
                parts.append(piece)
                at += len(piece)
        texts.append("".join(parts))
        all_spans.append(spans)
        partial.append(cut)
    return texts, all_spans, partial


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
    and <|im_end|> becomes the eos token the model learns to emit. The pad token never equals the
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


def render(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    """Render conversations to text with the tokenizer's template (no loss spans)."""
    with sandbox_errors(tokenizer):
        texts, _ = render_jinja_template(
            conversations=conversations,
            chat_template=tokenizer.chat_template,
            add_generation_prompt=add_generation_prompt,
            **_template_kwargs(tokenizer),
        )
    return texts


def render_with_spans(tokenizer, conversations: list[list[dict]]) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Render conversations and return, for each, the character spans that carry loss.

    With generation tags the template marks the spans itself. Without them (a model's own template),
    each assistant reply's span is what rendering up to that reply adds to rendering the history
    with the generation prompt; templates that rewrite earlier turns cannot be split this way.
    """
    with sandbox_errors(tokenizer):
        return _render_with_spans(tokenizer, conversations)


def _render_with_spans(tokenizer, conversations):
    template = tokenizer.chat_template
    if not template:
        raise ChattuneError("the tokenizer has no chat template; call prepare_tokenizer first")
    if is_chattune_template(template):
        return render_chatml(conversations)
    kwargs = _template_kwargs(tokenizer)
    if has_generation_tags(template):
        texts, spans = render_jinja_template(
            conversations=conversations, chat_template=template, return_assistant_tokens_mask=True, **kwargs
        )
        return texts, [list(s) for s in spans]
    texts, all_spans = [], []
    for conv in conversations:
        spans = []
        full = render_jinja_template(conversations=[conv], chat_template=template, **kwargs)[0][0]
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            before = render_jinja_template(conversations=[conv[:i]], chat_template=template,
                                           add_generation_prompt=True, **kwargs)[0][0] if i else ""
            upto = render_jinja_template(conversations=[conv[: i + 1]], chat_template=template, **kwargs)[0][0]
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
                 [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "calling"},
                  {"role": role, "content": marker}, {"role": "assistant", "content": "done"}])
        try:
            text = render_with_spans(tokenizer, [probe])[0][0]
        except BlockedTemplate:
            raise
        except Exception as e:  # jinja's raise_exception and template bugs alike
            raise ChattuneError(f"the model's chat template cannot express '{role}' turns such as {where} (rendering "
                                f"one fails: {str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                f"{_ROLE_HINT}") from None
        if marker not in text:
            raise ChattuneError(f"the model's chat template drops the content of '{role}' turns such as {where}, so "
                                f"the model would never see them; {_ROLE_HINT}")


_ROLE_HINT = ("pass --chat-template with a template that renders every role (chattune's own renders any role), or "
              "remove those turns from the data (sharegpt 'observation' turns become 'tool' messages)")
