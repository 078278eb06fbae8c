"""Batched generation for `chattune serve`: requests that arrive together are decoded as one batch.

One worker thread owns the model. Requests are handed in with `submit` from any thread and their text
comes back as `Event`s through a callback. The loop is a small decoder on the model's KV cache (see
decoding.py for why not `generate`): a left-padded prefill (position ids from the attention mask, as
`generate` computes them), then one token per step for every row. New requests join a running batch
at a step boundary (continuous batching, batch_cache.py) when its cache allows it, else they wait for
the batch to end; a request that is cancelled (its client went away) leaves at the next step.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from chattune.inference import batch_cache
from chattune.inference.decoding import Detokenizer, SamplingParams, bias_tensors, row_generator, sample_next
from chattune.inference.generate import prompt_ids, stop_token_ids
from chattune.model.load import context_length

log = logging.getLogger("chattune")
SHUTTING_DOWN = "the server is shutting down"


class PromptTooLong(ValueError):
    """The prompt leaves no room for a reply in the model's context."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class Event:
    """What a request's consumer receives: new text, and on the last event why generation ended."""
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length" on the last event
    error: str | None = None  # set (and last) when generation failed or the engine closed
    completion_tokens: int = 0  # tokens generated so far (the stop token not counted)

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Request:
    """One submitted prompt. `cancel()` is safe from any thread: the worker drops the row at the next step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, budget: int, sink: Callable[[Event], None]):
        self.prompt_ids, self.params, self.budget, self.sink = prompt_ids, params, budget, sink
        self.cancelled = False
        self.done = False  # its last event has been sent

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    request: Request
    detok: Detokenizer
    generator: torch.Generator | None
    bias: tuple | None
    ids: list[int] = field(default_factory=list)  # generated so far, stop token excluded
    sampled: int = 0


@dataclass
class _Batch:
    rows: list[_Row]
    cache: object  # the model's Cache; its length is mask.shape[1]
    mask: torch.Tensor  # (rows, cached positions); 0 where a row is left-padded
    tokens: torch.Tensor  # (rows,) the last sampled tokens, fed at the next step

    @property
    def requests(self) -> list[Request]:
        return [r.request for r in self.rows]

    def select(self, keep: list[int]) -> _Batch | None:
        """This batch without the other rows; None when no row is left."""
        if not keep:
            return None
        if len(keep) < len(self.rows):
            self.mask = batch_cache.select(self.cache, self.mask, keep)
            self.rows, self.tokens = [self.rows[i] for i in keep], self.tokens[keep]
        return self

    def join(self, other: _Batch) -> _Batch:
        self.mask = batch_cache.join(self.cache, self.mask, other.cache, other.mask)
        self.rows, self.tokens = self.rows + other.rows, torch.cat([self.tokens, other.tokens])
        return self


class Engine:
    """Owns the model: `submit` queues prompts from any thread; one worker thread generates them in batches
    of up to `max_batch_size`. An idle engine waits `batch_wait` seconds for requests arriving together."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, batch_wait: float = 0.01,
                 default_max_tokens: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.batch_wait = max(1, max_batch_size), batch_wait
        self.context = context_length(model.config)
        self.default_max_tokens = default_max_tokens  # used only when the model states no context length
        self.stop_ids = set(stop_token_ids(model, tokenizer))
        head = model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._logits_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # as generate() asks
        # transformers 5.24 names the cache argument `cache` (`past_key_values` is accepted until 5.40)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._tok_lock = threading.Lock()  # fast tokenizers raise "Already borrowed" when two threads share one
        self._cond = threading.Condition()
        self._waiting: list[Request] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        # requests: started; joined: of those, started inside a running batch (continuous batching at work)
        self.stats = {"running": 0, "waiting": 0, "peak_batch": 0, "requests": 0, "joined": 0, "cancelled": 0}

    # ---- prompts -------------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None, reply_start: str = "") -> list[int]:
        """The prompt tokens: the conversation (and its tool definitions) rendered with the saved chat template
        and the assistant header, exactly as `chattune chat` and `generate_replies` render it; `reply_start`: text
        the reply is made to begin with (its tokens follow the header)."""
        with self._tok_lock:
            ids = prompt_ids(self.tokenizer, [messages], [tools] if tools else None)[0]
            start = self.tokenizer(reply_start, add_special_tokens=False)["input_ids"] if reply_start else []
        return ids + list(start)

    def token_id(self, text: str) -> int | None:
        """The id of `text` when the tokenizer has it as one token, else None."""
        with self._tok_lock:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    def encode_text(self, prompt: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(prompt)["input_ids"])

    def budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """Tokens a reply may take: max_tokens, bounded by what the context leaves."""
        if n_prompt == 0:
            raise PromptTooLong("the prompt is empty")
        if self.context is None:
            return max_tokens or self.default_max_tokens
        room = self.context - n_prompt
        if room < 1:
            raise PromptTooLong(f"the prompt is {n_prompt} tokens and the model's context is {self.context} "
                                "tokens, which leaves no room for a reply; shorten it")
        return min(max_tokens, room) if max_tokens else room

    # ---- submitting ----------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> Request:
        """Queue a prompt; `sink` gets its events, called from the worker thread (it must hand them on,
        not block). Raises PromptTooLong, EngineClosed."""
        req = Request(prompt_ids, params, self.budget(len(prompt_ids), params.max_tokens), sink)
        with self._cond:
            if self._closing:
                raise EngineClosed(SHUTTING_DOWN)
            self._waiting.append(req)
            self.stats["waiting"] = len(self._waiting)
            self._cond.notify()
        return req

    @property
    def accepting(self) -> bool:
        return not self._closing

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Result:
        """Blocking: the whole reply to one prompt (for scripts and tests; the server streams)."""
        q: queue.Queue = queue.Queue()
        self.submit(prompt_ids, params, q.put)
        pieces = []
        while True:
            ev = q.get()
            if ev.error:
                raise RuntimeError(ev.error)
            pieces.append(ev.text)
            if ev.finish_reason:
                return Result("".join(pieces), ev.finish_reason, len(prompt_ids), ev.completion_tokens)

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="chattune-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking requests, end those waiting or running (each gets an error event), stop the worker."""
        with self._cond:
            self._closing = True
            for req in self._waiting:
                self._emit(req, Event(error=SHUTTING_DOWN))
            self._waiting.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        running: _Batch | None = None
        with torch.inference_mode():
            while (new := self._take(running)) is not None:
                # a failure must not take the server down: the requests it hit get the error, the others go on
                group = self._guarded(new, self._prefill, new) if new else None
                if group is not None and running is not None:
                    self.stats["joined"] += len(group.rows)
                    running = self._guarded(running.requests + group.requests, running.join, group)
                else:
                    running = running or group
                if running is not None:
                    running = self._guarded(running.requests, self._step, running)
                self.stats["running"] = len(running.rows) if running else 0
        for row in running.rows if running else []:
            self._emit(row.request, Event(error=SHUTTING_DOWN))
        self.stats["running"] = 0

    def _guarded(self, requests: list[Request], work, *args):
        """work(*args), or None after its failure has been logged and sent to `requests` that have not ended."""
        try:
            return work(*args)
        except Exception as e:
            log.exception("generation failed")
            for req in requests:
                if not req.done:
                    self._emit(req, Event(error=f"generation failed: {type(e).__name__}: {e}"))
            return None

    def _take(self, running: _Batch | None) -> list[Request] | None:
        """Requests to start now: when idle, wait for one, then up to `batch_wait` for others arriving with
        it; while a batch runs, those already waiting, if its cache can take them. None: shut down."""
        room = self.max_batch_size - (len(running.rows) if running else 0)
        with self._cond:
            if running is None:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                deadline = time.monotonic() + self.batch_wait
                while len(self._waiting) < room and not self._closing and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
            if self._closing:  # close() has ended the waiting requests
                return None
            if running is not None and (room < 1 or not batch_cache.joinable(running.cache)):
                return []
            live = [r for r in self._waiting if not r.cancelled]
            self.stats["cancelled"] += len(self._waiting) - len(live)  # went away while waiting
            taken, self._waiting = live[:room], live[room:]
            self.stats["waiting"] = len(self._waiting)
            self.stats["requests"] += len(taken)
            return taken

    def _emit(self, req: Request, event: Event) -> None:
        req.done = event.last
        try:
            req.sink(event)
        except Exception:  # the consumer is gone (its event loop closed): stop generating for it
            req.cancel()

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}, **self._logits_kw)
        return out.logits[:, -1, :].float()  # the cache object is updated in place

    def _prefill(self, requests: list[Request]) -> _Batch | None:
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's next token goes in the same column
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache)
        rows = [_Row(r, Detokenizer(self.tokenizer, r.params.stop, self._tok_lock),
                     row_generator(r.params, self.device), bias_tensors(r.params, self.device)) for r in requests]
        return self._advance(_Batch(rows, cache, mask, torch.zeros(len(rows), dtype=torch.long)), logits)

    def _step(self, batch: _Batch) -> _Batch | None:
        keep = [i for i, r in enumerate(batch.rows) if not r.request.cancelled]
        self.stats["cancelled"] += len(batch.rows) - len(keep)
        if (batch := batch.select(keep)) is None:  # clients that went away free their rows now
            return None
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        positions = batch.mask.sum(-1, keepdim=True) - 1
        logits = self._forward(batch.tokens[:, None], batch.mask, positions, batch.cache)
        return self._advance(batch, logits)

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Sample each row's next token, hand out its text, and drop the rows that are done."""
        rows = batch.rows
        tokens = sample_next(logits, [r.request.params for r in rows], [r.generator for r in rows],
                             [r.bias for r in rows])
        batch.tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(rows))
        return batch.select([i for i, (row, tok) in enumerate(zip(rows, tokens)) if not self._take_token(row, tok)])

    def _take_token(self, row: _Row, token: int) -> bool:
        """Record one sampled token and emit its text; True when the row is finished."""
        req = row.request
        row.sampled += 1
        if token in self.stop_ids:
            text, finish = row.detok.update(row.ids, final=True)[0], "stop"
        else:
            row.ids.append(token)
            text, hit = row.detok.update(row.ids, final=row.sampled >= req.budget)
            finish = "stop" if hit else ("length" if row.sampled >= req.budget else None)
        if text or finish:
            self._emit(req, Event(text=text, finish_reason=finish, completion_tokens=len(row.ids)))
        return finish is not None
