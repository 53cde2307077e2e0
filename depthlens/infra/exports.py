"""How a room's ``__init__`` hands on its modules' public names: on first use, not at import.

``from depthlens.models import load_model`` works, but importing ``depthlens.models`` alone does
not import every module of the room: a package that imported all of its modules eagerly would
run each of them twice under ``python -m depthlens.models.recipes`` (once as the package's
module, once as ``__main__``) and make every light import heavy.

    >>> import types
    >>> pkg = types.ModuleType("pkg")
    >>> pkg.__getattr__, pkg.__dir__ = lazy_exports("depthlens.infra", {"UsageError": "errors"})
    >>> pkg.__getattr__("UsageError").__name__
    'UsageError'
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to its module in the package.

    The first access to a name imports its module and keeps the value on the package.
    """

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        if package in sys.modules:
            setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        here = vars(sys.modules[package]) if package in sys.modules else {}
        return sorted({*here, *exports})

    return __getattr__, __dir__
