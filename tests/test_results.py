from __future__ import annotations

import json

import pytest

from depthlens.infra.errors import NonFiniteError, UsageError
from depthlens.infra.paths import results_tag
from depthlens.infra.results import RunRecord, latest_run, nonfinite_paths, read_run, write_run


def test_round_trip_and_layout(tmp_path):
    rec = RunRecord(analysis="evaluate", model="smollm2-135m-instruct:sft", config={"n": 3}, seed=7,
                    metrics={"asr_compliance": 0.25, "not_measured": None}, tables={"rows": [{"a": 1}]})
    path = write_run(rec, tmp_path)
    assert path.parent.parent.name == results_tag("smollm2-135m-instruct:sft") == "smollm2-135m-instruct-sft-68c070cc"
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


def test_provenance_is_the_start_of_the_run_and_a_change_before_the_end_is_recorded(tmp_path, monkeypatch):
    import depthlens.infra.results as results
    from depthlens.infra.results import RunRecord, read_run, start_stamp, write_run

    state = {"commit": "a" * 40, "dirty": False, "tree": "tree-at-start"}
    monkeypatch.setattr(results, "git_commit", lambda: state["commit"])
    monkeypatch.setattr(results, "git_dirty", lambda: state["dirty"])
    monkeypatch.setattr(results, "tree_fingerprint", lambda: state["tree"])

    stamp = start_stamp()
    assert stamp["git_commit"] == "a" * 40 and stamp["versions"]["numpy"] and stamp["time"]
    quiet = write_run(RunRecord(analysis="evaluate", model="tiny-llama", started=dict(stamp)), tmp_path)
    rec = read_run(quiet)
    assert rec.git_commit == "a" * 40 and rec.started["tree_changed_before_end"] is False
    assert rec.started["stamped"] == "at start" and "git_commit_at_end" not in rec.started

    stamp = start_stamp()
    state.update(commit="b" * 40, dirty=True, tree="tree-after-an-edit")  # a commit and an edit during the run
    rec = read_run(write_run(RunRecord(analysis="evaluate", model="tiny-llama", started=dict(stamp)), tmp_path / "2"))
    assert rec.git_commit == "a" * 40 and rec.git_dirty is False  # what the run started on
    assert rec.started["tree_changed_before_end"] is True
    assert (rec.started["git_commit_at_end"], rec.started["git_dirty_at_end"]) == ("b" * 40, True)

    rec = read_run(write_run(RunRecord(analysis="evaluate", model="tiny-llama"), tmp_path / "3"))
    assert rec.started == {"stamped": "when written (no start stamp)"} and rec.git_commit == "b" * 40


def test_the_tree_fingerprint_sees_an_edit_and_a_commit(tmp_path):
    import subprocess

    from depthlens.infra.results import tree_fingerprint

    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    fp = tree_fingerprint(tmp_path)
    assert fp is not None and tree_fingerprint(tmp_path) == fp  # stable while nothing changes
    (tmp_path / "code.py").write_text("x = 2\n")
    edited = tree_fingerprint(tmp_path)
    assert edited != fp
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two")
    assert tree_fingerprint(tmp_path) not in (fp, edited)
    assert tree_fingerprint(tmp_path / "not-a-repo") is None
