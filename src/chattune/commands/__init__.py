"""The commands: one module per CLI command, each with add_arguments(parser) and run(args), and the Python
function the command runs (run_train, run_eval, ...), which is the public API. Flags of config fields are
generated here from the config schema, so YAML files and the command line share one set of names.

Command modules import the library inside their functions: building the parser for `chattune --help`, or
rejecting a bad flag, must not wait seconds for torch and transformers to import.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re

from chattune.config import SECTIONS, Config, apply_values, fields_of, load_yaml, validate
from chattune.errors import ConfigError


def default(func, name: str):
    """The default of `func`'s parameter `name`: a flag's default is stated once, in the signature it feeds."""
    return inspect.signature(func).parameters[name].default


# the sections `chattune train` takes flags for; `chattune dpo` adds "dpo"
TRAIN_SECTIONS = tuple(s for s in SECTIONS if s != "dpo")


def add_config_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...] = TRAIN_SECTIONS,
                         defaults: dict | None = None) -> None:
    """Flags for the config fields of `sections`; `defaults` {"train.lr": 1e-6} states a command's own defaults
    in the help (the command applies them: config_from_args(args, base))."""
    defaults = defaults or {}
    parser.add_argument("--config", metavar="FILE", help="YAML config; command-line flags override it")
    for section in sections:
        group = parser.add_argument_group(f"{section} options")
        for name, (f, tp) in fields_of(SECTIONS[section]).items():
            flag = f.metadata.get("flag")
            if not flag:
                continue
            dest = f"{section}.{name}"
            default_txt = defaults.get(dest, f.default if f.default is not dataclasses.MISSING else None)
            help_txt = f.metadata["help"] + (f" (default: {default_txt})" if default_txt not in (None, False) else "")
            if tp is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_txt)
            elif name == "resume":
                group.add_argument(flag, dest=dest, nargs="?", const=True, default=argparse.SUPPRESS,
                                   metavar="CHECKPOINT", help=help_txt)
            else:
                group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=name.upper(),
                                   choices=f.metadata.get("choices"), help=help_txt)


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Defaults (or a command's own `base`), then the YAML file, then the flags given on the command line. An error
    about a value the command line set names the flag typed (--lr); one about a YAML value names its key
    (train.lr)."""
    cfg = base if base is not None else Config()
    if getattr(args, "config", None):
        apply_values(cfg, load_yaml(args.config), str(args.config))
    overrides: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    flags = {f"{section}.{name}": fields_of(SECTIONS[section])[name][0].metadata["flag"]
             for section, names in overrides.items() for name in names}
    try:
        apply_values(cfg, overrides, "command line")
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(name_flags(str(e), flags)) from None


def name_flags(message: str, flags: dict[str, str]) -> str:
    """Config keys in `message` replaced by the flags in `flags` ({"train.lr": "--lr"})."""
    text = re.sub(r"\b(?:model|data|train|lora)\.\w+\b", lambda m: flags.get(m.group(0), m.group(0)), message)
    return re.sub(r"(--[\w-]+) \(\1\)", r"\1", text)  # "lora.merge (--merge)" became "--merge (--merge)"
