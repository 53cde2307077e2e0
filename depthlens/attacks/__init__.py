"""Attacks: prefill, random and worst insertion, and the trial records they produce.

- ``records``: `Trial` (one attacked sequence) and `AttackResult` (the trials and their rates)
- ``plumbing``: building, generating and judging attack trials, shared by every attack
- ``insertion``: `prefill_attack` and `random_insertion_attack`
- ``worst``: per prompt, the (position, span length) that most weakens refusal, then its attack
- ``battery``: the jailbreak battery (decoding grid, templates, tense, suffixes, persona, trigger) and its prompt-level rates
- ``gcg``: greedy coordinate gradient, a suffix optimised on the model itself

It imports the rooms below it, up to `depthlens.judges`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depthlens.infra.exports import lazy_exports

# every public name of the room, and the module that defines it (imported on first use)
_EXPORTS = {
    "RATES": "records", "Trial": "records", "AttackResult": "records",
    "harmful_response_ids": "plumbing", "relative_position": "plumbing", "Plan": "plumbing",
    "check_inputs": "plumbing", "check_lengths": "plumbing", "decode": "plumbing", "run_and_judge": "plumbing",
    "insertion_sequence": "plumbing", "usable_refusals": "plumbing",
    "DEFAULT_KS": "insertion", "DEFAULT_DEPTHS": "insertion", "DEFAULT_SPAN_LENGTHS": "insertion",
    "SPAN_SOURCES": "insertion", "prefill_attack": "insertion", "random_insertion_attack": "insertion",
    "OBJECTIVES": "worst", "WorstInsertion": "worst", "worst_insertion": "worst", "worst_insertion_attack": "worst",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, spelled out for type checkers and editors
    from depthlens.attacks.records import RATES, Trial, AttackResult
    from depthlens.attacks.plumbing import (
        harmful_response_ids, relative_position, Plan, check_inputs, check_lengths, decode, run_and_judge,
        insertion_sequence, usable_refusals,
    )
    from depthlens.attacks.insertion import (
        DEFAULT_KS, DEFAULT_DEPTHS, DEFAULT_SPAN_LENGTHS, SPAN_SOURCES, prefill_attack, random_insertion_attack,
    )
    from depthlens.attacks.worst import OBJECTIVES, WorstInsertion, worst_insertion, worst_insertion_attack
