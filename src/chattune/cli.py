"""The command line: a thin table from command names to the functions the Python API exposes.

Errors a user can fix (ChattuneError) print as one line and exit 2; anything else is reported as a
bug with a hint to rerun with --debug, which shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from chattune.config import add_config_arguments, config_from_args
from chattune.errors import ChattuneError

log = logging.getLogger("chattune")


def _train(args) -> int:
    from chattune.train import run_train

    run_train(config_from_args(args))
    return 0


def _quickstart(args) -> int:
    from chattune.quickstart import run_quickstart

    r = run_quickstart(args.output_dir, max_steps=args.max_steps)
    s = r["sample"]
    print(f"\n{r['metric']} on {r['n']} held-out sums: before {r['before']:.1%} -> after {r['after']:.1%} "
          f"({r['seconds']:.0f} s)")
    print(f"sample exchange:\n  user:      {s['question']}\n  assistant: {s['reply']}"
          f"   [{'correct' if s['correct'] else 'wrong'}, expected {s['expected']}]")
    print(f"model: {args.output_dir}   report: {os.path.join(args.output_dir, 'eval.json')}")
    return 0


def _add_quickstart(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="quickstart-out", help="where to build and train (default: quickstart-out)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: 1100)")


# name -> (help, add arguments, run)
COMMANDS = {
    "train": ("fine-tune a model on chat data", add_config_arguments, _train),
    "quickstart": ("build a small model and data set offline, fine-tune, and score before/after",
                   _add_quickstart, _quickstart),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chattune", description="Turn a small pre-trained language model into a "
                                                                  "chat assistant.")
    parser.add_argument("--version", action="version", version=f"chattune {__import__('chattune').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
        add_args(p)
    return parser


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[chattune] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        warnings.filterwarnings("ignore")
        import transformers

        transformers.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    _setup_logging(debug)
    run = COMMANDS[args.command][2]
    try:
        return run(args)
    except ChattuneError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
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
