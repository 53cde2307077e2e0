"""Argument checks shared by the public API, each failing with one ``UsageError`` sentence.

Python would accept ``max_new_tokens=2.5`` or ``reduce="average"`` and fail later, deep in
torch or silently; the public functions call these first so the error names the argument,
the value and what is allowed.

    >>> positive_int("max_new_tokens", 8)
    8
    >>> positive_int("max_new_tokens", 2.5)
    Traceback (most recent call last):
    depthlens.infra.errors.UsageError: max_new_tokens must be an integer >= 1, got 2.5.
    >>> one_of("reduce", "mean", ("none", "mean"))
    'mean'
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from depthlens.infra.errors import UsageError


def integer(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int (Python or NumPy integer, not bool), at least ``minimum`` if given."""
    try:
        out = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        out = None
    if out is None or (minimum is not None and out < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise UsageError(f"{name} must be an integer{bound}, got {value!r}.")
    return out


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1 (counts: tokens, batch sizes, resamples)."""
    return integer(name, value, minimum=1)


def one_of(name: str, value, allowed: Sequence):
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise UsageError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}.")
    return value


def prompt_list(name: str, prompts, types: type | tuple[type, ...] = str) -> list:
    """``prompts`` as a non-empty list, refusing a single prompt passed where a list is expected."""
    if isinstance(prompts, (str, bytes, types)) or not hasattr(prompts, "__iter__"):
        raise UsageError(f"{name} must be a list of prompts, got {type(prompts).__name__}; wrap a single prompt in a list.")
    out = list(prompts)
    if not out:
        raise UsageError(f"{name} is empty; pass at least one prompt.")
    return out
