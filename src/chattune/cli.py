"""The command line: a table from command names to the modules in chattune.commands.

Each command module has HELP, add_arguments(parser) and run(args); only the module of the command being run
is imported, so `chattune --help` and a mistyped flag answer at once. Errors a user can fix (ChattuneError)
print as one line and exit 2; anything else is reported as a bug with a hint to rerun with --debug, which
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from chattune.errors import ChattuneError

log = logging.getLogger("chattune")

# name -> (module in chattune.commands, one-line help); the order is the order `chattune --help` lists them
COMMANDS = {
    "quickstart": ("quickstart", "build a small model and data set offline, fine-tune, and score before/after"),
    "train": ("train", "fine-tune a model on chat data"),
    "dpo": ("dpo", "preference-tune a model (DPO) on chosen/rejected reply pairs, e.g. after train"),
    "data": ("data", "inspect or validate a data set before training (subcommands: inspect, validate)"),
    "eval": ("eval", "assistant-token loss, perplexity and accuracy on a data set, optionally against a baseline"),
    "chat": ("chat", "talk to a model: interactive, one --message, or lines piped on standard input"),
    "generate": ("generate", "answer every prompt of a JSONL file, in batches"),
    "serve": ("serve", "serve a model over an OpenAI-compatible HTTP API, with a chat page"),
    "merge": ("merge", "merge a LoRA adapter into its base model: a standalone model directory"),
    "push": ("push", "upload a model directory with a generated model card to the Hugging Face hub"),
    "export": ("export", "export the model for llama.cpp, Ollama and LM Studio (GGUF)"),
}


def command_module(name: str):
    return importlib.import_module(f"chattune.commands.{COMMANDS[name][0]}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that command's arguments are built (the others are listed by name)."""
    parser = argparse.ArgumentParser(prog="chattune", description="Turn a small pre-trained language model into a "
                                                                  "chat assistant.")
    parser.add_argument("--version", action="version", version=f"chattune {__import__('chattune').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            p.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
            command_module(name).add_arguments(p)
    return parser


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[chattune] %(message)s"))
    log.handlers[:] = [handler]
    # the level is also what the command entry points read to keep the libraries' progress bars and notices
    # off during a run (verbosity.quiet_libraries); --debug leaves them on
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        warnings.filterwarnings("ignore")
        # transformers reads TRANSFORMERS_VERBOSITY when a command first imports it; one that ran earlier
        # in this process (the Python API) is told directly, without importing it for commands that never do
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    if not args.command:
        build_parser().print_help()
        return 2
    debug = getattr(args, "debug", False)
    _setup_logging(debug)
    try:
        return command_module(args.command).run(args)
    except ChattuneError as e:
        if debug:
            raise
        if not getattr(e, "quiet", False):  # an interrupted run's other processes repeat rank 0's message
            print(f"{getattr(e, 'prefix', 'error: ')}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: say so, keep the traceback behind --debug
        if debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback; this is likely a "
              "chattune bug)", file=sys.stderr)
        return 1
