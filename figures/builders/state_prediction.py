"""Figure of ``analyses.state_prediction``: probe AUROC by layer against its baselines.

One panel per feature site (last inserted token, token before the insertion, span mean):
the probe's AUROC per layer with its prompt-bootstrap 95 % band, the refusal-direction
projection with its band, and the other baselines as lines (shuffled labels, random
directions, surface features — flat, it has no layer) and chance (dotted). An undetermined
run (degenerate labels) gets a figure that says why instead of empty axes.

    >>> from figures.registry import build_figures, load_record  # reads a results file of a run  # doctest: +SKIP
    >>> build_figures(load_record("results/state_prediction/<tag>/<run>/results.json"), "figures/out")  # doctest: +SKIP
"""

from __future__ import annotations

import plotly.graph_objects as go

from figures.plots import small_multiples
from figures.registry import register
from figures.theme import apply_theme

_SITE_TITLES = {"last_inserted": "last inserted token", "before_insertion": "token before the insertion",
                "span_mean": "mean over the inserted span"}
_SERIES = (("probe", "probe", True), ("direction_projection", "refusal-direction projection", True),
           ("random_directions", "random directions", False), ("shuffled", "shuffled labels", False))


def _undetermined(record: dict) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=record["metrics"].get("verdict_sentence", "undetermined"), showarrow=False,
                       x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    apply_theme(fig, width="double")
    fig.update_layout(title_text="State prediction: undetermined")
    return fig


@register("state_prediction")
def state_prediction_figures(record: dict) -> dict:
    rows = record["tables"].get("auroc") or []
    if not rows:
        return {"auroc": _undetermined(record)}
    sites = list(dict.fromkeys(r["site"] for r in rows))
    layers = sorted({r["layer"] for r in rows if r["kind"] == "probe"})
    panels = {}
    for site in sites:
        here = [r for r in rows if r["site"] == site]
        series = {}
        for kind, label, band in _SERIES:
            by_layer = {r["layer"]: r for r in here if r["kind"] == kind}
            if not by_layer:
                continue
            mean = [by_layer[l]["auroc"] if l in by_layer else None for l in layers]
            if band:
                series[label] = (mean, [by_layer.get(l, {}).get("lo") for l in layers],
                                 [by_layer.get(l, {}).get("hi") for l in layers])
            else:
                series[label] = mean
        surface = [r for r in here if r["kind"] == "surface"]
        if surface:
            series["surface features"] = [surface[0]["auroc"]] * len(layers)
        panels[_SITE_TITLES.get(site, site)] = series
    m = record["metrics"]
    verdict = {"beats_baseline": "beats the best baseline",
               "does_not_beat_baseline": "does not beat the best baseline"}.get(m.get("verdict"), m.get("verdict"))
    fig = small_multiples(layers, panels, xlabel="layer", ylabel="AUROC (95% CI)", cols=min(3, len(panels)),
                          shared_yaxes=True, markers=True,
                          title="Recovery after insertion from the residual stream (docs/methods.md §6): "
                                f"best probe {verdict}")
    fig.add_hline(y=0.5, line_dash="dot", line_color="grey", row="all", col="all")
    return {"auroc": fig}
