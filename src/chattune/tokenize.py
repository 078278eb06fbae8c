"""Conversations to training rows: token ids and labels, with loss on assistant tokens only.

A token carries loss when its characters overlap an assistant span of the rendered template (the
same rule as transformers' `return_assistant_tokens_mask`); every other label is -100. Rows are
truncated to `max_length`; a row left with no loss token is dropped and counted, never trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chattune.template import render_with_spans

IGNORE = -100


def mask_from_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose character range overlaps a span; spans and offsets are both sorted."""
    mask = [0] * len(offsets)
    s = 0
    for i, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[i] = 1
    return mask


def encode_conversations(tokenizer, conversations: list[list[dict]], max_length: int | None = None) -> dict:
    """Tokenize a batch of canonical conversations; returns columns input_ids, labels, length."""
    texts, spans = render_with_spans(tokenizer, conversations)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids_out, labels_out = [], []
    for ids, offsets, conv_spans in zip(enc["input_ids"], enc["offset_mapping"], spans):
        mask = mask_from_offsets(offsets, conv_spans)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        ids_out.append(ids)
        labels_out.append([t if m else IGNORE for t, m in zip(ids, mask)])
    return {"input_ids": ids_out, "labels": labels_out, "length": [len(x) for x in ids_out]}


def encode_texts(tokenizer, texts: list[str], max_length: int | None = None) -> dict:
    """Plain text for continued pre-training: loss on every token, eos appended so documents end."""
    eos = tokenizer.eos_token_id
    ids_out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = ids + ([eos] if eos is not None else [])
        ids_out.append(ids[:max_length] if max_length else ids)
    return {"input_ids": ids_out, "labels": [list(x) for x in ids_out], "length": [len(x) for x in ids_out]}


@dataclass
class PrepStats:
    rows_in: int = 0
    rows_out: int = 0
    dropped_no_loss: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self, name: str) -> str:
        msg = f"{name}: {self.rows_out} conversations, {self.tokens} tokens ({self.loss_tokens} with loss)"
        if self.truncated:
            msg += f"; {self.truncated} truncated to max length"
        if self.dropped_no_loss:
            msg += f"; {self.dropped_no_loss} dropped because truncation left no assistant token"
        return msg


def prepare_split(dataset, tokenizer, max_length: int | None, kind: str = "messages",
                  batch_size: int = 256) -> tuple["object", PrepStats]:
    """Tokenize a canonical dataset (column `messages`, or `text` for kind='text') into training rows."""
    stats = PrepStats(rows_in=len(dataset))

    def fn(batch):
        if kind == "text":
            out = encode_texts(tokenizer, batch["text"], None)
        else:
            out = encode_conversations(tokenizer, batch["messages"], None)
        full_len = out["length"]
        if max_length is not None:
            out["input_ids"] = [x[:max_length] for x in out["input_ids"]]
            out["labels"] = [x[:max_length] for x in out["labels"]]
            out["length"] = [len(x) for x in out["input_ids"]]
        out["n_loss"] = [sum(1 for t in lab if t != IGNORE) for lab in out["labels"]]
        out["truncated"] = [f > n for f, n in zip(full_len, out["length"])]
        return out

    mapped = dataset.map(fn, batched=True, batch_size=batch_size, remove_columns=dataset.column_names,
                         desc="Tokenizing")
    n_loss = mapped["n_loss"]
    stats.truncated = sum(mapped["truncated"])
    keep = [i for i, n in enumerate(n_loss) if n > 0]
    if len(keep) != len(mapped):
        mapped = mapped.select(keep)
    stats.dropped_no_loss = stats.rows_in - len(keep)
    stats.rows_out = len(keep)
    stats.loss_tokens = sum(n_loss)
    stats.tokens = sum(mapped["length"]) if len(mapped) else 0
    return mapped.remove_columns(["n_loss", "truncated"]), stats
