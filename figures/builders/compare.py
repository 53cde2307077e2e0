"""Figures of ``analyses.compare``: every model side by side on the toolkit's safety measures.

- ``rates``: refusal rates, ASR (no prefill, prefill k, random/worst insertion) and refusal
  under whole-model perturbations — one bar group per measure, one bar per model;
- ``scores``: mean refusal score (log-odds) under the perturbations, and harmless
  cross-entropy (nats), the utility cost.

The builder reads only the record's ``tables.table`` rows (measure, label, better, one
value per model) and ``metrics.models``.

    >>> from figures.registry import build_figures, load_record
    >>> build_figures(load_record("results/compare/<tag>/<run>/results.json"), "figures/out")
"""

from __future__ import annotations

from figures.plots import grouped_bars
from figures.registry import register

_SCALE_MEASURES = ("harmless_ce",)


def _value(v) -> float:
    return float("nan") if v is None else float(v)


def _bars(rows: list[dict], models: list[str], ylabel: str, title: str):
    labels = [f"{r['label']} ({'↑' if r['better'] == 'higher' else '↓'})" for r in rows]
    series = {m: [_value(r.get(m)) for r in rows] for m in models}
    return grouped_bars(labels, series, xlabel="measure (arrow: better direction)", ylabel=ylabel, title=title,
                        width="double")


@register("compare")
def compare_figures(record: dict) -> dict:
    rows = record["tables"]["table"]
    models = list(record["metrics"]["models"])
    rates = [r for r in rows if not r["measure"].startswith("score_") and r["measure"] not in _SCALE_MEASURES]
    scores = [r for r in rows if r["measure"].startswith("score_") or r["measure"] in _SCALE_MEASURES]
    figs = {}
    if rates:
        figs["rates"] = _bars(rates, models, "share of prompts (AUROC: area)", "Refusal, attacks and perturbations")
    if scores:
        figs["scores"] = _bars(scores, models, "refusal score (log-odds) / CE (nats)",
                               "Refusal score under perturbation, and utility")
    return figs
