"""Recipes: spec suffixes (``:sft``, ``:deep``, ``:wo`` …) resolved through entry points.

A recipe turns a model into another (safety SFT, deep alignment, weight orthogonalization
…). Recipes live in ``finetune`` and ``probes``, which depend on this core, so the core finds
them by the standard plugin mechanism: the entry-point group ``depthlens.recipes`` in
``pyproject.toml``. A third party adds a recipe by declaring one entry point; nothing here
imports a recipe module by name.

A recipe object has ``name``, ``version`` (bumped when its code changes results), a
``config() -> dict`` and ``build(model, workdir) -> None`` that changes ``model`` in place
(``workdir`` is a scratch directory for resumable checkpoints). ``build_or_load`` caches each
step under ``$DEPTHLENS_CACHE/organisms`` keyed by a hash of the parent's key, the recipe's
name, version and config; a cache hit loads in seconds and an interrupted build leaves no
entry (the checkpoint directory is renamed into place only when complete). Under
``accelerate launch`` every rank builds (training is collective), rank 0 alone writes the
entry while the others wait for it, and then every rank loads it; a recipe that leaves an
``adapter/`` folder in its workdir (a LoRA build) gets it copied into the entry.

    >>> load_model("smollm2-135m-instruct:sft")        # built on first use, then cached
    >>> available_recipes()                              # {'sft': ..., 'deep': ..., 'wo': ...}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from depthlens.paths import cache_dir

log = logging.getLogger(__name__)
GROUP = "depthlens.recipes"
RECIPE_FILE = "recipe.json"


class Recipe(Protocol):
    name: str
    version: int

    def config(self) -> dict: ...

    def build(self, model: Any, workdir: Path) -> dict | None: ...


def available_recipes() -> dict[str, Any]:
    """Every recipe declared under the ``depthlens.recipes`` entry-point group, by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def get_recipe(name: str) -> Recipe:
    eps = available_recipes()
    if name not in eps:
        raise ValueError(
            f"Unknown recipe suffix {name!r}; installed recipes: {', '.join(sorted(eps)) or 'none'} "
            f"(declare new ones under [project.entry-points.\"{GROUP}\"])."
        )
    return eps[name].load()


def _key(parent_key: str, recipe: Recipe) -> str:
    blob = json.dumps({"parent": parent_key, "recipe": recipe.name, "version": recipe.version,
                       "config": recipe.config()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def base_key(model) -> str:
    """The cache key of a loaded model's weights (a ``HookedModel`` or its provenance dict)."""
    prov = model if isinstance(model, dict) else model.provenance
    return str(prov.get("gguf_sha256") or prov.get("weights_sha256") or prov.get("revision") or prov.get("source"))


def entry_dir(spec_so_far: str, key: str) -> Path:
    tag = spec_so_far.replace("/", "_").replace(":", "-")
    return cache_dir("organisms") / f"{tag}-{key[:16]}"


_WARNED_ONE_CPU_PROCESS: list[bool] = []


def process_state():
    """accelerate's ``PartialState`` when this process is one of several (``accelerate launch``), else None.

    Without a GPU (or under ``ACCELERATE_USE_CPU``) the processes are CPU ranks over gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ \
                and not _WARNED_ONE_CPU_PROCESS:
            _WARNED_ONE_CPU_PROCESS.append(True)
            log.warning("accelerate launch --cpu --num_processes N started this one process only (accelerate starts "
                        "several CPU processes only through MPI); for N ranks use --config_file "
                        "configs/accelerate/ddp.yaml.")
        return None
    import torch
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def build_with(base: str, *recipes: Recipe, device=None, dtype=None):
    """Like ``load_model("base:name")`` but with recipe objects (e.g. non-default configs)."""
    return build_or_load(base, list(recipes), device=device, dtype=dtype)


def build_or_load(base: str, recipes: list, *, device=None, dtype=None):
    """Load ``base`` and apply ``recipes`` (names or recipe objects) in order, each step cached."""
    from depthlens.models import _load_dir, _load_hf, _resolve_device_dtype, wrap

    state = process_state()
    if state is not None and device is None:
        device = state.device  # each rank on its own GPU (or the CPU under --cpu)
    device, dtype = _resolve_device_dtype(device, dtype)
    objs = [get_recipe(r) if isinstance(r, str) else r for r in recipes]  # fail fast on an unknown suffix
    recipes = [o.name for o in objs]
    hf, tok, prov = _load_hf(base)
    # the base is wrapped in a bridge (seconds) only if a step must be built from it
    current, key, spec, current_dir, chain = None, base_key(prov), base, None, []
    for name, recipe in zip(recipes, objs):
        key = _key(key, recipe)
        parent_spec, spec = spec, f"{spec}:{name}"
        target = entry_dir(spec, key)
        chain.append({"recipe": name, "version": recipe.version, "config": recipe.config(), "key": key})
        if (target / RECIPE_FILE).exists():
            current, current_dir = None, target
            continue
        if current is None:  # the parent is the base, or a step that came from the cache
            if current_dir is not None:
                hf, tok, prov = _load_dir(current_dir)
            current = wrap(hf, tok, parent_spec, prov, device, dtype)
        main = state is None or state.is_main_process
        if main:
            log.info("Building %s (recipe %r, cache key %s) - first use only", spec, name, key[:16])
        t0 = time.time()
        workdir = cache_dir("work", target.name)
        info = recipe.build(current, workdir) or {}
        current.spec = spec
        meta = {"chain": chain, "build_seconds": round(time.time() - t0, 1), "info": info}
        if main:
            current.save(target, extra={"spec": spec, "recipe_chain": chain},
                         files={RECIPE_FILE: json.dumps(meta, indent=2, default=str)})
            if (workdir / "adapter").is_dir():  # a LoRA build's adapter, kept beside the merged weights
                shutil.copytree(workdir / "adapter", target / "adapter", dirs_exist_ok=True)
        if state is not None:
            state.wait_for_everyone()  # the other ranks load rank 0's entry below
            current = None
        current_dir = target
    if current_dir is None:  # no recipes
        return wrap(hf, tok, spec, prov, device, dtype)
    hf, tok, prov = _load_dir(current_dir)
    return wrap(hf, tok, spec, {**prov, "recipe_chain": chain, "base": base}, device, dtype)
