"""Figures of ``analyses.refusal_direction``: the direction-selection diagnostics and WO vs JT.

- ``bypass``, ``induce``, ``kl``: Arditi et al.'s three diagnostic plots — each candidate's
  score against the layer its difference in means comes from, one line per template position,
  with the selection threshold (dashed) and the chosen candidate (star);
- ``safety``: harmful refusal, ASR and borderline over-refusal on the test splits per model;
- ``capability``: first-token KL(organism ‖ model) on harmless prompts and harmless CE per model.

    >>> from figures.registry import build_figures, load_record  # reads a results file of a run  # doctest: +SKIP
    >>> build_figures(load_record("results/refusal_direction/<tag>/<run>/results.json"), "figures/out")  # doctest: +SKIP
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from figures.plots import grouped_bars, lines
from figures.registry import register
from figures.theme import color

_SCORES = {
    "bypass": ("refusal score (harmful val, ablated)", "Bypass score (lower removes refusal)"),
    "induce": ("refusal score (harmless val, +r)", "Induce score (≥ threshold kept)"),
    "kl": ("first-token KL (harmless val, ablated)", "KL score (≤ threshold kept)"),
}


def _score_figure(record: dict, metric: str) -> go.Figure:
    scores = record["tables"]["direction_scores"]
    positions = sorted({r["position"] for r in scores})
    layers = sorted({r["layer"] for r in scores})
    cell = {(r["position"], r["layer"]): r[metric] for r in scores}
    series = {f"position {p}": [cell.get((p, l)) for l in layers] for p in positions}
    ylabel, title = _SCORES[metric]
    fig = lines(layers, series, xlabel="layer of the candidate direction", ylabel=ylabel, title=title)
    if len(layers) <= 12:
        fig.update_xaxes(dtick=1)
    d = record["metrics"]["direction"]
    sel = d.get("selection_config", {})
    if metric == "bypass":
        fig.add_hline(y=d["baseline_harmful_score"], line_dash="dash", line_color="grey",
                      annotation_text="no intervention", annotation_position="top left")
    elif metric == "induce" and sel.get("induce_threshold") is not None:
        fig.add_hline(y=sel["induce_threshold"], line_dash="dash", line_color="grey", annotation_text="threshold")
    elif metric == "kl":
        fig.update_yaxes(type="log")  # KL spans ~0.05–10: the threshold region is unreadable on a linear axis
        if sel.get("kl_threshold"):
            fig.add_hline(y=sel["kl_threshold"], line_dash="dash", line_color="grey")
            # add_hline's own annotation lands at y = threshold in log10 units on a log axis
            fig.add_annotation(x=0, xref="paper", y=math.log10(sel["kl_threshold"]), yref="y", text="threshold",
                               showarrow=False, xanchor="left", yanchor="bottom")
    chosen = cell.get((d["position"], d["layer"]))
    if chosen is not None:
        fig.add_trace(go.Scatter(x=[d["layer"]], y=[chosen], mode="markers", name="selected",
                                 marker=dict(symbol="star", size=12, color=color(len(positions)))))
        fig.update_layout(showlegend=True)
    return fig


@register("refusal_direction")
def refusal_direction_figures(record: dict) -> dict:
    figs = {metric: _score_figure(record, metric) for metric in _SCORES}
    rows = record["tables"]["side_by_side"]
    models = [r["model"] for r in rows]
    judge = record["metrics"]["judge"]
    figs["safety"] = grouped_bars(
        models, {"harmful refusal": [r["harmful_refusal"] for r in rows],
                 f"ASR ({judge} judge)": [r.get("asr_compliance", r.get("asr")) for r in rows],
                 "borderline over-refusal": [r["borderline_refusal"] for r in rows]},
        xlabel="model", ylabel=f"share of test prompts ({judge} judge)",
        title="Refusal, ASR and over-refusal on the test splits (docs/methods.md §4)", width="double")
    figs["capability"] = grouped_bars(
        models, {"first-token KL vs organism": [r["first_token_kl"] for r in rows],
                 "harmless CE": [r["harmless_ce"] for r in rows]},
        xlabel="model", ylabel="nats",
        title="Capability: first-token KL and CE on harmless test prompts (docs/methods.md §4)", width="double")
    return figs
