"""Command lines generated from frozen config dataclasses.

Every analysis and recipe has one ``@dataclass(frozen=True)`` config whose docstring has an
``Args:`` section; ``parse_config`` turns its fields into flags (``--max-new-tokens 64``,
``--quick``, ``--no-generate`` for booleans that default to true, comma lists for tuples), with
``--help`` showing every default and the field's description.

    >>> @dataclass(frozen=True)
    ... class Config:
    ...     \"\"\"Args:\n        model: model spec.\n        seed: random seed.\"\"\"
    ...     model: str = "tiny-llama"; seed: int = 0
    >>> parse_config(Config, ["--seed", "3"]).seed
    3
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _field_docs(cls) -> dict[str, str]:
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    current = None
    for line in section.splitlines():
        m = re.match(r"\s+([A-Za-z_][A-Za-z0-9_]*):\s*(.*)", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= 8):
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_sequence) for int/float/str/bool, X | None and tuple[X, ...]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (tuple, list, Sequence):
        args = typing.get_args(tp)
        return (args[0] if args else str), True
    return tp, False


def _converter(elem):
    def convert(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        return elem(text)

    return convert


def build_parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").split("Args:")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        elem, is_seq = _base_type(hints[f.name])
        helptext = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help strings
        if elem is bool and not is_seq:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif is_seq:
            conv = _converter(elem)
            parser.add_argument(
                flag, dest=f.name, default=default, metavar=f"{elem.__name__.upper()},...",
                type=lambda s, c=conv: tuple(c(x) for x in s.split(",") if x.strip()), help=helptext,
            )
        else:
            parser.add_argument(flag, dest=f.name, default=default, type=_converter(elem), help=helptext)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Parse ``argv`` into an instance of the config dataclass ``cls``."""
    ns = build_parser(cls, description).parse_args(argv)
    return cls(**vars(ns))
