"""Figures of a ``zo`` build: the per-step objective curve of MeZO (``finetune.zeroth_order``).

A ``zo`` build keeps its curve in the cache entry's ``recipe.json`` (``info.history``: every
step's L₊, L₋ and projected gradient g; ``info.evals``: the objective on fixed batches every
``eval_every`` steps). ``zo_record`` turns an entry into a record of analysis ``zo``, and the
builder draws

- ``objective``: (L₊ + L₋)/2 of every step (each on its own batch and noise draw, so noisy),
  its running mean over 5 % of the steps, and the fixed-batch evaluations (markers), which
  are comparable from step to step;
- ``projected_grad``: g of every step (MeZO's update is −η·g·z);
- ``fixed_batches``: the change since step 0 of the fixed-batch objective and of its safety and
  utility parts, on a scale of their own.

    $ python -m figures.builders.zo_curve ~/.cache/depthlens/organisms/<spec>-zo-<key> --out figures/out
    >>> build_figures(zo_record(entry), "figures/out")  # reads a recipe's cache entry  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

from figures.registry import SCHEMA_VERSION, build_figures, register
from figures.theme import apply_theme, color


def zo_record(entry: str | Path) -> dict:
    """A results-style record (analysis ``zo``) of the build in cache entry ``entry`` (or its recipe.json)."""
    path = Path(entry)
    path = path / "recipe.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"No recipe.json at {str(path)!r}; pass a zo cache entry (organisms/<spec>-<key>).")
    meta = json.loads(path.read_text())
    step = meta["chain"][-1]
    if step.get("recipe") != "zo" or "history" not in meta.get("info", {}):
        raise ValueError(f"{str(path)!r} is a {step.get('recipe')!r} build, not a zo build with a step history.")
    info = meta["info"]
    provenance = path.parent / "depthlens.json"  # depthlens.models.checkpoint's provenance file: the spec
    spec = json.loads(provenance.read_text()).get("spec") if provenance.exists() else path.parent.name
    return {"schema_version": SCHEMA_VERSION, "analysis": "zo", "run_id": step["key"][:16], "model": spec,
            "config": step["config"],
            "metrics": {k: info.get(k) for k in ("layers", "subspace", "lr", "eps", "n_weights", "steps", "seconds")},
            "tables": {"steps": info["history"], "evals": info.get("evals", [])}}


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@register("zo")
def zo_curve_figures(record: dict) -> dict:
    steps, evals = record["tables"]["steps"], record["tables"].get("evals") or []
    m = record.get("metrics", {})
    what = (f"{m.get('subspace') or 'full'} subspace of layers {m.get('layers')}, lr {m.get('lr')}, ε {m.get('eps')}"
            if m.get("layers") is not None else "")
    x = [r["step"] + 1 for r in steps]
    mid = [0.5 * (r["loss_plus"] + r["loss_minus"]) for r in steps]
    window = max(1, len(steps) // 20)
    obj = go.Figure()
    obj.add_trace(go.Scatter(x=x, y=mid, name="(L₊ + L₋)/2, step's batch", mode="lines",
                             line=dict(color=color(0), width=0.6), opacity=0.45))
    obj.add_trace(go.Scatter(x=x, y=_running_mean(mid, window), name=f"running mean ({window} steps)", mode="lines",
                             line=dict(color=color(0))))
    if evals:
        obj.add_trace(go.Scatter(x=[e["step"] for e in evals], y=[e["objective"] for e in evals],
                                 name="objective, fixed batches", mode="lines+markers", line=dict(color=color(1))))
    step_title = f"MeZO step ({what})" if what else "MeZO step"  # the settings go under the axis: a title never wraps
    apply_theme(obj, width="double")
    obj.update_layout(title_text=f"MeZO objective of {record['model']}")
    obj.update_xaxes(title_text=step_title)
    obj.update_yaxes(title_text="safety NLL under noise + λ·utility NLL")
    grad = go.Figure(go.Scatter(x=x, y=[r["projected_grad"] for r in steps], mode="markers",
                                marker=dict(color=color(2), size=3), name="g"))
    apply_theme(grad, width="double")
    grad.update_layout(title_text=f"MeZO projected gradient g = (L₊ − L₋)/2ε of {record['model']}", showlegend=False)
    grad.update_xaxes(title_text=step_title)
    grad.update_yaxes(title_text="g")
    figs = {"objective": obj, "projected_grad": grad}
    if evals:  # the fixed-batch objective on its own scale: its change is far below the per-step spread
        fixed = go.Figure()
        for i, (key, name) in enumerate((("objective", "objective"), ("safety", "safety NLL under noise"),
                                         ("utility", "utility NLL"))):
            if all(key in e for e in evals):
                fixed.add_trace(go.Scatter(x=[e["step"] for e in evals], y=[e[key] - evals[0][key] for e in evals],
                                           name=name, mode="lines+markers", line=dict(color=color(i + 1)),
                                           marker=dict(size=4)))
        apply_theme(fixed, width="double")
        fixed.update_layout(title_text=f"MeZO objective on the fixed evaluation batches, {record['model']}")
        fixed.update_xaxes(title_text=step_title)
        fixed.update_yaxes(title_text="change since step 0 (nats)")
        figs["fixed_batches"] = fixed
    return figs


def main(argv: Sequence[str] | None = None) -> list:
    """``python -m figures.builders.zo_curve ENTRY [--out DIR]``: the curve figures of one zo build."""
    parser = argparse.ArgumentParser(prog="python -m figures.builders.zo_curve", description=main.__doc__)
    parser.add_argument("entry", help="a zo cache entry (organisms/<spec>-zo-<key>) or its recipe.json")
    parser.add_argument("--out", default="figures/out", help="output folder (default: figures/out)")
    args = parser.parse_args(argv)
    saved = build_figures(zo_record(args.entry), args.out)
    for s in saved:
        print(s)
    return saved


if __name__ == "__main__":
    main()
