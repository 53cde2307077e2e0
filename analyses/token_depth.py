"""Is the alignment only a few tokens deep? Per-position KL and the prefill attack (Qi et al. 2024).

1. Per-position KL(aligned ‖ base) over the first 64 response positions, teacher-forcing the
   *base* model's harmful answers to harmful test prompts (HarmBench), mean and 95% interval;
   the same on the base's answers to harmless test prompts as control. Shallow alignment =
   KL concentrated in the first positions.
2. Prefill attack: the first k tokens of the base's harmful answer after the assistant header,
   the aligned model continues; ASR (substring judge) and the three continuation classes for
   k ∈ {0, 5, 10, 20, 40}.

    $ python -m analyses.token_depth                        # organism vs its base
    $ python -m analyses.token_depth --aligned smollm2-135m-instruct:deep --quick
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from analyses.common import Timer, finish, setup_logging
from depthlens.attacks import prefill_attack
from depthlens.cli import parse_config
from depthlens.data import default_splits
from depthlens.divergence import per_position_kl
from depthlens.models import load_model
from depthlens.organism import ORGANISM, base_spec
from depthlens.responses import response_set
from depthlens.results import RunRecord

QI_ET_AL = {"reference": "Qi et al. 2024, Llama-2-7B-Chat, HEx-PHI, GPT-4 judge",
            "prefill_asr": {"5": 0.42, "10": 0.52, "20": 0.56, "40": 0.57},
            "prefill_asr_after_deep_alignment": {"5": 0.028, "10": 0.029, "20": 0.034, "40": 0.045}}


@dataclass(frozen=True)
class TokenDepthConfig:
    """Per-position KL and prefill-attack ASR of an aligned model against its base.

    Args:
        aligned: the aligned model spec (default: the organism).
        base: the base model spec (default: the aligned spec without recipe suffixes).
        n_prompts: harmful test prompts (HarmBench) for KL and the prefill attack.
        n_control: harmless test prompts for the control KL.
        positions: response positions for the KL.
        response_tokens: length of the base's harmful answers (≥ the largest k + positions used).
        ks: prefill lengths k.
        max_new_tokens: tokens generated after the prefill.
        batch_size: sequences per batch. 48: greedy generation on 2 CPU cores runs 1.4× faster
            at 48 than at 16 (86 vs 61 new tokens/s, 48 prefilled HarmBench prompts × 48
            tokens, warm, 2026-12-01; 32 gave 67); on a GPU larger still is better.
        seed: split/bootstrap seed.
        split: ``test`` (reported numbers: HarmBench) or ``val`` (DoNotAnswer val, for choosing
            recipe settings without looking at the test split).
        device: cpu / cuda (default: automatic).
        out: results root directory.
        quick: small run (8 prompts, 16 positions, 24 new tokens).
    """

    aligned: str = ORGANISM
    base: str | None = None
    n_prompts: int = 48
    n_control: int = 32
    positions: int = 64
    response_tokens: int = 96
    ks: tuple[int, ...] = (0, 5, 10, 20, 40)
    max_new_tokens: int = 48
    batch_size: int = 48
    seed: int = 0
    split: str = "test"
    device: str | None = None
    out: str = "results"
    quick: bool = False


def run(cfg: TokenDepthConfig) -> RunRecord:
    if cfg.split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {cfg.split!r}.")
    if cfg.quick:
        cfg = replace(cfg, n_prompts=min(cfg.n_prompts, 8), n_control=min(cfg.n_control, 8),
                      positions=min(cfg.positions, 16), max_new_tokens=min(cfg.max_new_tokens, 24))
    timer = Timer()
    with timer("load"):
        aligned = load_model(cfg.aligned, device=cfg.device)
        base_name = cfg.base or base_spec(cfg.aligned)
        base = aligned if base_name == cfg.aligned else load_model(base_name, device=cfg.device)
    splits = default_splits(cfg.seed)
    harmful = getattr(splits.harmful, cfg.split).subset(cfg.n_prompts, seed=cfg.seed)
    harmless = getattr(splits.harmless, cfg.split).subset(cfg.n_control, seed=cfg.seed)
    with timer("base_responses"):
        harm_resp = response_set(base, harmful.prompts, max_new_tokens=cfg.response_tokens, batch_size=cfg.batch_size)
        ctrl_resp = response_set(base, harmless.prompts, max_new_tokens=cfg.response_tokens, batch_size=cfg.batch_size)
    with timer("kl"):
        kl_h = per_position_kl(aligned, base, harmful.prompts, harm_resp.tokens, n_positions=cfg.positions, seed=cfg.seed)
        kl_c = per_position_kl(aligned, base, harmless.prompts, ctrl_resp.tokens, n_positions=cfg.positions, seed=cfg.seed)
    with timer("prefill"):
        attack = prefill_attack(aligned, list(harmful.prompts), harm_resp.tokens, ks=cfg.ks,
                                max_new_tokens=cfg.max_new_tokens, prompt_ids=list(harmful.ids), batch_size=cfg.batch_size)
    prefill_rows = attack.asr_by("k")
    first = kl_h.mean[:5].tolist()
    metrics = {
        "kl_harmful_first5": first,
        "kl_harmful_mean_6_to_end": float(kl_h.mean[5:].mean()) if cfg.positions > 5 else None,
        "kl_control_first5": kl_c.mean[:5].tolist(),
        "kl_share_first5": float(kl_h.mean[:5].sum() / max(kl_h.mean.sum(), 1e-12)),
        "prefill_asr": {str(r["k"]): r["asr"] for r in prefill_rows},
        "judge": attack.trials[0].judge if attack.trials else None,
        "reference": QI_ET_AL,
    }
    tables = {"kl": kl_h.records("harmful") + kl_c.records("harmless"), "prefill": prefill_rows,
              "trials": [asdict(t) for t in attack.trials]}
    return RunRecord(analysis="token_depth", model=cfg.aligned, config=asdict(cfg), seed=cfg.seed,
                     provenance={"aligned": aligned.provenance, "base": base.provenance},
                     metrics=metrics, tables=tables, timings=timer.total())


def main(argv: Sequence[str] | None = None):
    setup_logging()
    cfg = parse_config(TokenDepthConfig, argv)
    rec = run(cfg)
    m = rec.metrics
    title = (f"token depth of {cfg.aligned}: KL at response positions 1-5 {[round(x, 2) for x in m['kl_harmful_first5']]}, "
             f"mean after {m['kl_harmful_mean_6_to_end']:.3f}; share of KL in the first 5 {m['kl_share_first5']:.2f}")
    cols = ["k", "n", "asr", "asr_lo", "asr_hi", "harmful", "recovered", "other"]
    return finish(rec, cfg.out, rec.tables["prefill"], cols, title=title)


if __name__ == "__main__":
    main()
