"""Rebuild every paper figure from results files alone: ``python -m figures``.

Walks ``--results`` (default ``results/``) for ``<analysis>/<model-tag>/<run-id>/results.json``,
keeps the newest run per (analysis, model tag) unless ``--all``, and writes each record's
figures to ``<out>/<model-tag>/<analysis>_<figure>.*`` (``<out>/<model-tag>/<run-id>/`` with
``--all``) and cross-model figures to ``<out>/<analysis>_<figure>.*``; then prints a table of
what it wrote and what it skipped. Exit status 1 when a file or builder failed; a bad flag or
a missing ``--results`` folder is one ``error:`` line and exit status 2 (``--debug``: traceback).

    $ python -m figures                                  # results/ -> figures/out/
    $ python -m figures --results results --formats png   # PNG only (HTML + JSON always)
    $ python -m figures --formats none                    # HTML + JSON only, no Chromium
    $ python -m figures --gallery                         # docs/gallery/results -> docs/gallery/, PNG only

``--gallery`` rebuilds the README gallery: the records under ``docs/gallery/results/`` (the
results.json files the gallery is made from, kept in the repository) become PNGs in
``docs/gallery/<model-tag>/`` and nothing else (the HTML and JSON are built in a temporary
folder and dropped). Gallery PNGs that no record rebuilt are listed, so a stale picture is
never mistaken for a reproduced one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from depthlens.cli import ArgumentParser, add_debug_flag, cli_errors, prepare_out
from depthlens.infra.errors import UsageError
from depthlens.infra.paths import results_tag, safe_segment

from .registry import (
    build_combined_figures,
    build_figures,
    has_builders,
    load_builders,
    load_record,
)
from .save import STATIC_FORMATS, SavedFigure, export_session

log = logging.getLogger("figures")

GALLERY = Path("docs/gallery")
GALLERY_RESULTS = GALLERY / "results"


@dataclass
class _Run:
    path: Path
    record: dict
    analysis: str
    tag: str
    run_id: str


def _parse_formats(text: str) -> list[str]:
    if text.strip().lower() in {"", "none", "html"}:
        return []
    fmts = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in STATIC_FORMATS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown format(s) {bad}; choose from {','.join(STATIC_FORMATS)} or 'none'")
    return fmts


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m figures", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # --results/--out/--formats default differently under --gallery, so their defaults are filled in by main()
    p.add_argument("--results", type=Path, default=argparse.SUPPRESS,
                   help=f"folder searched for results.json files (default: results; {GALLERY_RESULTS} with --gallery)")
    p.add_argument("--out", type=Path, default=argparse.SUPPRESS,
                   help=f"folder the figures are written to (default: figures/out; {GALLERY} with --gallery)")
    p.add_argument("--formats", type=_parse_formats, default=argparse.SUPPRESS,
                   help=f"static formats (png,pdf,svg or 'none'); HTML and JSON are always written "
                        f"(default: {','.join(STATIC_FORMATS)}; png only with --gallery)")
    p.add_argument("--all", action="store_true", help="every run, not only the newest per (analysis, model)")
    p.add_argument("--gallery", action="store_true",
                   help=f"rebuild the README gallery: PNGs only, from {GALLERY_RESULTS} into {GALLERY}")
    p.add_argument("--html-js", choices=["embed", "directory"], default="embed",
                   help="embed plotly.js in each HTML, or write one plotly.min.js beside them")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_debug_flag(p)
    return p


def _tag_from_path(path: Path, record: dict) -> str:
    """The model folder of a record: its results folder's name, else the spec's ``results_tag``; one safe segment."""
    parts = path.parts
    if len(parts) >= 4 and parts[-4] == record["analysis"]:
        return safe_segment(parts[-3])
    return safe_segment(results_tag(str(record["model"])))


def _find_runs(root: Path) -> tuple[list[_Run], list[tuple[Path, str]]]:
    runs, bad = [], []
    for path in sorted(root.rglob("results.json")):
        try:
            rec = load_record(path)
        except (ValueError, OSError) as e:
            bad.append((path, str(e)))
            continue
        runs.append(_Run(path, rec, rec["analysis"], _tag_from_path(path, rec), safe_segment(str(rec["run_id"]))))
    by_tag: dict[tuple[str, str], set[str]] = {}
    for r in runs:
        by_tag.setdefault((r.analysis, r.tag), set()).add(str(r.record["model"]))
    for r in runs:  # specs that share a folder of an older depthlens (':' vs '-') get one folder each
        if len(by_tag[(r.analysis, r.tag)]) > 1:
            r.tag = safe_segment(results_tag(str(r.record["model"])))
    return runs, bad


def _newest(runs: list[_Run]) -> list[_Run]:
    best: dict[tuple[str, str], _Run] = {}
    for r in runs:
        key = (r.analysis, r.tag)
        cur = best.get(key)
        if cur is None or (r.run_id, str(r.record.get("created", ""))) > (cur.run_id, str(cur.record.get("created", ""))):
            best[key] = r
    return sorted(best.values(), key=lambda r: (r.analysis, r.tag, r.run_id))


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


@dataclass
class _Summary:
    rows: list[tuple[str, ...]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    static_warnings: set[str] = field(default_factory=set)
    failed: bool = False

    def add(self, analysis: str, tag: str, run_id: str, saved: list[SavedFigure]) -> None:
        for s in saved:
            if s.warning:
                self.static_warnings.add(s.warning)
            self.rows.append((analysis, tag, run_id, s.stem.name, ",".join(s.formats), str(s.stem.parent)))

    def fail(self, what: str, exc: Exception) -> None:
        log.error("Building figures for %s failed", what, exc_info=exc)
        self.skipped.append(f"{what}: builder failed ({type(exc).__name__}: {exc})")
        self.failed = True


def _build_all(args: argparse.Namespace, out_root: Path, runs: list[_Run], chosen: list[_Run],
               summary: _Summary) -> None:
    """Per-run figures, then cross-model (``combine=True``) figures of each analysis, under ``out_root``."""
    kw = dict(formats=args.formats, html_js=args.html_js)
    for run in chosen:
        if not has_builders(run.analysis, combine=False):
            continue
        out = out_root / run.tag / (run.run_id if args.all else "")
        try:
            summary.add(run.analysis, run.tag, run.run_id, build_figures(run.record, out, **kw))
        except Exception as e:  # noqa: BLE001 - one broken builder must not stop the others
            summary.fail(str(run.path), e)
    for analysis in sorted({r.analysis for r in chosen if has_builders(r.analysis, combine=True)}):
        recs = [r.record for r in _newest([r for r in runs if r.analysis == analysis])]
        try:
            summary.add(analysis, "(all models)", "-", build_combined_figures(analysis, recs, out_root, **kw))
        except Exception as e:  # noqa: BLE001
            summary.fail(f"{analysis} (all models)", e)


def _resolve(args: argparse.Namespace) -> None:
    """Fill in --results/--out/--formats: the plain defaults, or the gallery's under --gallery."""
    given = {name for name in ("results", "out", "formats") if hasattr(args, name)}
    if args.gallery:
        clash = [flag for flag, on in (("--formats", "formats" in given), ("--all", args.all)) if on]
        if clash:
            raise UsageError(f"--gallery writes PNGs of the newest run per analysis and model; drop {' and '.join(clash)}.")
        args.formats = ["png"]
    args.results = getattr(args, "results", GALLERY_RESULTS if args.gallery else Path("results"))
    args.out = getattr(args, "out", GALLERY if args.gallery else Path("figures/out"))
    if "formats" not in given and not args.gallery:
        args.formats = list(STATIC_FORMATS)


def _publish_pngs(stage: Path, out: Path, results: Path, summary: _Summary) -> list[Path]:
    """Copy the staged PNGs into ``out`` (same relative paths); return the gallery PNGs no record rebuilt."""
    written = set()
    for png in sorted(stage.rglob("*.png")):
        rel = png.relative_to(stage)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, out / rel)
        written.add(rel)
    summary.rows = [(*row[:4], "png", str(out / Path(row[5]).relative_to(stage))) for row in summary.rows
                    if "png" in row[4].split(",")]
    results = results.resolve()
    return [p for p in sorted(out.rglob("*.png"))
            if p.relative_to(out) not in written and results not in p.resolve().parents]


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _resolve(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # kaleido/choreographer narrate every browser start at INFO
        for name in ("kaleido", "choreographer", "logistro"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not args.results.is_dir():
        where = ("the gallery's records go there as <analysis>/<model-tag>/<run-id>/results.json"
                 if args.gallery else "pass --results DIR pointing at analysis outputs")
        raise UsageError(f"--results {str(args.results)!r} is not a folder; {where}.")
    prepare_out(args.out)
    report = load_builders()
    runs, bad = _find_runs(args.results)
    chosen = runs if args.all else _newest(runs)

    summary = _Summary(failed=bool(bad or report.failed))
    summary.skipped += [f"{p}: {why}" for p, why in bad]
    summary.skipped += [f"builder module {m}: {why}" for m, why in report.failed.items()]
    buildable = [r for r in chosen if has_builders(r.analysis)]
    stale: list[Path] = []
    with contextlib.ExitStack() as stack:
        # --gallery builds in a scratch folder and keeps only the PNGs
        stage = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gallery-"))) if args.gallery else args.out
        if args.formats and buildable:  # one browser for the whole rebuild (~3 s saved per figure set)
            stack.enter_context(export_session())
        _build_all(args, stage, runs, buildable, summary)
        if args.gallery:
            stale = _publish_pngs(stage, args.out, args.results, summary)
    unknown = Counter(r.analysis for r in chosen if not has_builders(r.analysis))
    summary.skipped += [f"analysis {a!r} ({n} run{'s' * (n > 1)}): no figure builder registered"
                        for a, n in sorted(unknown.items())]

    print(f"{len(chosen)} run(s) read from {args.results}; {len(summary.rows)} figure(s) written to {args.out}")
    if summary.rows:
        print(_table(summary.rows, ("analysis", "model", "run", "figure", "formats", "folder")))
    for w in sorted(summary.static_warnings):
        print(f"static formats not written: {w}")
    if args.gallery and summary.static_warnings:
        summary.failed = True  # a gallery is its PNGs
    if stale:  # a gallery picture without its record is not reproducible: the rebuild fails until it is
        summary.failed = True
        print(f"not rebuilt (no record under {args.results} makes them; add the record or delete the picture):")
        for p in stale:
            print(f"  {p}")
    if summary.skipped:
        print("skipped:")
        for line in summary.skipped:
            print(f"  {line}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
