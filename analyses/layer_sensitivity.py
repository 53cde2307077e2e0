"""Rank the robustness-critical layers: which layer's perturbation breaks safety most?

For every layer l, perturbation kind k (parameter noise, activation noise, int8/int4
round-to-nearest weights; ``depthlens.interventions.perturbation``) and seed, the drop in mean refusal score on
harmful *validation* prompts and the rise in harmless cross-entropy (utility):

    S_{l,k} = E_seeds E_x [ score(x; θ) − score(x; θ + δ_{l,k}) ]         (docs/methods.md §5)

with a 95% interval from a paired bootstrap over prompts (seeds averaged per prompt), the
whole-model perturbation at the same σ as reference, a ranking by the mean of S over kinds
whose every score carries a prompt-bootstrap interval and P(layer in top-k) over the same
resamples, ``critical_layers`` (the top k by score, each with its P(top-k)) for the
zeroth-order recipe, and the cheap ZO-probe estimator
``c_l = |L(θ+εz_l) − L(θ−εz_l)| / 2ε`` with its Spearman correlation to the ranking.

Cost: prompts are batched, the clean baseline is computed once, only the perturbed layer is
touched (restored bit for bit), the unembedding runs on the scored positions only, and the
model is never reloaded. The clean residual stream entering every block is cached once and an
evaluation of layer l re-runs blocks l… only, on the HF blocks under the bridge
(transformer-lens 4.3's own ``start_at_layer`` still runs blocks 0..l−1 and discards them),
with the prompts' shared chat prefix computed once per evaluation
(``depthlens.runtime.forward.PrefixSharedRunner``). ``benchmarks/bench_layer_sensitivity.py``
measures the cost of an evaluation as a ratio to one plain forward.

    $ python -m analyses.layer_sensitivity                      # the organism, defaults below
    $ python -m analyses.layer_sensitivity --quick --model tiny-llama
    >>> rec = run(SensitivityConfig(model="tiny-llama", quick=True)); rec.metrics["critical_layers"]  # runs the whole analysis (tests/test_analyses_quick.py runs it)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar, TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from analyses.common import Timer
from analyses.contract import (AnalysisConfig, AnalysisResult, Summary, check_layers, fmt, load, make_main,
                               prompt_files, prompts_or)
from depthlens.data.chat import ChatSequence, build_chat
from depthlens.cli import require_choices, require_int, require_number, require_numbers
from depthlens.data import default_splits
from depthlens.infra.errors import NonFiniteError
from depthlens.runtime.forward import PrefixSharedRunner
from depthlens.runtime.generation import generate
from depthlens.judges import JUDGE_ID, refusal_rate, refusal_token_ids, score_from_logprobs
from depthlens.models.specs import ORGANISM
from depthlens.interventions.perturbation import KINDS, perturb
from depthlens.runtime.responses import response_set
from depthlens.stats import bootstrap_mean, percentile_interval, resample_indices, top_k_probability

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

KIND_SIGMA = {"param_noise": "param_sigma", "act_noise": "act_sigma", "act_noise_rms": "act_sigma"}
CRITICAL_RULE = ("the top {k} layers by the point estimate of the score (rank_layers), most sensitive first; each "
                 "with its score's prompt-bootstrap interval and p_top_k = P(layer in the top {k}) over the same "
                 "resamples (docs/methods.md §5)")


@dataclass(frozen=True)
class SensitivityConfig(AnalysisConfig):
    """Per-layer sensitivity of safety to parameter noise, activation noise and quantization.

    Args:
        model: model spec (default: the organism, built on first use).
        harmful: a .txt/.jsonl/.csv file of harmful prompts used instead of the val split.
        harmless: a file of harmless prompts (utility answers) used instead of the val split.
        kinds: perturbation kinds: param_noise, act_noise, int8, int4 (act_noise_rms: activation
            noise relative to the per-token RMS, the scale of records made before the robust one).
        param_sigma: parameter noise, relative to each matrix's Frobenius RMS. 0.3: smaller
            σ moved the refusal score less than its estimation noise on the organism
            (docs/findings.md "Costs measured on the way").
        act_sigma: activation noise on a layer's output, relative to the robust per-token scale
            of the residual stream, 1.4826 · median |x| over channels (``depthlens.interventions.perturbation``;
            older records used the per-token RMS, which Gemma's massive activations inflate:
            kind act_noise_rms). 1.0: on SmolLM2 the per-token RMS is larger than the robust scale
            (by layer: ``scripts/activation_scales.py``), so 1.0 is about the 0.5 × RMS its
            records were measured at, large enough to separate layers, small enough that the
            clean model is not destroyed.
        seeds: parameter-noise seeds per layer (quantization is deterministic: one run).
        act_seeds: activation-noise seeds per layer. 1 by default: one layer's activation noise
            moves the refusal score by far more than its seed-to-seed spread, while parameter
            noise is close to its noise and needs the second seed (docs/findings.md "Costs
            measured on the way").
        n_harmful: harmful validation prompts (DoNotAnswer val) scored by the refusal score.
            16 (with 6 utility prompts and one activation-noise seed) keeps the default run
            within a few minutes on a CPU; the cost is linear in the prompts (docs/findings.md
            "Costs measured on the way"). At 16 the organism's first critical layers are stable in
            the top 5 and its fifth is a near tie (``scripts/ranking_stability.py``, docs/findings.md
            §5), which the record's ``p_top_k`` shows.
        n_harmless: harmless validation prompts whose own greedy answers give the utility CE.
        utility_tokens: length of those answers. 6 × 16 tokens, measured on the first seed of
            each layer × kind only: utility is the secondary measure (its interval is over
            prompts) and its unembedding (every answer position × 49k vocab) would otherwise
            cost as much as the refusal score.
        layers: layers to sweep (default: all).
        top_k: how many critical layers to report for the zeroth-order recipe.
        zo_probe: also compute the cheap ZO-probe estimator and its rank correlation.
        zo_eps: ZO-probe step ε (absolute, z ~ N(0, I), as MeZO).
        zo_seeds: ZO-probe seeds per layer.
        generate: add refusal rates from generation under the perturbation of the top layers.
        generate_tokens: greedy tokens per answer of that check.
        n_boot: bootstrap resamples for the intervals.
        batch_size: prompts per forward batch.
        seed: split and noise seed offset.
        device: cpu / cuda (default: automatic).
        out: results root directory.
        quick: small run for smoke tests (8 harmful and 4 harmless prompts, one seed of each
            noise, 200 resamples); flags given explicitly keep their values.
    """

    QUICK: ClassVar = {"seeds": 1, "act_seeds": 1, "n_harmful": 8, "n_harmless": 4, "n_boot": 200}

    model: str = ORGANISM
    harmful: str | None = None
    harmless: str | None = None
    kinds: tuple[str, ...] = ("param_noise", "act_noise", "int4")
    param_sigma: float = 0.3
    act_sigma: float = 1.0
    seeds: int = 2
    act_seeds: int = 1
    n_harmful: int = 16
    n_harmless: int = 6
    utility_tokens: int = 16
    layers: tuple[int, ...] | None = None
    top_k: int = 5
    zo_probe: bool = True
    zo_eps: float = 1e-3
    zo_seeds: int = 1
    generate: bool = False
    generate_tokens: int = 48
    n_boot: int = 1000
    batch_size: int = 32
    seed: int = 0
    device: str | None = None
    out: str = "results"
    quick: bool = False

    def validate(self) -> None:
        require_choices(self, "kinds", KINDS)
        for name in ("seeds", "act_seeds", "n_harmful", "top_k", "zo_seeds", "n_boot", "utility_tokens",
                     "generate_tokens"):
            require_int(self, name)
        require_int(self, "n_harmless", minimum=0)
        for kind, sigma in KIND_SIGMA.items():
            require_number(self, sigma, lo=0.0, lo_open=kind in self.kinds)
        require_number(self, "zo_eps", lo=0.0, lo_open=True)
        require_numbers(self, "layers", lo=0, integer=True, optional=True)


@dataclass
class SensitivityResult(AnalysisResult):
    """The record of ``analyses.layer_sensitivity``, with its headline numbers typed."""

    @property
    def critical_layers(self) -> list[int]:
        """The top-k layers of the ranking, most sensitive first."""
        return [int(c["layer"]) for c in self.metrics["critical_layers"]]

    @property
    def clean_mean_refusal_score(self) -> float:
        return self.metrics["clean_mean_refusal_score"]

    def summary(self) -> Summary:
        m = self.metrics
        kinds = self.config.get("kinds", [])
        cols = ["rank", "layer", "score", "mean_sensitivity", *kinds, *(["zo_probe"] if "zo_probe_spearman" in m else [])]
        title = (f"layer sensitivity of {self.model}: clean mean refusal score {self.clean_mean_refusal_score:.2f} "
                 f"on {m['n_harmful']} harmful val prompts; critical layers {self.critical_layers}"
                 + (f"; ZO-probe Spearman {fmt(m['zo_probe_spearman'], '.2f')}" if "zo_probe_spearman" in m else "")
                 + f"; sweep {self.timings['sweep']:.0f} s")
        return Summary(title, self.tables["ranking"], cols)


class LayerEvaluator:
    """Refusal scores and utility NLL of a fixed prompt set, re-run from any layer.

    The clean residual stream entering every block is cached once; ``evaluate(l)`` runs blocks
    l… only, computes the prompts' shared prefix (system prompt, user header) once, and
    unembeds just the scored positions (the last one for the refusal score, the answer tokens
    for the utility NLL) — see ``depthlens.runtime.forward.PrefixSharedRunner``. Perturbations are
    applied by the caller around it; weight edits and ``depthlens.interventions.perturbation`` activation noise
    are seen by it.
    """

    def __init__(self, model, harmful: Sequence[ChatSequence], utility: Sequence[ChatSequence], batch_size: int):
        self.model = model
        self.refusal_ids = refusal_token_ids(model.tokenizer)
        self.harmful = PrefixSharedRunner(model, harmful, batch_size) if harmful else None
        self.utility = PrefixSharedRunner(model, utility, batch_size) if utility else None
        self.n_harmful, self.n_utility = len(harmful), len(utility)
        self.resp_len = [s.response_len for s in utility]
        self.keep = 1 + max(self.resp_len, default=0)

    @torch.inference_mode()
    def evaluate(self, start_layer: int = 0, utility: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(refusal score per harmful prompt, mean answer NLL per utility prompt — NaN if not ``utility``)."""
        scores = np.empty(self.n_harmful)
        nll = np.full(self.n_utility, np.nan)
        if self.harmful is not None:
            for idx, _, logits in self.harmful.run(start_layer, logits_to_keep=1):
                logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
                scores[idx] = score_from_logprobs(logp.cpu(), self.refusal_ids).numpy()
        if utility and self.utility is not None:
            for idx, batch, logits in self.utility.run(start_layer, logits_to_keep=self.keep):
                logp = torch.log_softmax(logits.float(), dim=-1)
                targets = batch.input_ids[:, -self.keep + 1:]
                tok_lp = logp[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
                for row, i in enumerate(idx):
                    nll[i] = float(-tok_lp[row, -self.resp_len[i]:].mean())
        return scores, nll


def rank_layers(rows: Sequence[dict], layers: Sequence[int]) -> list[dict]:
    """Rank layers by ``score`` = mean over kinds of S_{l,k} / max_l S_{l,k}.

    The kinds live on different scales (one layer's activation noise at σ = 0.5 moves the
    refusal score by several units, int4 by tenths), so a raw mean over kinds is a ranking by
    activation noise alone; dividing each kind by its largest layer sensitivity weighs the
    kinds equally. ``mean_sensitivity`` (the raw mean) is kept beside it. A NaN or infinite
    sensitivity raises ``NonFiniteError`` (it would otherwise rank as 0).
    """
    bad = [f"layer {r['layer']} {r['kind']}" for r in rows if not np.isfinite(r["sensitivity"])]
    if bad:
        raise NonFiniteError(f"The sensitivity is NaN or infinite at {', '.join(bad[:5])}"
                             f"{' and more' if len(bad) > 5 else ''}; no layer ranking can be made from it.")
    kinds = sorted({r["kind"] for r in rows})
    scale = {k: max([r["sensitivity"] for r in rows if r["kind"] == k] + [0.0]) for k in kinds}
    ranking = []
    for l in layers:
        per_kind = {r["kind"]: r["sensitivity"] for r in rows if r["layer"] == l}
        normed = [v / scale[k] if scale[k] > 0 else 0.0 for k, v in per_kind.items()]
        ranking.append({"layer": l, "score": float(np.mean(normed)),
                        "mean_sensitivity": float(np.mean(list(per_kind.values()))), **per_kind})
    ranking.sort(key=lambda r: -r["score"])
    for rank, r in enumerate(ranking, 1):
        r["rank"] = rank
    return ranking


def normalized_scores(per_kind: dict[str, np.ndarray]) -> np.ndarray:
    """``rank_layers``'s score for stacks of sensitivities: ``per_kind[kind]`` is ``[..., n_layers]``.

    Each kind is divided by its largest layer sensitivity (over the last axis; a kind whose
    largest is ≤ 0 contributes 0), then the kinds are averaged.
    """
    normed = []
    for v in per_kind.values():
        scale = v.max(axis=-1, keepdims=True)
        normed.append(np.where(scale > 0, v / np.where(scale > 0, scale, 1.0), 0.0))
    return np.mean(normed, axis=0)


def ranking_uncertainty(per_prompt: dict[str, np.ndarray], layers: Sequence[int], top_k: int, n_boot: int,
                        seed: int) -> dict[int, dict]:
    """Each layer's score with its prompt-bootstrap interval and P(layer in the top ``top_k``).

    ``per_prompt[kind]`` is ``[n_layers, n_prompts]``: the drop in refusal score per prompt
    (seeds averaged). Each of ``n_boot`` replicates resamples the prompts (the same draw as the
    per-row intervals, ``depthlens.stats.resample_indices``), recomputes every S_{l,k} and the
    normalized score, and ranks the layers; P(top-k) is the share of replicates in which a
    layer ranks in the top k (docs/methods.md §5).
    """
    n = next(iter(per_prompt.values())).shape[1]
    idx = resample_indices(n, n_boot, seed)
    boots = normalized_scores({k: v[:, idx].mean(axis=-1).T for k, v in per_prompt.items()})  # [B, n_layers]
    p_top = top_k_probability(boots, min(top_k, len(layers)))
    lo, hi = percentile_interval(boots)
    return {l: {"score_lo": float(lo[i]), "score_hi": float(hi[i]), "p_top_k": float(p_top[i])}
            for i, l in enumerate(layers)}


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None (not measured) with fewer than 3 layers or a constant input."""
    from scipy.stats import spearmanr

    if len(a) <= 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def _sigma(cfg: SensitivityConfig, kind: str) -> float:
    return getattr(cfg, KIND_SIGMA[kind]) if kind in KIND_SIGMA else 0.0


def _n_seeds(cfg: SensitivityConfig, kind: str) -> int:
    return {"param_noise": cfg.seeds, "act_noise": cfg.act_seeds, "act_noise_rms": cfg.act_seeds}.get(kind, 1)


def run(cfg: SensitivityConfig, model: HookedModel | None=None) -> SensitivityResult:
    """The sweep of the module docstring; ``model`` (already loaded) overrides ``cfg.model``."""
    timer = Timer()
    with timer("load"):
        model = load(cfg.model, cfg.device, model=model)
    layers = check_layers(model, cfg.layers) or list(range(model.n_layers))
    splits = default_splits(cfg.seed)
    harmful = prompts_or(cfg.harmful, lambda: splits.harmful.val, "--harmful").subset(cfg.n_harmful, seed=cfg.seed)
    harmless = (prompts_or(cfg.harmless, lambda: splits.harmless.val, "--harmless").subset(cfg.n_harmless, seed=cfg.seed)
                if cfg.n_harmless else None)
    with timer("prepare"):
        util = []
        if harmless is not None:
            answers = response_set(model, harmless.prompts, max_new_tokens=cfg.utility_tokens, batch_size=cfg.batch_size)
            util = [build_chat(model.tokenizer, p, [t]) for p, t in zip(harmless.prompts, answers.tokens) if t]
        harm = [build_chat(model.tokenizer, p) for p in harmful.prompts]
        ev = LayerEvaluator(model, harm, util, cfg.batch_size)
        clean_scores, clean_nll = ev.evaluate(0)

    jobs = [(l, k, s) for l in [*layers, None] for k in cfg.kinds
            for s in range(_n_seeds(cfg, k))]
    drops: dict[tuple, list[np.ndarray]] = {}
    rises: dict[tuple, list[np.ndarray]] = {}
    with timer("sweep"):
        for layer, kind, s in tqdm(jobs, desc="layer × kind × seed"):
            with perturb(model, kind, layer, _sigma(cfg, kind), seed=cfg.seed * 1000 + s):
                sc, nl = ev.evaluate(0 if layer is None else layer, utility=s == 0)
            drops.setdefault((layer, kind), []).append(clean_scores - sc)
            if s == 0:
                rises.setdefault((layer, kind), []).append(nl - clean_nll)

    rows, whole = [], []
    for (layer, kind), d in drops.items():
        per_prompt = np.mean(d, axis=0)
        s_mean, s_lo, s_hi = bootstrap_mean(per_prompt, cfg.n_boot, cfg.seed)
        u_mean, u_lo, u_hi = (bootstrap_mean(np.mean(rises[(layer, kind)], axis=0), cfg.n_boot, cfg.seed)
                              if util else (None, None, None))   # no utility answers: not measured
        row = {"layer": "all" if layer is None else layer, "kind": kind, "sigma": _sigma(cfg, kind),
               "sensitivity": s_mean, "lo": s_lo, "hi": s_hi, "seed_sd": float(np.std([x.mean() for x in d])),
               "utility_ce_rise": u_mean, "utility_lo": u_lo, "utility_hi": u_hi, "n_seeds": len(d)}
        (whole if layer is None else rows).append(row)

    ranking = rank_layers(rows, layers)
    per_prompt = {k: np.stack([np.mean(drops[(l, k)], axis=0) for l in layers]) for k in cfg.kinds}
    uncertainty = ranking_uncertainty(per_prompt, layers, cfg.top_k, cfg.n_boot, cfg.seed)
    for r in ranking:
        r.update(uncertainty[r["layer"]])
    critical = [{"layer": r["layer"], "score": r["score"], "score_lo": r["score_lo"], "score_hi": r["score_hi"],
                 "p_top_k": r["p_top_k"]} for r in ranking[: cfg.top_k]]

    metrics = {"judge": "refusal score (docs/methods.md §1) on harmful val; utility = NLL of own answers on harmless val",
               "clean_mean_refusal_score": float(clean_scores.mean()),
               "clean_utility_nll": float(clean_nll.mean()) if util else None,
               "critical_layers": critical, "critical_layers_rule": CRITICAL_RULE.format(k=cfg.top_k),
               "ranking_interval": ("95 % percentile bootstrap over the harmful prompts (every S_{l,k} and the "
                                    f"normalized score recomputed per resample, {cfg.n_boot} resamples)"),
               "n_harmful": len(harm), "n_utility": len(util),
               "n_evaluations": len(jobs)}

    if cfg.zo_probe:
        with timer("zo_probe"):
            zo = zo_probe_scores(model, ev, layers, cfg.zo_eps, cfg.zo_seeds, cfg.seed)
        for r in ranking:
            r["zo_probe"] = zo[r["layer"]]
        metrics["zo_probe_spearman"] = spearman([r["score"] for r in ranking], [r["zo_probe"] for r in ranking])
        if "param_noise" in cfg.kinds:
            metrics["zo_probe_spearman_vs_param_noise"] = spearman(
                [r["param_noise"] for r in ranking], [r["zo_probe"] for r in ranking])

    gen_rows = []
    if cfg.generate:
        with timer("generate"):
            gen_rows = generation_check(model, harmful.prompts, [c["layer"] for c in critical[:3]], cfg)
        metrics["generation"] = gen_rows

    # one forward over the same prompts, for the cost ratio quoted in benchmarks/
    with timer("one_clean_forward"):
        ev.evaluate(0)
    t = timer.total()
    t["cost_per_evaluation_in_forwards"] = round(t["sweep"] / max(1, len(jobs)) / max(1e-9, t["one_clean_forward"]), 3)
    provenance = {**model.provenance, **({"prompt_files": files} if (files := prompt_files(cfg)) else {})}
    return SensitivityResult(analysis="layer_sensitivity", model=cfg.model, config=asdict(cfg), seed=cfg.seed,
                             provenance=provenance, metrics=metrics, timings=t,
                             tables={"sensitivity": rows, "whole_model": whole, "ranking": ranking,
                                     "generation": gen_rows,
                                     # drops per prompt (seeds averaged): the ranking's bootstrap can be redone from it
                                     "per_prompt_drop": [{"layer": l, "kind": k, "drop": per_prompt[k][i].tolist()}
                                                         for k in cfg.kinds for i, l in enumerate(layers)]})


def zo_probe_scores(model, ev: LayerEvaluator, layers: Sequence[int], eps: float, n_seeds: int, seed: int) -> dict[int, float]:
    """c_l = |L(θ+εz_l) − L(θ−εz_l)| / 2ε with only layer l perturbed; L = −mean refusal score.

    ``depthlens.interventions.spsa.zo_layer_probes`` does the exact-restore perturbation; the loss
    re-runs the model from layer l only.
    """
    from depthlens.interventions.spsa import zo_layer_probes

    return zo_layer_probes(model, list(layers), lambda l: -float(ev.evaluate(l, utility=False)[0].mean()),
                           eps=eps, seed=seed, n_samples=n_seeds)


def generation_check(model, prompts: Sequence[str], layers: Sequence[int], cfg: SensitivityConfig) -> list[dict]:
    """Refusal rate (substring judge) of greedy answers, clean and under each kind at each top layer."""
    n = cfg.generate_tokens
    rows = [{"layer": "clean", "kind": "none", "refusal_rate": refusal_rate(generate(model, list(prompts), n).texts).rate,
             "judge": JUDGE_ID}]
    for l in layers:
        for kind in cfg.kinds:
            with perturb(model, kind, l, _sigma(cfg, kind), seed=cfg.seed * 1000):
                texts = generate(model, list(prompts), n, progress=False).texts
            rows.append({"layer": l, "kind": kind, "refusal_rate": refusal_rate(texts).rate, "judge": JUDGE_ID})
    return rows


main = make_main(SensitivityConfig, run)


if __name__ == "__main__":
    main()
