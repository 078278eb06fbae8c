"""`chattune generate`: answer every prompt of a JSONL file, in batches; JSONL out, one row per input row."""

from __future__ import annotations

import json
import os
from pathlib import Path

from chattune.commands import default
from chattune.errors import ChattuneError
from chattune.verbosity import quiet


def add_model_argument(p) -> None:
    p.add_argument("model", metavar="MODEL", help="a chattune output directory, any local model directory, or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")


def add_arguments(p) -> None:
    add_model_argument(p)
    p.add_argument("--input", required=True, metavar="FILE",
                   help='JSONL, one row per line: {"messages": [...]} or {"prompt": "..."} (an "id" is kept), '
                        'optionally with "tools" (function definitions the model may call)')
    p.add_argument("--output", required=True, metavar="FILE",
                   help="JSONL with one row per input row: index, id, reply, tokens, finish_reason; rows with tools "
                        "also get content and tool_calls (OpenAI's shape, arguments a JSON string)")
    p.add_argument("--max-new-tokens", type=int, default=default(run_generate, "max_new_tokens"),
                   help="longest reply in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=default(run_generate, "temperature"),
                   help="0 is greedy (default); above 0 samples")
    p.add_argument("--top-p", type=float, default=default(run_generate, "top_p"),
                   help="nucleus sampling threshold (default: %(default)s)")
    p.add_argument("--seed", type=int, default=default(run_generate, "seed"),
                   help="seed: the same seed gives the same output (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=default(run_generate, "batch_size"),
                   help="prompts per generate call (default: %(default)s)")
    p.add_argument("--system", metavar="TEXT", help="system prompt for rows that have none")


def run(args) -> int:
    r = run_generate(args.model, args.input, args.output, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                     system=args.system, device=args.device)
    print(f"{r['rows']} replies ({r['tokens']} tokens; {r['stopped']} ended at the end-of-turn token, the rest at "
          f"--max-new-tokens) written to {r['output']}")
    return 0


def check_generation_settings(max_new_tokens: int, temperature: float, top_p: float, batch_size: int = 1) -> None:
    """The sampling flags' ranges, each error naming its flag and value."""
    for flag, value, ok, rule in (("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, "at least 1"),
                                  ("--batch-size", batch_size, batch_size >= 1, "at least 1"),
                                  ("--temperature", temperature, temperature >= 0, ">= 0 (0 is greedy)"),
                                  ("--top-p", top_p, 0 < top_p <= 1, "in (0, 1]")):
        if not ok:
            raise ChattuneError(f"{flag} must be {rule}, got {value}")


def check_not_same_file(input_path, output_path) -> None:
    """--output must not be --input under another spelling (or a link to it): the answers would replace the prompts."""
    src, dst = Path(input_path).expanduser(), Path(output_path).expanduser()
    same = src.resolve() == dst.resolve() or (src.exists() and dst.exists() and os.path.samefile(src, dst))
    if same:
        raise ChattuneError(f"--output {output_path} is the --input file: the answers would replace the prompts; "
                            "give another --output")


def _conversation(row: dict, where: str) -> tuple[list[dict], list | None]:
    """A prompt row's messages (OpenAI's shape: tool calls' arguments may be JSON strings) and tools, canonical."""
    from chattune.data.formats import from_messages
    from chattune.data.tools import ToolFormatError, normalize_tools
    from chattune.data.validate import RowError

    try:
        if "messages" in row:
            messages = from_messages(row, {})
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise ChattuneError(f"{where}: needs 'messages' (a list of {{role, content}}) or 'prompt' (a non-empty "
                                f"string); found keys {sorted(row)}")
        return messages, normalize_tools(row.get("tools"))
    except (RowError, ToolFormatError) as e:
        raise ChattuneError(f"{where}: {e}") from None


def read_prompts(path: str | Path, system: str | None = None) -> list[tuple[dict, list[dict], list | None]]:
    """(input row, conversation to answer, its tools) for each line of a JSONL file; errors name the line."""
    from chattune.inference.generate import check_prompt

    path = Path(path)
    if not path.is_file():
        raise ChattuneError(f"input file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChattuneError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ChattuneError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            messages, tools = _conversation(row, f"{path} line {n}")
            problem = check_prompt(messages, tools)
            if problem:
                raise ChattuneError(f"{path} line {n}: {problem}")
            if system and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system}] + messages
            rows.append((row, messages, tools))
    if not rows:
        raise ChattuneError(f"{path} has no rows to answer")
    return rows


@quiet
def run_generate(model_path: str, input_path: str, output_path: str, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                 system: str | None = None, device: str | None = None) -> dict:
    """Answer every row of INPUT; OUTPUT gets one row per input row, in order, with index (and id if
    the input row had one), reply, tokens (generated, without the end-of-turn token) and finish_reason; a row
    with tools also gets content (the reply's text outside its calls), tool_calls (OpenAI's shape, arguments a
    JSON string; finish_reason 'tool_calls') and invalid_tool_calls (call blocks that were not valid JSON)."""
    from chattune.data.tools import to_wire
    from chattune.inference.generate import generate_replies
    from chattune.model.load import load_chat_model

    check_generation_settings(max_new_tokens, temperature, top_p, batch_size)
    check_not_same_file(input_path, output_path)
    rows = read_prompts(input_path, system)
    model, tokenizer = load_chat_model(model_path, device)
    tools = [t for _, _, t in rows]
    replies = generate_replies(model, tokenizer, [m for _, m, _ in rows], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, temperature=temperature, top_p=top_p, seed=seed,
                               tools=tools if any(tools) else None)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, ((row, _, _), reply) in enumerate(zip(rows, replies)):
            if "tool_calls" in reply:
                reply = {**reply, "tool_calls": to_wire(reply["tool_calls"]) or []}
            record = {"index": i, **({"id": row["id"]} if "id" in row else {}), **reply}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)  # a crash never leaves a half-written answers file behind
    return {"rows": len(rows), "tokens": sum(r["tokens"] for r in replies),
            "stopped": sum(r["finish_reason"] == "stop" for r in replies), "output": str(out)}
