"""`--config FILE.toml` for a subcommand: the file's keys are the subcommand's flags (`max-batch-size` or
`max_batch_size`), flags on the command line win; `--print-config` prints the effective values in the
same format, so its output is a valid config file."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Any

NOT_CONFIGURABLE = {"help", "config", "print_config"}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config and --print-config to a subcommand's parser (see `apply_config_file`)."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE.toml",
        help="read flags from this TOML file (keys are flag names, e.g. max-batch-size = 4); flags given "
        "on the command line win",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (defaults, --config file, flags) as TOML and exit",
    )
    parser.set_defaults(_config_parser=parser)


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv` with `parser` (the top-level one), the subcommand's --config file (if any) read first
    as that subcommand's defaults. A bad file is a usage error (exit 2)."""
    first, _ = parser.parse_known_args(argv)
    path = getattr(first, "config", None)
    sub = getattr(first, "_config_parser", None)
    if path is None or sub is None:
        return parser.parse_args(argv)
    sub.set_defaults(**read_config_file(sub, path, argv))
    return parser.parse_args(argv)


def read_config_file(parser: argparse.ArgumentParser, path: Path, argv: list[str]) -> dict[str, Any]:
    """The file's values by `dest`, checked and converted as the flags would be. Values for options of a
    mutually exclusive group whose other option is on the command line are dropped (the flag wins)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        parser.error(f"--config {path}: {e}")
    actions = {a.dest: a for a in _configurable(parser)}
    given = {a.dest for a in actions.values() if any(_on_command_line(o, argv) for o in a.option_strings)}
    values = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            known = ", ".join(sorted(a.option_strings[0].removeprefix("--") for a in actions.values()))
            parser.error(f"--config {path}: unknown key {key!r}; known keys: {known}")
        try:
            values[dest] = _convert(actions[dest], value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            parser.error(f"--config {path}: {key}: {e}")
    for group in parser._mutually_exclusive_groups:  # argparse keeps no public accessor
        dests = {a.dest for a in group._group_actions}
        if dests & given:
            for dest in dests - given:
                values.pop(dest, None)
        elif len(dests & set(values)) > 1:
            names = " and ".join(sorted(d.replace("_", "-") for d in dests & set(values)))
            parser.error(f"--config {path}: {names} exclude each other")
    return values


def print_config(parser: argparse.ArgumentParser, args: argparse.Namespace, file=None) -> None:
    """Print the effective value of every configurable flag as TOML (unset ones as comments)."""
    file = file or sys.stdout
    for action in _configurable(parser):
        key = action.option_strings[0].removeprefix("--")
        value = getattr(args, action.dest, None)
        if isinstance(action, argparse._StoreFalseAction) and value is not None:
            value = not value  # the key names the flag, which sets dest to False
        if value is None:
            print(f"# {key} = (unset)", file=file)
        else:
            print(f"{key} = {_toml(value)}", file=file)


def _configurable(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.option_strings and a.dest not in NOT_CONFIGURABLE and a.option_strings[0].startswith("--")
    ]


def _on_command_line(option: str, argv: list[str]) -> bool:
    return any(arg == option or arg.startswith(option + "=") for arg in argv)


def _convert(action: argparse.Action, value: Any) -> Any:
    """A TOML value as the flag would have parsed it."""
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value if not isinstance(action, argparse._StoreFalseAction) else not value
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {value!r}")
        return [_scalar(action, item) for item in value]
    return _scalar(action, value)


def _scalar(action: argparse.Action, value: Any) -> Any:
    kind = action.type
    if isinstance(value, bool) or isinstance(value, list | dict):
        raise TypeError(f"expected a single value, got {value!r}")
    if kind in (int, float):
        if isinstance(value, str) or (kind is int and not isinstance(value, int)):
            raise TypeError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
        value = kind(value)
    elif kind is not None and kind is not str:
        value = kind(str(value))  # e.g. "0:2" for --blocks, a path
    elif not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
        )
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return json.dumps(f"{value[0]}:{value[1]}")  # a span of blocks, as --blocks takes it
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # JSON's string escapes are valid TOML basic strings
