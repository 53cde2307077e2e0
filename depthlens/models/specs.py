"""Model specs as strings: the organism's spec, and a spec's base, parent and reference model.

The embedded default is not safety-aligned (it answers harmful requests), so the toolkit aligns
it the way a lab would (``finetune.sft``: harmful → refusal, benign → own answers) and studies
that: ``ORGANISM`` (``smollm2-135m-instruct:sft``), which ``load_model(ORGANISM)`` builds on
first use (with a progress bar) and caches under ``$DEPTHLENS_CACHE`` keyed by its recipe hash.
A spec is a base followed by recipe suffixes; these helpers take it apart.

    >>> base_spec("smollm2-135m-instruct:sft:zo"), parent_spec("smollm2-135m-instruct:deep:zo")
    ('smollm2-135m-instruct', 'smollm2-135m-instruct:deep')
"""
from __future__ import annotations

import json
from pathlib import Path

from depthlens.models.base import DEFAULT_MODEL, split_spec
from depthlens.models.checkpoint import PROVENANCE_FILE
from depthlens.models.hooked_model import HookedModel
from depthlens.models.load import load_model

ORGANISM = f"{DEFAULT_MODEL}:sft"


def base_spec(spec: str) -> str:
    """The spec with its recipe suffixes removed: ``"x:sft:zo"`` → ``"x"``.

    A checkpoint directory that depthlens saved (a cache entry, a ``:wo`` checkpoint) names the
    spec it was built as; its base is that spec's base, not the directory itself.
    """
    path = Path(spec).expanduser()
    if path.is_dir() and (path / PROVENANCE_FILE).exists():
        recorded = json.loads((path / PROVENANCE_FILE).read_text()).get("spec")
        if recorded and recorded != spec:
            return base_spec(recorded)
    return split_spec(spec)[0]


def reference_spec(spec: str) -> str:
    """The model whose greedy answers are ``spec``'s reference answers: the harmful spans of the
    attacks and recipes, the benign targets, the cross-entropy targets.

    That is the base (``base_spec``), unless the base is pretrained only
    (``depthlens.models.families.PRETRAINED_ONLY``, e.g. ``gemma3-270m``), which echoes a chat prompt
    instead of answering it; then the embedded default, the teacher of such a base's ``:sft``.
    Its answers reach another tokenizer as text (``depthlens.runtime.responses.answers_for``).

        >>> reference_spec("smollm2-135m-instruct:sft"), reference_spec("gemma3-270m:sft")
        ('smollm2-135m-instruct', 'smollm2-135m-instruct')
    """
    from depthlens.models.families import PRETRAINED_ONLY

    base = base_spec(spec)
    return DEFAULT_MODEL if base in PRETRAINED_ONLY else base


def load_reference(model: HookedModel) -> HookedModel:
    """The model of ``reference_spec(model.spec)``: ``model`` itself when it is that spec, else
    loaded on ``model``'s device (what a recipe or analysis takes reference answers from)."""
    name = reference_spec(model.spec)
    return model if name == model.spec else load_model(name, device=model.device)


def parent_spec(spec: str) -> str:
    """The spec without its last recipe: ``"x:deep:zo"`` → ``"x:deep"`` (``"x"`` → ``"x"``)."""
    base, recipes = split_spec(spec)
    return ":".join([base, *recipes[:-1]])
