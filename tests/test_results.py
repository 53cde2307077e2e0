from __future__ import annotations

import json

import pytest

from depthlens.results import RunRecord, latest_run, read_run, write_run


def test_round_trip_and_layout(tmp_path):
    rec = RunRecord(analysis="evaluate", model="smollm2-135m-instruct:sft", config={"n": 3}, seed=7,
                    metrics={"asr": 0.25, "nan": float("nan"), "inf": float("inf"), "ninf": -float("inf")},
                    tables={"rows": [{"a": 1}]})
    path = write_run(rec, tmp_path)
    assert path.parent.parent.name == "smollm2-135m-instruct-sft"
    assert path.parent.parent.parent.name == "evaluate"
    back = read_run(path)
    # strict JSON on disk: every non-finite float is written as null (was: inf failed the write)
    assert back.metrics == {"asr": 0.25, "nan": None, "inf": None, "ninf": None}
    assert "Infinity" not in path.read_text() and "NaN" not in path.read_text()
    assert back.tables == {"rows": [{"a": 1}]} and back.seed == 7
    assert back.versions["torch"] and back.created
    assert latest_run(tmp_path, "evaluate") == path
    assert not [p for p in path.parent.iterdir() if p.name != "results.json"], "no temp files left"


def test_other_schema_version_is_refused(tmp_path):
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ValueError, match="schema version 99; this depthlens reads version 1"):
        read_run(p)


def test_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="No results file"):
        read_run(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_run(bad)
