"""`chattune data inspect|validate`: what a data set holds and what the model would be trained on, and every
data check training runs, before any training."""

from __future__ import annotations

import argparse
import json

from chattune.commands import add_config_arguments, config_from_args
from chattune.errors import ChattuneError
from chattune.verbosity import quiet_libraries


def add_arguments(p) -> None:
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


def run(args) -> int:
    cfg = config_from_args(args)
    if args.data_command != "validate" and args.sample < 0:
        raise ChattuneError("--sample must be 0 (all rows) or more")
    with quiet_libraries():
        return validate(cfg, args) if args.data_command == "validate" else inspect(cfg, args)


def validate(cfg, args) -> int:
    from chattune.data.inspect import format_validate, validate_data
    from chattune.data.preferences import is_preference_config, load_preferences

    # preference pairs (chosen/rejected columns) are checked as `chattune dpo` checks them
    r = validate_data(cfg, load_preferences if is_preference_config(cfg) else None)
    print(json.dumps(r, indent=2, ensure_ascii=False) if args.json else format_validate(r))
    return 0 if r["ok"] else 2


def inspect(cfg, args) -> int:
    from chattune.data.inspect import format_inspect, inspect_data
    from chattune.data.preferences import is_preference_config
    from chattune.model.hub import load_config
    from chattune.model.load import context_length, load_for_training, resolve_max_length

    m = cfg.model
    max_length = resolve_max_length(cfg.data.max_length, context_length(load_config(m.name, m.revision,
                                                                                    m.trust_remote_code)), m.name)
    tokenizer, _ = load_for_training(m, lambda msg: None)
    if is_preference_config(cfg):
        from chattune.data.preference_stats import format_inspect_preferences, inspect_preferences

        r = inspect_preferences(cfg, tokenizer, max_length, args.split, args.sample or None)
        print(json.dumps(r, ensure_ascii=False) if args.json else format_inspect_preferences(r))
        return 0
    r = inspect_data(cfg, tokenizer, max_length, args.split, args.sample or None, args.example)
    print(json.dumps(r, ensure_ascii=False) if args.json else format_inspect(r))
    return 0
