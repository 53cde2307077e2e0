"""Write a figure as HTML (always), PNG/PDF/SVG (when a Chromium is present) and its data as JSON.

Static export goes through kaleido 1.x, which drives a headless Chromium. Starting the
browser costs ~3–4 s and each format ~0.3 s once it runs, so all formats of a figure (and,
with ``save_figures``, all figures of a batch) are rendered with one browser start. Where
kaleido or a Chromium is missing, or the export fails, one warning per process says how to
enable it, and HTML + JSON are still written; ``export_session()`` keeps one browser open
across many ``save_figure`` calls (~1 s per figure set instead of ~4 s). Every file is written atomically (temp file in
the same folder, then ``os.replace``), so an interrupted run leaves no half-written file.

    >>> from figures.plots import lines  # writes into figures/out of the working directory  # doctest: +SKIP
    >>> saved = save_figure(lines([1, 2], {"a": [0.1, 0.2]}, "k", "ASR"), "figures/out/asr")  # doctest: +SKIP
    >>> saved.files                          # [.../asr.html, .../asr.json, .../asr.png, ...]  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import plotly.graph_objects as go

from depthlens.infra.results import jsonable

from .theme import DEFAULT_HEIGHT_IN, DOUBLE_COLUMN_IN, PNG_SCALE, PRINT_DPI, inches

log = logging.getLogger(__name__)

STATIC_FORMATS = ("png", "pdf", "svg")
ENABLE_HINT = "install a Chromium for static export, e.g. `apt-get install -y chromium` (Debian/Ubuntu)"
RENDER_TIMEOUT_S = 60.0

HtmlJs = Literal["embed", "directory"]


@dataclass
class SavedFigure:
    """What ``save_figure`` wrote.

    Attributes:
        stem: the path stem given (no suffix).
        files: every file written: HTML (and a shared plotly.min.js), JSON, then static ones.
        skipped_formats: requested static formats that were not written.
        warning: why they were not (None when every requested format was written).
    """

    stem: Path
    files: list[Path] = field(default_factory=list)
    skipped_formats: list[str] = field(default_factory=list)
    warning: str | None = None

    @property
    def formats(self) -> list[str]:
        return [p.suffix.lstrip(".") for p in self.files if p.name != "plotly.min.js"]


# --- Atomic writes. ---------------------------------------------------------------------
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, payload: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- Data JSON. -------------------------------------------------------------------------
_TRACE_KEYS = ("x", "y", "z", "text")


def figure_data(fig: go.Figure) -> dict:
    """The plotted numbers of ``fig``: per trace its name, type, x/y/z and error arrays."""
    traces = []
    for tr in fig.data:
        row: dict[str, Any] = {"name": tr.name, "type": tr.type}
        for key in _TRACE_KEYS:
            val = getattr(tr, key, None)
            if val is not None and not isinstance(val, str):
                row[key] = jsonable(np.asarray(val, dtype=object).tolist())
        for key in ("error_x", "error_y"):
            err = getattr(tr, key, None)
            if err is not None and err.array is not None:
                row[key] = {"plus": jsonable(list(err.array)),
                            "minus": jsonable(list(err.arrayminus if err.arrayminus is not None else err.array))}
        traces.append(row)
    return {"title": fig.layout.title.text, "traces": traces}


# --- Static export. ---------------------------------------------------------------------
_warned = False
_browser_missing: str | None = None  # set once a start failed for want of a browser


def find_browser() -> str | None:
    """Path of a Chromium-based browser kaleido can drive, or None."""
    try:
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
        if found:
            return found
    except Exception:  # noqa: BLE001 - detection only; fall back to PATH
        pass
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def static_export_unavailable() -> str | None:
    """Why static export cannot run here (None when kaleido and a Chromium are present)."""
    if _browser_missing:
        return _browser_missing
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return f"kaleido is not installed (`pip install 'kaleido>=1'`), and {ENABLE_HINT}"
    if find_browser() is None:
        return f"no Chromium found; {ENABLE_HINT}"
    return None


def _opts(fig: go.Figure, fmt: str) -> dict:
    w = fig.layout.width or inches(DOUBLE_COLUMN_IN)
    h = fig.layout.height or inches(DEFAULT_HEIGHT_IN["double"])
    return {"format": fmt, "width": w, "height": h, "scale": PNG_SCALE if fmt == "png" else 1}


def _render_static(jobs: Sequence[tuple[go.Figure, str]]) -> list[bytes]:
    """Render every ``(figure, format)`` with one kaleido browser start; bytes in job order.

    Runs in its own thread with its own event loop, so it works inside Jupyter too.
    """
    import kaleido

    if kaleido._global_server.is_running():  # inside export_session(): reuse its browser
        return [kaleido.calc_fig_sync(fig, opts=_opts(fig, fmt)) for fig, fmt in jobs]

    async def run() -> list[bytes]:
        out = []
        async with kaleido.Kaleido(mathjax=False, timeout=RENDER_TIMEOUT_S) as k:
            for fig, fmt in jobs:
                out.append(await k.calc_fig(fig, opts=_opts(fig, fmt)))
        return out

    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(run())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, name="depthlens-kaleido", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


@contextlib.contextmanager
def export_session() -> Iterator[None]:
    """Keep one browser open for every static export inside the block (saves ~3 s a call).

        >>> with export_session():  # doctest: +SKIP
        ...     for name, fig in figs.items(): save_figure(fig, f"out/{name}")
    """
    if static_export_unavailable() is not None:
        yield
        return
    import kaleido

    if kaleido._global_server.is_running():
        yield
        return
    kaleido.start_sync_server(mathjax=False, timeout=RENDER_TIMEOUT_S, silence_warnings=True)
    try:
        yield
    finally:
        kaleido.stop_sync_server(silence_warnings=True)


def _with_dpi(png: bytes, dpi: float = PRINT_DPI) -> bytes:
    """Add a pHYs chunk so LaTeX/Office place the PNG at print size (Chromium writes none)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR" or b"pHYs" in png[:64]:
        return png
    ppm = round(dpi / 0.0254)
    body = b"pHYs" + struct.pack(">IIB", ppm, ppm, 1)
    chunk = struct.pack(">I", 9) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return png[:33] + chunk + png[33:]


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        log.warning("Static figure export (PNG/PDF/SVG) skipped: %s. HTML and JSON are still written.", message)
        _warned = True
    else:
        log.debug("Static figure export skipped: %s", message)


def _is_browser_error(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in {"ChromeNotFoundError", "BrowserFailedError", "BrowserClosedError"} or isinstance(
        exc, (FileNotFoundError, PermissionError)
    )


# --- Public API. ------------------------------------------------------------------------
def _check_formats(formats: Iterable[str]) -> list[str]:
    fmts = [f.lower().lstrip(".") for f in formats]
    bad = [f for f in fmts if f not in STATIC_FORMATS]
    if bad:
        raise ValueError(f"Unknown figure format(s) {bad}; static formats are {list(STATIC_FORMATS)} "
                         "(HTML and JSON are always written).")
    return list(dict.fromkeys(fmts))


def _write_html(fig: go.Figure, path: Path, html_js: HtmlJs) -> list[Path]:
    if html_js == "embed":
        return [_atomic_write(path, fig.to_html(include_plotlyjs=True, full_html=True))]
    if html_js == "directory":
        written = [_atomic_write(path, fig.to_html(include_plotlyjs="directory", full_html=True))]
        js = path.parent / "plotly.min.js"
        if not js.exists():
            from plotly.offline import get_plotlyjs

            written.append(_atomic_write(js, get_plotlyjs()))
        return written
    raise ValueError(f"html_js={html_js!r} is not one of 'embed', 'directory'.")


def save_figures(
    items: Sequence[tuple[go.Figure, str | Path, Any]],
    formats: Iterable[str] = STATIC_FORMATS,
    html_js: HtmlJs = "embed",
) -> list[SavedFigure]:
    """``save_figure`` for many ``(fig, stem, data)`` at once, with a single browser start."""
    global _browser_missing
    fmts = _check_formats(formats)
    saved: list[SavedFigure] = []
    for fig, stem, data in items:
        stem = Path(stem)
        if stem.suffix.lower() in {".html", ".json", ".png", ".pdf", ".svg"}:
            stem = stem.with_suffix("")
        rec = SavedFigure(stem=stem)
        rec.files += _write_html(fig, stem.with_name(stem.name + ".html"), html_js)
        payload = jsonable(data) if data is not None else figure_data(fig)
        rec.files.append(_atomic_write(stem.with_name(stem.name + ".json"),
                                       json.dumps(payload, allow_nan=False)))
        saved.append(rec)
    if not fmts or not saved:
        return saved

    reason = static_export_unavailable()
    if reason is None:
        jobs = [(fig, fmt) for fig, _, _ in items for fmt in fmts]
        try:
            blobs = _render_static(jobs)
        except Exception as e:  # noqa: BLE001 - kaleido raises many kinds; HTML+JSON stand
            reason = f"kaleido failed ({type(e).__name__}: {e}); {ENABLE_HINT}"
            if _is_browser_error(e):
                _browser_missing = reason
        else:
            it = iter(blobs)
            for rec in saved:
                for fmt in fmts:
                    blob = next(it)
                    if fmt == "png":
                        blob = _with_dpi(blob)
                    rec.files.append(_atomic_write(rec.stem.with_name(f"{rec.stem.name}.{fmt}"), blob))
            return saved
    _warn_once(reason)
    for rec in saved:
        rec.skipped_formats = list(fmts)
        rec.warning = reason
    return saved


def save_figure(
    fig: go.Figure,
    path: str | Path,
    data: Any = None,
    formats: Iterable[str] = STATIC_FORMATS,
    html_js: HtmlJs = "embed",
) -> SavedFigure:
    """Write ``<path>.html``, ``<path>.json`` and ``<path>.<fmt>`` for each static format.

    Args:
        fig: the figure (themed by the builder).
        path: the stem, e.g. ``figures/out/token_depth_kl`` (a known suffix is dropped).
        data: what to store in ``<path>.json``; default: the traces' x/y/z as lists.
        formats: static formats among png/pdf/svg; empty for HTML + JSON only.
        html_js: "embed" puts plotly.js in the HTML (self-contained, works offline);
            "directory" writes one ``plotly.min.js`` beside it and references it.
    """
    return save_figures([(fig, path, data)], formats=formats, html_js=html_js)[0]
