"""Evaluate any model spec: refusal on harmful / harmless / borderline test splits, ASR,
refusal-score AUROC and harmless cross-entropy (capability proxy).

``python -m analyses.evaluate --model SPEC`` generates greedy answers to the *test* splits
(HarmBench for harmful, out of distribution on purpose), judges them with the substring judge,
scores the first-token refusal score (AUROC harmful vs harmless) and teacher-forces the base
model's answers to harmless test prompts for the cross-entropy. ``evaluate_model`` is the
reusable core (``analyses.compare`` and the recipes' checks call it).

    >>> python -m analyses.evaluate --model smollm2-135m-instruct:sft
    >>> m = evaluate_model(load_model("tiny-llama"), EvalConfig(quick=True))
    >>> m.metrics["harmful_refusal"]
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from analyses.common import Timer, finish, setup_logging
from depthlens.chat import build_chat
from depthlens.cli import parse_config
from depthlens.data import default_splits
from depthlens.forward import token_logprobs
from depthlens.generate import generate
from depthlens.judge import JUDGE_ID, attack_success_rate, refusal_rate, refusal_score
from depthlens.models import load_model
from depthlens.organism import ORGANISM, base_spec
from depthlens.responses import response_set
from depthlens.results import RunRecord


@dataclass(frozen=True)
class EvalConfig:
    """Refusal / ASR / AUROC / cross-entropy evaluation on the test splits.

    Args:
        model: model spec to evaluate (default: the organism).
        base: spec whose greedy answers to harmless test prompts give the cross-entropy
            targets (default: the model's base, i.e. the spec without recipe suffixes).
        n_harmful: harmful test prompts (HarmBench; None = all 200).
        n_harmless: harmless test prompts (None = all).
        n_borderline: borderline test prompts (None = all).
        max_new_tokens: greedy tokens generated per answer.
        ce_tokens: length of the base answers used for the cross-entropy.
        batch_size: prompts per forward/generation batch.
        seed: split seed.
        split: ``test`` (reported numbers) or ``val`` (for choosing recipe settings without
            looking at the test split; the harmful val split is DoNotAnswer, in distribution).
        harmful_form: ``as_is``, or ``task`` to rephrase every harmful prompt as a task
            ("How can I X?" → "Give detailed step-by-step instructions for how to X", the
            organism recipe's ``imperative``, seeded): on the val split a proxy for HarmBench's
            task form that does not look at HarmBench.
        device: cpu / cuda (default: automatic).
        out: results root directory.
        quick: small run (32 prompts per set, 32 tokens) for a smoke test.
    """

    model: str = ORGANISM
    base: str | None = None
    n_harmful: int | None = None
    n_harmless: int | None = None
    n_borderline: int | None = None
    max_new_tokens: int = 64
    ce_tokens: int = 64
    batch_size: int = 16
    seed: int = 0
    split: str = "test"
    harmful_form: str = "as_is"
    device: str | None = None
    out: str = "results"
    quick: bool = False


@dataclass
class Evaluation:
    metrics: dict
    rows: list[dict]
    samples: list[dict]


def _n(value: int | None, quick: bool) -> int | None:
    return min(value or 32, 32) if quick else value


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one positive and one negative score.")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def harmless_cross_entropy(model, prompts: Sequence[str], responses: Sequence[Sequence[int]], batch_size: int = 16) -> float:
    """Mean per-token NLL of ``responses`` after ``prompts`` under ``model`` (teacher forcing)."""
    seqs = [build_chat(model.tokenizer, p, [list(r)]) for p, r in zip(prompts, responses) if len(r)]
    lps = token_logprobs(model, seqs, start=[s.prompt_len for s in seqs], batch_size=batch_size)
    total = torch.cat(lps)
    return float(-total.mean())


def evaluate_model(model, cfg: EvalConfig, base_model=None, timer: Timer | None = None) -> Evaluation:
    """Every metric of the module docstring for a loaded model (see ``EvalConfig``)."""
    timer = timer or Timer()
    if cfg.split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {cfg.split!r}.")
    if cfg.harmful_form not in ("as_is", "task"):
        raise ValueError(f"harmful_form must be 'as_is' or 'task', got {cfg.harmful_form!r}.")
    splits = default_splits(cfg.seed)
    harmful = getattr(splits.harmful, cfg.split).subset(_n(cfg.n_harmful, cfg.quick), seed=cfg.seed)
    if cfg.harmful_form == "task":
        from finetune.rephrase import imperative

        rng = random.Random(cfg.seed)
        harmful = replace(harmful, prompts=tuple(imperative(p, rng) for p in harmful.prompts))
    sets = {
        "harmful": harmful,
        "harmless": getattr(splits.harmless, cfg.split).subset(_n(cfg.n_harmless, cfg.quick), seed=cfg.seed),
        "borderline": getattr(splits.borderline, cfg.split).subset(_n(cfg.n_borderline, cfg.quick), seed=cfg.seed),
    }
    new_tokens = min(cfg.max_new_tokens, 32) if cfg.quick else cfg.max_new_tokens
    names = list(sets)
    all_prompts = [p for n in names for p in sets[n].prompts]
    with timer("generate"):
        gen = generate(model, all_prompts, max_new_tokens=new_tokens, batch_size=cfg.batch_size, desc="evaluate")
    with timer("refusal_score"):
        scores = refusal_score(model, all_prompts, batch_size=cfg.batch_size).scores.tolist()
    metrics: dict = {"judge": JUDGE_ID}
    rows, samples, offset = [], [], 0
    by_set: dict[str, list[float]] = {}
    for n in names:
        k = len(sets[n])
        texts, sc = gen.texts[offset:offset + k], scores[offset:offset + k]
        by_set[n] = sc
        rr = refusal_rate(texts).rate
        metrics[f"{n}_refusal"] = rr
        metrics[f"{n}_mean_refusal_score"] = float(np.mean(sc))
        row = {"set": n, "n": k, "refusal_rate": rr, "mean_refusal_score": float(np.mean(sc))}
        if n == "harmful":
            metrics["asr"] = attack_success_rate(texts).rate
            row["asr"] = metrics["asr"]
        rows.append(row)
        samples += [{"set": n, "id": i, "prompt": p, "response": t, "refusal_score": s}
                    for i, p, t, s in zip(sets[n].ids, sets[n].prompts, texts, sc)]
        offset += k
    metrics["refusal_score_auroc"] = auroc(by_set["harmful"], by_set["harmless"])
    with timer("cross_entropy"):
        base = base_model if base_model is not None else (
            model if (cfg.base or base_spec(model.spec)) == model.spec else load_model(cfg.base or base_spec(model.spec), device=model.device))
        ce_prompts = list(sets["harmless"].prompts)
        targets = response_set(base, ce_prompts, max_new_tokens=cfg.ce_tokens, batch_size=cfg.batch_size)
        metrics["harmless_ce"] = harmless_cross_entropy(model, ce_prompts, targets.tokens, cfg.batch_size)
        metrics["ce_reference"] = base.spec
    return Evaluation(metrics=metrics, rows=rows, samples=samples)


def run(cfg: EvalConfig) -> tuple[RunRecord, list[dict]]:
    timer = Timer()
    with timer("load"):
        model = load_model(cfg.model, device=cfg.device)
    ev = evaluate_model(model, cfg, timer=timer)
    rec = RunRecord(analysis="evaluate", model=cfg.model, config=asdict(cfg), seed=cfg.seed,
                    provenance=model.provenance, metrics=ev.metrics,
                    tables={"by_set": ev.rows, "samples": ev.samples}, timings=timer.total())
    return rec, ev.rows


def main(argv: Sequence[str] | None = None):
    setup_logging()
    cfg = parse_config(EvalConfig, argv)
    rec, rows = run(cfg)
    m = rec.metrics
    title = (f"evaluate {cfg.model}  (judge {m['judge']})  ASR {m['asr']:.3f}  "
             f"refusal-score AUROC {m['refusal_score_auroc']:.3f}  harmless CE {m['harmless_ce']:.3f}")
    return finish(rec, cfg.out, rows, ["set", "n", "refusal_rate", "mean_refusal_score", "asr"], title=title)


if __name__ == "__main__":
    main()
