"""Response sets: a model's own greedy answers to a prompt set, cached on disk.

Attacks and recipes need harmful trajectories (the *base* model complies, so its answers to
harmful prompts are the harmful responses) and benign answers (self-distillation keeps the
organism's utility). Generating them is the slow part, so each set is cached under
``$DEPTHLENS_CACHE/responses`` keyed by the model's weights hash, the prompts and the
generation config; a second call is a file read.

    >>> rs = response_set(base, harmful.train.prompts, max_new_tokens=96)
    >>> rs.tokens[0][:10], rs.texts[0]
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from depthlens.generate import generate
from depthlens.paths import cache_dir
from depthlens.recipes import base_key
from depthlens.results import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResponseSet:
    """Greedy responses of ``model`` to ``prompts`` (same order)."""

    prompts: list[str]
    texts: list[str]
    tokens: list[list[int]]
    model: str
    config: dict
    key: str


def _model_key(model) -> str:
    chain = model.provenance.get("recipe_chain")
    return base_key(model) + (json.dumps([c["key"] for c in chain]) if chain else "")


def response_set(model, prompts: Sequence[str], *, max_new_tokens: int = 96, batch_size: int = 16,
                 progress: bool = True) -> ResponseSet:
    """The model's greedy answers to ``prompts``, from the cache when present."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("response_set needs at least one prompt.")
    config = {"max_new_tokens": max_new_tokens, "greedy": True, "v": 1}
    blob = json.dumps({"model": _model_key(model), "prompts": prompts, "config": config}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    path = cache_dir("responses") / f"{model.tag}-{key}.json"
    if path.exists():
        data = json.loads(path.read_text())
        return ResponseSet(**data)
    log.info("Generating %d responses of %s (%d new tokens), cached as %s", len(prompts), model.spec, max_new_tokens, path.name)
    gen = generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                   desc=f"responses ({model.tag})")
    rs = ResponseSet(prompts=prompts, texts=gen.texts, tokens=gen.tokens, model=model.spec, config=config, key=key)
    atomic_write_json(path, asdict(rs))
    return rs
