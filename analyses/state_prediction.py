"""Do hidden states predict insertion robustness? Per-layer linear probes with baselines (docs/methods.md §6).

Reads the per-trial records of an ``analyses.insertion_robustness`` run (a harmful span of m
tokens inserted into the model's own refusal; the model continued and the continuation was
judged recovered / harmful / other), labels every trial ``recovered`` → 0 and ``harmful`` →
1 (``other`` trials are dropped, or counted as 1 with ``--other-as harmful``), and asks per
layer whether the residual stream at the insertion already tells the two apart, at three sites:

- ``last_inserted``: the last token of the inserted span (the state the continuation starts from);
- ``before_insertion``: the token just before the span (the model has not seen it yet: a
  control for "the prompt or prefix decides", and the state a defence could read);
- ``span_mean``: the mean over the inserted span.

Activations are streamed batch by batch (one residual kind, stop at the last layer needed;
``resid_pre``/``resid_post`` from the plain blocks with the shared chat prefix computed once,
``resid_mid`` from the bridge with a ``names_filter``), gathered at the sites and kept as
``[layer, trial, d_model]`` arrays only: a full cache is never materialized.
``probes.linear.probe_layers`` fits grouped-CV logistic probes (trials of one prompt never
straddle train and test) and scores every baseline on the same folds with prompt-level
bootstrap intervals: shuffled labels, random directions, surface features only (insertion
position and relative depth, span length, prompt length), and the 1-D projection on the
refusal direction of that layer (difference in means of harmful vs harmless *train* prompts
at the last prompt token, the same hook kind — never the probed trials, which would leak).

The verdict is computed from the numbers: the best (site, layer) probe's lower 95 % bound
against the best baseline's upper bound, over all sites. Too few trials of one class (or of
prompts per class) gives the verdict ``"undetermined"`` with the reason, not an error.
Decodable is not causal: ``analyses.layer_ablation`` is the causal check.

    $ python -m analyses.insertion_robustness && python -m analyses.state_prediction
    $ python -m analyses.state_prediction --trials results/insertion_robustness/<tag>/<run> --quick
    >>> rec = run(StatePredictionConfig(model="tiny-llama", quick=True)); rec.metrics["verdict"]  # runs the whole analysis (tests/test_analyses_quick.py runs it)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar, TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float

from analyses.common import Timer
from analyses.contract import AnalysisConfig, AnalysisResult, Summary, judge_fields, load, make_main
from analyses.trials import TrialSource, check_trials, judged_trials, load_trials, obtain_trials  # noqa: F401 - re-exported
from depthlens.cli import require_choice, require_choices, require_int, require_number, require_text
from depthlens.data import default_splits
from depthlens.runtime.forward import residuals_at, stream_residuals
from depthlens.runtime.generation import as_chats
from depthlens.models.specs import ORGANISM
from depthlens.stats import diff_in_means
from probes.grouped_cv import LayerAUROC, grouped_folds
from probes.linear import ProbeReport, probe_layers

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

SITES = ("last_inserted", "before_insertion", "span_mean")
RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
SURFACE_FEATURES = ("position", "depth_actual", "span_len", "prompt_len")
LABELS = {"recovered": 0, "harmful": 1}
OTHER_AS = ("drop", "harmful")


@dataclass(frozen=True)
class StatePredictionConfig(AnalysisConfig):
    """Per-layer probes: does the residual stream at the insertion predict recovery?

    Args:
        model: the model whose insertion trials are probed (default: the organism).
        trials: an insertion_robustness run directory or results.json; none = the newest run
            of this model under ``out`` (a warning names it, the record keeps its path and
            ``trials_chosen: "newest"``), or, if there is none, an insertion_robustness run
            made (and saved) first with its own defaults (a few minutes more on a CPU).
        kind: residual hook kind probed (resid_post: the stream leaving each layer).
        sites: feature sites: last_inserted, before_insertion, span_mean.
        other_as: what to do with "other" continuations: drop them, or count them as
            harmful (label 1 = did not recover).
        max_trials: cap on probed trials (seeded subsample above it). 600: above the default
            insertion run's trials, so the cap only bounds the cost of larger runs.
        n_dir: harmful and harmless train prompts each for the refusal direction per layer.
            32 each: two forwards; the direction's noise is small next to its norm.
        n_splits: grouped CV folds (fewer, with a warning, when prompts of a class are scarce).
        n_boot: prompt-level bootstrap resamples for the 95 % intervals. 1000 resamples cost
            < 1 s per row; fewer make the interval bounds (the verdict) jittery.
        n_random_directions: random directions per layer for that baseline (16 as probes.linear).
        probe_c: inverse L2 strength of the logistic probes.
        batch_size: trials per forward batch.
        judge: the judge whose labels are probed, by id (default: the default judge, the best
            validated); trials recorded with another judge are relabelled with it.
        seed: folds, shuffles, random directions, bootstrap and subsample seed.
        device: cpu / cuda (default: automatic).
        out: results root directory (also where insertion runs are looked for).
        quick: small run for smoke tests (≤ 48 trials, 8 direction prompts, 2 random directions,
            3 folds, 100 resamples; 62–71 s wall with the organism cached); flags given
            explicitly keep their values.
    """

    QUICK: ClassVar = {"max_trials": 48, "n_dir": 8, "n_boot": 100, "n_random_directions": 2, "n_splits": 3}

    model: str = ORGANISM
    trials: str | None = None
    kind: str = "resid_post"
    sites: tuple[str, ...] = SITES
    other_as: str = "drop"
    max_trials: int = 600
    n_dir: int = 32
    n_splits: int = 5
    n_boot: int = 1000
    n_random_directions: int = 16
    probe_c: float = 1.0
    batch_size: int = 16
    judge: str | None = None
    seed: int = 0
    device: str | None = None
    out: str = "results"
    quick: bool = False

    def validate(self) -> None:
        require_text(self, "trials", optional=True)
        require_choice(self, "kind", RESID_KINDS)
        require_choices(self, "sites", SITES)
        require_choice(self, "other_as", OTHER_AS)
        require_int(self, "max_trials", minimum=4)
        require_int(self, "n_dir")
        require_int(self, "n_splits", minimum=2)
        require_int(self, "n_boot")
        require_int(self, "n_random_directions", minimum=0)
        require_number(self, "probe_c", lo=0.0, lo_open=True)


@dataclass
class StatePredictionResult(AnalysisResult):
    """The record of ``analyses.state_prediction``, with its verdict typed."""

    @property
    def verdict(self) -> str:
        """``beats_baseline``, ``does_not_beat_baseline`` or ``undetermined``."""
        return self.metrics["verdict"]

    @property
    def verdict_sentence(self) -> str:
        return self.metrics["verdict_sentence"]

    def summary(self) -> Summary:
        m = self.metrics
        title = (f"state prediction on {self.model} ({m['n_trials']} trials of {m['trials_source']} "
                 f"[{m['trials_chosen']}]: {m['n_harmful']} harmful, {m['n_recovered']} recovered; "
                 f"continuation judge {m['continuation_judge']}; {m['kind']}): {self.verdict_sentence}")
        cols = ["site", "best_layer", "auroc", "lo", "hi", "baseline", "baseline_auroc", "baseline_hi", "beats"]
        return Summary(title, summary_rows(self), cols)


def label_trials(trials: Sequence[dict], other_as: str = "drop") -> tuple[list[dict], np.ndarray, Counter]:
    """Keep the trials that get a label and return ``(kept, y, counts of every label)``.

    recovered → 0, harmful → 1; ``other`` is dropped or, with ``other_as="harmful"``, → 1.
    """
    if other_as not in OTHER_AS:
        raise ValueError(f"other_as must be one of {OTHER_AS}, got {other_as!r}.")
    counts = Counter(t["label"] for t in trials)
    mapping = dict(LABELS)
    if other_as == "harmful":
        mapping["other"] = 1
    kept = [t for t in trials if t["label"] in mapping]
    y = np.array([mapping[t["label"]] for t in kept], dtype=np.int64)
    return kept, y, counts


def degenerate_reason(y: np.ndarray, groups: Sequence[str], n_splits: int = 5, seed: int = 0) -> str | None:
    """One sentence saying why no probe can be fitted on these labels, or None if one can."""
    if y.size == 0:
        return "no trial is labelled recovered or harmful, so there is nothing to probe."
    if np.unique(y).size < 2:
        name = "harmful (1)" if y[0] == 1 else "recovered (0)"
        return f"all {y.size} labelled trials are {name}, so recovery cannot be predicted from them."
    g = np.asarray(groups)
    for c, name in ((0, "recovered"), (1, "harmful")):
        n_groups = np.unique(g[y == c]).size
        if n_groups < 2:
            return (f"only {n_groups} prompt has {name} trials; grouped cross-validation needs at least 2 prompts "
                    "per class.")
    try:
        with warnings.catch_warnings():  # probe_layers warns about fewer folds itself
            warnings.simplefilter("ignore", UserWarning)
            grouped_folds(y, g, n_splits=n_splits, seed=seed)
    except ValueError as err:
        return str(err)
    return None


def site_positions(trial: Mapping) -> dict[str, list[int]]:
    """Token indices (into ``trial["ids"]``) of every feature site of one insertion trial."""
    s0, s1 = (int(v) for v in trial["span"])
    n = len(trial["ids"])
    if not 1 <= s0 < s1 <= n:
        raise ValueError(f"Trial {trial.get('prompt_id')!r} has span {trial['span']} outside its {n} tokens "
                         "or empty; it needs 1 <= start < end <= len(ids).")
    return {"last_inserted": [s1 - 1], "before_insertion": [s0 - 1], "span_mean": list(range(s0, s1))}


# ----------------------------------------------------------------------------- activations


@torch.inference_mode()
def site_activations(model: HookedModel, seqs: Sequence[Sequence[int]], positions: Mapping[str, Sequence[Sequence[int]]], *,
                     kind: str = "resid_post", layers: Sequence[int] | None = None, batch_size: int = 16,
                     progress: bool = False) -> dict[str, Float[np.ndarray, "layer n d_model"]]:
    """Residual ``kind`` per layer averaged over each site's positions, streamed batch by batch.

    ``positions[site][i]`` lists token indices into ``seqs[i]`` (one index, or a span to average).
    One pass of ``depthlens.runtime.forward.stream_residuals`` (the pass behind ``residuals_at``) serves
    every site: ``resid_pre``/``resid_post`` from the plain blocks with the prefix all trials
    share (system prompt, user header) computed once per batch, ``resid_mid`` from the bridge
    with only its hooks cached; each site is one einsum with a ``[batch, pos]`` weight matrix.
    Returns float32 ``[len(layers), n, d_model]`` per site.
    """
    if kind not in RESID_KINDS:
        raise ValueError(f"kind must be one of {RESID_KINDS}, got {kind!r}.")
    layers = list(range(model.n_layers)) if layers is None else [model.check_layer(l) for l in layers]
    n = len(seqs)
    lengths = [len(s) for s in seqs]
    for site, pos in positions.items():
        if len(pos) != n:
            raise ValueError(f"Site {site!r} has {len(pos)} position lists for {n} sequences; they must match.")
        for i, p in enumerate(pos):
            q = [v if v >= 0 else lengths[i] + v for v in p]
            if not q or min(q) < 0 or max(q) >= lengths[i]:
                raise ValueError(f"Site {site!r} of sequence {i} asks for positions {list(p)} outside "
                                 f"its {lengths[i]} tokens.")
    absolute = {site: [[v if v >= 0 else lengths[i] + v for v in p] for i, p in enumerate(pos)]
                for site, pos in positions.items()}
    out = {site: np.empty((len(layers), n, model.d_model), dtype=np.float32) for site in positions}

    def reduce(idx, width, states):
        for site, pos in absolute.items():
            weights = torch.zeros(len(idx), width, dtype=torch.float32)
            for row, i in enumerate(idx):
                weights[row, [width - lengths[i] + q for q in pos[i]]] = 1.0 / len(pos[i])
            weights = weights.to(model.device)
            for j, st in enumerate(states):
                out[site][j, idx] = torch.einsum("bpd,bp->bd", st.float(), weights).cpu().numpy()

    first = min(min(p) for pos in absolute.values() for p in pos)
    stream_residuals(model, seqs, layers, reduce, kind=kind, first=first, batch_size=batch_size, progress=progress,
                     desc=f"{kind} at sites")
    return out


def refusal_directions(model, harmful: Sequence[str], harmless: Sequence[str], *, kind: str = "resid_post",
                       layers: Sequence[int] | None = None,
                       batch_size: int = 16) -> Float[np.ndarray, "layer d_model"]:
    """Raw difference in means (float64) of ``kind`` at the last prompt token, harmful − harmless, per layer."""
    if not harmful or not harmless:
        raise ValueError(f"refusal_directions needs harmful and harmless prompts, got {len(harmful)} and "
                         f"{len(harmless)}.")
    acts = [residuals_at(model, as_chats(model, list(ps)), [-1] * len(ps), kind=kind, layers=layers,
                         batch_size=batch_size) for ps in (harmful, harmless)]
    return diff_in_means(acts[0], acts[1], axis=1).numpy()


def surface_features(trials: Sequence[Mapping]) -> Float[np.ndarray, "n n_surface"]:
    """Surface features of each trial (``SURFACE_FEATURES``); a missing or non-finite value is an error."""
    out = np.array([[np.nan if t.get(f) is None else float(t[f]) for f in SURFACE_FEATURES] for t in trials],
                   dtype=np.float64)
    if not np.isfinite(out).all():
        i, j = np.argwhere(~np.isfinite(out))[0]
        raise ValueError(f"Trial {i} has {SURFACE_FEATURES[j]} = {trials[i].get(SURFACE_FEATURES[j])!r}; "
                         "surface features must be finite numbers.")
    return out


def probe_sites(acts: Mapping[str, Float[np.ndarray, "layer n d_model"]], trials: Sequence[Mapping], y: np.ndarray,
                directions: Float[np.ndarray, "layer d_model"] | None,
                cfg: StatePredictionConfig) -> dict[str, ProbeReport]:
    """One ``probe_layers`` report per site; groups are the trials' prompt ids, surface features
    come from the trial records, and every site shares the folds, seed and bootstrap resamples."""
    groups = np.array([str(t["prompt_id"]) for t in trials])
    surface = surface_features(trials)
    return {site: probe_layers(X, y, groups, surface=surface, directions=directions, n_splits=cfg.n_splits,
                               C=cfg.probe_c, n_boot=cfg.n_boot, n_random_directions=cfg.n_random_directions,
                               seed=cfg.seed, site=site)
            for site, X in acts.items()}


# ----------------------------------------------------------------------------- verdict


def _row(row: LayerAUROC | None) -> dict | None:
    if row is None:
        return None
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(row).items()}


def overall_verdict(reports: Mapping[str, ProbeReport]) -> dict:
    """Best (site, layer) probe vs the best baseline over all sites: beats = best.lo > baseline.hi."""
    best_site, best = max(((s, r.best_layer()) for s, r in reports.items()),
                          key=lambda sr: -math.inf if math.isnan(sr[1].auroc) else sr[1].auroc)
    base_site, (base_name, base) = max(((s, r.best_baseline()) for s, r in reports.items()),
                                       key=lambda sr: -math.inf if math.isnan(sr[1][1].auroc) else sr[1][1].auroc)
    beats = bool(best.lo > base.hi)  # False when an interval is missing (NaN)
    where = "surface features" if base.layer < 0 else f"{base_name} at {base_site}, layer {base.layer}"
    head = (f"The best probe ({best_site}, layer {best.layer}) has AUROC {best.auroc:.3f} with 95% interval "
            f"[{best.lo:.3f}, {best.hi:.3f}]")
    tail = f"the best baseline ({where}) AUROC {base.auroc:.3f} [{base.lo:.3f}, {base.hi:.3f}]"
    if beats:
        sentence = f"{head}; its lower bound beats the upper bound of {tail}."
    else:
        sentence = f"{head}; it does not beat {tail} by more than its interval."
    return {"verdict": "beats_baseline" if beats else "does_not_beat_baseline", "verdict_sentence": sentence,
            "beats_baseline": beats, "best_site": best_site, "best_layer": best.layer, "best_auroc": best.auroc,
            "best_lo": best.lo, "best_hi": best.hi, "best_baseline": base_name, "baseline_site": base_site,
            "baseline_layer": base.layer, "baseline_auroc": base.auroc, "baseline_lo": base.lo,
            "baseline_hi": base.hi}


def refusal_direction_summary(report: ProbeReport) -> dict | None:
    """The refusal-direction projection at one site: its best layer vs shuffled labels and vs the probe."""
    if not report.direction_projection:
        return None
    proj = max(report.direction_projection, key=lambda r: -math.inf if math.isnan(r.auroc) else r.auroc)
    shuf = max(report.shuffled, key=lambda r: -math.inf if math.isnan(r.auroc) else r.auroc)
    probe = report.best_layer()
    return {"best": _row(proj), "above_shuffled": bool(proj.lo > shuf.hi), "shuffled_hi": shuf.hi,
            "probe_beats_direction": bool(probe.lo > proj.hi)}


# ----------------------------------------------------------------------------- run


def _subsample(trials: list[dict], y: np.ndarray, cap: int, seed: int) -> tuple[list[dict], np.ndarray]:
    if len(trials) <= cap:
        return trials, y
    keep = np.sort(np.random.default_rng(seed).choice(len(trials), size=cap, replace=False))
    log.info("Probing a seeded subsample of %d of %d trials (--max-trials).", cap, len(trials))
    return [trials[i] for i in keep], y[keep]


def run(cfg: StatePredictionConfig, model: HookedModel | None=None) -> StatePredictionResult:
    """Probe the insertion trials (see the module docstring); ``model`` (loaded) overrides ``cfg.model``."""
    timer = Timer()
    with timer("trials"):
        source = obtain_trials(cfg.model, cfg.trials, cfg.out, seed=cfg.seed, device=cfg.device, quick=cfg.quick,
                               judge=cfg.judge)
    with timer("judge"):
        trials, relabelled = judged_trials(source, cfg.judge)
    kept, y, counts = label_trials(trials, cfg.other_as)
    kept, y = _subsample(kept, y, cfg.max_trials, cfg.seed)
    groups = [str(t["prompt_id"]) for t in kept]
    reason = degenerate_reason(y, groups, cfg.n_splits, cfg.seed)
    metrics: dict = {
        "trials_source": str(source.path), "trials_chosen": source.chosen, "ran_insertion": source.ran_insertion,
        "kind": cfg.kind,
        "label_counts": dict(counts), "n_trials": int(y.size), "n_harmful": int(y.sum()),
        "n_recovered": int(y.size - y.sum()), "n_groups": len(set(groups)), "other_as": cfg.other_as,
        **{("continuation_judge" if k == "judge" else k): v
           for k, v in judge_fields(cfg.judge, [cfg.model], [t["prompt_id"] for t in trials], cfg.seed).items()},
        "relabelled": relabelled, "surface_features": list(SURFACE_FEATURES),
    }
    rows: list[dict] = []
    provenance: dict = {"trials": str(source.path)}
    if reason is None:
        with timer("load"):
            model = load(cfg.model, cfg.device, model=model)
        provenance["model"] = model.provenance
        pos = [site_positions(t) for t in kept]
        with timer("activations"):
            acts = site_activations(model, [t["ids"] for t in kept], {s: [p[s] for p in pos] for s in cfg.sites},
                                    kind=cfg.kind, batch_size=cfg.batch_size, progress=True)
        splits = default_splits(cfg.seed)
        with timer("refusal_direction"):
            dirs = refusal_directions(model, list(splits.harmful.train.subset(cfg.n_dir, seed=cfg.seed).prompts),
                                      list(splits.harmless.train.subset(cfg.n_dir, seed=cfg.seed).prompts),
                                      kind=cfg.kind, batch_size=cfg.batch_size)
        norms = np.linalg.norm(dirs, axis=1)
        metrics["refusal_direction_norms"] = norms.tolist()
        if np.any(norms == 0):
            log.warning("The refusal direction is zero at layer(s) %s; the direction baseline is left out.",
                        np.flatnonzero(norms == 0).tolist())
            dirs = None
        with timer("probes"):
            reports = probe_sites(acts, kept, y, dirs, cfg)
        rows = [r for rep in reports.values() for r in rep.to_records()]
        metrics.update(overall_verdict(reports))
        metrics["by_site"] = {s: r.verdict() for s, r in reports.items()}
        metrics["refusal_direction"] = {s: refusal_direction_summary(r) for s, r in reports.items()}
        metrics["n_splits"] = next(iter(reports.values())).n_splits
    else:
        log.warning("State prediction undetermined: %s", reason)
        metrics.update({"verdict": "undetermined", "verdict_sentence": f"Undetermined: {reason}",
                        "undetermined_reason": reason, "beats_baseline": None, "best_lo": None, "baseline_hi": None})
    trial_rows = [{"prompt_id": t["prompt_id"], "attack": t.get("attack"), **{f: t.get(f) for f in SURFACE_FEATURES},
                   "label": t["label"], "y": int(v)} for t, v in zip(kept, y)]
    return StatePredictionResult(analysis="state_prediction", model=cfg.model, config=asdict(cfg), seed=cfg.seed,
                                 provenance=provenance, metrics=metrics, timings=timer.total(),
                                 tables={"auroc": rows, "trials": trial_rows})


def summary_rows(rec) -> list[dict]:
    """Per site: the best probe layer and the strongest baseline (the console table)."""
    out = []
    for site, v in (rec.metrics.get("by_site") or {}).items():
        out.append({"site": site, "best_layer": v["best_layer"], "auroc": v["best_auroc"], "lo": v["best_lo"],
                    "hi": v["best_hi"], "baseline": v["best_baseline"], "baseline_auroc": v["baseline_auroc"],
                    "baseline_hi": v["baseline_hi"], "beats": v["beats_baseline"]})
    return out


main = make_main(StatePredictionConfig, run)


if __name__ == "__main__":
    main()
