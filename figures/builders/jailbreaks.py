"""Figures of ``analyses.jailbreaks``: the battery's headline ASRs and one figure per attack.

- ``battery``: each attack's ASR (and "any setting/variant succeeds") with its 95 % prompt-level interval;
- ``<attack>``: that attack's ASR per setting (decoding setting, template id, tense, suffix …).

Every ASR is the "harmful" class of the judge the record names (``metrics.judge``), on the axis title.

    >>> from figures.registry import build_figures, load_record  # reads a results file of a run  # doctest: +SKIP
    >>> build_figures(load_record("results/jailbreaks/<model>/<run>/results.json"), "figures/out")  # doctest: +SKIP
"""

from __future__ import annotations

from figures.plots import grouped_bars
from figures.registry import register


def _bars(rows: list[dict], label_key: str, model: str, judge: str, title: str):
    rows = [r for r in rows if r.get("asr") is not None]
    labels = [str(r[label_key]) for r in rows]
    vals = [float(r["asr"]) for r in rows]
    lo = [float(r["asr_lo"]) for r in rows]
    hi = [float(r["asr_hi"]) for r in rows]
    longest = max((len(s) for s in labels), default=0)
    return grouped_bars(labels, {model: vals}, xlabel="", ylabel=f"ASR, harmful class ({judge})", title=title,
                        errors={model: (lo, hi)}, width="double", height_in=max(2.8, 2.0 + 0.07 * longest))


@register("jailbreaks")
def jailbreak_figures(record: dict) -> dict:
    judge, model = record["metrics"]["judge"], record["model"]
    figs = {"battery": _bars(record["tables"]["attacks"], "attack", model, judge,
                             f"jailbreak battery on {model} (95% intervals over prompts)")}
    settings = record["tables"]["settings"]
    for attack in dict.fromkeys(r["attack"] for r in settings):
        rows = [r for r in settings if r["attack"] == attack]
        figs[attack.replace("-", "_")] = _bars(rows, "setting", model, judge, f"{attack} on {model}, by setting")
    return figs
