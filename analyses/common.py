"""Shared plumbing of the analyses: timing, the run record, figures, the console table.

Each analysis module is a config dataclass, a ``run(cfg) -> RunRecord`` that computes, and a
``main(argv=None)`` made from ``finish``: write ``results.json`` atomically, build its figures
through ``figures`` (which reads only the record), print a table and the paths.

    >>> with Timer() as t: ...
    >>> path = finish(record, cfg.out, table_rows, columns=["layer", "score"])
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from depthlens.results import RunRecord, write_run

log = logging.getLogger(__name__)


class Timer:
    """Collects named wall-clock timings: ``with timer("generate"): ...``; ``timer.seconds``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(timer.seconds.get(name, 0.0) + time.perf_counter() - self.t, 3)
                return False

        return _Span()

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self._t0, 3)}


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "transformer_lens", "transformers", "kaleido", "choreographer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3f") -> str:
    """A plain fixed-width table of ``rows`` (dicts) for the console."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def finish(record: RunRecord, out: str | Path, rows: Sequence[dict] = (), columns: Sequence[str] | None = None,
           title: str = "", figures: bool = True) -> Path:
    """Write the record, build its figures, print the table and where everything went."""
    path = write_run(record, out)
    fig_paths: list[str] = []
    if figures:
        try:
            from figures.registry import build_figures

            saved = build_figures(record.to_dict(), path.parent)
            fig_paths = [str(f) for s in saved for f in getattr(s, "files", [])]
        except Exception as err:  # a figure problem must not lose the computed results
            log.warning("Figures for %s could not be built (%s); results are saved.", record.analysis, err)
    if title:
        print(f"\n{title}")
    if rows:
        print(format_table(rows, columns))
    print(f"\nresults: {path}")
    for f in fig_paths:
        if f.endswith((".html", ".png")):
            print(f"figure:  {f}")
    return path
