"""scripts/ranking_stability.py and scripts/activation_scales.py on tiny-llama records."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from depthlens.infra.results import RunRecord, read_run, write_run

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(tmp_path, per_prompt: bool) -> Path:
    """A layer_sensitivity record of 4 layers: layer 0 far ahead, layers 1-3 close together."""
    import numpy as np

    rng = np.random.default_rng(0)
    n, kinds = 12, ("act_noise", "int4")
    drops = {(l, k): (3.0 if l == 0 else 1.0) + rng.normal(0, 1.0 if l else 0.05, n) for l in range(4) for k in kinds}
    rows = [{"layer": l, "kind": k, "sensitivity": float(d.mean()), "lo": float(d.mean() - 2 * d.std() / n ** 0.5),
             "hi": float(d.mean() + 2 * d.std() / n ** 0.5)} for (l, k), d in drops.items()]
    from analyses.layer_sensitivity import rank_layers

    tables = {"sensitivity": rows, "ranking": rank_layers(rows, list(range(4)))}
    if per_prompt:
        tables["per_prompt_drop"] = [{"layer": l, "kind": k, "drop": d.tolist()} for (l, k), d in drops.items()]
    rec = RunRecord(analysis="layer_sensitivity", model="tiny-llama", config={"kinds": list(kinds)},
                    metrics={"n_harmful": n}, tables=tables)
    return write_run(rec, tmp_path / ("pp" if per_prompt else "old"))


@pytest.mark.parametrize("per_prompt", [True, False])
def test_ranking_stability_grows_with_the_prompts_and_is_a_record(tmp_path, per_prompt):
    path = _script("ranking_stability").main([str(_record(tmp_path, per_prompt)), "--top-k", "2", "--first", "2",
                                              "--counts", "4,12,200", "--draws", "2000", "--out", str(tmp_path / "out")])
    rec = read_run(path)
    assert rec.analysis == "ranking_stability" and rec.started["stamped"] == "at start"
    assert ("bootstrap" in rec.metrics["method"]) == per_prompt
    first, second = rec.metrics["watched_layers"]
    rows = {r["n_harmful"]: r for r in rec.tables["by_n_harmful"]}
    assert first == 0 and all(rows[n][f"p_top2_layer{first}"] > 0.95 for n in rows)  # the clear leader
    p = [rows[n][f"p_top2_layer{second}"] for n in (4, 12, 200)]
    assert p[0] < 0.9 and p == sorted(p)  # the tied second place: steadier with more prompts, never certain at 4


def test_activation_scales_of_a_random_model_are_about_one(tmp_path):
    rec = read_run(_script("activation_scales").main(["--model", "tiny-llama", "--n", "2", "--out", str(tmp_path)]))
    assert len(rec.tables["by_layer"]) == 2
    assert all(0.8 < r["median_ratio"] < 1.3 for r in rec.tables["by_layer"])  # near-Gaussian streams: RMS ≈ robust
