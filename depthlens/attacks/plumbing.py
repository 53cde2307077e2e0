"""Building, generating and judging attack trials: the plumbing every attack shares.

An attack plans sequences (:class:`Plan`: the chat, what its response part is made of),
then :func:`run_and_judge` generates all of them in one batched ``generate`` call and judges
each continuation twice, with the substring judge (refusal markers) and with the continuation
judge (``judge``: harmful / recovered / other, the default judge of ``depthlens.judges.seam`` unless
another is chosen), into :class:`~depthlens.attacks.records.Trial` records. Only the continuation is judged, never the
prefilled or inserted harmful tokens. The input checks and the insertion sequence
(``chat(x) + refusal[:p] + harmful[offset:offset+m]``) live here too, so that random and
worst insertion build exactly the same sequences.

    >>> relative_position(0.5, 9), relative_position(1.0, 9)
    (5, 9)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from depthlens.attacks.records import Trial
from depthlens.data.chat import ChatSequence, build_chat
from depthlens.infra.errors import UsageError
from depthlens.runtime.generation import generate
from depthlens.judges.lexical import JUDGE_ID, is_compliance, is_refusal
from depthlens.judges.seam import classify_many, judge_id

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)


def harmful_response_ids(generation) -> list[list[int]]:
    """Token ids of harmful responses from a ``Generation``/``ResponseSet`` (``.tokens``) or id lists."""
    tokens = getattr(generation, "tokens", generation)
    out = [[int(t) for t in row] for row in tokens]
    if not out:
        raise UsageError("harmful_response_ids got no responses.")
    return out


def relative_position(depth: float, length: int) -> int:
    """Token position ``p = round(depth · length)`` (half rounds up), for ``depth`` in [0, 1].

        >>> relative_position(0.5, 9), relative_position(1.0, 9)
        (5, 9)
    """
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"A relative depth must lie in [0, 1], got {depth}.")
    return int(math.floor(depth * length + 0.5))


@dataclass(frozen=True)
class Plan:
    """A trial before generation: the sequence and what it is made of."""

    index: int
    seq: ChatSequence
    meta: dict


def check_inputs(prompts, prompt_ids, **lists) -> list[str]:
    """The prompt ids (``prompt-0000``… when None), after checking every list has one entry per prompt."""
    if isinstance(prompts, str) or not prompts:
        raise UsageError("An attack needs a non-empty list of prompts.")
    for name, values in lists.items():
        if values is None or len(values) != len(prompts):
            got = None if values is None else len(values)
            raise UsageError(f"{name} must have one entry per prompt ({len(prompts)}), got {got}.")
    if prompt_ids is None:
        return [f"prompt-{i:04d}" for i in range(len(prompts))]
    if len(prompt_ids) != len(prompts):
        raise UsageError(f"prompt_ids must have one id per prompt ({len(prompts)}), got {len(prompt_ids)}.")
    return [str(i) for i in prompt_ids]


def check_lengths(values, name: str, minimum: int) -> list[int]:
    """``values`` as sorted distinct ints, each at least ``minimum``; ``name`` is used in the error."""
    out = [int(v) for v in values]
    if not out or any(v < minimum for v in out):
        raise UsageError(f"{name} must be a non-empty list of integers >= {minimum}, got {list(values)}.")
    return sorted(set(out))


def decode(tok, ids: Sequence[int]) -> str:
    """The text of ``ids`` without special tokens (a reference answer, a span)."""
    return tok.decode(list(ids), skip_special_tokens=True)


def run_and_judge(model: HookedModel, attack: str, plans: list[Plan], prompts, pids, references: list[str], *,
                  max_new_tokens: int, batch_size: int, fwd_hooks, progress: bool, judge: str | None = None) -> list[Trial]:
    """Generate all planned sequences in one call and judge every continuation.

    ``judge``: the id of the continuation judge (``depthlens.judges.seam.get_judge``; default: the
    default judge), called once on all continuations; the prefilled or inserted text is given to
    it as the prefix (context, never credited to the continuation).
    """
    if not plans:
        return []
    tok = model.tokenizer
    full_id = judge_id(judge)
    gen = generate(model, [p.seq for p in plans], max_new_tokens=max_new_tokens, batch_size=batch_size,
                   fwd_hooks=fwd_hooks, progress=progress, desc=attack)
    contexts = [decode(tok, p.seq.ids[p.seq.prompt_len:]) for p in plans]
    labels = classify_many([prompts[p.index] for p in plans], list(gen.texts), contexts, judge=full_id,
                           references=[references[p.index] for p in plans])
    trials = []
    for plan, text, new_ids, label in zip(plans, gen.texts, gen.tokens, labels):
        i, seq, meta = plan.index, plan.seq, plan.meta
        (p0, p1), (s0, s1) = meta["prefix_span"], meta["span"]
        refused = is_refusal(text)
        compliant = is_compliance(text)
        trials.append(Trial(
            prompt_id=pids[i], prompt=prompts[i], attack=attack,
            k=meta.get("k"), position=meta.get("position"), depth=meta.get("depth"),
            depth_actual=meta.get("depth_actual"), span_len=meta.get("span_len"),
            span_offset=meta.get("span_offset"), refusal_len=meta.get("refusal_len"),
            prefix_text=decode(tok, seq.ids[p0:p1]), span_text=decode(tok, seq.ids[s0:s1]),
            prompt_len=seq.prompt_len, prefix_span=[p0, p1], span=[s0, s1], ids=list(seq.ids),
            continuation=text, continuation_ids=list(new_ids), label=label, is_refusal=refused,
            asr_not_refusal=not refused, asr_compliance=compliant, asr_harmful=label == "harmful",
            success=label == "harmful", objective=meta.get("objective"), score=meta.get("score"),
            judge=JUDGE_ID, continuation_judge=full_id,
        ))
    return trials


def insertion_sequence(tok, prompt: str, refusal: Sequence[int], harmful: Sequence[int], p: int, offset: int, m: int,
                   extra: int = 0) -> ChatSequence:
    """chat(x) + refusal[:p] + harmful[offset:offset+m] (+ harmful[offset+m:offset+m+extra] as a third segment)."""
    segs = [list(refusal[:p]), list(harmful[offset:offset + m])]
    if extra:
        segs.append(list(harmful[offset + m:offset + m + extra]))
    return build_chat(tok, prompt, segs)


def usable_refusals(refusals, pids, min_refusal_tokens: int, skipped: list[dict]) -> list[bool]:
    """Per prompt, whether its refusal has ``min_refusal_tokens``; the others are appended to ``skipped``."""
    ok = []
    for pid, r in zip(pids, refusals):
        good = len(r) >= min_refusal_tokens
        if not good:
            skipped.append({"prompt_id": pid, "reason": f"refusal has {len(r)} < {min_refusal_tokens} tokens"})
        ok.append(good)
    if not any(ok):
        raise UsageError(f"Every refusal is shorter than min_refusal_tokens={min_refusal_tokens}; "
                         "give refusals of several sentences or lower the minimum.")
    if not all(ok):
        log.warning("Skipped %d prompts whose refusal is shorter than %d tokens.", ok.count(False), min_refusal_tokens)
    return ok
