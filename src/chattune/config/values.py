"""Values into the schema: YAML files and command-line values coerced to each field's type, with errors
that name the field (and a did-you-mean for unknown keys); a run directory's saved config read back."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from chattune.config.schema import SECTIONS, Config, fields_of
from chattune.errors import ConfigError
from chattune.outputs import CONFIG_FILE


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or say which field is wrong."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if tp is list or origin is list:
        inner = (typing.get_args(tp) or (Any,))[0]
        if isinstance(value, str) and not dataclasses.is_dataclass(inner):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [v if inner is Any else _coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _coerce_section(value, tp, where)
    return value


def _coerce_section(value: Any, section_cls, where: str):
    """A mapping (or an instance) as the dataclass `section_cls`; a bare string names its first field."""
    if isinstance(value, section_cls):
        value = dataclasses.asdict(value)
    fields = fields_of(section_cls)
    if isinstance(value, str):
        value = {next(iter(fields)): value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{{next(iter(fields))}: ...}}, got {value!r}")
    obj = section_cls()
    for key, v in value.items():
        if key not in fields:
            raise _unknown(key, list(fields), where)
        setattr(obj, key, _coerce(v, fields[key][1], f"{where}.{key}"))
    return obj


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
    return ConfigError(f"{where}: unknown setting '{key}'{hint}")


def apply_values(cfg: Config, values: dict, source: str) -> Config:
    """Set nested values {section: {field: value}} on cfg, coercing types; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), "
                          f"got {type(values).__name__}")
    for section, entries in values.items():
        if section not in SECTIONS:
            raise _unknown(section, list(SECTIONS), source)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {entries!r}")
        target = getattr(cfg, section)
        fields = fields_of(SECTIONS[section])
        for key, value in entries.items():
            if key not in fields:
                raise _unknown(key, list(fields), f"{source}: {section}")
            f, tp = fields[key]
            setattr(target, key, _coerce(value, tp, f"{section}.{key}"))
    return cfg


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping with sections {', '.join(SECTIONS)}")
    return data


def read_saved(directory: str | Path) -> dict:
    """The run configuration saved in a model directory (chattune.yaml), as plain values; {} when there is none."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
