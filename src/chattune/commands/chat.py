"""`chattune chat`: talk to a model: one `--message`, an interactive terminal (`you> ` prompt, /commands),
or piped standard input (one user turn per line, one reply per line, no prompts).

With `--tools FILE.json` the model sees those tool definitions; when a reply calls tools, the call is shown and
the next line typed (at the `tool result> ` prompt; piped: the next line) is its result, after which the model
goes on."""

from __future__ import annotations

import sys

from chattune.commands import default
from chattune.commands.generate import add_model_argument, check_generation_settings
from chattune.errors import ChattuneError
from chattune.verbosity import quiet

COMMANDS_HELP = """commands:
  /reset          start a new conversation (the system prompt stays)
  /history        show the conversation so far
  /system TEXT    set a new system prompt and start over
  /tool TEXT      the result of the tool call the model is waiting on (typing it at the prompt works too)
  /quit, /exit    leave (Ctrl-D too)
  //TEXT          send a message that starts with '/'
Ctrl-C stops a reply that is being written."""


def add_arguments(p) -> None:
    add_model_argument(p)
    p.add_argument("--message", metavar="TEXT", help="answer this one message and exit")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--tools", metavar="FILE", help="JSON file with the tool (function) definitions the model may call: "
                                                   "a list of {name, description, parameters} or OpenAI's "
                                                   "{type: function, function: {...}}")
    p.add_argument("--temperature", type=float, default=default(run_chat, "temperature"),
                   help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=default(run_chat, "top_p"),
                   help="nucleus sampling threshold (default: %(default)s)")
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token (no sampling)")
    p.add_argument("--max-new-tokens", type=int, default=default(run_chat, "max_new_tokens"),
                   help="longest reply in tokens (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def run(args) -> int:
    return run_chat(args.model, message=args.message, system=args.system, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, greedy=args.greedy, seed=args.seed,
                    device=args.device, tools=args.tools)


def read_tools(path: str) -> list[dict]:
    """Tool definitions from a JSON file (a list, or an object with a 'tools' list), in the canonical shape."""
    import json
    from pathlib import Path

    from chattune.data.tools import ToolFormatError, normalize_tools

    file = Path(path)
    if not file.is_file():
        raise ChattuneError(f"--tools file not found: {file}")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
        tools = normalize_tools(value["tools"] if isinstance(value, dict) and "tools" in value else value)
    except (ValueError, UnicodeDecodeError) as e:
        raise ChattuneError(f"{file}: not a JSON file of tool definitions ({e})") from None
    except ToolFormatError as e:
        raise ChattuneError(f"{file}: {e}; give a list of {{name, description, parameters}} objects") from None
    if not tools:
        raise ChattuneError(f"{file} defines no tools")
    return tools


def _say(session, text: str | None, out, prefix: str = "", results: list[str] | None = None) -> None:
    """Stream the reply to a user message (or to tool results), then show any tool call it makes."""
    from chattune.inference.toolcalls import describe_call

    out.write(prefix)
    out.flush()
    for piece in session.stream(text) if results is None else session.stream_tool_results(results):
        out.write(piece)
        out.flush()
    out.write("\n")
    for note in session.notices:
        print(f"[{note}]", file=sys.stderr)
    if session.invalid_calls:
        print(f"[{session.invalid_calls} tool call(s) in the reply are not valid JSON calls: left as text]",
              file=sys.stderr)
    for call in session.pending_calls:
        print(f"[tool call {call['id']}: {describe_call(call)}; type its result]", file=sys.stderr)
    out.flush()


def _command(session, line: str, out) -> bool | None:
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
            calls = "".join(f" [calls {c['function']['name']}]" for c in m.get("tool_calls") or [])
            out.write(f"{m['role']}: {m['content']}{calls}\n")
        if not session.messages:
            out.write("[no messages yet]\n")
    elif name == "system":
        session.reset(arg.strip())
        out.write(f"[system prompt {'set' if arg.strip() else 'cleared'}; new conversation]\n")
    elif name == "tool":
        if not session.pending_calls:
            out.write("[no tool call is waiting for a result]\n")
        else:
            return None  # the argument is the result: handled as a line
    elif name == "help":
        out.write(COMMANDS_HELP + "\n")
    else:
        out.write(f"[unknown command /{name}; /help lists the commands]\n")
    out.flush()
    return True


def _turn(session, line: str, out, prefix: str, interactive: bool, results: list[str] | None = None) -> bool:
    """Handle one input line; False when the session should end. While the model waits on tool calls, a line
    is the next call's result (`results` collects them until every call has one)."""
    handled = _command(session, line, out)
    if handled is False:
        return False
    if handled:
        return True
    text = line[1:] if line.startswith("//") else line
    if session.pending_calls:
        results = results if results is not None else []
        results.append(text[len("/tool "):] if text.startswith("/tool ") else text)
        if len(results) < len(session.pending_calls):
            return True
        text, given = None, list(results)
        results.clear()
    else:
        given = None
    try:
        _say(session, text, out, prefix, given)
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


def interactive(session, name: str, out=None) -> None:
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    mode = "greedy" if session.temperature <= 0 else f"temperature {session.temperature}, top-p {session.top_p}"
    out.write(f"chatting with {name} ({mode}; up to {session.max_new_tokens} new tokens). "
              "/help lists commands; /quit or Ctrl-D leaves.\n")
    results: list[str] = []
    while True:
        waiting = session.pending_calls[len(results)]["function"]["name"] if session.pending_calls else None
        try:
            line = input(f"tool result ({waiting})> " if waiting else "you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        line = line.strip()
        if line and not _turn(session, line, out, "assistant> ", interactive=True, results=results):
            break
    out.flush()


def piped(session, lines, out=None) -> None:
    """Each non-empty line is the next user turn of one conversation; each reply is printed as it is
    generated, then a newline. /reset and /quit work as in a terminal."""
    out = out or sys.stdout
    results: list[str] = []
    for line in lines:
        line = line.strip()
        if line and not _turn(session, line, out, "", interactive=False, results=results):
            break


@quiet
def run_chat(model_path: str, message: str | None = None, system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.7, top_p: float = 0.9, greedy: bool = False, seed: int | None = None,
             device: str | None = None, stdin=None, out=None, tools: str | list | None = None) -> int:
    """tools: a JSON file of tool definitions (or the definitions themselves)."""
    from transformers.utils import logging as hf_logging

    from chattune.inference.chat import ChatSession
    from chattune.model.load import load_chat_model

    stdin = stdin or sys.stdin
    out = out or sys.stdout
    check_generation_settings(max_new_tokens, temperature, top_p)
    tool_defs = read_tools(tools) if isinstance(tools, str) else tools
    hf_logging.disable_progress_bar()  # a loading bar would land in the middle of the conversation
    model, tokenizer = load_chat_model(model_path, device)
    session = ChatSession(model, tokenizer, system=system, max_new_tokens=max_new_tokens,
                          temperature=0.0 if greedy else temperature, top_p=top_p, seed=seed, tools=tool_defs)
    if message is not None:
        if not message.strip():
            raise ChattuneError("--message is empty")
        _say(session, message, out)
    elif stdin.isatty():
        interactive(session, model_path, out)
    else:
        piped(session, stdin, out)
    return 0
