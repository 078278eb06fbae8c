"""The command line: a thin table from command names to the functions the Python API exposes.

Errors a user can fix (ChattuneError) print as one line and exit 2; anything else is reported as a
bug with a hint to rerun with --debug, which shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings

from chattune.config import DataConfig, add_config_arguments, config_from_args
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
    from chattune.quickstart import DEFAULT_STEPS

    p.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps (default: {DEFAULT_STEPS})")


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a chattune output directory, any local model directory, or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")


def _add_chat(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p)
    p.add_argument("--message", metavar="TEXT", help="answer this one message and exit")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default: 0.9)")
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token (no sampling)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def _chat(args) -> int:
    from chattune.chat import run_chat

    return run_chat(args.model, message=args.message, system=args.system, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, greedy=args.greedy, seed=args.seed,
                    device=args.device)


def _add_generate(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p)
    p.add_argument("--input", required=True, metavar="FILE",
                   help='JSONL, one row per line: {"messages": [...]} or {"prompt": "..."} (an "id" is kept)')
    p.add_argument("--output", required=True, metavar="FILE",
                   help="JSONL with one row per input row: index, id, reply, tokens, finish_reason")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed: the same seed gives the same output (default: 0)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default: 16)")
    p.add_argument("--system", metavar="TEXT", help="system prompt for rows that have none")


def _generate(args) -> int:
    from chattune.errors import ChattuneError
    from chattune.infer import run_generate

    if args.max_new_tokens < 1 or args.batch_size < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ChattuneError("--max-new-tokens and --batch-size must be at least 1, --temperature >= 0 and --top-p "
                            "in (0, 1]")
    r = run_generate(args.model, args.input, args.output, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                     system=args.system, device=args.device)
    print(f"{r['rows']} replies ({r['tokens']} tokens; {r['stopped']} ended at the end-of-turn token, the rest at "
          f"--max-new-tokens) written to {r['output']}")
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p)
    p.add_argument("--dataset", help="hub id, local hub-layout directory or file (default: the data set MODEL was "
                                     "trained on, from its chattune.yaml)")
    p.add_argument("--split", help="split to score (default: the run's evaluation split)")
    p.add_argument("--dataset-config", help="the data set's configuration (subset) name")
    formats = next(f.metadata["choices"] for f in dataclasses.fields(DataConfig) if f.name == "format")
    p.add_argument("--format", default=None, choices=formats, help="data format (default: the run's, else auto)")
    p.add_argument("--max-samples", type=int, default=None, help="score at most this many conversations")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate conversations to this many tokens (default: the run's, else the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per forward pass (default: 8)")
    p.add_argument("--baseline", metavar="OTHER_MODEL",
                   help="also score this model on the same token sequences and report the difference")
    p.add_argument("--samples", type=int, default=0, metavar="N", help="generate N replies next to the references")
    p.add_argument("--sample-tokens", type=int, default=64, help="longest sample reply in tokens (default: 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _eval(args) -> int:
    import json

    from chattune.evaluate import format_report, jsonable, run_eval

    result = run_eval(args.model, dataset=args.dataset, split=args.split, config_name=args.dataset_config,
                      fmt=args.format, max_samples=args.max_samples, max_length=args.max_length,
                      batch_size=args.batch_size, baseline=args.baseline, samples=args.samples,
                      sample_tokens=args.sample_tokens, device=args.device)
    print(json.dumps(jsonable(result), indent=2, ensure_ascii=False) if args.json else format_report(result))
    return 0


def _add_push(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the model directory to upload (a chattune output directory)")
    p.add_argument("--repo", required=True, metavar="NAME", help="hub repository: NAME or OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", action="store_true", help="write what would be uploaded to --output-dir instead")
    p.add_argument("--output-dir", metavar="DIR", help="with --dry-run: where to write the folder and its card")


def _push(args) -> int:
    from chattune.publish import run_push

    r = run_push(args.model, args.repo, private=args.private, dry_run=args.dry_run, output_dir=args.output_dir)
    if args.dry_run:
        print(f"dry run: the {len(r['files'])} files that would be uploaded, model card included, are in "
              f"{r['folder']} (nothing was uploaded)")
    else:
        print(f"uploaded {len(r['files'])} files to {r['url']}")
    return 0


def _add_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="the output directory of a --lora or --qlora run")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where to write the merged model")
    p.add_argument("--trust-remote-code", action="store_true", help="run modelling code shipped with the base model")


def _merge(args) -> int:
    from chattune.adapters import merge_adapter

    out = merge_adapter(args.adapter, args.output_dir, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out}")
    return 0


def _add_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    ins = sub.add_parser("inspect", help="rows, turns, roles, token lengths, what --max-length cuts, and one example "
                                         "with its trained-on tokens marked",
                         description="What a data set holds and what the model would be trained on, with the "
                                     "model's tokenizer and chat template.")
    add_config_arguments(ins, ("model", "data"))
    ins.add_argument("--split", choices=("train", "eval"), default="train", help="which split to inspect")
    ins.add_argument("--sample", type=int, default=2000, metavar="N",
                     help="conversations tokenized for the length statistics, drawn with the seed (0: all; "
                          "default 2000)")
    ins.add_argument("--example", type=int, default=0, metavar="ROW", help="the row to show token by token")
    val = sub.add_parser("validate", help="run every data check, without a model; exit 0 when all rows are valid",
                         description="Load and check the data as `chattune train` would; report problems by kind "
                                     "with file and line, and exit non-zero when there are any.")
    add_config_arguments(val, ("data",))
    for q in (ins, val):
        q.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _data(args) -> int:
    import json

    cfg = config_from_args(args)
    if args.data_command == "validate":
        from chattune.data.inspect import format_validate, validate_data

        r = validate_data(cfg)
        print(json.dumps(r, indent=2, ensure_ascii=False) if args.json else format_validate(r))
        return 0 if r["ok"] else 2
    from chattune.data.inspect import format_inspect, inspect_data
    from chattune.model import context_length, load_config, load_for_training
    from chattune.train import resolve_max_length

    m = cfg.model
    max_length = resolve_max_length(cfg.data.max_length, context_length(load_config(m.name, m.revision,
                                                                                    m.trust_remote_code)), m.name)
    tokenizer, _ = load_for_training(m, lambda msg: None)
    if args.sample < 0:
        raise ChattuneError("--sample must be 0 (all rows) or more")
    r = inspect_data(cfg, tokenizer, max_length, args.split, args.sample or None, args.example)
    print(json.dumps(r, ensure_ascii=False) if args.json else format_inspect(r))
    return 0


# name -> (help, add arguments, run)
COMMANDS = {
    "train": ("fine-tune a model on chat data", add_config_arguments, _train),
    "quickstart": ("build a small model and data set offline, fine-tune, and score before/after",
                   _add_quickstart, _quickstart),
    "chat": ("talk to a model: interactive, one --message, or lines piped on standard input", _add_chat, _chat),
    "generate": ("answer every prompt of a JSONL file, in batches", _add_generate, _generate),
    "eval": ("assistant-token loss, perplexity and accuracy on a data set, optionally against a baseline",
             _add_eval, _eval),
    "push": ("upload a model directory with a generated model card to the Hugging Face hub", _add_push, _push),
    "merge": ("merge a LoRA adapter into its base model: a standalone model directory", _add_merge, _merge),
    "data": ("inspect or validate a data set before training (subcommands: inspect, validate)", _add_data, _data),
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
        # transformers reads TRANSFORMERS_VERBOSITY when a command first imports it; one that ran earlier
        # in this process (the Python API) is told directly, without importing it for commands that never do
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.set_verbosity_error()


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
