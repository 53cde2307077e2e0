from __future__ import annotations

import json

import pytest

from depthlens.infra.errors import NonFiniteError, UsageError
from depthlens.infra.results import RunRecord, latest_run, nonfinite_paths, read_run, write_run


def test_round_trip_and_layout(tmp_path):
    rec = RunRecord(analysis="evaluate", model="smollm2-135m-instruct:sft", config={"n": 3}, seed=7,
                    metrics={"asr_compliance": 0.25, "not_measured": None}, tables={"rows": [{"a": 1}]})
    path = write_run(rec, tmp_path)
    assert path.parent.parent.name == "smollm2-135m-instruct-sft"
    assert path.parent.parent.parent.name == "evaluate"
    back = read_run(path)
    assert back.metrics == {"asr_compliance": 0.25, "not_measured": None}
    assert back.tables == {"rows": [{"a": 1}]} and back.seed == 7
    assert back.versions["torch"] and back.created
    assert back.git_dirty in (True, False)          # provenance says whether the work tree had changes
    assert latest_run(tmp_path, "evaluate") == path
    assert not [p for p in path.parent.iterdir() if p.name != "results.json"], "no temp files left"


def test_non_finite_values_fail_the_write_and_are_kept_apart(tmp_path):
    """A NaN is an error, not a null: no results.json, the raw record in results.invalid.json."""
    rec = RunRecord(analysis="layer_sensitivity", model="tiny-llama", seed=0,
                    metrics={"ok": 1.0, "nan": float("nan"), "nested": {"inf": float("inf")}},
                    tables={"ranking": [{"layer": 0, "score": 0.5}, {"layer": 1, "score": -float("inf")}]})
    with pytest.raises(NonFiniteError, match=r"metrics\.nan, metrics\.nested\.inf, tables\.ranking\[1\]\.score"):
        write_run(rec, tmp_path)
    (run_dir,) = list((tmp_path / "layer_sensitivity" / "tiny-llama").iterdir())
    assert not (run_dir / "results.json").exists() and latest_run(tmp_path, "layer_sensitivity") is None
    raw = json.loads((run_dir / "results.invalid.json").read_text())   # Python's json reads NaN back
    assert raw["nonfinite"] == ["metrics.nan", "metrics.nested.inf", "tables.ranking[1].score"]
    assert raw["metrics"]["ok"] == 1.0


def test_nonfinite_paths_finds_numpy_and_nested_values():
    import numpy as np

    assert nonfinite_paths({"a": [1.0, np.float64("nan")], "b": np.array([0.0, np.inf]), "c": "nan", "d": None}) == \
        ["a[1]", "b[1]"]


def test_a_ranking_with_missing_or_nonfinite_scores_is_refused_on_read(tmp_path):
    """Records written before NaN was an error hold null scores; consumers (the zo recipe) must not use them."""
    good = RunRecord(analysis="layer_sensitivity", model="tiny-llama",
                     metrics={"critical_layers": [{"layer": 1, "score": 1.0}, {"layer": 0, "score": 0.0}]},
                     tables={"ranking": [{"layer": 1, "score": 1.0, "rank": 1}]})
    path = write_run(good, tmp_path)
    assert read_run(path).metrics["critical_layers"][0]["layer"] == 1
    data = json.loads(path.read_text())
    data["metrics"]["critical_layers"][1]["score"] = None     # what jsonable made of a NaN before
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match=r"metrics\.critical_layers\[1\]\.score .*re-run analyses.layer_sensitivity"):
        read_run(path)


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
