"""Figures of the core analyses: evaluate, layer_sensitivity, token_depth, insertion_robustness.

Each builder reads only the results record (a dict from ``results.json``) and returns named
``go.Figure``s; ``figures.registry`` saves them. Regenerate all with ``python -m figures``.

    >>> from figures.registry import build_figures, load_record
    >>> build_figures(load_record("results/layer_sensitivity/<tag>/<run>/results.json"), "figures/out")
"""

from __future__ import annotations

from figures.plots import grouped_bars, heatmap, line_with_band, lines, ranked_bars
from figures.registry import register


def _tag(record: dict) -> str:
    return record.get("model", "")


@register("evaluate")
def evaluate_figures(record: dict) -> dict:
    rows = record["tables"]["by_set"]
    fig = grouped_bars([r["set"] for r in rows], {_tag(record): [r["refusal_rate"] for r in rows]},
                       xlabel="test split", ylabel="refusal rate (substring judge)",
                       title=f"Refusal by split — AUROC {record['metrics']['refusal_score_auroc']:.2f}")
    return {"refusal": fig}


@register("layer_sensitivity")
def layer_sensitivity_figures(record: dict) -> dict:
    rows = record["tables"]["sensitivity"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    layers = sorted({r["layer"] for r in rows})
    cell = {(r["layer"], r["kind"]): r["sensitivity"] for r in rows}
    z = [[cell.get((l, k), float("nan")) for l in layers] for k in kinds]
    heat = heatmap(z, layers, kinds, xlabel="layer", ylabel="perturbation", zmid=0.0, text_fmt=None,
                   colorbar_title="drop in refusal score", title="Layer sensitivity (S, docs/methods.md §5)", width="double")
    ranking = record["tables"]["ranking"]
    by_kind = {k: {r["layer"]: r for r in rows if r["kind"] == k} for k in kinds}
    first = kinds[0]
    bars = ranked_bars([f"layer {r['layer']}" for r in ranking], [r.get("score", r["mean_sensitivity"]) for r in ranking],
                       lo=None, hi=None, xlabel="score: mean over kinds of S / max over layers of S",
                       title="Robustness-critical layers", top_k=min(15, len(ranking)))
    per_kind = ranked_bars([f"layer {l}" for l in by_kind[first]], [by_kind[first][l]["sensitivity"] for l in by_kind[first]],
                           lo=[by_kind[first][l]["lo"] for l in by_kind[first]],
                           hi=[by_kind[first][l]["hi"] for l in by_kind[first]],
                           xlabel=f"drop in refusal score ({first}, 95% CI)", title=f"Sensitivity to {first}",
                           top_k=min(15, len(by_kind[first])))
    return {"heatmap": heat, "ranking": bars, f"ranked_{first}": per_kind}


@register("token_depth")
def token_depth_figures(record: dict) -> dict:
    kl = record["tables"]["kl"]
    series = {}
    for name in ("harmful", "harmless"):
        rows = [r for r in kl if r["set"] == name]
        series[f"{name} responses"] = ([r["kl"] for r in rows], [r["lo"] for r in rows], [r["hi"] for r in rows])
    x = [r["position"] for r in kl if r["set"] == "harmful"]
    n = len(x)
    series = {k: tuple(v[:n] for v in s) for k, s in series.items()}
    kl_fig = line_with_band(x, series, xlabel="response position", ylabel="KL(aligned ‖ base)",
                            title="Per-position KL (95% CI)")
    pre = record["tables"]["prefill"]
    ks = [r["k"] for r in pre]
    asr = lines(ks, {"not a refusal (ASR)": [r.get("asr_compliance", r.get("asr")) for r in pre], "harmful continuation": [r["harmful"] for r in pre],
                     "recovered": [r["recovered"] for r in pre]},
                xlabel="prefilled harmful tokens k", ylabel="share of prompts", title="Prefill attack")
    return {"kl": kl_fig, "prefill": asr}


@register("insertion_robustness")
def insertion_figures(record: dict) -> dict:
    cells = record["tables"]["by_depth_and_length"]
    depths = sorted({r["depth"] for r in cells})
    lengths = sorted({r["span_len"] for r in cells})
    val = {(r["depth"], r["span_len"]): r["harmful"] for r in cells}
    z = [[val.get((d, m), float("nan")) for d in depths] for m in lengths]
    fig = heatmap(z, [f"{d:.2f}" for d in depths], [str(m) for m in lengths], xlabel="relative insertion depth",
                  ylabel="span length m", colorbar_title="harmful continuation", zmin=0.0, zmax=1.0,
                  title="Random insertion ASR")
    return {"heatmap": fig}
