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

__all__ = ["type_name", "fields_help"]


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


def fields_help(cls: type) -> str:
    """Every field of the dataclass ``cls`` with its type, default and help, two lines each (required fields say so)."""
    hints = typing.get_type_hints(cls)
    lines = []
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
        lines.append(f"  {f.name} ({type_name(hints[f.name])}; {shown})")
        lines.append(f"      {f.metadata.get('help', '(undocumented)')}")
    return "\n".join(lines)
