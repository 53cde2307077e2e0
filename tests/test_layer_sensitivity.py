from __future__ import annotations

import pytest
import torch

from analyses.layer_sensitivity import SensitivityConfig, bootstrap_mean, run, spearman
from depthlens.infra.errors import NonFiniteError, UsageError
from depthlens.judges.seam import refusal_token_ids
from depthlens.models import load_model


def fragile_tiny():
    """tiny-llama whose layer 1 alone writes the refusal (through one MLP unit) and whose
    layer 0 is drowned out: perturbing layer 1 must hurt the refusal score, layer 0 must not."""
    m = load_model("tiny-llama")
    hf = m.hf
    r0 = refusal_token_ids(m.tokenizer)[0]
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        e = torch.randn(m.d_model, generator=g)
        e = e / e.norm()
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone() * 4, requires_grad=False)
        hf.model.embed_tokens.weight += 20 * e          # every token's stream ≈ the same big vector
        u = hf.lm_head.weight[r0] / hf.lm_head.weight[r0].norm()
        mlp = hf.model.layers[1].mlp
        n_ff = mlp.gate_proj.weight.shape[0]
        mlp.gate_proj.weight.copy_(torch.outer(torch.ones(n_ff), e) * 3)
        mlp.up_proj.weight.copy_(torch.outer(torch.ones(n_ff), e) * 3)
        mlp.down_proj.weight.copy_(torch.outer(u, torch.ones(n_ff)) * 2.0)
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fragile_layer_ranks_first_and_a_drowned_layer_scores_zero(tmp_path, seed):
    cfg = SensitivityConfig(model="tiny-llama", kinds=("param_noise", "act_noise"), param_sigma=0.3,
                            act_sigma=0.5, seeds=2, n_harmful=6, n_harmless=3, utility_tokens=8, top_k=1,
                            zo_probe=False, n_boot=100, seed=seed, out=str(tmp_path))
    rec = run(cfg, model=fragile_tiny())
    ranking = rec.tables["ranking"]
    assert ranking[0]["layer"] == 1 and rec.metrics["critical_layers"][0]["layer"] == 1
    layer0 = next(r for r in ranking if r["layer"] == 0)
    assert abs(layer0["param_noise"]) < 1e-6
    assert ranking[0]["param_noise"] > 0 and ranking[0]["act_noise"] > 0
    # the fragile layer is in the top 1 on (nearly) every resample of the prompts, and its score's interval holds it
    crit = rec.metrics["critical_layers"][0]
    assert crit["p_top_k"] >= 0.9 and crit["score_lo"] <= crit["score"] <= crit["score_hi"]
    assert sum(r["p_top_k"] for r in ranking) == pytest.approx(1.0)  # each resample has exactly one top layer


def test_weights_are_untouched_by_the_sweep(tmp_path):
    m = load_model("tiny-llama")
    before = {k: v.clone() for k, v in m.hf.state_dict().items()}
    rec = run(SensitivityConfig(model="tiny-llama", quick=True, out=str(tmp_path), kinds=("param_noise", "int4", "act_noise")), model=m)
    assert all(torch.equal(v, m.hf.state_dict()[k]) for k, v in before.items())
    assert {r["kind"] for r in rec.tables["sensitivity"]} == {"param_noise", "int4", "act_noise"}
    assert {r["layer"] for r in rec.tables["whole_model"]} == {"all"}
    assert set(rec.tables["ranking"][0]) >= {"rank", "layer", "mean_sensitivity", "zo_probe"}


def test_helpers():
    mean, lo, hi = bootstrap_mean([1.0, 2.0, 3.0, 4.0], 500, 0)
    assert mean == 2.5 and lo < mean < hi
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None   # not measured, not NaN


def test_the_ranking_weighs_kinds_equally_not_by_their_scale():
    from analyses.layer_sensitivity import rank_layers

    # layer 0 is the most sensitive to the large-scale kind, layer 1 to both small-scale kinds
    rows = [{"layer": 0, "kind": "act_noise", "sensitivity": 8.0}, {"layer": 1, "kind": "act_noise", "sensitivity": 6.0},
            {"layer": 0, "kind": "int4", "sensitivity": 0.0}, {"layer": 1, "kind": "int4", "sensitivity": 0.4},
            {"layer": 0, "kind": "param_noise", "sensitivity": 0.1}, {"layer": 1, "kind": "param_noise", "sensitivity": 0.5}]
    ranking = rank_layers(rows, [0, 1])
    assert [r["layer"] for r in ranking] == [1, 0]
    assert ranking[0]["score"] == pytest.approx((6 / 8 + 1 + 1) / 3)
    assert ranking[1]["mean_sensitivity"] > ranking[0]["mean_sensitivity"]  # the raw mean would invert it


def test_seed_counts_per_kind_and_bad_settings(tmp_path):
    cfg = SensitivityConfig(model="tiny-llama", kinds=("param_noise", "act_noise", "int4"), seeds=3, act_seeds=2,
                            n_harmful=4, n_harmless=2, utility_tokens=4, layers=(0,), zo_probe=False, n_boot=50,
                            out=str(tmp_path))
    rec = run(cfg)
    n = {r["kind"]: r["n_seeds"] for r in rec.tables["sensitivity"]}
    assert n == {"param_noise": 3, "act_noise": 2, "int4": 1}
    assert rec.metrics["n_evaluations"] == 2 * (3 + 2 + 1)  # layer 0 and the whole model
    with pytest.raises(UsageError, match="--act-seeds must be an integer >= 1, got 0"):
        SensitivityConfig(act_seeds=0)


def test_a_nan_sensitivity_fails_the_ranking_instead_of_ranking_as_zero():
    from analyses.layer_sensitivity import rank_layers

    rows = [{"layer": 0, "kind": "int4", "sensitivity": float("nan")}, {"layer": 1, "kind": "int4", "sensitivity": 0.2}]
    with pytest.raises(NonFiniteError, match="layer 0 int4"):
        rank_layers(rows, [0, 1])


def test_ranking_uncertainty_separates_a_consistent_layer_from_noisy_ties():
    import numpy as np

    from analyses.layer_sensitivity import normalized_scores, rank_layers, ranking_uncertainty

    rng = np.random.default_rng(0)
    n = 40
    # layer 0: a large drop on every prompt; layers 1-3: the same mean drop, noisy per prompt (a three-way tie)
    per_prompt = {"act_noise": np.stack([np.full(n, 5.0) + rng.normal(0, 0.1, n),
                                         *[1.0 + rng.normal(0, 2.0, n) for _ in range(3)]]),
                  "int4": np.stack([np.full(n, 0.5), *[0.1 + rng.normal(0, 0.2, n) for _ in range(3)]])}
    layers = [0, 1, 2, 3]
    u = ranking_uncertainty(per_prompt, layers, top_k=2, n_boot=1000, seed=0)
    assert u[0]["p_top_k"] == 1.0
    tied = [u[l]["p_top_k"] for l in (1, 2, 3)]
    assert sum(tied) == pytest.approx(1.0) and max(tied) < 0.9  # one slot shared among the three
    # the normalized score of the means is rank_layers' score
    rows = [{"layer": l, "kind": k, "sensitivity": float(v[i].mean())} for k, v in per_prompt.items()
            for i, l in enumerate(layers)]
    point = normalized_scores({k: v.mean(axis=1) for k, v in per_prompt.items()})
    assert [r["score"] for r in sorted(rank_layers(rows, layers), key=lambda r: r["layer"])] == pytest.approx(point)
    for l in layers:
        assert u[l]["score_lo"] <= point[l] <= u[l]["score_hi"]
