"""Run records: one ``results.json`` per analysis run, written atomically.

A record holds everything needed to trust and reproduce a number: the config, the model
spec and provenance, the seed, timings, package versions, the git commit (and whether the work
tree had uncommitted changes), scalar metrics and tables (lists of row dicts). Commit, dirty
flag and versions are those of the run's start (``start_stamp``, taken by every analysis CLI
before it loads a model); ``started["tree_changed_before_end"]`` says whether the work tree
changed (an edit, a commit, a checkout) before the record was written. It lives at
``<out>/<analysis>/<model-tag>/<run-id>/results.json``; ``read_run`` refuses a file of another
schema version with one clear sentence.

Measured values are finite. A value that was not measured is absent or ``null``; a NaN or
infinite metric or table cell is an error, not a null: ``write_run`` then writes the record
as ``results.invalid.json`` (beside where ``results.json`` would be, never read by consumers)
and raises ``NonFiniteError`` naming the values. ``read_run`` refuses a ranking whose scores
are missing or not finite (records written before this rule turned NaN into null).

    >>> import tempfile
    >>> rec = RunRecord(analysis="evaluate", model="tiny-llama", config={"n": 8}, seed=0, metrics={"asr_compliance": 0.25})
    >>> path = write_run(rec, out=tempfile.mkdtemp())     # <out>/evaluate/tiny-llama/<run-id>/results.json
    >>> read_run(path).metrics
    {'asr_compliance': 0.25}
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import glob
import os
import secrets
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from depthlens.infra.errors import NonFiniteError, UsageError

SCHEMA_VERSION = 1
_PACKAGES = ("depthlens", "torch", "transformer-lens", "transformers", "numpy", "scikit-learn", "plotly")


@dataclass
class RunRecord:
    """Everything one analysis run produced (see the module docstring)."""

    analysis: str
    model: str
    config: dict = field(default_factory=dict)
    seed: int = 0
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    created: str = ""
    versions: dict = field(default_factory=dict)
    git_commit: str | None = None
    git_dirty: bool | None = None
    started: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def model_tag(self) -> str:
        """The results folder of this model (``depthlens.infra.paths.results_tag``: one per spec)."""
        from depthlens.infra.paths import results_tag

        return results_tag(self.model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty() -> bool | None:
    """Whether tracked files of the depthlens work tree differ from ``HEAD`` (None outside git)."""
    try:
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=5, check=False)
        return bool(res.stdout.strip()) if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def tree_fingerprint(root: str | Path | None = None) -> str | None:
    """A hash of ``HEAD`` and of the uncommitted changes to tracked files of the depthlens work
    tree (or of ``root``); None outside git.

    Equal fingerprints at the start and the end of a run mean the code it ran was not
    edited, committed or checked out in between.
    """
    try:
        root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=False)
        diff = subprocess.run(["git", "-C", str(root), "diff", "HEAD", "--no-color", "--no-ext-diff"],
                              capture_output=True, timeout=20, check=False)
        if head.returncode != 0 or diff.returncode != 0:
            return None
        return hashlib.sha256(head.stdout.encode() + b"\0" + diff.stdout).hexdigest()[:16]
    except (OSError, subprocess.SubprocessError):
        return None


def start_stamp() -> dict:
    """What a run records about its code when it starts: time, commit, dirty flag, versions, tree fingerprint.

    ``write_run`` takes commit, dirty flag and versions from it (not from the end of the run)
    and says in ``started["tree_changed_before_end"]`` whether the work tree changed meanwhile.
    """
    return {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "git_dirty": git_dirty(), "versions": package_versions(), "tree_fingerprint": tree_fingerprint()}


def _apply_start(record: RunRecord) -> None:
    """Provenance from the start stamp; a change of the work tree before the end is recorded, not hidden."""
    st = dict(record.started)
    if not st:  # a record made without a start stamp (library use): stamped now, and it says so
        record.started = {"stamped": "when written (no start stamp)"}
        return
    record.git_commit = record.git_commit or st.get("git_commit")
    if record.git_dirty is None:
        record.git_dirty = st.get("git_dirty")
    record.versions = record.versions or st.get("versions") or {}
    end = tree_fingerprint()
    st["stamped"] = "at start"
    st["tree_changed_before_end"] = None if end is None or st.get("tree_fingerprint") is None else end != st["tree_fingerprint"]
    if st["tree_changed_before_end"]:
        st["git_commit_at_end"], st["git_dirty_at_end"] = git_commit(), git_dirty()
    st.pop("versions", None)  # kept once, as the record's versions
    record.started = st


def nonfinite_paths(obj: Any, where: str = "") -> list[str]:
    """Where ``obj`` holds a NaN or infinite number: ``["metrics.score", "tables.ranking[0].score", ...]``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite_paths(v, f"{where}[{i}]")]
    if isinstance(obj, (str, bytes, bool)) or obj is None:
        return []
    if hasattr(obj, "tolist") and not isinstance(obj, (int, float)):
        return nonfinite_paths(obj.tolist(), where)
    if isinstance(obj, (int, float)):
        return [] if math.isfinite(obj) else [where]
    return []


def describe_nonfinite(paths: list[str], limit: int = 5) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def jsonable(obj: Any) -> Any:
    """Plain JSON values: dataclasses → dicts, numpy/torch → lists or scalars, paths → str, NaN/±inf → None.

    Results files are written with ``allow_nan=False`` (strict JSON), so a non-finite float must
    become ``null`` here rather than fail the write after the run has done its work.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, tensors
        return jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return jsonable(obj.item())
    return str(obj)


def write_run(record: RunRecord, out: str | Path = "results") -> Path:
    """Fill run id, time, versions and commit, then write ``results.json`` atomically; return its path.

    A NaN or infinite value in ``metrics`` or ``tables`` is written to ``results.invalid.json``
    instead and raises ``NonFiniteError`` (see the module docstring).
    """
    now = _dt.datetime.now(_dt.timezone.utc)
    record.created = record.created or now.isoformat(timespec="seconds")
    _apply_start(record)
    record.versions = record.versions or package_versions()
    record.git_commit = record.git_commit or git_commit()
    if record.git_dirty is None:
        record.git_dirty = git_dirty()
    run_dir = _new_run_dir(record, Path(out), now)
    bad = nonfinite_paths({"metrics": record.metrics, "tables": record.tables})
    if bad:
        invalid = run_dir / "results.invalid.json"
        atomic_write_json(invalid, {**_raw(record.to_dict()), "nonfinite": bad}, allow_nan=True)
        raise NonFiniteError(
            f"The {record.analysis} run of {record.model!r} produced non-finite values at {describe_nonfinite(bad)}; "
            f"no results.json was written (the raw record is {str(invalid)!r}).")
    path = run_dir / "results.json"
    atomic_write_json(path, jsonable(record.to_dict()))
    return path


def _new_run_dir(record: RunRecord, out: Path, now) -> Path:
    """Create the run's folder ``<out>/<analysis>/<tag>/<run id>`` exclusively: two runs never share one.

    A generated run id is ``<UTC time>-<config hash>-s<seed>-<6 random hex>``, made again in
    the unlikely case its folder exists; a run id set by the caller must be one path segment
    and is refused when its folder already holds a results.json.
    """
    from depthlens.infra.paths import safe_segment

    parent = out / record.analysis / record.model_tag
    parent.mkdir(parents=True, exist_ok=True)
    if record.run_id:
        if safe_segment(record.run_id) != record.run_id:
            raise UsageError(f"run id {record.run_id!r} is not one safe folder name; use letters, digits, '-' and '_'.")
        run_dir = parent / record.run_id
        if (run_dir / "results.json").exists():
            raise UsageError(f"{str(run_dir)!r} already holds a results.json; choose another run id or --out.")
        run_dir.mkdir(exist_ok=True)
        return run_dir
    digest = hashlib.sha256(json.dumps(jsonable(record.config), sort_keys=True).encode()).hexdigest()[:8]
    stamp = f"{now.strftime('%Y%m%d-%H%M%S')}-{digest}-s{record.seed}"
    while True:
        run_id = f"{stamp}-{secrets.token_hex(3)}"
        try:
            (parent / run_id).mkdir()
        except FileExistsError:
            continue
        record.run_id = run_id
        return parent / run_id


def _raw(obj: Any) -> Any:
    """``jsonable`` but keeping NaN/inf as floats (for ``results.invalid.json``)."""
    if isinstance(obj, float):
        return obj
    if isinstance(obj, dict):
        return {str(k): _raw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_raw(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, int)):
        return _raw(obj.tolist())
    return jsonable(obj)


def atomic_write_json(path: Path, data: Any, allow_nan: bool = False) -> None:
    """Write JSON to ``path`` through a temp file and a rename: never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, allow_nan=allow_nan)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_run(path: str | Path) -> RunRecord:
    """Read a ``results.json`` (or its directory) back into a ``RunRecord``."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"No results file at {str(path)!r}.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"Results file {str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}).") from err
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"Results file {str(path)!r} has schema version {version!r}; this depthlens reads version {SCHEMA_VERSION} only."
        )
    known = {f.name for f in dataclasses.fields(RunRecord)}
    rec = RunRecord(**{k: v for k, v in data.items() if k in known})
    _check_scores(rec, path)
    return rec


# Lists of rows that a consumer reads as scores: every value present there must be a finite
# number or a string (``critical_layers_from`` of the zo recipe reads the first one).
SCORED_ROWS = {"layer_sensitivity": (("metrics", "critical_layers"), ("tables", "ranking"))}


def _check_scores(rec: RunRecord, path: Path) -> None:
    for part, key in SCORED_ROWS.get(rec.analysis, ()):
        rows = getattr(rec, part).get(key)
        if rows is None:
            continue
        for i, row in enumerate(rows):
            items = row.items() if isinstance(row, dict) else [("", row)]
            for k, v in items:
                if v is None or (isinstance(v, float) and not math.isfinite(v)):
                    where = f"{part}.{key}[{i}]" + (f".{k}" if k else "")
                    raise UsageError(
                        f"Results file {str(path)!r} has no finite value at {where} ({v!r}: a NaN or infinite "
                        f"score, or one not measured); re-run analyses.{rec.analysis} and use its new results.json.")


def latest_run(out: str | Path, analysis: str, model_tag: str | None = None, *, model: str | None = None) -> Path | None:
    """Path of the newest ``results.json`` of ``analysis`` (optionally for one model tag), or None.

    With ``model`` (a spec), the runs of that spec: its ``results_tag`` folder and the older
    ``model_tag`` folder (shared by specs that differ only in ``:`` and ``-``), keeping only
    records whose ``model`` is exactly ``model``.
    """
    root = Path(out) / analysis
    if model is not None:
        from depthlens.infra.paths import model_tag as legacy_tag
        from depthlens.infra.paths import results_tag

        runs = [p for tag in dict.fromkeys((results_tag(model), legacy_tag(model)))
                for p in root.glob(f"{glob.escape(tag)}/*/results.json") if _record_model(p) == model]
    else:
        pattern = f"{glob.escape(model_tag)}/*/results.json" if model_tag else "*/*/results.json"
        runs = list(root.glob(pattern))
    runs = sorted(runs, key=lambda p: p.parent.name)
    return runs[-1] if runs else None


def _record_model(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("model") if isinstance(data, dict) else None
