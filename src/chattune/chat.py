"""`chattune chat`: a multi-turn session that streams the reply as it is generated.

Each turn re-renders the whole history with the tokenizer's saved chat template (the one training
used), so the model sees exactly the token layout it was trained on, and generation stops at the
end-of-turn token. Three ways in: `--message TEXT` (one answer), an interactive terminal (`you> `
prompt, /commands), or piped standard input (one user turn per line, one reply per line, no prompts).
"""

from __future__ import annotations

import sys
import threading
from typing import Iterator

import torch

from chattune.errors import ChattuneError
from chattune.infer import sampling_kwargs, stop_token_ids

HELP = """commands:
  /reset          start a new conversation (the system prompt stays)
  /history        show the conversation so far
  /system TEXT    set a new system prompt and start over
  /quit, /exit    leave (Ctrl-D too)
  //TEXT          send a message that starts with '/'
Ctrl-C stops a reply that is being written."""


class _Stop:
    """A stopping criterion the reader thread flips when the user interrupts a reply."""

    def __init__(self):
        self.requested = False

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.requested, dtype=torch.bool, device=input_ids.device)


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None):
        from chattune.model import context_length

        self.model, self.tokenizer = model, tokenizer
        self.system = system
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

    def prompt_ids(self, messages: list[dict] | None = None) -> list[int]:
        """The tokens the model is given: the history rendered with the saved template, then the
        assistant header; the same tokens training produced for this history."""
        enc = self.tokenizer.apply_chat_template(self.messages if messages is None else messages,
                                                 add_generation_prompt=True, tokenize=True, return_dict=True)
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
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        saved = list(self.messages)
        self.notices = []
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._fit_context()
        except ChattuneError:
            self.messages = saved
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
                self.messages = saved
        if "error" in result:
            raise result["error"]
        new = result["ids"][0, len(ids):].tolist()
        reply_ids = []
        for t in new:
            if t in self.stops:
                break
            reply_ids.append(t)
        self.last_prompt_ids, self.last_reply_ids = ids, reply_ids
        self.messages.append({"role": "assistant", "content": self.tokenizer.decode(reply_ids, skip_special_tokens=True)})

    def reply(self, text: str) -> str:
        return "".join(self.stream(text))


def _say(session: ChatSession, text: str, out, prefix: str = "") -> None:
    out.write(prefix)
    out.flush()
    for piece in session.stream(text):
        out.write(piece)
        out.flush()
    out.write("\n")
    for note in session.notices:
        print(f"[{note}]", file=sys.stderr)
    out.flush()


def _command(session: ChatSession, line: str, out) -> bool | None:
    """Run a /command; False to quit, True when handled, None when the line is a message."""
    if line.startswith("//"):
        return None
    if not line.startswith("/"):
        return None
    name, _, arg = line[1:].partition(" ")
    if name in ("quit", "exit", "q"):
        return False
    if name == "reset":
        session.reset()
        out.write("[new conversation]\n")
    elif name == "history":
        for m in session.messages:
            out.write(f"{m['role']}: {m['content']}\n")
        if not session.messages:
            out.write("[no messages yet]\n")
    elif name == "system":
        session.reset(arg.strip())
        out.write(f"[system prompt {'set' if arg.strip() else 'cleared'}; new conversation]\n")
    elif name == "help":
        out.write(HELP + "\n")
    else:
        out.write(f"[unknown command /{name}; /help lists the commands]\n")
    out.flush()
    return True


def _turn(session: ChatSession, line: str, out, prefix: str, interactive: bool) -> bool:
    """Handle one input line; False when the session should end."""
    handled = _command(session, line, out)
    if handled is False:
        return False
    if handled:
        return True
    text = line[1:] if line.startswith("//") else line
    try:
        _say(session, text, out, prefix)
    except KeyboardInterrupt:
        if not interactive:
            raise
        out.write(" [stopped]\n")
        out.flush()
    except ChattuneError as e:
        if not interactive:
            raise
        out.write(f"\n[{e}]\n")
        out.flush()
    return True


def interactive(session: ChatSession, name: str, out=None) -> None:
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    mode = "greedy" if session.temperature <= 0 else f"temperature {session.temperature}, top-p {session.top_p}"
    out.write(f"chatting with {name} ({mode}; up to {session.max_new_tokens} new tokens). "
              "/help lists commands; /quit or Ctrl-D leaves.\n")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        line = line.strip()
        if line and not _turn(session, line, out, "assistant> ", interactive=True):
            break
    out.flush()


def piped(session: ChatSession, lines, out=None) -> None:
    """Each non-empty line is the next user turn of one conversation; each reply is printed as it is
    generated, then a newline. /reset and /quit work as in a terminal."""
    out = out or sys.stdout
    for line in lines:
        line = line.strip()
        if line and not _turn(session, line, out, "", interactive=False):
            break


def run_chat(model_path: str, message: str | None = None, system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.7, top_p: float = 0.9, greedy: bool = False, seed: int | None = None,
             device: str | None = None, stdin=None, out=None) -> int:
    from chattune.infer import load_chat_model

    stdin = stdin or sys.stdin
    out = out or sys.stdout
    if max_new_tokens < 1:
        raise ChattuneError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not 0 < top_p <= 1:
        raise ChattuneError(f"--top-p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ChattuneError(f"--temperature must be >= 0, got {temperature}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a loading bar would land in the middle of the conversation
    model, tokenizer = load_chat_model(model_path, device)
    session = ChatSession(model, tokenizer, system=system, max_new_tokens=max_new_tokens,
                          temperature=0.0 if greedy else temperature, top_p=top_p, seed=seed)
    if message is not None:
        if not message.strip():
            raise ChattuneError("--message is empty")
        _say(session, message, out)
    elif stdin.isatty():
        interactive(session, model_path, out)
    else:
        piped(session, stdin, out)
    return 0
