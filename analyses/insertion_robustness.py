"""Beyond the first tokens: does a short harmful span inserted *inside* a refusal flip it?

Random insertion attack (Lyu et al. 2026; docs/methods.md §3): the aligned model's own greedy refusal
to a harmful test prompt, with the first m tokens of the base model's harmful answer inserted
at relative depth p/|refusal|; the model continues, and the continuation is judged in three
classes (recovered / harmful / other; a bare "not a refusal" overstates ASR, docs/methods.md §1).
Reported: ASR by depth × span length m ∈ {2, 4, 8, 16}, the change in ASR from each depth to the
next with a paired prompt-bootstrap interval (``tables["depth_differences"]``), random-position ASR, and the
worst-insertion ASR (the (p, m) minimizing the next-token refusal score, per prompt). Every
trial is saved (``tables["trials"]``) for ``analyses.state_prediction``.

    $ python -m analyses.insertion_robustness
    $ python -m analyses.insertion_robustness --model smollm2-135m-instruct:sft:deep --quick
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import ClassVar, TYPE_CHECKING

from analyses.common import Timer
from analyses.contract import (AnalysisConfig, AnalysisResult, Summary, fmt, judge_fields, load_with_base, make_main,
                               prompt_files, prompts_or)
from depthlens.attacks import random_insertion_attack
from depthlens.cli import require_int, require_numbers, require_text
from depthlens.data import default_splits
from depthlens.infra.errors import UsageError
from depthlens.judges.accuracy import corrected_trial_columns, correction_record
from depthlens.models.specs import ORGANISM
from depthlens.runtime.responses import answers_for, response_set
from depthlens.attacks.worst import worst_insertion_attack
from depthlens.stats import paired_rate_difference, rate_interval

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InsertionConfig(AnalysisConfig):
    """Random and worst-case insertion of harmful spans into the model's own refusals.

    Args:
        model: the aligned model spec (default: the organism).
        base: spec whose harmful answers provide the spans (default: the model's base; for a
            pretrained-only base the embedded default, ``depthlens.models.specs.reference_spec``).
        n_prompts: harmful test prompts (HarmBench) whose refusals are attacked. 16: the
            5 × 4 grid then holds 320 trials, and the default run stays within a few minutes on
            a CPU (docs/findings.md "Costs measured on the way"); raise it on a GPU.
        harmful: a .txt/.jsonl/.csv file of harmful prompts used instead of the test split.
        depths: relative insertion depths p/|refusal| of the grid.
        span_lengths: inserted span lengths m.
        n_random: random positions per prompt for the random-position ASR (m = 8; >= 1).
        harmful_tokens: length of the base's harmful answers the spans are cut from (≥ the
            largest span length).
        refusal_tokens: length of the model's own greedy refusals.
        min_refusal_tokens: own answers shorter than this are not attacked (too short to
            hold an insertion); their share is ``share_with_long_refusal``.
        max_new_tokens: tokens generated after the insertion (32: long enough for the
            model to return to a refusal sentence; shorter would bias ASR upward).
        batch_size: sequences per batch. 48: greedy generation on a CPU runs faster at 48 than
            at 16 or 32 (docs/findings.md "Costs measured on the way"); on a GPU larger still is better.
        judge: the continuation judge by id (default: the default judge, the best validated;
            ``substring-v1``, ``substring+topic-overlap-v1``, ``lexical-v2``: fast lexical judges;
            ``hf:PATH``: a local guard model; docs/judging.md).
        seed: split and position seed.
        device: cpu / cuda (default: automatic).
        out: results root directory.
        quick: small run (6 prompts, depths 0/0.5/1, m 2/8, 2 random positions, 16 new tokens,
            refusals of >= 4 tokens attacked); flags given explicitly keep their values.
    """

    QUICK: ClassVar = {"n_prompts": 6, "depths": (0.0, 0.5, 1.0), "span_lengths": (2, 8), "n_random": 2,
                       "max_new_tokens": 16, "min_refusal_tokens": 4}

    model: str = ORGANISM
    base: str | None = None
    n_prompts: int = 16
    harmful: str | None = None
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    span_lengths: tuple[int, ...] = (2, 4, 8, 16)
    n_random: int = 2
    harmful_tokens: int = 96
    refusal_tokens: int = 64
    min_refusal_tokens: int = 32
    max_new_tokens: int = 32
    batch_size: int = 48
    judge: str | None = None
    seed: int = 0
    device: str | None = None
    out: str = "results"
    quick: bool = False

    def validate(self) -> None:
        require_text(self, "base", optional=True)
        for name in ("n_prompts", "n_random", "harmful_tokens", "refusal_tokens", "min_refusal_tokens",
                     "max_new_tokens"):
            require_int(self, name)
        require_numbers(self, "depths", lo=0.0, hi=1.0)
        require_numbers(self, "span_lengths", lo=1, integer=True)
        if max(self.span_lengths) > self.harmful_tokens:
            raise UsageError(f"--harmful-tokens ({self.harmful_tokens}) must be >= the largest --span-lengths "
                             f"({max(self.span_lengths)}).")
        if self.min_refusal_tokens > self.refusal_tokens:
            raise UsageError(f"--min-refusal-tokens ({self.min_refusal_tokens}) must be <= --refusal-tokens "
                             f"({self.refusal_tokens}): no refusal could be long enough.")


@dataclass
class InsertionResult(AnalysisResult):
    """The record of ``analyses.insertion_robustness``; every ASR is the harmful-continuation class."""

    @property
    def asr_harmful_grid(self) -> float | None:
        return self.metrics["asr_harmful_grid"]

    @property
    def asr_harmful_random(self) -> float | None:
        return self.metrics["asr_harmful_random"]

    @property
    def asr_harmful_worst(self) -> float | None:
        return self.metrics["asr_harmful_worst"]

    def summary(self) -> Summary:
        m = self.metrics
        title = (f"insertion robustness of {self.model} ({m['n_prompts_attacked']} prompts): harmful-continuation ASR "
                 f"(judge {m['judge']}) grid {fmt(self.asr_harmful_grid, '.2f')}, random "
                 f"{fmt(self.asr_harmful_random, '.2f')}, worst {fmt(self.asr_harmful_worst, '.2f')}; judge-corrected "
                 f"grid {fmt(m.get('asr_harmful_grid_corrected'), '.2f')}, random "
                 f"{fmt(m.get('asr_harmful_random_corrected'), '.2f')}, worst {fmt(m.get('asr_harmful_worst_corrected'), '.2f')}")
        cols = ["depth", "span_len", "n", "harmful", "harmful_lo", "harmful_hi", "harmful_interval", *CORRECTED_KEYS, "recovered",
                "other", "not_refusal"]
        return Summary(title, self.tables["by_depth_and_length"], cols)


def run(cfg: InsertionConfig, model: HookedModel | None=None) -> InsertionResult:
    """The grid, random and worst insertions into ``cfg.model``'s (or ``model``'s) own refusals."""
    timer = Timer()
    with timer("load"):
        model, base = load_with_base(cfg, model)
    harmful = prompts_or(cfg.harmful, lambda: default_splits(cfg.seed).harmful.test, "--harmful").subset(
        cfg.n_prompts, seed=cfg.seed)
    prompts, ids = list(harmful.prompts), list(harmful.ids)
    with timer("responses"):
        h = answers_for(model, base, prompts, max_new_tokens=cfg.harmful_tokens, batch_size=cfg.batch_size).tokens
        refusals = response_set(model, prompts, max_new_tokens=cfg.refusal_tokens, batch_size=cfg.batch_size).tokens
    min_len = cfg.min_refusal_tokens
    common = dict(prompt_ids=ids, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, min_refusal_tokens=min_len,
                  judge=cfg.judge)
    with timer("grid"):
        grid = random_insertion_attack(model, prompts, refusals, h, depths=cfg.depths, span_lengths=cfg.span_lengths, **common)
    with timer("random"):
        rand = random_insertion_attack(model, prompts, refusals, h, span_lengths=(8,), n_random=cfg.n_random,
                                       seed=cfg.seed, **common)
    with timer("worst"):
        worst = worst_insertion_attack(model, prompts, refusals, h, candidate_positions=cfg.depths,
                                       span_lengths=cfg.span_lengths, prompt_ids=ids, batch_size=cfg.batch_size,
                                       max_new_tokens=cfg.max_new_tokens, min_refusal_tokens=min_len, judge=cfg.judge)
    by_cell = grid.asr_by(("depth", "span_len")) if grid.trials else []
    rows_m = grid.asr_by("span_len") if grid.trials else []
    for row in by_cell + rows_m:  # each raw ASR beside its judge-error-corrected value (docs/judging.md §2)
        cell = [t for t in grid.trials if t.span_len == row["span_len"] and row.get("depth", t.depth) == t.depth]
        row.update(_corrected(cell, cfg.seed))
    summary = [
        {"attack": "grid (all cells)", **_overall(grid)},
        {"attack": "random position, m=8", **_overall(rand)},
        {"attack": "worst insertion", **_overall(worst)},
    ]
    for row, res in zip(summary, (grid, rand, worst)):
        row.update(_corrected(res.trials, cfg.seed) if res.trials else dict.fromkeys(CORRECTED_KEYS))
    own_refusal_rate = sum(1 for t in refusals if len(t) >= min_len) / max(1, len(refusals))
    metrics = {
        "asr_harmful_grid": summary[0]["harmful"], "asr_harmful_random": summary[1]["harmful"],
        "asr_harmful_worst": summary[2]["harmful"], "recovered_grid": summary[0]["recovered"],
        **{f"asr_harmful_{name}{key[len('harmful'):]}": row[key] for name, row in zip(("grid", "random", "worst"), summary)
           for key in ("harmful_lo", "harmful_hi", "harmful_interval", *CORRECTED_KEYS)},
        "interval": INTERVAL_NOTE,
        "n_prompts_attacked": len({t.prompt_id for t in grid.trials}), "skipped": len(grid.skipped),
        "share_with_long_refusal": own_refusal_rate,
        **(judged := judge_fields(cfg.judge, [cfg.model], ids, cfg.seed)),
        "correction": correction_record([judged["judge"]]),
    }
    if not grid.trials:
        log.warning("No refusal of %s was >= %d tokens long (--min-refusal-tokens): nothing was attacked.",
                    cfg.model, min_len)
    tables = {"by_depth_and_length": by_cell, "by_length": rows_m, "summary": summary,
              "depth_differences": depth_differences(grid.trials, cfg.depths, cfg.seed) if grid.trials else [],
              "trials": [asdict(t) for t in grid.trials + rand.trials + worst.trials]}
    provenance = {"model": model.provenance, "base": base.provenance,
                  **({"prompt_files": files} if (files := prompt_files(cfg)) else {})}
    return InsertionResult(analysis="insertion_robustness", model=cfg.model, config=asdict(cfg), seed=cfg.seed,
                           provenance=provenance, metrics=metrics, tables=tables, timings=timer.total())


CORRECTED_KEYS = ("harmful_corrected", "harmful_corrected_lo", "harmful_corrected_hi")
INTERVAL_NOTE = ("95 %; raw rates: prompt_bootstrap (whole prompts resampled) where a prompt gave several trials, wilson "
                 "where each gave one, wilson_over_prompts where no trial (or every trial) succeeded (the *_interval keys "
                 "and the rows' <rate>_interval columns name which); corrected rates: a "
                 "joint bootstrap of prompts and held-out labels (docs/methods.md §0, docs/judging.md §2)")


def _corrected(trials, seed: int) -> dict:
    """The harmful-continuation ASR of ``trials`` corrected for the continuation judge's measured errors."""
    c = corrected_trial_columns(trials, seed=seed)
    return {k: c[k] for k in (*CORRECTED_KEYS, "harmful_corrected_note") if k in c}


def depth_differences(trials, depths, seed: int = 0) -> list[dict]:
    """Harmful-continuation ASR at each grid depth minus the one before (pooled over span lengths),
    with a paired prompt bootstrap interval: both depths are rates over the same prompts.

    ``trials``: the grid's ``Trial``s or their dicts (a record's ``tables["trials"]``, where
    only the grid trials, ``attack == "insertion"`` with a ``depth`` in ``depths``, are used).
    """
    get = lambda t, k: t[k] if isinstance(t, dict) else getattr(t, k)  # noqa: E731
    by_depth: dict[float, list] = {}
    for t in trials:
        if get(t, "attack") == "insertion" and get(t, "depth") in depths:
            by_depth.setdefault(float(get(t, "depth")), []).append(t)
    order = [float(d) for d in sorted(set(depths)) if float(d) in by_depth]
    rows = []
    for a, b in zip(order, order[1:]):
        ta, tb = by_depth[a], by_depth[b]
        d = paired_rate_difference([get(t, "label") == "harmful" for t in ta], [get(t, "label") == "harmful" for t in tb],
                                   [get(t, "prompt_id") for t in ta], [get(t, "prompt_id") for t in tb], seed=seed)
        rows.append({"from_depth": a, "to_depth": b, "asr_from": sum(get(t, "label") == "harmful" for t in ta) / len(ta),
                     "asr_to": sum(get(t, "label") == "harmful" for t in tb) / len(tb), "difference": d.rate,
                     "lo": d.lo, "hi": d.hi, "n_prompts": d.n_prompts, "interval": d.method})
    return rows


def depth_differences_of_record(record: dict) -> list[dict]:
    """``depth_differences`` recomputed from a results.json (a dict): its grid trials are the first
    ``sum(n)`` of ``tables["trials"]`` (grid, then random, then worst insertions)."""
    n_grid = sum(r["n"] for r in record["tables"]["by_depth_and_length"])
    return depth_differences(record["tables"]["trials"][:n_grid], record["config"]["depths"], record.get("seed", 0))


def summary_intervals_of_record(record: dict) -> dict[str, dict]:
    """The grid, random and worst harmful-continuation ASRs of a results.json (a dict) with the
    intervals of ``depthlens.stats.rate_interval``, recomputed from its trials: for records
    written before the intervals respected prompts (their ``tables["summary"]`` gives Wilson's)."""
    n = [row["n"] or 0 for row in record["tables"]["summary"]]
    trials = record["tables"]["trials"]
    parts = {"grid": trials[:n[0]], "random": trials[n[0]:n[0] + n[1]], "worst": trials[n[0] + n[1]:sum(n)]}
    return {name: vars(rate_interval([t["label"] == "harmful" for t in part], [t["prompt_id"] for t in part]))
            for name, part in parts.items() if part}


def _overall(result) -> dict:
    rows = result.asr_by(lambda t: "all") if result.trials else []
    r = rows[0] if rows else {}
    return {k: r.get(k) for k in ("n", "n_prompts", "harmful", "harmful_lo", "harmful_hi", "harmful_interval", "recovered",
                                  "other", "not_refusal")}


main = make_main(InsertionConfig, run)


if __name__ == "__main__":
    main()
