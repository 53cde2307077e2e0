"""Every number the docs claim comes from a committed record: docs/claims.json, checked against the records."""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = json.loads((ROOT / "docs" / "claims.json").read_text())["claims"]


def _segments(key: str) -> list[str]:
    """Split a key at the dots outside brackets: ``tables.rows[depth=0.25].x`` → 3 segments."""
    return re.findall(r"(?:[^.\[]|\[[^\]]*\])+", key)


def _match(row: dict, cond: str) -> bool:
    if cond == "*":
        return True
    if "~" in cond:
        field, sub = cond.split("~", 1)
        return sub in str(row.get(field, ""))
    field, want = cond.split("=", 1)
    got = row.get(field)
    try:
        return float(got) == float(want)
    except (TypeError, ValueError):
        return str(got) == want


def resolve(data, key: str) -> list:
    """The values at ``key`` (see docs/claims.json's "about"); a list, one entry per row matched."""
    values = [data]
    for seg in _segments(key):
        name, _, cond = seg.partition("[")
        nxt = []
        for v in values:
            if name:
                if not isinstance(v, dict) or name not in v:
                    raise KeyError(f"{name!r} (of {key!r})")
                v = v[name]
            if cond:
                rows = [r for r in v if _match(r, cond[:-1])]
                if not rows:
                    raise KeyError(f"no row with [{cond} (of {key!r})")
                nxt.extend(rows)
            else:
                nxt.append(v)
        values = nxt
    return values


def claimed_value(claim: dict):
    record = json.loads((ROOT / claim["record"]).read_text())
    if claim.get("call"):
        module, name = claim["call"].split(":")
        record = {**record, "computed": getattr(importlib.import_module(module), name)(record)}
    keys = claim["key"] if isinstance(claim["key"], list) else [claim["key"]]
    values = [x for k in keys for x in resolve(record, k)]
    op = claim.get("op")
    if op == "list":
        return values
    nums = [float(v) for v in values]
    if op is None:
        assert len(nums) == 1, f"{claim['key']} matched {len(nums)} values; give an op"
        value = nums[0]
    else:
        value = {"mean": lambda: sum(nums) / len(nums), "min": lambda: min(nums), "max": lambda: max(nums),
                 "sum": lambda: sum(nums), "pct_change": lambda: (nums[1] / nums[0] - 1) * 100,
                 "first_minus_rest": lambda: nums[0] - sum(nums[1:])}[op]()
    return value * claim.get("scale", 1)


def _number(text: str) -> tuple[float, int]:
    """A number as written (−, +, thousands commas) and its decimals."""
    t = text.replace("−", "-").replace(",", "").replace("+", "")
    return float(t), len(t.split(".")[1]) if "." in t else 0


@pytest.mark.parametrize("claim", CLAIMS, ids=[f"{c['doc']}:{c['text'][:40]}:{c['number']}" for c in CLAIMS])
def test_the_claimed_number_is_in_the_doc_and_in_its_record(claim):
    doc = (ROOT / claim["doc"]).read_text()
    assert claim["text"] in doc, f"{claim['doc']} no longer says {claim['text']!r}; update docs/claims.json"
    assert claim["number"] in claim["text"]
    assert (ROOT / claim["record"]).is_file(), f"the record {claim['record']} is not committed"
    value = claimed_value(claim)
    if claim.get("op") == "list":
        assert ", ".join(str(v) for v in value) == claim["number"]
        return
    number, decimals = _number(claim["number"])
    assert math.isfinite(value)
    assert abs(value - number) <= 0.5 * 10 ** -decimals + 1e-9, \
        f"{claim['doc']} says {claim['number']}, the record gives {value!r}"


def _table(doc: str, header_start: str) -> str:
    lines = (ROOT / doc).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


# numbers in the two tables that are settings or labels, not measurements
_NOT_MEASURED = {"README.md": {"2,000", "100", "2", "10", "3", "270", "135", "5", "8", "1", "0", "20", "40"},
                 "docs/findings.md": {"1", "2", "3", "4", "5", "6", "7", "10", "18", "270", "0.1", "13"}}


@pytest.mark.parametrize("doc, header", [("README.md", "| suffix | what | use it for |"),
                                         ("README.md", "| command | question |"),
                                         ("docs/findings.md", "| question | answer on the SmolLM2 organism |")])
def test_every_number_in_the_claimed_tables_is_listed(doc, header):
    table = _table(doc, header)
    listed = {c["number"] for c in CLAIMS if c["doc"] == doc and c["text"] in table}
    listed |= {n for c in CLAIMS if c["doc"] == doc and c["text"] in table and c.get("op") == "list"
               for n in c["number"].split(", ")}
    cells = re.sub(r"`[^`]*`|§\s*\d+(\.\d+)?|k = \d+|m = \d+|depth [0-9¼½¾]+|\d+(\.\d+)? ?[BM]\b|gemma3|smollm2|"
                   r"v\d|Llama-2-7B|ZO|int4|WO\+SFT|JT\+SFT|≤ 2 %|Gemma 3|MeZO's|LoRA", " ", table)
    found = re.findall(r"[−+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", cells)
    missing = sorted({n for n in found if n not in listed and n.lstrip("+") not in listed
                      and n not in _NOT_MEASURED[doc]})
    assert not missing, f"numbers in {doc}'s table without a claim in docs/claims.json: {missing}"
