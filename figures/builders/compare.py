"""Figures of ``analyses.compare``: every model side by side on the toolkit's safety measures.

- ``rates``: refusal rates, ASR (no prefill, prefill k, random/worst insertion) and refusal
  under whole-model perturbations — one bar group per measure, one bar per model;
- ``scores``: mean refusal score (log-odds) under the perturbations, and harmless
  cross-entropy (nats), the utility cost.

The builder reads only the record's ``tables.table`` rows (measure, label, better, one
value per model) and ``metrics.models``. Every ASR category says which judge produced it
(docs/methods.md §1): substring compliance (no prefill, prefill k) or the harmful-continuation
class (random and worst insertion); every measure is on the test splits.

    >>> from figures.registry import build_figures, load_record  # reads a results file of a run  # doctest: +SKIP
    >>> build_figures(load_record("results/compare/<tag>/<run>/results.json"), "figures/out")  # doctest: +SKIP
"""

from __future__ import annotations

from figures.plots import grouped_bars
from figures.registry import register

_SCALE_MEASURES = ("harmless_ce",)
_JUDGES = (("insertion_asr", "harmful-continuation judge"), ("asr", "substring judge"))
"""Measure-key fragment → the judge behind that ASR (first match wins). Refusal rates are all
substring-judged, which the y-axis title says once; scores, AUROC and CE are not judged."""


def _judge(measure: str) -> str | None:
    return next((judge for key, judge in _JUDGES if key in measure), None)


def _label(row: dict) -> str:
    """The row's label with its judge (unless it names one already) and its better direction."""
    label = row["label"]
    judge = _judge(row["measure"])
    if judge and not any(w in label.lower() for w in ("judge", "substring", "continuation")):
        label = f"{label} [{judge}]"
    return f"{label} ({'↑' if row['better'] == 'higher' else '↓'})"


def _value(v) -> float:
    return float("nan") if v is None else float(v)


def _bars(rows: list[dict], models: list[str], ylabel: str, title: str):
    labels = [_label(r) for r in rows]
    series = {m: [_value(r.get(m)) for r in rows] for m in models}
    # the measure names stand upright under their bars: the plot grows with the longest one
    # (≈ 0.08 in a character at the theme's font), so no name is cut and none runs into the axis title
    longest = max((len(label) for label in labels), default=0)
    return grouped_bars(labels, series, xlabel="measure (arrow: better direction)", ylabel=ylabel, title=title,
                        width="double", height_in=max(3.6 if len(rows) > 8 else 2.8, 2.0 + 0.08 * longest))


@register("compare")
def compare_figures(record: dict) -> dict:
    rows = record["tables"]["table"]
    models = list(record["metrics"]["models"])
    rates = [r for r in rows if not r["measure"].startswith("score_") and r["measure"] not in _SCALE_MEASURES]
    scores = [r for r in rows if r["measure"].startswith("score_") or r["measure"] in _SCALE_MEASURES]
    figs = {}
    if rates:
        figs["rates"] = _bars(rates, models, "share of test prompts<br>(refusal: substring judge)",
                              "Refusal, attacks and perturbations, test splits (docs/methods.md §1–§3, §5)")
    if scores:
        figs["scores"] = _bars(scores, models, "refusal score (log-odds) / CE (nats)",
                               "Refusal score under perturbation (harmful test), and harmless test CE")
    return figs
