"""Settings documented where they are defined: the ``--help`` listing of a dataclass's fields (type, default, help).

The run's settings (:class:`sorlora.simulation.config.ExperimentConfig`) and a collaboration's terms
(:class:`sorlora.protocol.terms.CollabTerms`) both keep each field's meaning in ``field(metadata={"help": ...})``;
this module turns that into the text ``sorlora run --help`` and ``sorlora collab create --help`` print.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

__all__ = ["fields_help", "fields_table", "type_name"]


def type_name(hint: Any) -> str:
    """A short human name of a field type (``int``, ``int or none``, ``list of str``, ``one of a, b``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + " or none"
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"JSON object of {type_name(args[1])}"
    return getattr(hint, "__name__", str(hint))


def _fields(cls: type):
    """(name, type name, shown default, help) of every field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = dataclasses.MISSING
        if default is dataclasses.MISSING:
            shown = "required"
        else:
            shown = "none" if default is None else json.dumps(list(default) if isinstance(default, tuple) else default)
            shown = "default " + (shown if len(shown) <= 60 else shown[:57] + "...")
        yield f.name, type_name(hints[f.name]), shown, f.metadata.get("help", "(undocumented)")


def fields_help(cls: type) -> str:
    """Every field of the dataclass ``cls`` with its type, default and help, two lines each (required fields say so)."""
    return "\n".join(f"  {name} ({kind}; {shown})\n      {text}" for name, kind, shown, text in _fields(cls))


def fields_table(cls: type) -> str:
    """Every field of the dataclass ``cls`` as a markdown table (name, type, default, meaning): the README's table of
    the collaboration terms is this, checked by a test."""
    rows = ["| term | type | default | meaning |", "|---|---|---|---|"]
    for name, kind, shown, text in _fields(cls):
        default = shown.removeprefix("default ")
        rows.append(f"| `{name}` | {kind} | {'`' + default + '`' if default != 'required' else 'required'} | "
                    f"{text.replace('|', '/')} |")  # fmt: skip
    return "\n".join(rows)
