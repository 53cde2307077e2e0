from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import pytest

from depthlens.cli import build_parser, parse_config


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """A config.

    Args:
        share: harmful share, e.g. 25 % of the examples (a literal percent sign).
        layers: layers to use.
    """

    share: float = 0.25
    layers: tuple[int, ...] = (1, 2)


def test_help_shows_a_percent_sign_in_a_field_doc():
    text = build_parser(_Cfg).format_help()
    assert "25 % of the examples" in text
    assert parse_config(_Cfg, ["--share", "0.5", "--layers", "3,4"]) == _Cfg(0.5, (3, 4))


def _config_classes():
    out = []
    for pkg in ("analyses", "finetune", "probes"):
        for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
            mod = importlib.import_module(f"{pkg}.{info.name}")
            for obj in vars(mod).values():
                if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == mod.__name__ \
                        and obj.__name__.endswith("Config"):
                    out.append(obj)
    return out


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_command_line_config_formats_its_help(cls):
    """``python -m <module> --help`` must print, not crash (a % in a docstring once broke three)."""
    assert build_parser(cls).format_help().startswith("usage:")
