"""Is the alignment only a few tokens deep? Per-position KL and the prefill attack (Qi et al. 2024).

1. Per-position KL(aligned ‖ base) over the first 64 response positions, teacher-forcing the
   *base* model's harmful answers to harmful test prompts (HarmBench), mean and 95% interval;
   the same on the base's answers to harmless test prompts as control. Shallow alignment =
   KL concentrated in the first positions.
2. Prefill attack: the first k tokens of the base's harmful answer after the assistant header,
   the aligned model continues; ASR by two judges — ``prefill_asr_compliance`` (substring
   compliance: a non-trivial non-refusal) and ``prefill_asr_harmful`` (the harmful-continuation
   class) — and the three continuation classes for k ∈ {0, 5, 10, 20, 40}.

    $ python -m analyses.token_depth                        # organism vs its base
    $ python -m analyses.token_depth --model smollm2-135m-instruct:deep --quick
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from analyses.common import Timer
from analyses.contract import (AnalysisConfig, AnalysisResult, Summary, judge_fields, load, load_with_base, make_main,
                               prompt_files, prompts_or)
from depthlens.attacks import prefill_attack
from depthlens.cli import parse_config, require_choice, require_int, require_numbers, require_text
from depthlens.data import default_splits
from depthlens.interventions.divergence import per_position_kl
from depthlens.infra.errors import UsageError
from depthlens.judges import JUDGE_ID
from depthlens.judges.accuracy import corrected_trial_columns, correction_record
from depthlens.models.specs import ORGANISM, base_spec
from depthlens.runtime.responses import answers_for, same_tokenizer

QI_ET_AL = {"reference": "Qi et al. 2024, Llama-2-7B-Chat, HEx-PHI, GPT-4 judge",
            "prefill_asr": {"5": 0.42, "10": 0.52, "20": 0.56, "40": 0.57},
            "prefill_asr_after_deep_alignment": {"5": 0.028, "10": 0.029, "20": 0.034, "40": 0.045}}


@dataclass(frozen=True)
class TokenDepthConfig(AnalysisConfig):
    """Per-position KL and prefill-attack ASR of an aligned model against its base.

    Args:
        model: the aligned model spec (default: the organism; ``--aligned`` is its old name).
        base: the model whose answers are teacher-forced and prefilled, and the KL's partner
            (default: the aligned spec without recipe suffixes). For a pretrained-only base
            (``gemma3-270m``) the answers are the embedded default's, re-encoded
            (``depthlens.models.specs.reference_spec``), and the KL stays against the base itself;
            so it does for a ``--base`` with another tokenizer.
        n_prompts: harmful test prompts (HarmBench) for KL and the prefill attack.
        n_control: harmless test prompts for the control KL.
        harmful: a .txt/.jsonl/.csv file of harmful prompts used instead of the split's.
        harmless: a file of harmless (control) prompts used instead of the split's.
        positions: response positions for the KL.
        response_tokens: length of the base's harmful answers (≥ the largest k and ≥ positions).
        ks: prefill lengths k.
        max_new_tokens: tokens generated after the prefill.
        batch_size: sequences per batch. 48: greedy generation on a CPU runs faster at 48 than
            at 16 or 32 (docs/findings.md "Costs measured on the way"); on a GPU larger still is better.
        judge: the continuation judge by id (default: the default judge, the best validated;
            lexical judges such as ``lexical-v2`` for fast runs; ``hf:PATH`` a local guard model).
        seed: split/bootstrap seed.
        split: ``test`` (reported numbers: HarmBench) or ``val`` (DoNotAnswer val, for choosing
            recipe settings without looking at the test split).
        device: cpu / cuda (default: automatic).
        out: results root directory.
        quick: small run (8 prompts, 16 positions, 24 new tokens); flags given explicitly
            keep their values.
    """

    QUICK: ClassVar = {"n_prompts": 8, "n_control": 8, "positions": 16, "max_new_tokens": 24}

    model: str = ORGANISM
    base: str | None = None
    n_prompts: int = 48
    n_control: int = 32
    harmful: str | None = None
    harmless: str | None = None
    positions: int = 64
    response_tokens: int = 96
    ks: tuple[int, ...] = (0, 5, 10, 20, 40)
    max_new_tokens: int = 48
    batch_size: int = 48
    judge: str | None = None
    seed: int = 0
    split: str = "test"
    device: str | None = None
    out: str = "results"
    quick: bool = False

    def validate(self) -> None:
        require_text(self, "base", optional=True)
        for name in ("n_prompts", "n_control", "positions", "response_tokens", "max_new_tokens"):
            require_int(self, name)
        require_numbers(self, "ks", lo=0, integer=True)
        require_choice(self, "split", ("test", "val"))
        if max(self.ks) > self.response_tokens or self.positions > self.response_tokens:
            raise UsageError(f"--response-tokens ({self.response_tokens}) must be >= the largest --ks "
                             f"({max(self.ks)}) and >= --positions ({self.positions}).")


@dataclass
class TokenDepthResult(AnalysisResult):
    """The record of ``analyses.token_depth``, with its headline numbers typed."""

    @property
    def kl_harmful_first5(self) -> list[float]:
        return self.metrics["kl_harmful_first5"]

    @property
    def kl_share_first5(self) -> float:
        return self.metrics["kl_share_first5"]

    @property
    def prefill_asr_compliance(self) -> dict[str, float]:
        """Prefill ASR by k, substring compliance judge (non-trivial and not a refusal)."""
        return self.metrics["prefill_asr_compliance"]

    @property
    def prefill_asr_harmful(self) -> dict[str, float]:
        """Prefill ASR by k, harmful-continuation class of the continuation judge."""
        return self.metrics["prefill_asr_harmful"]

    def summary(self) -> Summary:
        m = self.metrics
        after = m["kl_harmful_mean_6_to_end"]
        title = (f"token depth of {self.model}: KL at response positions 1-5 {[round(x, 2) for x in self.kl_harmful_first5]}, "
                 + (f"mean after {after:.3f}; " if after is not None else "no positions after 5; ")
                 + f"share of KL in the first 5 {self.kl_share_first5:.2f}. Prefill ASR: asr_compliance = "
                 f"substring compliance ({m['judge']}), harmful = harmful-continuation class ({m['continuation_judge']})")
        cols = ["k", "n", "asr_compliance", "asr_compliance_lo", "asr_compliance_hi", "asr_compliance_corrected",
                "asr_compliance_corrected_lo", "asr_compliance_corrected_hi", "harmful", "harmful_lo", "harmful_hi",
                "harmful_corrected", "harmful_corrected_lo", "harmful_corrected_hi", "recovered", "other"]
        return Summary(title, self.tables["prefill"], cols)


def judged_rows(rows: list[dict]) -> list[dict]:
    """``AttackResult.asr_by`` rows with ``compliance`` (and its interval) named ``asr_compliance``; the
    headline ``asr`` (the continuation judge's harmful call, the same as ``harmful``) dropped."""
    return [{(f"asr_{k}" if k.startswith("compliance") else k): v for k, v in r.items() if not k.startswith("asr")}
            for r in rows]


def corrected_columns(trials, seed: int = 0) -> dict[str, float]:
    """Judge-error-corrected prefill ASRs of one k: ``asr_compliance_corrected`` and ``harmful_corrected`` (± interval)."""
    c = corrected_trial_columns(trials, seed=seed)
    return {f"{dst}{end}": c[f"{src}{end}"] for src, dst in (("compliance", "asr_compliance"), ("harmful", "harmful"))
            for end in ("_corrected", "_corrected_lo", "_corrected_hi", "_corrected_note") if f"{src}{end}" in c}


def run(cfg: TokenDepthConfig, model=None) -> TokenDepthResult:
    """KL and prefill attack of ``cfg.model`` (or the loaded ``model``) against its base."""
    timer = Timer()
    with timer("load"):
        aligned, ref = load_with_base(cfg, model)  # ref answers; the KL needs a model of the same vocabulary
        base = ref if same_tokenizer(aligned, ref) else load(base_spec(cfg.model), aligned.device,
                                                             flag_name="--model (its base)")
    splits = default_splits(cfg.seed)
    harmful = prompts_or(cfg.harmful, lambda: getattr(splits.harmful, cfg.split), "--harmful").subset(
        cfg.n_prompts, seed=cfg.seed)
    harmless = prompts_or(cfg.harmless, lambda: getattr(splits.harmless, cfg.split), "--harmless").subset(
        cfg.n_control, seed=cfg.seed)
    with timer("base_responses"):
        harm_resp = answers_for(aligned, ref, harmful.prompts, max_new_tokens=cfg.response_tokens,
                                batch_size=cfg.batch_size)
        ctrl_resp = answers_for(aligned, ref, harmless.prompts, max_new_tokens=cfg.response_tokens,
                                batch_size=cfg.batch_size)
    with timer("kl"):
        kl_h = per_position_kl(aligned, base, harmful.prompts, harm_resp.tokens, n_positions=cfg.positions, seed=cfg.seed)
        kl_c = per_position_kl(aligned, base, harmless.prompts, ctrl_resp.tokens, n_positions=cfg.positions, seed=cfg.seed)
    with timer("prefill"):
        attack = prefill_attack(aligned, list(harmful.prompts), harm_resp.tokens, ks=cfg.ks,
                                max_new_tokens=cfg.max_new_tokens, prompt_ids=list(harmful.ids), batch_size=cfg.batch_size,
                                judge=cfg.judge)
    prefill_rows = judged_rows(attack.asr_by("k"))
    for row in prefill_rows:  # each raw ASR beside its judge-error-corrected value (docs/judging.md §2)
        row.update(corrected_columns([t for t in attack.trials if t.k == row["k"]], seed=cfg.seed))
    metrics = {
        "interval": ("95 %; KL: bootstrap over prompts; prefill ASR at each k: wilson (one trial per prompt, the "
                     "rows' *_interval columns); corrected: joint bootstrap of prompts and held-out labels"),
        "kl_harmful_first5": kl_h.mean[:5].tolist(),
        "kl_harmful_mean_6_to_end": float(kl_h.mean[5:].mean()) if cfg.positions > 5 else None,
        "kl_control_first5": kl_c.mean[:5].tolist(),
        "kl_share_first5": float(kl_h.mean[:5].sum() / max(kl_h.mean.sum(), 1e-12)),
        "prefill_asr_compliance": {str(r["k"]): r["asr_compliance"] for r in prefill_rows},
        "prefill_asr_harmful": {str(r["k"]): r["harmful"] for r in prefill_rows},
        **{f"prefill_asr_{name}{end}": {str(r["k"]): r[f"{col}{end}"] for r in prefill_rows}
           for name, col in (("compliance", "asr_compliance"), ("harmful", "harmful"))
           for end in ("_corrected", "_corrected_lo", "_corrected_hi")},
        "judge": JUDGE_ID, "continuation_judge": (judged := judge_fields(cfg.judge, [cfg.model], list(harmful.ids),
                                                                         cfg.seed))["judge"],
        "judge_validation": judged["judge_validation"],
        "correction": correction_record([JUDGE_ID, judged["judge"]]),
        "reference": QI_ET_AL,
    }
    tables = {"kl": kl_h.records("harmful") + kl_c.records("harmless"), "prefill": prefill_rows,
              "trials": [asdict(t) for t in attack.trials]}
    provenance = {"aligned": aligned.provenance, "base": base.provenance,
                  **({"answers": ref.provenance} if ref is not base else {}),
                  **({"prompt_files": files} if (files := prompt_files(cfg)) else {})}
    return TokenDepthResult(analysis="token_depth", model=cfg.model, config=asdict(cfg), seed=cfg.seed,
                            provenance=provenance, metrics=metrics, tables=tables, timings=timer.total())


main = make_main(TokenDepthConfig, run, parse=lambda cls, argv: parse_config(cls, argv, aliases={"--aligned": "model"}))


if __name__ == "__main__":
    main()
