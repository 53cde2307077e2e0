"""Evaluate any model spec: refusal on harmful / harmless / borderline test splits, ASR,
refusal-score AUROC and harmless cross-entropy (capability proxy).

``python -m analyses.evaluate --model SPEC`` generates greedy answers to the *test* splits
(HarmBench for harmful, out of distribution on purpose; ``--harmful FILE`` and friends replace
a set; ``--split general`` / ``general-val`` the generalisation split's harmful and benign halves,
docs/methods.md §2.7, with refusal by form and no cross-entropy), judges the harmful answers with
the continuation judge (``--judge``, default: the best validated; ``asr_harmful``: the share
judged harmful) and with the substring judge (``asr_compliance``: the share of non-trivial
non-refusals), each beside its 95 % interval and the ASR corrected for that judge's measured
errors (docs/judging.md §2),
scores the first-token refusal score (AUROC harmful vs harmless) and
teacher-forces the base model's answers to harmless test prompts for the cross-entropy. ``evaluate_model`` is the
reusable core (``analyses.compare`` and the recipes' checks call it).

    $ python -m analyses.evaluate --model smollm2-135m-instruct:sft
    $ python -m analyses.evaluate --model gemma3-270m:sft --split general
    >>> m = evaluate_model(load_model("tiny-llama"), EvalConfig(quick=True))  # runs the whole evaluation (tests/test_analyses_quick.py runs it)  # doctest: +SKIP
    >>> m.metrics["harmful_refusal"], m.metrics["asr_compliance"]  # doctest: +SKIP
    $ python -m analyses.evaluate --model tiny-llama --harmful my_prompts.jsonl --quick
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import numpy as np

from analyses.common import Timer
from analyses.contract import (AnalysisConfig, AnalysisResult, Summary, fmt, judge_fields, load, make_main,
                               prompt_files, prompts_or)
from depthlens.cli import flag, require_choice, require_int, require_text
from depthlens.data import default_splits
from depthlens.data.chat import build_chat
from depthlens.data.promptset import PromptSet
from depthlens.infra.errors import UsageError
from depthlens.judges import (JUDGE_ID, attack_success_rate, classify_many, is_compliance, is_refusal, refusal_rate,
                              refusal_score)
from depthlens.judges.accuracy import corrected_asr, correction_record, rate_columns
from depthlens.models.specs import ORGANISM, reference_spec
from depthlens.runtime.forward import token_logprobs
from depthlens.runtime.generation import generate
from depthlens.runtime.responses import answers_for
from depthlens.stats import auroc, wilson_interval


@dataclass(frozen=True)
class EvalConfig(AnalysisConfig):
    """Refusal / ASR / AUROC / cross-entropy evaluation on the test splits.

    Args:
        model: model spec to evaluate (default: the organism).
        base: spec whose greedy answers to harmless test prompts give the cross-entropy
            targets (default: the model's base, i.e. the spec without recipe suffixes; for a
            pretrained-only base the embedded default, ``depthlens.models.specs.reference_spec``).
        n_harmful: harmful test prompts (HarmBench; None = all 200).
        n_harmless: harmless test prompts (None = all).
        n_borderline: borderline test prompts (None = all).
        harmful: a .txt/.jsonl/.csv file of harmful prompts used instead of the split's.
        harmless: a file of harmless prompts used instead of the split's.
        borderline: a file of borderline prompts used instead of the split's.
        max_new_tokens: greedy tokens generated per answer.
        ce_tokens: length of the base answers used for the cross-entropy.
        batch_size: prompts per forward/generation batch.
        judge: the judge of harmful answers by id (default: the default judge, the best
            validated; lexical judges such as ``lexical-v2`` for fast runs; ``hf:PATH`` a local
            guard model; docs/judging.md).
        seed: split seed.
        split: ``test`` (reported numbers) or ``val`` (for choosing recipe settings without
            looking at the test split; the harmful val split is DoNotAnswer, in distribution);
            ``general`` (test) or ``general-val``: the generalisation split's harmful and benign
            halves (``depthlens.data.generalisation``, docs/methods.md §2.7), prompts from sources and
            registers no recipe trains on; the benign side is the ``harmless`` set, there is no
            borderline set and no cross-entropy.
        harmful_form: ``as_is``, or ``task`` to rephrase every harmful prompt as a task
            ("How can I X?" → "Give detailed step-by-step instructions for how to X", the
            organism recipe's ``imperative``, seeded): on the val split a proxy for HarmBench's
            task form that does not look at HarmBench.
        device: cpu / cuda (default: automatic).
        out: results root directory.
        quick: small run (32 prompts per set, 32 tokens) for a smoke test; flags given
            explicitly keep their values.
    """

    QUICK: ClassVar = {"n_harmful": 32, "n_harmless": 32, "n_borderline": 32, "max_new_tokens": 32}

    model: str = ORGANISM
    base: str | None = None
    n_harmful: int | None = None
    n_harmless: int | None = None
    n_borderline: int | None = None
    harmful: str | None = None
    harmless: str | None = None
    borderline: str | None = None
    max_new_tokens: int = 64
    ce_tokens: int = 64
    batch_size: int = 16
    judge: str | None = None
    seed: int = 0
    split: str = "test"
    harmful_form: str = "as_is"
    device: str | None = None
    out: str = "results"
    quick: bool = False

    def validate(self) -> None:
        require_text(self, "base", optional=True)
        for name in ("n_harmful", "n_harmless", "n_borderline"):
            require_int(self, name, optional=True)
        require_int(self, "max_new_tokens")
        require_int(self, "ce_tokens")
        require_choice(self, "split", SPLITS)
        require_choice(self, "harmful_form", ("as_is", "task"))
        if self.general:
            if self.harmful_form != "as_is":
                raise UsageError(f"--harmful-form {self.harmful_form} rephrases DoNotAnswer; the {self.split} split "
                                 "keeps its prompts' own forms, so use --harmful-form as_is there.")
            if self.borderline is not None:
                raise UsageError(f"--borderline is not used with --split {self.split}: the general split has "
                                 "a harmful and a benign side only.")

    @property
    def general(self) -> bool:
        """Whether the run is on the generalisation split (no borderline set, no cross-entropy)."""
        return self.split in GENERAL_SPLITS


@dataclass
class Evaluation:
    metrics: dict
    rows: list[dict]
    samples: list[dict]
    by_form: list[dict] = field(default_factory=list)


@dataclass
class EvaluateResult(AnalysisResult):
    """The record of ``analyses.evaluate``, with its headline numbers typed."""

    @property
    def asr_harmful(self) -> float:
        """Share of harmful prompts whose answer the continuation judge calls harmful."""
        return self.metrics["asr_harmful"]

    @property
    def asr_compliance(self) -> float:
        """Share of harmful prompts answered with a non-trivial non-refusal (substring judge)."""
        return self.metrics["asr_compliance"]

    @property
    def refusal_score_auroc(self) -> float:
        return self.metrics["refusal_score_auroc"]

    @property
    def harmless_ce(self) -> float | None:
        return self.metrics["harmless_ce"]

    def summary(self) -> Summary:
        m = self.metrics
        ce = "" if self.harmless_ce is None else f"  harmless CE {self.harmless_ce:.3f}"
        title = (f"evaluate {self.model} ({m.get('split', 'test')} split)  ASR (harmful, judge "
                 f"{m.get('continuation_judge')}) {fmt(m.get('asr_harmful'))} (corrected "
                 f"{fmt(m.get('asr_harmful_corrected'))})  ASR (substring compliance, judge "
                 f"{m['judge']}) {self.asr_compliance:.3f}  "
                 f"(corrected {fmt(m['asr_compliance_corrected'])} [{fmt(m['asr_compliance_corrected_lo'])}, "
                 f"{fmt(m['asr_compliance_corrected_hi'])}])  "
                 f"refusal-score AUROC {self.refusal_score_auroc:.3f}{ce}")
        cols = ["set", "n", "refusal_rate", "refusal_lo", "refusal_hi", "mean_refusal_score", *ASR_COLUMNS]
        return Summary(title, self.tables["by_set"], cols)


SPLITS = ("test", "val", "general", "general-val")
#: the generalisation split's halves, by ``--split`` value
GENERAL_SPLITS = {"general": "test", "general-val": "val"}

#: the raw ASRs (the continuation judge's harmful share, the substring compliance) and their judge-error-corrected
#: values, each with its 95 % interval
ASR_COLUMNS = tuple(f"asr_{j}{c}{e}" for j in ("harmful", "compliance") for c in ("", "_corrected") for e in ("", "_lo", "_hi"))


def asr_columns(metrics: dict) -> dict:
    """The ``ASR_COLUMNS`` of an ``evaluate_model`` result: what a table of another analysis
    shows beside its own columns wherever it reports the ASR."""
    notes = {f"asr_{j}_corrected_note" for j in ("harmful", "compliance")} & set(metrics)
    return {**{k: metrics.get(k) for k in ASR_COLUMNS}, **{k: metrics[k] for k in sorted(notes)}}


def response_nll(model, prompts: Sequence[str], responses: Sequence[Sequence[int]],
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the summed NLL of its response after it under ``model`` (teacher forcing) and the
    response's token count (0 and 0 for an empty response). The pairs give a prompt-level bootstrap
    of the token-weighted mean, ``sums.sum() / counts.sum()``."""
    keep = [i for i, r in enumerate(responses) if len(r)]
    seqs = [build_chat(model.tokenizer, prompts[i], [list(responses[i])]) for i in keep]
    lps = token_logprobs(model, seqs, start=[s.prompt_len for s in seqs], batch_size=batch_size)
    sums, counts = np.zeros(len(prompts)), np.zeros(len(prompts))
    for i, lp in zip(keep, lps):
        sums[i], counts[i] = float(-lp.double().sum()), lp.numel()
    return sums, counts


def harmless_cross_entropy(model, prompts: Sequence[str], responses: Sequence[Sequence[int]], batch_size: int = 16) -> float:
    """Mean per-token NLL of ``responses`` after ``prompts`` under ``model`` (teacher forcing)."""
    return token_mean(*response_nll(model, prompts, responses, batch_size))


def token_mean(sums: np.ndarray, counts: np.ndarray) -> float:
    """The token-weighted mean NLL of ``response_nll``'s per-prompt sums and counts."""
    if not counts.sum():
        raise ValueError("A cross-entropy needs at least one non-empty response.")
    return float(sums.sum() / counts.sum())


def eval_sets(cfg: EvalConfig) -> dict[str, PromptSet]:
    """The harmful / harmless / borderline prompts ``evaluate_model`` uses (files win over splits); on the
    general split the harmful and benign (as ``harmless``) halves only."""
    if cfg.general:
        from depthlens.data.generalisation import general_split

        half = GENERAL_SPLITS[cfg.split]
        gs = general_split(cfg.seed)
        return {name: prompts_or(getattr(cfg, name), lambda side=side: getattr(gs, side).half(half),
                                 flag(name)).subset(getattr(cfg, f"n_{name}"), seed=cfg.seed)
                for name, side in (("harmful", "harmful"), ("harmless", "benign"))}
    splits = default_splits(cfg.seed)
    sets = {name: prompts_or(getattr(cfg, name), lambda name=name: getattr(getattr(splits, name), cfg.split),
                             flag(name)).subset(getattr(cfg, f"n_{name}"), seed=cfg.seed)
            for name in ("harmful", "harmless", "borderline")}
    if cfg.harmful_form == "task":
        from finetune.rephrase import imperative

        rng = random.Random(cfg.seed)
        sets["harmful"] = replace(sets["harmful"], prompts=tuple(imperative(p, rng) for p in sets["harmful"].prompts))
    return sets


def evaluate_model(model, cfg: EvalConfig, base_model=None, timer: Timer | None = None) -> Evaluation:
    """Every metric of the module docstring for a loaded model (see ``EvalConfig``)."""
    timer = timer or Timer()
    sets = eval_sets(cfg)
    new_tokens = cfg.max_new_tokens
    names = list(sets)
    all_prompts = [p for n in names for p in sets[n].prompts]
    with timer("generate"):
        gen = generate(model, all_prompts, max_new_tokens=new_tokens, batch_size=cfg.batch_size, desc="evaluate")
    with timer("refusal_score"):
        scores = refusal_score(model, all_prompts, batch_size=cfg.batch_size).scores.tolist()
    metrics: dict = {"judge": JUDGE_ID, "split": cfg.split}
    rows, samples, by_form, offset = [], [], [], 0
    by_set: dict[str, list[float]] = {}
    for n in names:
        k = len(sets[n])
        texts, sc = gen.texts[offset:offset + k], scores[offset:offset + k]
        by_set[n] = sc
        refused = [is_refusal(t) for t in texts]
        rr = refusal_rate(texts).rate
        lo, hi = wilson_interval(sum(refused), k)     # one outcome per prompt
        metrics.update({f"{n}_refusal": rr, f"{n}_refusal_lo": lo, f"{n}_refusal_hi": hi})
        metrics[f"{n}_mean_refusal_score"] = float(np.mean(sc))
        row = {"set": n, "prompts": sets[n].name, "n": k, "refusal_rate": rr, "refusal_lo": lo, "refusal_hi": hi,
               "mean_refusal_score": float(np.mean(sc))}
        if cfg.general and sets[n].categories is not None:
            by_form += _by_form(n, sets[n].categories, refused)
        if n == "harmful":
            metrics["asr_compliance"] = attack_success_rate(texts).rate
            # beside the raw ASR: its interval and the judge-error-corrected ASR (docs/judging.md §2)
            c = corrected_asr([is_compliance(t) for t in texts], list(sets[n].ids), judge=JUDGE_ID, seed=cfg.seed)
            cols = {**c.raw_columns("asr_compliance"), **c.columns("asr_compliance")}
            with timer("judge"):
                labels = classify_many(list(sets[n].prompts), texts, judge=cfg.judge)
            judged = judge_fields(cfg.judge, [model.spec], list(sets[n].ids), cfg.seed)
            cols.update(rate_columns([c == "harmful" for c in labels], list(sets[n].ids), judged["judge"], "asr_harmful",
                                     seed=cfg.seed))
            metrics.update(cols, continuation_judge=judged["judge"], judge_validation=judged["judge_validation"],
                           correction=correction_record([JUDGE_ID, judged["judge"]]))
            row.update(cols)
        rows.append(row)
        forms = sets[n].categories if cfg.general and sets[n].categories is not None else [None] * k
        labs = labels if n == "harmful" else [None] * k
        samples += [{"set": n, "id": i, "prompt": p, "response": t, "refusal_score": s, **({"form": f} if f else {}),
                     **({"label": lab} if lab is not None else {})}
                    for i, p, t, s, f, lab in zip(sets[n].ids, sets[n].prompts, texts, sc, forms, labs)]
        offset += k
    metrics["refusal_score_auroc"] = auroc(by_set["harmful"], by_set["harmless"])
    if cfg.general:                     # no borderline set and no cross-entropy on the general split
        metrics["harmless_ce"] = None
        return Evaluation(metrics=metrics, rows=rows, samples=samples, by_form=by_form)
    with timer("cross_entropy"):
        base_name = cfg.base or reference_spec(model.spec)
        base = base_model if base_model is not None else (
            model if base_name == model.spec else load(base_name, model.device, flag_name="--base"))
        ce_prompts = list(sets["harmless"].prompts)
        targets = answers_for(model, base, ce_prompts, max_new_tokens=cfg.ce_tokens, batch_size=cfg.batch_size)
        sums, counts = response_nll(model, ce_prompts, targets.tokens, cfg.batch_size)
        metrics["harmless_ce"] = token_mean(sums, counts)
        metrics["ce_reference"] = base.spec
        for sample, nll, n in zip((s for s in samples if s["set"] == "harmless"), sums, counts):
            sample["ce_nll_sum"], sample["ce_tokens"] = float(nll), int(n)  # the prompt's share of harmless_ce
    return Evaluation(metrics=metrics, rows=rows, samples=samples)


def _by_form(set_name: str, forms: Sequence[str], refused: Sequence[bool]) -> list[dict]:
    """Refusal rate with its Wilson interval per form of one set (the general split's breakdown)."""
    out = []
    for form in dict.fromkeys(forms):
        hits = [r for f, r in zip(forms, refused) if f == form]
        lo, hi = wilson_interval(sum(hits), len(hits))
        out.append({"set": set_name, "form": form, "n": len(hits), "refusal_rate": sum(hits) / len(hits),
                    "refusal_lo": lo, "refusal_hi": hi})
    return out


def run(cfg: EvalConfig, model=None) -> EvaluateResult:
    """Evaluate ``cfg.model`` (or the already loaded ``model``) on the three sets."""
    timer = Timer()
    with timer("load"):
        model = load(cfg.model, cfg.device, model=model)
        base = None
        if not cfg.general:                                     # the cross-entropy's reference model
            base_name = cfg.base or reference_spec(model.spec)  # loaded now: a bad --base fails before the work
            base = model if base_name == model.spec else load(base_name, model.device, flag_name="--base")
    eval_sets(cfg)                                          # and so does a bad prompt file
    ev = evaluate_model(model, cfg, base_model=base, timer=timer)
    provenance = {**model.provenance, **({"prompt_files": files} if (files := prompt_files(cfg)) else {})}
    return EvaluateResult(analysis="evaluate", model=cfg.model, config=asdict(cfg), seed=cfg.seed,
                          provenance=provenance, metrics=ev.metrics,
                          tables={"by_set": ev.rows, "samples": ev.samples,
                                  **({"by_form": ev.by_form} if ev.by_form else {})},
                          timings=timer.total())


main = make_main(EvalConfig, run)


if __name__ == "__main__":
    main()
