"""Which figures each analysis gets: builders registered per ``analysis`` name of a results.json.

A builder is ``fn(record: dict) -> dict[str, go.Figure]`` (figure name → figure), declared
with ``@register("token_depth")`` in a module under ``figures/builders/``; every module there
is imported lazily by ``load_builders()``, so adding a module is all it takes. A builder
declared with ``combine=True`` instead receives the list of records of that analysis (one per
model) and draws cross-model figures. Records are read with plain ``json`` here, and a file
of another schema version is refused with one sentence.

    >>> @register("token_depth")  # registers a builder and reads a results file of a run  # doctest: +SKIP
    ... def _kl(record): return {"kl": lines(...)}
    >>> build_figures(load_record("results/token_depth/m/r/results.json"), "figures/out")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from .save import STATIC_FORMATS, HtmlJs, SavedFigure, save_figures

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUILDER_PACKAGE = "figures.builders"
"""Every module in this package is imported by ``load_builders()`` (each registers itself)."""
EXTRA_BUILDER_MODULES: tuple[str, ...] = ()
"""Builder modules living elsewhere, imported as well."""

Builder = Callable[[dict], dict[str, go.Figure]]
CombinedBuilder = Callable[[list[dict]], dict[str, go.Figure]]


@dataclass
class _Entry:
    fn: Callable
    combine: bool


_REGISTRY: dict[str, dict[str, _Entry]] = {}
"""analysis → {builder qualname → entry}; keyed by qualname so a re-import does not duplicate."""


def register(analysis: str, *, combine: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` draws the figures of ``analysis`` records (all of them if ``combine``)."""

    def deco(fn: Callable) -> Callable:
        module = fn.__module__
        if module == "__main__":  # a builder module run as ``python -m figures.builders.x`` is imported again
            spec = getattr(sys.modules["__main__"], "__spec__", None)  # under its own name: one builder, not two
            module = spec.name if spec is not None else module
        key = f"{module}.{fn.__qualname__}"
        _REGISTRY.setdefault(analysis, {})[key] = _Entry(fn=fn, combine=combine)
        return fn

    return deco


def has_builders(analysis: str, *, combine: bool | None = None) -> bool:
    return any(combine is None or e.combine == combine for e in _REGISTRY.get(analysis, {}).values())


@dataclass
class LoadReport:
    """Which builder modules were imported and which failed (module → error)."""

    loaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def load_builders(extra: Iterable[str] = ()) -> LoadReport:
    """Import every ``figures.builders`` module (and ``extra``); one failure does not stop the rest."""
    report = LoadReport()
    names: list[str] = []
    try:
        pkg = importlib.import_module(BUILDER_PACKAGE)
        names += [f"{BUILDER_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    except ImportError as e:
        report.failed[BUILDER_PACKAGE] = f"{type(e).__name__}: {e}"
    names += [*EXTRA_BUILDER_MODULES, *extra]
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
            report.loaded.append(name)
        except Exception as e:  # noqa: BLE001 - report and go on with the other modules
            log.error("Figure builder module %s failed to import: %s: %s", name, type(e).__name__, e)
            report.failed[name] = f"{type(e).__name__}: {e}"
    return report


# --- Records. ---------------------------------------------------------------------------
def load_record(path: str | Path) -> dict:
    """Read one results.json; ValueError (one sentence) when malformed or of another schema."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); "
                         "expected a depthlens results.json.") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a {type(record).__name__}, not the object a results.json must be.")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {version!r}, but figures reads only schema_version "
                         f"{SCHEMA_VERSION}; re-run that analysis with this depthlens to rebuild it.")
    missing = [k for k in ("analysis", "run_id", "model") if not record.get(k)]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}, which every results.json must have.")
    return record


def model_tag(record: dict) -> str:
    """The model tag used in results paths (``depthlens.infra.paths.results_tag``), one safe path segment."""
    from depthlens.infra.paths import results_tag, safe_segment

    return safe_segment(results_tag(str(record["model"])))


# --- Building. --------------------------------------------------------------------------
def _call(entry: _Entry, arg: Any, analysis: str) -> dict[str, go.Figure]:
    figs = entry.fn(arg)
    if not isinstance(figs, dict) or not all(isinstance(f, go.Figure) for f in figs.values()):
        raise TypeError(f"Figure builder {entry.fn.__qualname__} for {analysis!r} must return "
                        "dict[str, go.Figure]; got something else.")
    return figs


def _collect(analysis: str, arg: Any, combine: bool) -> dict[str, go.Figure]:
    figures: dict[str, go.Figure] = {}
    for entry in _REGISTRY.get(analysis, {}).values():
        if entry.combine != combine:
            continue
        for name, fig in _call(entry, arg, analysis).items():
            if name in figures:
                raise ValueError(f"Two builders for {analysis!r} both make a figure named {name!r}; "
                                 "figure names must be unique per analysis.")
            figures[name] = fig
    return figures


def _save(analysis: str, figures: dict[str, go.Figure], out_dir: str | Path,
          formats: Iterable[str], html_js: HtmlJs) -> list[SavedFigure]:
    out = Path(out_dir)
    return save_figures([(fig, out / f"{analysis}_{name}", None) for name, fig in figures.items()],
                        formats=formats, html_js=html_js)


def build_figures(
    record: dict,
    out_dir: str | Path,
    formats: Iterable[str] = STATIC_FORMATS,
    html_js: HtmlJs = "embed",
) -> list[SavedFigure]:
    """Build and save every per-record figure of ``record["analysis"]`` as ``<out_dir>/<analysis>_<name>.*``.

    An analysis nobody registered a builder for is logged and skipped (empty list).
    """
    analysis = record.get("analysis", "")
    load_builders()  # idempotent: modules are imported once
    if not has_builders(analysis, combine=False):
        log.info("No figure builder registered for analysis %r; skipped.", analysis)
        return []
    return _save(analysis, _collect(analysis, record, combine=False), out_dir, formats, html_js)


def build_combined_figures(
    analysis: str,
    records: Sequence[dict],
    out_dir: str | Path,
    formats: Iterable[str] = STATIC_FORMATS,
    html_js: HtmlJs = "embed",
) -> list[SavedFigure]:
    """Build and save the ``combine=True`` figures of ``analysis`` from all its ``records``."""
    load_builders()
    if not records or not has_builders(analysis, combine=True):
        return []
    return _save(analysis, _collect(analysis, list(records), combine=True), out_dir, formats, html_js)
