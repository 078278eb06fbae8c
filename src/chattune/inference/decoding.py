"""Per-request decoding for the batching engine: each row of a batch has its own sampling settings,
random stream, token biases and stop strings, and its text is released piece by piece as it grows.

transformers' `generate` takes one temperature / top-p / seed / stop list for a whole batch and streams
only batches of one, so these few pieces are written here for one row at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: as many as the context leaves
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's)


def row_generator(params: SamplingParams, device) -> torch.Generator | None:
    """A row's own random stream, so a seeded request samples the same tokens whatever it is batched with."""
    if params.temperature <= 0:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def bias_tensors(params: SamplingParams, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not params.logit_bias:
        return None
    ids, values = zip(*sorted(params.logit_bias.items()))
    return torch.tensor(ids, device=device), torch.tensor(values, dtype=torch.float32, device=device)


def sample_next(logits: torch.Tensor, params: list[SamplingParams], generators: list, biases: list) -> list[int]:
    """The next token of every row (logits: rows x vocabulary, float): the row's biases added first, then
    greedy for temperature 0, else temperature and nucleus (top-p) sampling from the row's generator."""
    tokens = logits.argmax(-1).tolist()
    for i, (p, gen, bias) in enumerate(zip(params, generators, biases)):
        row = logits[i]
        if bias is not None:
            row = row.index_add(0, bias[0], bias[1])
        if p.temperature <= 0:
            if bias is not None:
                tokens[i] = int(row.argmax())
            continue
        probs = torch.softmax(row / p.temperature, dim=-1)
        if p.top_p < 1:
            probs, order = probs.sort(descending=True)
            probs[(probs.cumsum(0) - probs) >= p.top_p] = 0  # keep the smallest head whose mass reaches top_p
            tokens[i] = int(order[torch.multinomial(probs, 1, generator=gen)])
        else:
            tokens[i] = int(torch.multinomial(probs, 1, generator=gen))
    return tokens


class Detokenizer:
    """The text of a growing list of token ids, released only once it can no longer change: a trailing
    replacement character (a UTF-8 sequence split across tokens) and any tail that could be the start of
    a stop string are held back. Decoding the whole list each time keeps the streamed pieces exactly
    equal to the final decode (byte-level BPE merges can change earlier characters)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), lock=None):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.lock = lock or contextlib.nullcontext()  # fast tokenizers may not be used by two threads at once
        self.sent = 0  # characters of the decoded text already released

    def update(self, ids: list[int], final: bool = False) -> tuple[str, bool]:
        """(new text to release, whether a stop string was reached: the text then ends before it)."""
        with self.lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [k for k in (text.find(s) for s in self.stops) if k >= 0]
        if hits:
            return self._release(text, min(hits)), True
        if final:
            return self._release(text, len(text)), False
        end = len(text.rstrip("\ufffd"))
        hold = max((k for s in self.stops for k in range(1, min(len(s), end + 1)) if text[end - k:end] == s[:k]),
                   default=0)
        return self._release(text, end - hold), False

    def _release(self, text: str, end: int) -> str:
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece
