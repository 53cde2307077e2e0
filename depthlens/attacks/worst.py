"""Worst insertion: per prompt, the (position, span length) that most weakens refusal, then its attack.

Random insertion (:func:`depthlens.attacks.insertion.random_insertion_attack`) asks how often a model
recovers from a harmful span spliced into its own refusal at chosen depths; worst insertion
(Lyu et al. 2026, docs/methods.md §3) asks about the adversary's best choice. Every candidate
(p, m) of every prompt is scored in one batched forward pass, by the next-token refusal score
(lowest wins) or by the likelihood of the rest of the harmful answer (highest wins);
:func:`worst_insertion_attack` then generates from each prompt's chosen state and judges it
like every other attack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from depthlens.attacks.records import AttackResult
from depthlens.attacks.plumbing import (Plan, check_inputs, check_lengths, decode, insertion_sequence, relative_position,
                                     run_and_judge, usable_refusals)
from depthlens.attacks.insertion import DEFAULT_DEPTHS, DEFAULT_SPAN_LENGTHS
from depthlens.data.chat import ChatSequence
from depthlens.infra.errors import UsageError
from depthlens.runtime import Hook
from depthlens.judges.seam import refusal_token_ids, score_from_logprobs

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

OBJECTIVES = ("refusal_score", "harmful_loglik")


@dataclass(frozen=True)
class WorstInsertion:
    """The worst (p, m) for one prompt and the score of every candidate.

    Attributes:
        index: the prompt's index in the input lists.
        prompt_id, prompt: the harmful prompt.
        objective: "refusal_score" (chosen = lowest) or "harmful_loglik" (chosen = highest mean
            log-prob of the next ``n_next`` harmful tokens after the span).
        position, depth, span_len: the chosen p, p / refusal_len, and m.
        score: the chosen candidate's objective value.
        refusal_len: length of the refusal.
        candidates: ``{"position", "depth", "span_len", "score"}`` for every candidate, in
            evaluation order (positions ascending, then span lengths).
        sequence: chat(x) + refusal[:p] + harmful[:m] for the chosen candidate (the state to
            continue from).
    """

    index: int
    prompt_id: str
    prompt: str
    objective: str
    position: int
    depth: float
    span_len: int
    score: float
    refusal_len: int
    candidates: list[dict]
    sequence: ChatSequence


def _candidate_positions(candidate_positions, length: int) -> list[int]:
    """Python ints are absolute token positions; floats are relative depths. Deduplicated, sorted."""
    out = set()
    for c in candidate_positions:
        if isinstance(c, bool):
            raise UsageError(f"A candidate position must be an int (absolute) or a float depth, got {c!r}.")
        if isinstance(c, int):
            if c < 0:
                raise UsageError(f"An absolute candidate position must be >= 0, got {c}.")
            if c <= length:
                out.add(c)
        else:
            out.add(relative_position(float(c), length))
    return sorted(out)


def worst_insertion(model: HookedModel, prompts: Sequence[str], refusals: Sequence[Sequence[int]],
                    harmful_responses: Sequence[Sequence[int]],
                    candidate_positions: Sequence[float | int] = DEFAULT_DEPTHS,
                    span_lengths: Sequence[int] = DEFAULT_SPAN_LENGTHS, objective: str = "refusal_score", *,
                    n_next: int = 8, prompt_ids: Sequence | None = None, batch_size: int = 16,
                    min_refusal_tokens: int = 32, fwd_hooks: Sequence[Hook] = (),
                    progress: bool = False) -> list[WorstInsertion]:
    """Per prompt, the (position, span length) pair that most weakens refusal after the span.

    Candidates are every position in ``candidate_positions`` (floats: relative depths in [0, 1];
    ints: absolute token positions, those beyond the refusal dropped) crossed with every span
    length m ≤ |harmful response|; the span is the first m harmful tokens. All candidates of all
    prompts go through one batched forward helper call: ``last_logprobs`` + ``score_from_logprobs``
    for ``"refusal_score"`` (minimized), or ``token_logprobs`` on h[m:m+n_next] teacher-forced
    after the span for ``"harmful_loglik"`` (mean log-prob, maximized; needs ≥ 1 harmful token
    after the span). Prompts with a refusal shorter than ``min_refusal_tokens`` or no candidate
    are left out (logged); results keep the order of the remaining prompts.
    """
    from depthlens.runtime.forward import last_logprobs, token_logprobs

    if objective not in OBJECTIVES:
        raise UsageError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if n_next < 1:
        raise UsageError(f"n_next must be at least 1, got {n_next}.")
    pids = check_inputs(prompts, prompt_ids, refusals=refusals, harmful_responses=harmful_responses)
    span_lengths = check_lengths(span_lengths, "span_lengths", 1)
    if not candidate_positions:
        raise UsageError("worst_insertion needs at least one candidate position.")
    tok = model.tokenizer
    usable = usable_refusals(refusals, pids, min_refusal_tokens, [])
    cands: list[tuple[int, int, int]] = []  # (prompt index, p, m)
    seqs: list[ChatSequence] = []
    for i, (x, r, h) in enumerate(zip(prompts, refusals, harmful_responses)):
        if not usable[i]:
            continue
        r, h = [int(t) for t in r], [int(t) for t in h]
        limit = len(h) if objective == "refusal_score" else len(h) - 1
        for p in _candidate_positions(candidate_positions, len(r)):
            for m in span_lengths:
                if m > limit:
                    continue
                extra = 0 if objective == "refusal_score" else min(n_next, len(h) - m)
                cands.append((i, p, m))
                seqs.append(insertion_sequence(tok, x, r, h, p, 0, m, extra))
    if not seqs:
        raise UsageError("No (position, span length) candidate fits: harmful responses are shorter than every span length.")
    if objective == "refusal_score":
        lp = last_logprobs(model, seqs, batch_size=batch_size, fwd_hooks=fwd_hooks, progress=progress)
        scores = score_from_logprobs(lp, refusal_token_ids(tok)).tolist()
    else:
        starts = [s.segments[2][0] for s in seqs]
        lps = token_logprobs(model, seqs, start=starts, batch_size=batch_size, fwd_hooks=fwd_hooks, progress=progress)
        scores = [float(t.double().mean()) for t in lps]
    by_prompt: dict[int, list[int]] = {}
    for j, (i, _, _) in enumerate(cands):
        by_prompt.setdefault(i, []).append(j)
    missing = [pids[i] for i in range(len(prompts)) if usable[i] and i not in by_prompt]
    if missing:
        log.warning("worst_insertion: no candidate fits for %d prompts (%s...).", len(missing), missing[:3])
    sign = 1.0 if objective == "refusal_score" else -1.0
    out = []
    for i, js in by_prompt.items():
        best = min(js, key=lambda j: sign * scores[j])  # first of equals: positions ascending, then m
        _, p, m = cands[best]
        n_r = len(refusals[i])
        table = [{"position": cands[j][1], "depth": cands[j][1] / n_r, "span_len": cands[j][2], "score": scores[j]}
                 for j in js]
        chosen = seqs[best]
        if objective == "harmful_loglik":  # the state to continue from ends after the span
            chosen = insertion_sequence(tok, prompts[i], refusals[i], harmful_responses[i], p, 0, m)
        out.append(WorstInsertion(index=i, prompt_id=pids[i], prompt=prompts[i], objective=objective, position=p,
                                  depth=p / n_r, span_len=m, score=scores[best], refusal_len=n_r,
                                  candidates=table, sequence=chosen))
    return out


def worst_insertion_attack(model: HookedModel, prompts: Sequence[str], refusals: Sequence[Sequence[int]],
                           harmful_responses: Sequence[Sequence[int]],
                           candidate_positions: Sequence[float | int] = DEFAULT_DEPTHS,
                           span_lengths: Sequence[int] = DEFAULT_SPAN_LENGTHS, objective: str = "refusal_score",
                           max_new_tokens: int = 48, prompt_ids: Sequence | None = None, batch_size: int = 16, *,
                           n_next: int = 8, min_refusal_tokens: int = 32, fwd_hooks: Sequence[Hook] = (),
                           progress: bool = False, judge: str | None = None) -> AttackResult:
    """``worst_insertion``, then generate from every prompt's chosen state and judge (one trial a prompt;
    ``judge``: the continuation judge, default: the default judge)."""
    pids = check_inputs(prompts, prompt_ids, refusals=refusals, harmful_responses=harmful_responses)
    worst = worst_insertion(model, prompts, refusals, harmful_responses, candidate_positions, span_lengths, objective,
                            n_next=n_next, prompt_ids=pids, batch_size=batch_size,
                            min_refusal_tokens=min_refusal_tokens, fwd_hooks=fwd_hooks, progress=progress)
    refs = [decode(model.tokenizer, h) for h in harmful_responses]
    plans = [Plan(w.index, w.sequence, {
        "position": w.position, "depth": w.depth, "depth_actual": w.depth, "span_len": w.span_len, "span_offset": 0,
        "refusal_len": w.refusal_len, "prefix_span": w.sequence.segments[0], "span": w.sequence.segments[1],
        "objective": objective, "score": w.score}) for w in worst]
    chosen = {w.index for w in worst}
    skipped = [{"prompt_id": pid, "reason": "short refusal or no fitting candidate"}
               for i, pid in enumerate(pids) if i not in chosen]
    trials = run_and_judge(model, "worst_insertion", plans, list(prompts), pids, refs, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, fwd_hooks=fwd_hooks, progress=progress, judge=judge)
    config = {"candidate_positions": list(candidate_positions), "span_lengths": sorted(set(span_lengths)),
              "objective": objective, "n_next": n_next, "max_new_tokens": max_new_tokens,
              "min_refusal_tokens": min_refusal_tokens, "greedy": True, "n_prompts": len(prompts)}
    return AttackResult("worst_insertion", trials, skipped, config)
