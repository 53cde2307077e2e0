"""Figures of the core analyses: evaluate, layer_sensitivity, token_depth, insertion_robustness.

Each builder reads only the results record (a dict from ``results.json``) and returns named
``go.Figure``s; ``figures.registry`` saves them. Regenerate all with ``python -m figures``.
Every ASR names the judge behind it (substring compliance vs the harmful-continuation class,
docs/methods.md §1) and every figure names the prompt split it was computed on; curves over
prompts carry the 95% intervals the record holds.

    >>> from figures.registry import build_figures, load_record  # reads a results file of a run  # doctest: +SKIP
    >>> build_figures(load_record("results/layer_sensitivity/<tag>/<run>/results.json"), "figures/out")  # doctest: +SKIP
"""

from __future__ import annotations

from figures.plots import grouped_bars, heatmap, heatmap_rows, line_with_band, ranked_bars, small_multiples
from figures.registry import register

SUBSTRING = "substring-v1"
CONTINUATION = "substring+topic-overlap-v1"
KIND_NAMES = {"param_noise": "parameter noise", "act_noise": "activation noise", "int4": "int4 weights",
              "int8": "int8 weights"}
SIGMA_NAMES = {"param_noise": "σ·rms(W)", "act_noise": "σ·rms(x)"}


def _tag(record: dict) -> str:
    return record.get("model", "")


def split_label(record: dict, harmful: bool = True) -> str:
    """The prompt set a record was computed on, as a figure can name it ("HarmBench test", …)."""
    cfg = record.get("config") or {}
    own = cfg.get("harmful") if harmful else None
    if own:  # the user's own prompt file
        return f"prompts from {own}"
    split = cfg.get("split", "test")
    if not harmful:
        return f"{split} split"
    return {"test": "HarmBench test", "val": "DoNotAnswer val"}.get(split, f"{split} split")


def _judges(record: dict) -> tuple[str, str]:
    """(substring judge id, continuation judge id) of an attack record, from its trials when present."""
    trials = (record.get("tables") or {}).get("trials") or [{}]
    m = record.get("metrics") or {}
    return (trials[0].get("judge") or m.get("judge") or SUBSTRING,
            trials[0].get("continuation_judge") or m.get("continuation_judge") or CONTINUATION)


def _band(rows: list[dict], key: str) -> tuple[list, list | None, list | None]:
    lo = [r.get(f"{key}_lo") for r in rows]
    hi = [r.get(f"{key}_hi") for r in rows]
    if any(v is None for v in lo + hi):
        return [r[key] for r in rows], None, None
    return [r[key] for r in rows], lo, hi


@register("evaluate")
def evaluate_figures(record: dict) -> dict:
    rows = record["tables"]["by_set"]
    split = (record.get("config") or {}).get("split", "test")
    judge = (record.get("metrics") or {}).get("judge", SUBSTRING)
    fig = grouped_bars([r["set"] for r in rows], {_tag(record): [r["refusal_rate"] for r in rows]},
                       xlabel=f"{split} split", ylabel=f"refusal rate ({judge} judge)",
                       title=f"Refusal by {split} split — refusal-score AUROC "
                             f"{record['metrics']['refusal_score_auroc']:.2f}")
    return {"refusal": fig}


@register("layer_sensitivity")
def layer_sensitivity_figures(record: dict) -> dict:
    """One heat-map strip per perturbation kind, each on its own colour scale, plus the rankings.

    The kinds differ by an order of magnitude (one layer's activation noise moves the refusal
    score by several units, int4 by tenths), so one shared scale would leave all but one row
    blank; the ranking uses the same per-kind normalization (``analyses.layer_sensitivity.rank_layers``).
    """
    rows = record["tables"]["sensitivity"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    layers = sorted({r["layer"] for r in rows})
    cell = {(r["layer"], r["kind"]): r for r in rows}
    whole = {r["kind"]: r for r in record["tables"].get("whole_model") or []}
    n = (record.get("metrics") or {}).get("n_harmful")
    where = f"{n} harmful val prompts" if n else "harmful val prompts"

    def panel(kind: str) -> str:
        sigma = next((cell[(l, kind)].get("sigma") for l in layers if (l, kind) in cell), None)
        name = KIND_NAMES.get(kind, kind)
        if kind in SIGMA_NAMES and sigma:
            name += f", {SIGMA_NAMES[kind]} with σ = {sigma:g}"
        if kind in whole:
            name += f" (whole model: {whole[kind]['sensitivity']:.2f})"
        return name

    strips = {panel(k): [cell[(l, k)]["sensitivity"] if (l, k) in cell else None for l in layers] for k in kinds}
    bands = {panel(k): ([cell.get((l, k), {}).get("lo") for l in layers], [cell.get((l, k), {}).get("hi") for l in layers])
             for k in kinds}
    heat = heatmap_rows(strips, layers, xlabel="layer", colorbar_title="S", zmid=0.0, intervals=bands,
                        title=f"Layer sensitivity S = drop in mean refusal score, one colour scale per row "
                              f"(docs/methods.md §5; {where})")
    figs = {"heatmap": heat}
    ranking = record["tables"]["ranking"]
    k = record.get("config", {}).get("top_k", 5)
    has_ci = all("score_lo" in r for r in ranking)  # records before the ranking bootstrap have no intervals
    figs["ranking"] = ranked_bars(
        [f"layer {r['layer']}" + (f" · P(top {k}) {r['p_top_k']:.2f}" if "p_top_k" in r else "") for r in ranking],
        [r.get("score", r["mean_sensitivity"]) for r in ranking],
        lo=[r["score_lo"] for r in ranking] if has_ci else None, hi=[r["score_hi"] for r in ranking] if has_ci else None,
        xlabel="score: mean over kinds of S / max over layers of S" + (" (95% prompt-bootstrap CI)" if has_ci else ""),
        title=f"Robustness-critical layers ({where})", top_k=min(15, len(ranking)))
    for kind in kinds:
        here = [cell[(l, kind)] for l in layers if (l, kind) in cell]
        figs[f"ranked_{kind}"] = ranked_bars(
            [f"layer {r['layer']}" for r in here], [r["sensitivity"] for r in here],
            lo=[r["lo"] for r in here], hi=[r["hi"] for r in here],
            xlabel="drop in mean refusal score S (95% bootstrap CI)",
            title=f"Sensitivity to {panel(kind)}", top_k=min(15, len(here)))
    return figs


@register("token_depth")
def token_depth_figures(record: dict) -> dict:
    kl = record["tables"]["kl"]
    harmful_set, harmless_set = split_label(record), split_label(record, harmful=False)
    labels = {"harmful": f"base's answers to {harmful_set}", "harmless": f"base's answers to harmless {harmless_set}"}
    x = [r["position"] for r in kl if r["set"] == "harmful"]
    series = {}
    for name in ("harmful", "harmless"):
        rows = [r for r in kl if r["set"] == name][: len(x)]
        if len(rows) == len(x):
            series[labels[name]] = ([r["kl"] for r in rows], [r["lo"] for r in rows], [r["hi"] for r in rows])
    kl_fig = line_with_band(x, series, xlabel="response position", ylabel="KL(aligned ‖ base), nats (95% bootstrap CI)",
                            title="Per-position KL (docs/methods.md §2)")
    pre = record["tables"]["prefill"]
    # records written before the ASR keys named their judge call substring compliance plain "asr"
    pre = [{**r, **{f"asr{s}": r.get(f"asr_compliance{s}", r.get(f"asr{s}")) for s in ("", "_lo", "_hi")}} for r in pre]
    substring, continuation = _judges(record)
    asr = line_with_band(
        [r["k"] for r in pre],
        {f"ASR: not a refusal, ≥ 5 words ({substring})": _band(pre, "asr"),
         f"harmful continuation ({continuation})": _band(pre, "harmful"),
         f"recovered ({continuation})": _band(pre, "recovered")},
        xlabel="prefilled harmful tokens k", ylabel=f"share of {harmful_set} prompts (95% CI)", markers=True,
        title="Prefill attack (docs/methods.md §2)", height_in=3.0)
    return {"kl": kl_fig, "prefill": asr}


@register("insertion_robustness")
def insertion_figures(record: dict) -> dict:
    cells = record["tables"]["by_depth_and_length"]
    depths = sorted({r["depth"] for r in cells})
    lengths = sorted({r["span_len"] for r in cells})
    val = {(r["depth"], r["span_len"]): r for r in cells}
    _, continuation = _judges(record)
    where = split_label(record)
    z = [[val[(d, m)]["harmful"] if (d, m) in val else float("nan") for d in depths] for m in lengths]
    heat = heatmap(z, [f"{d:.2f}" for d in depths], [str(m) for m in lengths], xlabel="relative insertion depth p/|r|",
                   ylabel="span length m", colorbar_title=f"ASR ({continuation})", zmin=0.0, zmax=1.0,
                   title=f"Random insertion ASR, harmful-continuation class, {where} (docs/methods.md §3)",
                   width="double")
    panels = {f"span length m = {m}": {"harmful continuation": _band([val[(d, m)] for d in depths], "harmful")}
              for m in lengths if all((d, m) in val for d in depths)}
    depth_fig = small_multiples(depths, panels, xlabel="relative depth p/|r|", markers=True, shared_yaxes=True,
                                ylabel="ASR, harmful continuation (95% CI)", cols=max(1, len(panels)),
                                title=f"Random insertion ASR by depth, {where} (docs/methods.md §3)")
    return {"heatmap": heat, "depth": depth_fig}
