"""Figures of ``analyses.layer_ablation``: layer × intervention heat maps of the two effects.

- ``delta_asr``: change in insertion ASR (share of harmful continuations) on the fixed trial
  subset, ablated − baseline;
- ``delta_refusal_score``: change in the mean refusal score on harmful validation prompts.

Both diverge from 0 (no effect); cells that were not run (a zero refusal direction) are blank.

    >>> from figures.registry import build_figures, load_record  # reads a results file of a run  # doctest: +SKIP
    >>> build_figures(load_record("results/layer_ablation/<tag>/<run>/results.json"), "figures/out")  # doctest: +SKIP
"""

from __future__ import annotations

from figures.plots import heatmap
from figures.registry import register

_LABELS = {"zero_attn": "attn out = 0", "mean_attn": "attn out = mean", "zero_mlp": "MLP out = 0",
           "mean_mlp": "MLP out = mean", "direction": "refusal dir. ablated"}


@register("layer_ablation")
def layer_ablation_figures(record: dict) -> dict:
    rows = record["tables"]["effects"]
    layers = sorted({r["layer"] for r in rows})
    kinds = list(dict.fromkeys(r["intervention"] for r in rows))
    base = record["metrics"]["baseline"]
    base_asr = base.get("asr_harmful", base.get("asr"))   # "asr" in records written before the key named its judge
    figs = {}
    for key, name, label, what in (
            ("delta_asr_harmful", "delta_asr", "Δ ASR (harmful continuation)",
             f"Δ insertion ASR, harmful-continuation judge, HarmBench test trials (baseline {base_asr:.2f})"),
            ("delta_score", "delta_refusal_score", "Δ mean refusal score",
             f"Δ mean refusal score on harmful val prompts (baseline {base['refusal_score']:.2f})")):
        cell = {(r["layer"], r["intervention"]): r.get(key, r.get(key.removesuffix("_harmful"))) for r in rows}
        z = [[cell.get((l, k)) for l in layers] for k in kinds]
        figs[name] = heatmap(z, layers, [_LABELS.get(k, k) for k in kinds], xlabel="layer", ylabel="intervention",
                             colorbar_title=label, zmid=0.0, text_fmt=".2f" if len(layers) <= 16 else None,
                             title=f"Per-layer ablation: {what}", width="double")
    return figs
