"""Chat template: give a tokenizer chattune's template when it has none, and render conversations
to text with the character spans that carry loss (assistant replies with their end-of-turn token).

Training, evaluation and chat all format conversations through the template saved with the
tokenizer, so a conversation becomes the same tokens everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

from chattune.errors import ChattuneError

TURN_START = "<|im_start|>"
END_OF_TURN = "<|im_end|>"
PAD = "<|pad|>"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chattune_template() -> str:
    return resources.files("chattune").joinpath("chat_template.jinja").read_text()


def has_generation_tags(template: str | None) -> bool:
    return bool(template) and bool(_GENERATION_TAG.search(template))


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
    template = tokenizer.chat_template
    if not template:
        raise ChattuneError("the tokenizer has no chat template; call prepare_tokenizer first")
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
