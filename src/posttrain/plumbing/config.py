"""One flat dataclass per stage, filled from ``--config file.yaml`` and ``--key=value`` overrides.

Fields carry their help text in ``metadata["help"]`` (shown by ``--help``). Unknown keys, in YAML or on the command
line, are an error naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its help text (and, for enumerated strings, the allowed ``choices``)."""
    kwargs = {"choices": choices} if choices else {}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) of a field annotation like ``int | None``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Path": Path})  # from __future__ annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    if origin is not None:
        return origin, False
    return annotation, False


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type, with an error naming the key."""
    kind, optional = _base_type(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"'{key}' cannot be empty")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind in (list, dict):
            parsed = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(parsed, kind):
                raise ValueError(value)
            return parsed
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind is str and isinstance(value, (list, dict)):
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):  # YAML `batch_size: yes` is not 1
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"'{key}': cannot read {value!r} as {name}") from None


def build_config(cls: type, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """An instance of the dataclass ``cls`` from defaults, then the YAML file, then ``overrides``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    sources = []
    if yaml_path:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{yaml_path}: invalid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of key: value")
        sources.append((str(yaml_path), loaded))
    if overrides:
        sources.append(("command line", overrides))
    for where, mapping in sources:
        for key, value in mapping.items():
            key = str(key).replace("-", "_")
            if key not in fields:
                raise ConfigError(f"{where}: unknown key '{key}' for {cls.__name__}{_closest(key, list(fields))}")
            values[key] = coerce(value, fields[key].type, key)
            choices = fields[key].metadata.get("choices")
            if choices and values[key] not in choices:
                raise ConfigError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {values[key]!r}")
    return cls(**values)


def config_to_dict(config) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}


def save_config(config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def help_lines(cls: type) -> str:
    """``--key (type, default): help`` for every field, for ``--help``."""
    lines = []
    for f in dataclasses.fields(cls):
        kind, optional = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        name = getattr(kind, "__name__", str(kind)) + (" | None" if optional else "")
        if choices := f.metadata.get("choices"):
            name = " | ".join(choices)
        lines.append(f"  --{f.name}=VALUE  ({name}, default {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_overrides(args: list[str], cls: type) -> dict[str, str]:
    """``['--lr=1e-4', '--steps', '10', '--packing']`` -> {'lr': '1e-4', 'steps': '10', 'packing': 'true'}."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (options look like --key=value)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            raise ConfigError(f"unknown option '--{key}'{_closest(key, list(fields)).replace(chr(39), chr(39) + '--', 1)}")
        if not eq:
            is_flag = _base_type(fields[key].type)[0] is bool
            if is_flag and (i + 1 == len(args) or args[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"option '--{key}' needs a value")
        overrides[key] = value
        i += 1
    return overrides
