"""Composed recipes: one recipe, then another, as one spec suffix (``:wo+sft``, ``:jt+sft``).

``ComposedRecipe(name, first, then)`` applies ``first`` (an installed suffix or a recipe
object) and then ``then``, cached as one entry keyed by both configs. The intermediate is
shared with the plain ``:first`` entry in both directions: the composed step reuses the cached
``…:first`` when there is one and, when it has to build ``first`` itself, stores that
intermediate under ``…:first`` too, so ``:wo``/``:wo+sft`` never build ``wo`` twice. Which
recipes may follow ``+`` is the business of the module declaring the suffixes
(``finetune.jailbreak.composed``).

    >>> ComposedRecipe("wo+sft", "wo", CountermeasureRecipe())  # a recipe object, shown for its arguments  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _parent_entry(model) -> tuple[str, list[dict]] | None:
    """(cache key, recipe chain) of ``model`` as ``depthlens.models.recipes.build_or_load`` keyed it, or None.

    None when the provenance does not describe ``model.spec`` (e.g. the parent was built a
    moment ago in the same ``build_or_load`` call and carries its own parent's provenance).
    """
    from depthlens.models.base import split_spec
    from depthlens.models.recipes import base_key

    prov = model.provenance
    if prov.get("spec") != model.spec:
        return None
    names = split_spec(model.spec)[1]
    if not names:
        return base_key(model), []
    chain = prov.get("recipe_chain") or prov.get("saved_from", {}).get("recipe_chain") or []
    if [c.get("recipe") for c in chain] != names:
        return None
    return chain[-1]["key"], list(chain)


@torch.no_grad()
def _load_into(model, path: Path) -> None:
    """Copy the weights of the checkpoint at ``path`` into ``model`` in place (untying if it is untied)."""
    from transformers import AutoModelForCausalLM

    from probes.orthogonalize import untie_embeddings

    saved = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if not getattr(saved.config, "tie_word_embeddings", True) and getattr(model.hf.config, "tie_word_embeddings", False):
        untie_embeddings(model)
    model.plain().load_state_dict(saved.state_dict(), strict=True)


class ComposedRecipe:
    """``first+then``: recipe ``first`` (an installed suffix or a recipe object), then the recipe ``then``.

    One cache entry for the pair (keyed by both configs); the intermediate is shared with the
    plain ``:first`` entry in both directions (see the module docstring).
    """

    version = 1

    def __init__(self, name: str, first, then):
        self.name = name
        self._first = first
        self.then = then

    @property
    def first(self):
        if isinstance(self._first, str):
            from depthlens.models.recipes import get_recipe

            self._first = get_recipe(self._first)
        return self._first

    def config(self) -> dict:
        return {part: {"recipe": r.name, "version": r.version, "config": r.config()}
                for part, r in (("first", self.first), ("then", self.then))}

    def build(self, model, workdir: Path) -> dict:
        workdir = Path(workdir)
        first = self._build_first(model, workdir / "first")
        (workdir / "then").mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        then = self.then.build(model, workdir / "then") or {}
        return {"first": first, "then": {"recipe": self.then.name, "seconds": round(time.time() - t0, 1), "info": then}}

    def _build_first(self, model, workdir: Path) -> dict:
        from depthlens.models.recipes import RECIPE_FILE, entry_dir, recipe_key

        first = self.first
        parent = _parent_entry(model)
        target = None
        if parent is not None:
            key = recipe_key(parent[0], first)
            spec = f"{model.spec}:{first.name}"
            target = entry_dir(spec, key)
            if (target / RECIPE_FILE).exists():
                log.info("%s: reusing the cached %s", self.name, spec)
                _load_into(model, target)
                meta = json.loads((target / RECIPE_FILE).read_text())
                return {"recipe": first.name, "reused": True, "entry": str(target), "info": meta.get("info", {})}
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        info = first.build(model, workdir) or {}
        seconds = round(time.time() - t0, 1)
        if target is not None:  # store the intermediate exactly as build_or_load would have (rank 0 of a launch)
            from depthlens.models.recipes import process_state

            state = process_state()
            chain = [*parent[1], {"recipe": first.name, "version": first.version, "config": first.config(), "key": key}]
            meta = {"chain": chain, "build_seconds": seconds, "info": info}
            if state is None or state.is_main_process:
                model.save(target, extra={"spec": spec, "recipe_chain": chain},
                           files={RECIPE_FILE: json.dumps(meta, indent=2, default=str)})
            if state is not None:
                state.wait_for_everyone()
        return {"recipe": first.name, "reused": False, "entry": None if target is None else str(target),
                "seconds": seconds, "info": info}
