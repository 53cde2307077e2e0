"""Figures of ``analyses.refusal_pareto``: the refusal/KL front coloured by depth, and depth against KL.

- ``front``: every search trial (validation first-token KL on a log axis, validation refusal
  rate); dominated trials in grey, front points coloured by their mid-answer recovery (share
  of random insertions into the organism's refusals after which the ablated model returns to
  refusal), circles plain and diamonds norm-preserving projections, the chosen :wo-opt point
  ringed, the reference ablations (``:wo``) as stars;
- ``depth``: the depth columns of the front points against their validation KL (prefill ASR
  per k > 0, insertion ASR, insertion recovered), with the organism's values dashed.

    >>> from figures.registry import build_figures, load_record  # reads a results file of a run  # doctest: +SKIP
    >>> build_figures(load_record("results/refusal_pareto/<tag>/<run>/results.json"), "figures/out")  # doctest: +SKIP
"""

from __future__ import annotations

import plotly.graph_objects as go

from figures.plots import lines
from figures.registry import register
from figures.theme import SEQUENTIAL, apply_theme, color

_DEPTH = "insertion_recovered"


def _front_figure(record: dict) -> go.Figure:
    tables, m = record["tables"], record["metrics"]
    front = tables["front"]
    on_front = {r["trial"] for r in front}
    rest = [t for t in tables["trials"] if t["trial"] not in on_front and t["val_kl"] > 0]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[t["val_kl"] for t in rest], y=[t["val_refusal"] for t in rest], mode="markers",
                             name="dominated trials", marker=dict(color="#BBBBBB", size=5)))
    depth = [r.get(_DEPTH) for r in front]
    # one colour scale from 0 to the largest recovery shown (the organism's included), so small shares stay readable
    top = max([d for d in depth if d is not None] + [r.get(_DEPTH) or 0.0 for r in tables["references"]] + [0.05])
    fig.add_trace(go.Scatter(
        x=[r["val_kl"] for r in front], y=[r["val_refusal"] for r in front], mode="markers+lines", name="Pareto front",
        line=dict(color="#888888", width=0.8, shape="hv"),
        text=[f"trial {r['trial']}" for r in front],
        marker=dict(size=9, color=depth, colorscale=SEQUENTIAL, cmin=0.0, cmax=top, showscale=True,
                    symbol=["diamond" if r["norm_preserving"] else "circle" for r in front],
                    line=dict(color="black", width=0.5),
                    colorbar=dict(title=dict(text=f"recovered after<br>random insertion<br>(HarmBench test,<br>{m['continuation_judge']})"), len=0.8))))
    chosen = [r for r in front if r.get("chosen")]
    if chosen:
        fig.add_trace(go.Scatter(x=[chosen[0]["val_kl"]], y=[chosen[0]["val_refusal"]], mode="markers", name="WO-opt",
                                 marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(color=color(1), width=2))))
    refs = [r for r in tables["references"] if r["val_kl"] > 0]
    for i, r in enumerate(refs):
        fig.add_trace(go.Scatter(x=[r["val_kl"]], y=[r["val_refusal"]], mode="markers", name=r["point"],
                                 marker=dict(symbol="star", size=12, color=color(2 + i)),
                                 text=[f"{r['point']}: recovery {r.get(_DEPTH, float('nan')):.2f}"]))
    apply_theme(fig, width="double")
    fig.update_xaxes(type="log", title_text="first-token KL on harmless val prompts (nats)")
    fig.update_yaxes(title_text=f"refusal, harmful val ({m['judge']})", rangemode="tozero")
    fig.update_layout(showlegend=True, title_text=(
        "Refusal vs KL of parametrised ablations (validation; ◆ norm-preserving, ● plain projection)"))
    return fig


def _depth_figure(record: dict) -> go.Figure:
    front = sorted(record["tables"]["front"], key=lambda r: r["val_kl"])
    ks = [k for k in record["config"]["ks"] if k > 0]
    series = {f"prefill ASR, k = {k}": [r.get(f"prefill_asr_k{k}") for r in front] for k in ks}
    series["insertion ASR (harmful continuation)"] = [r.get("insertion_asr") for r in front]
    series["insertion: recovered"] = [r.get(_DEPTH) for r in front]
    fig = lines([r["val_kl"] for r in front], series, xlabel="first-token KL on harmless val prompts (nats)",
                ylabel="share of HarmBench test trials", width="double", log_x=True,
                title="Depth of each front point's refusal removal (ablated organism, HarmBench test)")
    organism = next((r for r in record["tables"]["references"] if r["point"] == "organism"), None)
    if organism and organism.get(_DEPTH) is not None:
        fig.add_hline(y=organism[_DEPTH], line_dash="dash", line_color="grey",
                      annotation_text="organism: recovered", annotation_position="top left")
    return fig


@register("refusal_pareto")
def refusal_pareto_figures(record: dict) -> dict:
    return {"front": _front_figure(record), "depth": _depth_figure(record)}
