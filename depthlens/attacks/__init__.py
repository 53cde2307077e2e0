"""Attacks: prefill, random and worst insertion, and the trial records they produce.

- ``records``: `Trial` (one attacked sequence) and `AttackResult` (the trials and their rates)
- ``plumbing``: building, generating and judging attack trials, shared by every attack
- ``insertion``: `prefill_attack` and `random_insertion_attack`
- ``worst``: per prompt, the (position, span length) that most weakens refusal, then its attack

It imports the rooms below it, up to `depthlens.judges`.
"""

from __future__ import annotations

from depthlens.attacks.records import RATES, Trial, AttackResult
from depthlens.attacks.plumbing import (
    harmful_response_ids, relative_position, Plan, check_inputs, check_lengths, decode, run_and_judge,
    insertion_sequence, usable_refusals,
)
from depthlens.attacks.insertion import (
    DEFAULT_KS, DEFAULT_DEPTHS, DEFAULT_SPAN_LENGTHS, SPAN_SOURCES, prefill_attack, random_insertion_attack,
)
from depthlens.attacks.worst import OBJECTIVES, WorstInsertion, worst_insertion, worst_insertion_attack

__all__ = [
    "RATES",
    "Trial",
    "AttackResult",
    "harmful_response_ids",
    "relative_position",
    "Plan",
    "check_inputs",
    "check_lengths",
    "decode",
    "run_and_judge",
    "insertion_sequence",
    "usable_refusals",
    "DEFAULT_KS",
    "DEFAULT_DEPTHS",
    "DEFAULT_SPAN_LENGTHS",
    "SPAN_SOURCES",
    "prefill_attack",
    "random_insertion_attack",
    "OBJECTIVES",
    "WorstInsertion",
    "worst_insertion",
    "worst_insertion_attack",
]
