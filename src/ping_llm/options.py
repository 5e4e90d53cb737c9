"""Command-line flags declared once, as the fields of the config dataclasses they set.

`option(default, help)` makes a dataclass field that is also a flag: `--a-b` for field `a_b`,
typed by the field's annotation (a bool is a `--x/--no-x` pair), its help the field's doc ending
with the default, read from the dataclass so that no default is typed twice. `add_arguments` adds
a dataclass's flags to a parser; `given` reads back the ones given, as keyword arguments for it.
Every flag defaults to None, "not given": the dataclass's own default applies, and a resumed run
can tell an option given now from one it recorded (`config.config_for_run`). litgpt's idea (flags
and help from the config) with plain argparse; free of torch, so `ping-llm --help` stays quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

# The units a flag may count in other than its field's: a field keeps seconds or bytes, while
# people type minutes or megabytes.
UNITS = {"minutes": 60, "MB": 1 << 20}


def option(default, help: str, *, flag: str | None = None, unit: str | None = None,
           **argparse_kwargs) -> typing.Any:
    """A dataclass field that is also a flag. `flag` renames it (`--batch-size` for
    device_batch_size); `unit` (a key of UNITS) makes the flag count in that unit; the rest
    (metavar, choices, action) go to `add_argument` as they are."""
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "unit": unit, "argparse": argparse_kwargs})


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per `option` field of `cls`, in field order, with the field's name as its dest."""
    hints = typing.get_type_hints(cls)
    for f in _options(cls):
        unit, default = f.metadata["unit"], f.default
        kind = float if unit else _bare(hints[f.name])
        if kind is bool:  # --x / --no-x: a resumed run's True can be turned off again
            kw = {"action": argparse.BooleanOptionalAction}
        else:  # an int reads N, a unit its name, anything else argparse's (the flag's name)
            kw = {"type": kind, "metavar": unit.upper() if unit else "N" if kind is int else None}
        if unit and default is not None:
            default /= UNITS[unit]
        if f.metadata["argparse"].get("action") in ("store_true", "store_false"):
            default = None  # the flag is the non-default: nothing to show
        # argparse %-formats help; a literal % in a field's doc must survive it
        help = f.metadata["help"].replace("%", "%%") + show_default(default)
        parser.add_argument(f.metadata["flag"] or "--" + f.name.replace("_", "-"), dest=f.name,
                            default=None, help=help, **kw | f.metadata["argparse"])


def given(args: argparse.Namespace, cls) -> dict:
    """The `option` fields of `cls` whose flags were given, in the field's own unit and type."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in _options(cls):
        value, unit = getattr(args, f.name), f.metadata["unit"]
        if value is not None:
            out[f.name] = _bare(hints[f.name])(value * UNITS[unit]) if unit else value
    return out


def _options(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _bare(hint) -> type:
    """int for `int` and for `int | None`."""
    return next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))


def show_default(default) -> str:
    """The help's ending: the default as people type it. None shows nothing: where it means
    something, the help says what."""
    if default is None:
        return ""
    if isinstance(default, bool):
        text = "on" if default else "off"
    elif isinstance(default, float):
        text = repr(default).removesuffix(".0")  # the shortest exact form; 15 for 15.0
    elif isinstance(default, list | tuple):
        text = ",".join(map(str, default))  # as a comma-separated flag takes it
    else:
        text = str(default)
    return f" ({text})"
