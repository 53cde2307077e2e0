"""analyses.state_prediction: sites, probing through the analysis, verdicts, degenerate labels, CLI.

probes/linear.py's and grouped_cv.py's own tests cover the probe statistics (planted signal, controls, folds);
these check the analysis layer on top: groups come from prompt ids, the verdict is computed
from the reports, activations are gathered at the right tokens, and bad or degenerate input
ends in one sentence or an "undetermined" record, never a traceback.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from analyses import state_prediction as sp
from depthlens.runtime.forward import residuals_at
from depthlens.infra.results import read_run, write_run

N_LAYERS, D, SIGNAL_LAYER = 4, 64, 2
CFG = sp.StatePredictionConfig(model="tiny-llama", n_boot=200, n_random_directions=4)


def synthetic_trials(n_prompts: int = 40, per_prompt: int = 4, signal: float = 3.0, seed: int = 0):
    """Trial records + per-site activations; a label-dependent shift along one direction at
    SIGNAL_LAYER of ``last_inserted`` only, the other sites pure noise."""
    rng = np.random.default_rng(seed)
    trials, y = [], []
    for p in range(n_prompts):
        for _ in range(per_prompt):
            trials.append({"prompt_id": f"p{p:03d}", "position": int(rng.integers(0, 64)), "depth_actual": rng.random(),
                           "span_len": int(rng.choice([2, 4, 8, 16])), "prompt_len": 30 + p % 7, "label": "x"})
            y.append(int(rng.integers(0, 2)))
    y = np.array(y)
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    acts = {s: rng.standard_normal((N_LAYERS, len(y), D)).astype(np.float32) for s in sp.SITES}
    acts["last_inserted"][SIGNAL_LAYER] += signal * np.outer(2 * y - 1, u)
    return trials, y, acts, u


@pytest.fixture(scope="module")
def planted():
    trials, y, acts, u = synthetic_trials()
    dirs = np.random.default_rng(5).standard_normal((N_LAYERS, D))
    return sp.probe_sites(acts, trials, y, dirs, CFG), y


def test_planted_signal_found_at_its_layer_and_site_only(planted):
    reports, _ = planted
    probe = reports["last_inserted"].layers
    assert probe[SIGNAL_LAYER].auroc >= 0.95
    for layer in range(N_LAYERS):
        if layer != SIGNAL_LAYER:
            assert 0.3 <= probe[layer].auroc <= 0.7
    for site in ("before_insertion", "span_mean"):
        assert all(0.3 <= r.auroc <= 0.7 for r in reports[site].layers)
    # shuffled labels stay at chance even at the planted layer
    assert all(0.3 <= r.auroc <= 0.7 for r in reports["last_inserted"].shuffled)
    v = sp.overall_verdict(reports)
    assert (v["best_site"], v["best_layer"]) == ("last_inserted", SIGNAL_LAYER)
    assert v["verdict"] == "beats_baseline" and v["beats_baseline"] is True
    assert v["best_lo"] > v["baseline_hi"]          # the rule, on the recorded numbers
    assert "beats" in v["verdict_sentence"] and f"layer {SIGNAL_LAYER}" in v["verdict_sentence"]


def test_no_signal_does_not_beat_baseline():
    trials, y, acts, _ = synthetic_trials(signal=0.0, seed=1)
    reports = sp.probe_sites(acts, trials, y, None, CFG)
    v = sp.overall_verdict(reports)
    assert v["verdict"] == "does_not_beat_baseline" and not v["best_lo"] > v["baseline_hi"]
    assert "does not beat" in v["verdict_sentence"]


def test_refusal_direction_explains_a_signal_along_it():
    """When the label lives on the refusal direction, the 1-D projection matches the probe."""
    trials, y, acts, u = synthetic_trials(seed=2)
    dirs = np.random.default_rng(5).standard_normal((N_LAYERS, D))
    dirs[SIGNAL_LAYER] = 4.0 * u
    rep = sp.probe_sites({"last_inserted": acts["last_inserted"]}, trials, y, dirs, CFG)["last_inserted"]
    summ = sp.refusal_direction_summary(rep)
    assert summ["best"]["layer"] == SIGNAL_LAYER and summ["best"]["auroc"] >= 0.95
    assert summ["above_shuffled"] and not summ["probe_beats_direction"]


def test_groups_are_prompt_ids_and_a_leaking_split_is_caught(monkeypatch):
    """Swap the grouped splitter for one that ignores groups: the analysis must refuse the folds."""
    from sklearn.model_selection import StratifiedKFold

    import probes.grouped_cv as grouped_cv

    class Leaky(StratifiedKFold):
        def split(self, X, y, groups=None):
            return super().split(X, y)

    monkeypatch.setattr(grouped_cv, "StratifiedGroupKFold", Leaky)
    trials, y, acts, _ = synthetic_trials(n_prompts=12)
    with pytest.raises(ValueError, match="both train and test"):
        sp.probe_sites({"span_mean": acts["span_mean"]}, trials, y, None, CFG)


def test_surface_features_come_from_the_trial_records():
    trials = [{"position": 5, "depth_actual": 0.25, "span_len": 8, "prompt_len": 31},
              {"position": 0, "depth_actual": 0.0, "span_len": 2, "prompt_len": 30}]
    assert sp.surface_features(trials).tolist() == [[5, 0.25, 8, 31], [0, 0.0, 2, 30]]
    with pytest.raises(ValueError, match="Trial 1 has depth_actual = None"):     # missing is not 0
        sp.surface_features([trials[0], {**trials[1], "depth_actual": None}])


def test_labels_and_degenerate_reasons():
    trials = [{"label": lab, "prompt_id": f"p{i % 3}"} for i, lab in enumerate(["harmful", "recovered", "other"] * 4)]
    kept, y, counts = sp.label_trials(trials)
    assert len(kept) == 8 and set(y.tolist()) == {0, 1} and counts["other"] == 4
    _, y2, _ = sp.label_trials(trials, "harmful")
    assert y2.sum() == 8                              # "other" counts as not recovered
    with pytest.raises(ValueError, match="other_as must be one of"):
        sp.label_trials(trials, "keep")
    assert "all 5 labelled trials are harmful" in sp.degenerate_reason(np.ones(5, int), list("abcde"))
    assert "nothing to probe" in sp.degenerate_reason(np.zeros(0, int), [])
    one_prompt = sp.degenerate_reason(np.array([1, 1, 0, 0]), ["a", "b", "c", "c"])
    assert "only 1 prompt has recovered trials" in one_prompt
    assert sp.degenerate_reason(np.array([1, 0] * 6), [f"g{i // 2}" for i in range(12)]) is None


def test_site_positions_and_bad_span():
    t = {"ids": list(range(20)), "span": [12, 16], "prompt_id": "p"}
    assert sp.site_positions(t) == {"last_inserted": [15], "before_insertion": [11], "span_mean": [12, 13, 14, 15]}
    with pytest.raises(ValueError, match="outside its 20 tokens or empty"):
        sp.site_positions({**t, "span": [16, 16]})


@pytest.mark.parametrize("kind", ["resid_post", "resid_mid"])  # the plain-block stream and the hooked bridge
def test_site_activations_match_residuals_at(tiny, kind):
    """Streamed, left-padded gathering equals per-position residuals of the unpadded sequences."""
    from depthlens.data.chat import build_chat

    seqs = [list(build_chat(tiny.tokenizer, p, [r]).ids) for p, r in
            [("How do I bake bread?", "I can't help"), ("Hi", "Sure, here it is"), ("Tell me a joke about cats", "No")]]
    spans = [[len(s) - 3, len(s)] for s in seqs]
    pos = [sp.site_positions({"ids": s, "span": sp_}) for s, sp_ in zip(seqs, spans)]
    acts = sp.site_activations(tiny, seqs, {k: [p[k] for p in pos] for k in sp.SITES}, kind=kind, batch_size=2)
    last = residuals_at(tiny, seqs, [p["last_inserted"][0] for p in pos], kind=kind)
    before = residuals_at(tiny, seqs, [p["before_insertion"][0] for p in pos], kind=kind)
    mean = residuals_at(tiny, seqs, [p["span_mean"] for p in pos], kind=kind, reduce="mean")
    assert acts["last_inserted"].shape == (tiny.n_layers, 3, tiny.d_model)
    torch.testing.assert_close(torch.from_numpy(acts["last_inserted"]), last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(acts["before_insertion"]), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(acts["span_mean"]), mean, atol=1e-5, rtol=1e-5)
    assert not np.allclose(acts["last_inserted"], acts["span_mean"])


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``main --quick`` on tiny-llama with no insertion run yet: it makes one, then probes."""
    out = tmp_path_factory.mktemp("sp")
    path = sp.main(["--model", "tiny-llama", "--quick", "--out", str(out)])
    return out, path


def test_main_quick_end_to_end(quick_run):
    out, path = quick_run
    rec = read_run(path)
    m = rec.metrics
    assert rec.analysis == "state_prediction" and m["ran_insertion"] is True and m["trials_chosen"] == "ran"
    assert read_run(m["trials_source"]).analysis == "insertion_robustness"
    assert m["verdict"] in ("beats_baseline", "does_not_beat_baseline", "undetermined")
    assert m["verdict_sentence"] and "best_lo" in m and "baseline_hi" in m
    if m["verdict"] == "undetermined":        # tiny-llama's random continuations are all one class
        assert m["undetermined_reason"].endswith(".") and rec.tables["auroc"] == []
    assert (path.parent / "state_prediction_auroc.html").exists()


def test_main_with_trials_on_tiny_llama_activations(quick_run, tmp_path):
    """Relabel the tiny model's real trials by span length: the probes run on its activations,
    the surface baseline sees the rule (AUROC 1), so no probe may claim to beat it."""
    out, path = quick_run
    src = read_run(read_run(path).metrics["trials_source"])
    for t in src.tables["trials"]:
        t["label"] = "harmful" if t["span_len"] >= 8 else "recovered"
    src.run_id = ""
    relabelled = write_run(src, tmp_path / "in")
    new = read_run(sp.main(["--model", "tiny-llama", "--quick", "--trials", str(relabelled.parent),
                            "--out", str(tmp_path / "out"), "--n-boot", "100"]))
    m = new.metrics
    assert m["n_harmful"] > 0 and m["n_recovered"] > 0 and m["trials_source"] == str(relabelled)
    kinds = {r["kind"] for r in new.tables["auroc"]}
    assert kinds == {"probe", "shuffled", "random_directions", "surface", "direction_projection"}
    assert {r["site"] for r in new.tables["auroc"]} == set(sp.SITES)
    assert len([r for r in new.tables["auroc"] if r["kind"] == "probe"]) == 2 * len(sp.SITES)  # 2 layers
    surface = next(r for r in new.tables["auroc"] if r["kind"] == "surface")
    assert surface["auroc"] == 1.0
    assert m["verdict"] == "does_not_beat_baseline" and m["best_lo"] <= m["baseline_hi"]
    json.dumps(m)  # JSON-clean
    html = list((tmp_path / "out").glob("state_prediction/*/*/state_prediction_auroc.html"))
    assert html and "plotly" in html[0].read_text()


def test_degenerate_trials_give_undetermined_record(quick_run, tmp_path):
    _, path = quick_run
    src = read_run(read_run(path).metrics["trials_source"])
    for t in src.tables["trials"]:
        t["label"] = "other"
    src.run_id = ""
    f = write_run(src, tmp_path / "in")
    rec = sp.run(replace(CFG, trials=str(f), out=str(tmp_path / "out"), quick=True))
    assert rec.metrics["verdict"] == "undetermined" and "nothing to probe" in rec.metrics["verdict_sentence"]
    assert rec.tables["auroc"] == []


def test_bad_trials_input_is_one_sentence(quick_run, tmp_path, capsys):
    _, path = quick_run
    with pytest.raises(SystemExit) as exit_:
        sp.main(["--model", "tiny-llama", "--trials", str(tmp_path / "nope"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no results.json"):
        sp.load_trials(tmp_path / "empty")
    with pytest.raises(ValueError, match="is a 'state_prediction' record"):
        sp.load_trials(path)
    trials_file = read_run(path).metrics["trials_source"]
    with pytest.raises(ValueError, match="were made by 'tiny-llama' but --model is 'other-model'"):
        sp.load_trials(trials_file, "other-model")
    with pytest.raises(ValueError, match="--kind must be one of"):
        sp.run(replace(CFG, kind="attn_out"))
    # a trial with a missing or non-finite number is refused, not read as 0
    src = read_run(trials_file)
    src.tables["trials"][3]["depth_actual"] = None
    src.run_id = ""
    with pytest.raises(ValueError, match=r"Trial 3 .* lacks \['depth_actual'\]"):
        sp.load_trials(write_run(src, tmp_path / "holes"))


def test_the_newest_insertion_run_is_named_and_recorded(quick_run, caplog):
    out, _ = quick_run
    with caplog.at_level("WARNING"):
        source = sp.obtain_trials("tiny-llama", None, str(out))
    assert source.chosen == "newest" and str(source.path) in caplog.text and "--trials not given" in caplog.text
