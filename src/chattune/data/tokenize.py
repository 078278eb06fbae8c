"""Conversations to training rows: token ids and labels, with loss on assistant tokens only.

A token carries loss when its characters overlap an assistant span of the rendered template (the
same rule as transformers' `return_assistant_tokens_mask`); every other label is -100. Rows are
truncated to `max_length`; a row left with no loss token is dropped and counted, never trained.

Speed at ultrachat scale comes from three things, none of which changes a token or a label:
batches are read as Arrow and written back as Arrow (no per-row Python dicts); with a max length,
only a prefix of each rendered conversation is tokenized when the tokenizer provably splits the
text there (see `prefix_safe`); and the loss mask is computed with numpy for a whole batch at once.
The tokenizer spreads each batch over all cores; large sets on many cores are also mapped with
`datasets`' own worker processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from chattune.data.chatml import columns_of
from chattune.data.digest import code_digest, tokenizer_digest
from chattune.data.template import (
    check_roles,
    check_tools,
    cut_point,
    is_chattune_template,
    render_chatml_columns,
    render_with_spans,
)
from chattune.data.tools import MESSAGE_FIELDS, from_arrow
from chattune.errors import ChattuneError
from chattune.outputs import IGNORE_INDEX

log = logging.getLogger("chattune")
PARALLEL_MIN_ROWS = 20_000  # below this, starting worker processes costs more than it saves
_SPLITTERS = {"Whitespace", "WhitespaceSplit"}  # pre-tokenizers whose pieces never hold a space
_LOCAL = _SPLITTERS | {"Digits", "Punctuation"}


def prefix_safe(tokenizer) -> bool:
    """True when tokenizing `text[:cut]` gives exactly the first tokens of `text` for any cut where a
    space follows a non-space character.

    That holds when no normalizer rewrites text across the cut, the pre-tokenizer never puts a
    non-space and a following space in one piece (GPT-2's byte-level regex, whitespace splitting)
    and no added token holds whitespace or strips it; the model then works piece by piece. Other
    tokenizers (SentencePiece-style ones, say) are tokenized whole.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    if spec.get("normalizer") is not None:
        return False

    def stages(p):
        if p is None:
            return [None]
        return list(chain.from_iterable(stages(x) for x in p["pretokenizers"])) if p.get("type") == "Sequence" else [p]

    pre = stages(spec.get("pre_tokenizer"))
    splits = False
    for p in pre:
        if p is None:
            return False
        if p["type"] == "ByteLevel" and p.get("use_regex", True):
            splits = True
        elif p["type"] in _LOCAL:
            splits |= p["type"] in _SPLITTERS
        else:
            return False
    for t in spec.get("added_tokens") or []:
        if t.get("lstrip") or t.get("rstrip") or any(c.isspace() for c in t["content"]):
            return False
    return splits


class Encoder:
    """Batches of rendered texts and loss spans to token ids and labels (numpy, flat per batch)."""

    def __init__(self, tokenizer, max_length: int | None):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ChattuneError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; chattune needs a fast one "
                                "to locate assistant tokens (load it with use_fast=True)")
        self.backend = backend
        self.max_length = max_length
        self.prefix = max_length is not None and prefix_safe(tokenizer)
        self.chars_per_token = 5.0  # a first guess, tightened from each batch

    def _encode(self, texts: list[str]):
        # transformers sets truncation and padding on the backend per call; a direct call must clear them
        if self.backend.truncation is not None:
            self.backend.no_truncation()
        if self.backend.padding is not None:
            self.backend.no_padding()
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def tokens(self, texts: list[str], grow=None) -> tuple[list[list[int]], list[list[tuple[int, int]]], list[bool]]:
        """Ids and character offsets of each text, cut to max_length, and whether the text was longer.

        Texts may be prefixes (ending at a cut point) of longer ones: grow(i) replaces texts[i] by the
        whole text when its prefix runs out before max_length."""
        limit = self.max_length
        if not self.prefix:
            encs = self._encode(texts)
            ids = [e.ids for e in encs]
            offsets = [e.offsets for e in encs]
            over = [limit is not None and len(x) > limit for x in ids]
            if limit is not None:
                ids, offsets = [x[:limit] for x in ids], [o[:limit] for o in offsets]
            return ids, offsets, over
        need = limit + 1  # one token past the limit tells whether the text was cut
        ids: list[list[int]] = [[] for _ in texts]
        offsets: list[list[tuple[int, int]]] = [[] for _ in texts]
        done = [0] * len(texts)  # characters tokenized so far, always at a cut point
        todo = list(range(len(texts)))
        continued = None
        while todo:
            # tokens(text[:b]) == tokens(text[:a]) + tokens(text[a:b]) when a and b are cut points, so a
            # text that ran short continues from where it stopped instead of starting over
            ends = [cut_point(texts[i], done[i] + int((need - len(ids[i])) * self.chars_per_token) + 8)
                    for i in todo]
            encs = self._encode([texts[i][done[i]:e] for i, e in zip(todo, ends)])
            for i, e, enc in zip(todo, ends, encs):
                shift = done[i]
                if shift:
                    ids[i] += enc.ids
                    offsets[i] += [(a + shift, b + shift) for a, b in enc.offsets]
                else:
                    ids[i], offsets[i] = enc.ids, enc.offsets
                done[i] = e
            todo = [i for i in todo if len(ids[i]) < need]
            for i in todo:
                if grow is not None and done[i] >= len(texts[i]):
                    grow(i)
            todo = [i for i in todo if done[i] < len(texts[i])]
            continued = todo[0] if todo and continued is None else continued
        ratios = [d / len(x) for x, d in zip(ids, done) if x]
        if ratios:  # chars per token at the median: half the texts need a second, short pass (measured fastest)
            self.chars_per_token = max(1.0, float(np.median(ratios)))
        self._check_prefix(texts, done, ids, continued)
        over = [len(x) > limit for x in ids]
        return [x[:limit] for x in ids], [o[:limit] for o in offsets], over

    def _check_prefix(self, texts, cuts, ids, continued: int | None) -> None:
        """Tokenize one cut text of each batch whole (one that was continued, if any): a tokenizer that
        broke the prefix rule must not silently change tokens (it is then tokenized whole)."""
        cut = [k for k in (continued, next((k for k, (c, t) in enumerate(zip(cuts, texts)) if c < len(t)), None))
               if k is not None]
        for i in cut[:1]:
            if self._encode([texts[i]])[0].ids[: len(ids[i])] != ids[i]:
                self.prefix = False
                raise _PrefixMismatch()

    def encode(self, texts: list[str], spans: list[list[tuple[int, int]]], whole=None) -> dict:
        """Flat arrays for a batch: ids, labels, per-row lengths, loss-token counts and truncation flags.
        When texts are prefixes, whole(i) gives text i and its spans in full."""
        texts, spans = list(texts), list(spans)

        def grow(i):
            texts[i], spans[i] = whole(i)

        try:
            ids, offsets, over = self.tokens(texts, grow if whole else None)
        except _PrefixMismatch:
            log.warning("the tokenizer split a cut text differently from the whole text; tokenizing whole texts "
                        "from here on (slower, same result)")
            for i in range(len(texts) if whole else 0):
                grow(i)
            ids, offsets, over = self.tokens(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat_ids = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        offs = np.fromiter(chain.from_iterable(chain.from_iterable(offsets)), dtype=np.int64,
                           count=2 * len(flat_ids)).reshape(-1, 2)
        # one coordinate space for the batch: row r's characters start at base[r], so one sorted
        # search finds, for every token, the first loss span that ends after the token starts
        base = np.zeros(len(texts), dtype=np.int64)
        np.cumsum([len(t) for t in texts[:-1]], out=base[1:])
        row = np.repeat(np.arange(len(texts)), lengths)
        start, end = offs[:, 0] + base[row], offs[:, 1] + base[row]
        span_rows = np.repeat(np.arange(len(texts)), [len(s) for s in spans])
        flat_spans = np.array(list(chain.from_iterable(spans)), dtype=np.int64).reshape(-1, 2)
        s_start, s_end = flat_spans[:, 0] + base[span_rows], flat_spans[:, 1] + base[span_rows]
        j = np.searchsorted(s_end, start, side="right")
        has = j < len(s_end)
        mask = has & (s_start[np.minimum(j, max(len(s_end) - 1, 0))] < end) if len(s_end) else np.zeros_like(has)
        labels = np.where(mask, flat_ids, IGNORE_INDEX)
        n_loss = np.bincount(row[mask], minlength=len(texts))
        return {"ids": flat_ids, "labels": labels, "lengths": lengths, "n_loss": n_loss, "truncated": np.array(over)}


class _PrefixMismatch(Exception):
    pass


def _split_rows(flat: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [x.tolist() for x in np.split(flat, np.cumsum(lengths)[:-1])] if len(lengths) else []


def encode_conversations(tokenizer, conversations: list[list[dict]], max_length: int | None = None,
                         tools: list | None = None) -> dict:
    """Tokenize a batch of canonical conversations (tools: each one's tool definitions, or None); returns
    columns input_ids, labels, length."""
    texts, spans = render_with_spans(tokenizer, conversations, tools)
    out = Encoder(tokenizer, max_length).encode(texts, spans)
    return {"input_ids": _split_rows(out["ids"], out["lengths"]), "labels": _split_rows(out["labels"], out["lengths"]),
            "length": out["lengths"].tolist()}


def _texts_with_eos(encoder: Encoder, eos: int | None, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
    """Plain text: each document's tokens and eos (so documents end), cut to max length."""
    limit = encoder.max_length
    ids, _, over = encoder.tokens(texts)
    tail = [eos] if eos is not None else []
    out = [(x + tail)[:limit] if limit else x + tail for x in ids]
    return out, [o or (limit is not None and len(x) + len(tail) > limit) for o, x in zip(over, ids)]


def encode_texts(tokenizer, texts: list[str], max_length: int | None = None) -> dict:
    """Plain text for continued pre-training: loss on every token, eos appended so documents end."""
    ids_out, _ = _texts_with_eos(Encoder(tokenizer, max_length), tokenizer.eos_token_id, texts)
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


class _BatchFn:
    """The map function: an Arrow batch of conversations (or texts) in, an Arrow batch of rows out."""

    def __init__(self, tokenizer, max_length: int | None, kind: str):
        self.tokenizer, self.max_length, self.kind = tokenizer, max_length, kind
        self.encoder = None

    def __call__(self, table):
        import pyarrow as pa

        self.encoder = self.encoder or Encoder(self.tokenizer, self.max_length)
        if self.kind == "text":
            ids, over = _texts_with_eos(self.encoder, self.tokenizer.eos_token_id, table.column("text").to_pylist())
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
            enc = {"ids": flat, "labels": flat, "lengths": lengths, "n_loss": lengths,
                   "truncated": np.array(over, dtype=bool)}
        else:
            roles, contents, bounds, calls, tools = columns_of(table)
            if is_chattune_template(self.tokenizer.chat_template):
                # with a max length, render only about twice what its tokens should need
                budget = int(2 * (self.max_length + 1) * self.encoder.chars_per_token) + 64 if \
                    self.encoder.prefix else None
                texts, spans, partial = render_chatml_columns(roles, contents, bounds, budget, calls, tools)

                def whole(i):
                    if not partial[i]:
                        return texts[i], spans[i]
                    full_texts, full_spans, _ = render_chatml_columns(
                        roles, contents, bounds[i:i + 2], None, calls, tools[i:i + 1] if tools else None)
                    return full_texts[0], full_spans[0]

                enc = self.encoder.encode(texts, spans, whole)
            elif tools is None:
                convs = [[{"role": r, "content": c} for r, c in zip(roles[a:b], contents[a:b])]
                         for a, b in zip(bounds[:-1], bounds[1:])]
                texts, spans = render_with_spans(self.tokenizer, convs)
                enc = self.encoder.encode(texts, spans)
            else:
                pairs = [from_arrow(m, t) for m, t in zip(table.column("messages").to_pylist(),
                                                          table.column("tools").to_pylist())]
                texts, spans = render_with_spans(self.tokenizer, [m for m, _ in pairs], [t for _, t in pairs])
                enc = self.encoder.encode(texts, spans)
        offsets = pa.array(np.r_[0, np.cumsum(enc["lengths"])].astype(np.int32))
        return pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(enc["ids"].astype(np.int32))),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(enc["labels"].astype(np.int32))),
            "length": pa.array(enc["lengths"].astype(np.int32)),
            "n_loss": pa.array(enc["n_loss"].astype(np.int32)),
            "truncated": pa.array(enc["truncated"], type=pa.bool_()),
        })



def prep_fingerprint(dataset, tokenizer, max_length: int | None, kind: str) -> str:
    blob = json.dumps([dataset._fingerprint, tokenizer_digest(tokenizer), max_length, kind, code_digest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def first_turns(dataset) -> dict[str, str]:
    """Each role in a conversations dataset, with where it first occurs ('conversation 3, message 2')."""
    import pyarrow.compute as pc

    col = dataset.with_format("arrow")[:].column("messages").combine_chunks()
    roles = col.flatten().field("role")
    if not len(roles):
        return {}
    encoded = pc.dictionary_encode(roles)
    names = encoded.dictionary.to_pylist()
    codes, first = np.unique(encoded.indices.to_numpy(zero_copy_only=False), return_index=True)
    offsets = col.offsets.to_numpy() - col.offsets[0].as_py()
    out = {}
    for code, at in zip(codes, first):
        row = int(np.searchsorted(offsets, at, side="right") - 1)
        out[names[code]] = f"conversation {row}, message {int(at - offsets[row])}"
    return out


def first_tool_use(dataset) -> str:
    """Where a tool-schema dataset first declares tools or uses them ('conversation 3'), for messages; read row
    by row, which stops at the first (nearly always the first row)."""
    for i, row in enumerate(dataset.select_columns(["messages", "tools"])):
        if row["tools"] or any(m.get(k) for m in row["messages"] for k in MESSAGE_FIELDS):
            return f"conversation {i}"
    return "conversation 0"


def workers(n_rows: int) -> int | None:
    """Processes for a map over n_rows; CHATTUNE_NUM_PROC overrides (1: in-process).

    In-process, the Rust tokenizer already spreads each batch over every core and only the Python
    around it runs on one, so worker processes pay off only with many cores (on 2 cores, 60k
    conversations took 31.7 s in-process and 33.4 s with 2 workers)."""
    if os.environ.get("CHATTUNE_NUM_PROC"):
        n = int(os.environ["CHATTUNE_NUM_PROC"])
        return n if n > 1 else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 8) if cores >= 4 and n_rows >= PARALLEL_MIN_ROWS else None


def prepare_split(dataset, tokenizer, max_length: int | None, kind: str = "messages", batch_size: int = 1000,
                  num_proc: int | None = -1, fingerprint: str | None = None) -> tuple[object, PrepStats]:
    """Tokenize a canonical dataset (column `messages`, or `text` for kind='text') into training rows.

    num_proc -1 picks the worker count from the size. The result is named in datasets' cache by
    `fingerprint`, by default a hash of the data, tokenizer, template, max length and this code
    (datasets' own hash of the map function would miss changes to the code it calls).
    """
    import pyarrow.compute as pc
    from datasets import Features, List, Value

    stats = PrepStats(rows_in=len(dataset))
    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")),
                         "length": Value("int32"), "n_loss": Value("int32"), "truncated": Value("bool")})
    if kind != "text" and not is_chattune_template(tokenizer.chat_template):
        check_roles(tokenizer, first_turns(dataset))
        if "tools" in dataset.column_names:
            check_tools(tokenizer, first_tool_use(dataset))
    if num_proc == -1:
        num_proc = workers(len(dataset))
    fingerprint = fingerprint or prep_fingerprint(dataset, tokenizer, max_length, kind)
    mapped = dataset.with_format("arrow").map(
        _BatchFn(tokenizer, max_length, kind), batched=True, batch_size=batch_size,
        remove_columns=dataset.column_names, features=features, num_proc=num_proc, new_fingerprint=fingerprint,
        desc="Tokenizing").with_format(None)
    table = mapped.data
    n_loss = table.column("n_loss")
    stats.truncated = int(pc.sum(table.column("truncated")).as_py() or 0)
    stats.loss_tokens = int(pc.sum(n_loss).as_py() or 0)
    keep = np.flatnonzero(n_loss.to_numpy() > 0)
    if len(keep) != len(mapped):
        mapped = mapped.select(keep)
    stats.dropped_no_loss = stats.rows_in - len(keep)
    stats.rows_out = len(keep)
    stats.tokens = int(pc.sum(table.column("length").filter(pc.greater(n_loss, 0))).as_py() or 0)
    return mapped.remove_columns(["n_loss", "truncated"]), stats
