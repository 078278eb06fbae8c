"""A multi-turn chat session that streams each reply as it is generated (the library behind `chattune chat`).

Each turn re-renders the whole history with the tokenizer's saved chat template (the one training
used), so the model sees exactly the token layout it was trained on, and generation stops at the
end-of-turn token; the oldest exchanges are dropped when the history outgrows the context.

With tools, the template shows the model their definitions; a reply that calls tools joins the history as an
assistant message with tool_calls (parsed from its text), `pending_calls` holds them, and
`stream_tool_results` hands the results back and streams the model's next reply.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from chattune.data.template import sandbox_errors
from chattune.errors import ChattuneError
from chattune.inference.generate import sampling_kwargs, stop_token_ids, until_stop
from chattune.inference.toolcalls import assistant_message, parse_tool_calls
from chattune.model.load import context_length


class _Stop:
    """A stopping criterion the reader thread flips when the user interrupts a reply."""

    def __init__(self):
        self.requested = False

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.requested, dtype=torch.bool, device=input_ids.device)


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None, tools: list | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.tools = tools or None  # canonical tool definitions (data.tools.normalize_tools)
        self.pending_calls: list[dict] = []  # the last reply's tool calls, waiting for their results
        self.invalid_calls = 0  # call blocks in the last reply whose JSON was not a call (left as text)
        self.turns = 0
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.context = context_length(model.config)
        self.stops = stop_token_ids(model, tokenizer)
        self.messages: list[dict] = []
        self.notices: list[str] = []  # things the user should know about the last turn (dropped history)
        self.last_prompt_ids: list[int] = []
        self.last_reply_ids: list[int] = []
        if seed is not None:
            torch.manual_seed(seed)
        self.reset()

    def reset(self, system: str | None = None) -> None:
        if system is not None:
            self.system = system or None
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.pending_calls = []

    def prompt_ids(self, messages: list[dict] | None = None) -> list[int]:
        """The tokens the model is given: the history rendered with the saved template, then the
        assistant header; the same tokens training produced for this history."""
        with sandbox_errors(self.tokenizer):
            enc = self.tokenizer.apply_chat_template(self.messages if messages is None else messages,
                                                     tools=self.tools, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
        return list(enc["input_ids"])

    def _fit_context(self) -> list[int]:
        """Prompt ids that leave room for a reply, dropping the oldest exchanges (never the system
        prompt or the new message) when the history has grown past the model's context."""
        ids = self.prompt_ids()
        if self.context is None:
            return ids
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        # room kept for the reply; at most half the context, so a short context still holds some history
        reserve = min(self.max_new_tokens, self.context // 2)
        dropped = 0
        while len(ids) + reserve > self.context and len(self.messages) - first > 1:
            # one exchange: a user message and everything up to the next user message
            end = next((i for i in range(first + 1, len(self.messages)) if self.messages[i]["role"] == "user"),
                       len(self.messages) - 1)
            del self.messages[first:end]
            dropped += 1
            ids = self.prompt_ids()
        if dropped:
            self.notices.append(f"dropped the {dropped} oldest exchange(s) to fit the model's context of "
                                f"{self.context} tokens")
        if len(ids) >= self.context:
            raise ChattuneError(f"the message is {len(ids)} tokens with its template, the model's context is "
                                f"{self.context}: shorten it")
        return ids

    def stream(self, text: str) -> Iterator[str]:
        """Add a user message and yield the reply as it is generated; the reply joins the history when
        it is complete. An interrupted or failed turn leaves the history as it was."""
        if self.pending_calls:
            raise ChattuneError(f"the model called {len(self.pending_calls)} tool(s): give their results first")
        yield from self._turn([{"role": "user", "content": text}])

    def stream_tool_results(self, results: list[str]) -> Iterator[str]:
        """Hand back one result per pending tool call, in order, and yield the model's next reply."""
        if len(results) != len(self.pending_calls):
            raise ChattuneError(f"{len(self.pending_calls)} tool call(s) wait for a result, got {len(results)}")
        yield from self._turn([{"role": "tool", "content": r, "tool_call_id": c["id"], "name": c["function"]["name"]}
                               for r, c in zip(results, self.pending_calls)])

    def _turn(self, new: list[dict]) -> Iterator[str]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        saved, pending = list(self.messages), self.pending_calls
        self.notices = []
        self.messages += new
        self.pending_calls = []
        try:
            ids = self._fit_context()
        except ChattuneError:
            self.messages, self.pending_calls = saved, pending
            raise
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        budget = self.max_new_tokens if self.context is None else min(self.max_new_tokens, self.context - len(ids))
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = _Stop()
        result: dict = {}

        def work():
            try:
                with torch.no_grad():
                    result["ids"] = self.model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                        max_new_tokens=budget, eos_token_id=self.stops, pad_token_id=self.tokenizer.pad_token_id,
                        stopping_criteria=StoppingCriteriaList([stop]),
                        **sampling_kwargs(self.temperature, self.top_p))
            except BaseException as e:  # handed to the reading thread, which raises it
                result["error"] = e
                streamer.end()

        # generation runs in a thread so that this one can hand out text while tokens arrive
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        finished = False
        try:
            yield from streamer
            finished = True
        finally:
            if not finished:
                stop.requested = True
            thread.join()
            if not finished or "error" in result:
                self.messages, self.pending_calls = saved, pending
        if "error" in result:
            raise result["error"]
        reply_ids, _ = until_stop(result["ids"][0, len(ids):].tolist(), self.stops)
        self.last_prompt_ids, self.last_reply_ids = ids, reply_ids
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
        self.turns += 1
        if self.tools:
            parsed = parse_tool_calls(reply, id_prefix=f"call_{self.turns}")
            self.pending_calls, self.invalid_calls = parsed.tool_calls, parsed.invalid
            self.messages.append(assistant_message(parsed))
        else:
            self.messages.append({"role": "assistant", "content": reply})

    def reply(self, text: str) -> str:
        return "".join(self.stream(text))
