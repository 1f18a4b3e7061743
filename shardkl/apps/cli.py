"""Command lines of the launchers: dataclass defaults < a TOML file (``--config``) < command-line options.

Parsing is jsonargparse's: it reads the TOML file and checks every value, from the file or the command line, against
the type of its dataclass field (``Literal`` choices included), rejects unknown keys, and ``--help`` lists every key
with its type, default and meaning (the field's docstring). This module adds what the launchers promise on top:

- the file is applied first wherever ``--config`` stands, so the command line always wins over it;
- options are the TOML keys (``--vocab_size``); ``--vocab-size`` is accepted too;
- a boolean option may stand alone (``--verify``) or take a value (``--verify false``);
- every problem is one :class:`ConfigError` line that names the file when the file is at fault, including the
  checks of the dataclasses' ``__post_init__``.

A launcher prints ``PROG: error: LINE`` and exits with status 2 before any process group exists, so under torchrun
every rank fails the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, get_type_hints

from jsonargparse import ArgumentError, ArgumentParser, set_parsing_settings

# descriptions in --help come from the docstring under each dataclass field
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming it."""


def _one_line(message: str, known: Sequence[str] = ()) -> str:
    """jsonargparse's message on one line; its three common forms in the words the launchers have always used
    (any other message is kept, on one line)."""
    message = " ".join(message.split())
    wrong = re.fullmatch(r'Parser key "(\w+)": Expected a (.+?)\. Got value: (.*)', message)
    if wrong:
        key, kind, value = wrong.groups()
        kind = re.sub(r"<class '([\w.]+)'>", r"\1", kind)
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", kind)
        if literal:
            kind = "one of " + literal.group(1).replace("'", "")
        return f"{key} must be {kind}, got {value!r}"
    stray = re.fullmatch(r"unrecognized arguments: ([^-]\S*).*", message)
    if stray:
        return f"unexpected argument {stray.group(1)!r}; options are --key value"
    if message.startswith("Problems parsing config:"):
        return "not valid TOML:" + message.partition(":")[2]
    unknown = (
        re.fullmatch(r"Option '(\w+)' is not accepted", message)
        or re.fullmatch(r"(?:Validation failed: )?Key '(\w+)' is not expected", message)
        or re.fullmatch(r"unrecognized arguments: (\S+).*", message)
    )
    if unknown:
        name = unknown.group(1)
        what = f"option {name}" if name.startswith("-") else f"key {name!r}"
        return f"unknown {what} (known: {', '.join(known)})" if known else f"unknown {what}"
    return message


def _bool_fields(sections: Sequence[type]) -> set[str]:
    return {
        f.name for cls in sections for f in dataclasses.fields(cls) if get_type_hints(cls)[f.name] is bool
    }


def _normalise(argv: Sequence[str], flags: set[str]) -> list[str]:
    """``--a-b`` -> ``--a_b``; a boolean option without a value -> ``--flag=true``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            arg = f"--{name}{eq}{value}"
            alone = i + 1 == len(argv) or argv[i + 1].startswith("-")
            if name in flags and not eq and alone:
                arg = f"--{name}=true"
        out.append(arg)
    return out


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """The value of ``--config`` (the last one if repeated) and the other arguments."""
    path: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("option --config needs a value")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    return path, rest


def build_parser(sections: Sequence[type], *, prog: str, description: str, epilog: str = "") -> ArgumentParser:
    """A parser whose options are the fields of ``sections`` (dataclasses, one help group each) plus ``--config``.

    Field names must be unique across the sections: they share one namespace, in the file and on the command line.
    """
    names = [f.name for cls in sections for f in dataclasses.fields(cls)]
    if len(names) != len(set(names)):
        raise ValueError(f"field names repeat across {[cls.__name__ for cls in sections]}")
    parser = ArgumentParser(
        prog=prog, description=description, epilog=epilog, parser_mode="toml", exit_on_error=False,
        print_config=None, default_env=False,
    )
    # a plain option for --help; parse_config applies the file itself, before the command line
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of keys below (command-line options win)")
    for cls in sections:
        parser.add_class_arguments(cls, nested_key=None, as_group=True)
    return parser


def parse_or_exit(
    sections: Sequence[type], argv: Sequence[str], *, prog: str, description: str, epilog: str = ""
) -> list[Any]:
    """:func:`parse_config`, or ``PROG: error: LINE`` on stderr and exit status 2 (before any process group)."""
    try:
        return parse_config(sections, argv, prog=prog, description=description, epilog=epilog)
    except ConfigError as exc:
        refuse(prog, str(exc))


def refuse(prog: str, message: str) -> NoReturn:
    """``PROG: error: MESSAGE`` on stderr and exit status 2: an option that cannot run here, refused as a bad
    configuration is (before any process group)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def require(prog: str, module: str, hint: str) -> None:
    """Exit with status 1 and one line when an optional dependency of a launcher is not installed."""
    if importlib.util.find_spec(module) is None:
        print(f"{prog}: error: {hint}", file=sys.stderr)
        raise SystemExit(1)


def parse_config(
    sections: Sequence[type], argv: Sequence[str], *, prog: str, description: str, epilog: str = ""
) -> list[Any]:
    """Parse ``argv`` into one instance of each dataclass in ``sections``: defaults < ``--config`` file < options.

    ``-h``/``--help`` prints the help and raises ``SystemExit(0)``.

    Args:
        sections: frozen dataclasses whose fields are the keys; each field's docstring is its help text.
        argv: the command line without the program name.
        prog, description, epilog: for ``--help``.

    Returns:
        ``[sections[0](...), sections[1](...), ...]``.

    Raises:
        ConfigError: unknown key, wrong type, bad value, missing or malformed file; one line.
    """
    parser = build_parser(sections, prog=prog, description=description, epilog=epilog)
    known = [f.name for cls in sections for f in dataclasses.fields(cls)]
    path, rest = _split_config(_normalise(argv, _bool_fields(sections)))
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        # the file alone first, so that an error in it is reported as the file's
        parser.set_defaults(config=None)
        try:
            from_file = parser.parse_path(file)
        except ArgumentError as exc:
            raise ConfigError(f"{path}: {_one_line(str(exc), known)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        values = {k: v for k, v in from_file.as_dict().items() if k != "config"}
        parser.set_defaults(**values)
    try:
        values = parser.parse_args(rest).as_dict()
    except ArgumentError as exc:
        raise ConfigError(f"{'command line: ' if path is not None else ''}{_one_line(str(exc), known)}") from None
    instances = []
    for cls in sections:
        kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls)}
        try:
            instances.append(cls(**kwargs))
        except (ValueError, TypeError) as exc:
            raise ConfigError(_one_line(str(exc))) from None
    return instances


__all__ = ["ConfigError", "build_parser", "parse_config", "parse_or_exit", "refuse", "require"]
