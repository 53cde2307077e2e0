"""Recipes: spec suffixes (``:sft``, ``:deep``, ``:wo`` …) resolved through entry points.

A recipe turns a model into another (safety SFT, deep alignment, weight orthogonalization
…). Recipes live in ``finetune`` and ``probes``, which depend on this core, so the core finds
them by the standard plugin mechanism: the entry-point group ``depthlens.recipes`` in
``pyproject.toml``. A third party adds a recipe by declaring one entry point; nothing here
imports a recipe module by name.

A recipe object has ``name``, ``version`` (bumped when its code changes results), a
``config() -> dict`` and ``build(model, workdir) -> None`` that changes ``model`` in place
(``workdir`` is a scratch directory for resumable checkpoints); a recipe whose settings depend
on the model it is applied to (the ``zo`` recipe's default layers) also has ``for_parent(spec)``,
which returns it bound to that parent before its key is taken. ``build_or_load`` caches each
step under ``$DEPTHLENS_CACHE/organisms`` keyed by a hash of the parent's key, the recipe's
name, version and config. Each step is a ``depthlens.infra.cache`` entry: built by one process
while others wait for it, published whole with a manifest, checked on load; a damaged entry
is refused with the command that rebuilds it (``python -m depthlens.models.recipes --rebuild SPEC``),
since a recipe build can take hours. Under ``accelerate launch`` every rank runs the build
(training is collective), rank 0 alone publishes the entry while the others wait for it, and
then every rank loads it; a recipe that leaves an ``adapter/`` folder in its workdir (a LoRA
build) gets it copied into the entry beside the merged weights.

    >>> {"sft", "wo", "deep"} <= set(available_recipes())
    True
    >>> get_recipe("sft").name
    'sft'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, TYPE_CHECKING

from depthlens.infra import cache
from depthlens.models.base import load_base, load_dir, resolve_device_dtype, split_spec
from depthlens.models.checkpoint import check_free_space, write_checkpoint
from depthlens.infra.errors import UsageError
from depthlens.models.hooked_model import wrap
from depthlens.infra.paths import cache_dir, entry_name
from depthlens.infra.verbosity import quiet_build, set_verbose

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)
GROUP = "depthlens.recipes"
RECIPE_FILE = "recipe.json"


class Recipe(Protocol):
    """What ``build_or_load`` needs of a recipe (see the module docstring)."""

    name: str
    version: int

    def config(self) -> dict:
        """The settings that change the result (they key the cache entry)."""
        ...

    def build(self, model: Any, workdir: Path) -> dict | None:
        """Change ``model`` in place; return a JSON-ready summary (stored in ``recipe.json``)."""
        ...


def available_recipes() -> dict[str, Any]:
    """Every recipe declared under the ``depthlens.recipes`` entry-point group, by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def get_recipe(name: str) -> Recipe:
    """The recipe object installed under suffix ``name``; ``UsageError`` naming the installed ones if none is."""
    eps = available_recipes()
    if name not in eps:
        raise UsageError(
            f"Unknown recipe suffix {name!r}; installed recipes: {', '.join(sorted(eps)) or 'none'} "
            f"(declare new ones under [project.entry-points.\"{GROUP}\"])."
        )
    return eps[name].load()


def bind(recipe: Recipe, parent_spec: str) -> Recipe:
    """``recipe`` as it applies on top of ``parent_spec`` (``recipe.for_parent``, where it has one)."""
    for_parent = getattr(recipe, "for_parent", None)
    return for_parent(parent_spec) if for_parent is not None else recipe


def recipe_key(parent_key: str, recipe: Recipe) -> str:
    blob = json.dumps({"parent": parent_key, "recipe": recipe.name, "version": recipe.version,
                       "config": recipe.config()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def base_key(model: HookedModel | dict) -> str:
    """The cache key of a loaded model's weights (a ``HookedModel`` or its provenance dict)."""
    prov = model if isinstance(model, dict) else model.provenance
    return str(prov.get("gguf_sha256") or prov.get("weights_sha256") or prov.get("revision") or prov.get("source"))


def entry_dir(spec_so_far: str, key: str) -> Path:
    """The cache entry of the model ``spec_so_far`` whose last step has cache key ``key``."""
    return cache_dir("organisms") / entry_name(spec_so_far, key, 16)


def rebuild_command(spec: str, recipe: Recipe | None = None) -> str:
    """The command that rebuilds the damaged entries of ``spec`` (named in ``CacheEntryDamaged``).

    A step made by a recipe object with another config than the installed suffix's is not
    what the spec names, so for it the command is the ``build_with`` call itself.
    """
    parent, _, name = spec.rpartition(":")
    installed = recipe is None or _is_installed(name, recipe, parent)
    if not installed:
        return "your build_with(...) call again with rebuild_damaged=True"
    return f"`python -m depthlens.models.recipes --rebuild '{spec}'`"


def _is_installed(name: str, recipe: Recipe, parent: str) -> bool:
    """Whether ``recipe`` on ``parent`` is what the installed suffix ``name`` builds there."""
    eps = available_recipes()
    if name not in eps:
        return False
    try:
        installed = bind(eps[name].load(), parent)
    except UsageError:  # the default cannot apply here (e.g. no record it needs); ``recipe`` is another config
        return False
    return recipe_key("", installed) == recipe_key("", recipe)


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


def build_with(base: str, *recipes: Recipe, device=None, dtype=None, rebuild_damaged: bool = False):
    """Like ``load_model("base:name")`` but with recipe objects (e.g. non-default configs)."""
    return build_or_load(base, list(recipes), device=device, dtype=dtype, rebuild_damaged=rebuild_damaged)


def build_or_load(base: str, recipes: list, *, device=None, dtype=None, rebuild_damaged: bool = False):
    """Load ``base`` and apply ``recipes`` (names or recipe objects) in order, each step a cache entry.

    A step found intact in the cache is loaded, not built; one being built by another process
    is waited for. A damaged step raises ``depthlens.infra.cache.CacheEntryDamaged`` naming the
    rebuild command, unless ``rebuild_damaged`` (what that command passes). Under a
    multi-process launch all ranks build a missing step together and rank 0 publishes it.
    """
    state = process_state()
    if state is not None and device is None:
        device = state.device  # each rank on its own GPU (or the CPU under --cpu)
    device, dtype = resolve_device_dtype(device, dtype)
    objs = [get_recipe(r) if isinstance(r, str) else r for r in recipes]  # fail fast on an unknown suffix
    recipes = [o.name for o in objs]
    hf, tok, prov = load_base(base)
    # the base is wrapped in a bridge (seconds) only if a step must be built from it
    current, key, spec, current_dir, chain = None, base_key(prov), base, None, []
    main_rank = state is None or state.is_main_process
    for name, recipe in zip(recipes, objs):
        recipe = bind(recipe, spec)  # ``spec`` is still the parent's here
        key = recipe_key(key, recipe)
        parent_spec, spec = spec, f"{spec}:{name}"
        target = entry_dir(spec, key)
        workdir = cache_dir("work", target.name)
        chain.append({"recipe": name, "version": recipe.version, "config": recipe.config(), "key": key})
        built: list[dict] = []

        def train(name=name, recipe=recipe, parent_spec=parent_spec, spec=spec, chain=list(chain),
                  workdir=workdir) -> None:
            nonlocal current, hf, tok, prov
            if current is None:  # the parent is the base, or a step that came from the cache
                if current_dir is not None:
                    hf, tok, prov = load_dir(current_dir)
                current = wrap(hf, tok, parent_spec, prov, device, dtype)
            if main_rank:
                log.info("Building %s (recipe %r, cache key %s) - first use only", spec, name, key[:16])
            t0 = time.time()
            info = recipe.build(current, workdir) or {}
            current.spec = spec
            built.append({"chain": chain, "build_seconds": round(time.time() - t0, 1), "info": info})

        def write(tmp: Path, spec=spec, chain=list(chain), workdir=workdir) -> None:
            write_checkpoint(current.hf, current.tokenizer, tmp, {**current.provenance, "spec": spec, "recipe_chain": chain},  # type: ignore[union-attr]  # train() ran first
                             files={RECIPE_FILE: json.dumps(built[-1], indent=2, default=str)})
            if (workdir / "adapter").is_dir():  # a LoRA build's adapter, kept beside the merged weights
                shutil.copytree(workdir / "adapter", tmp / "adapter", dirs_exist_ok=True)

        if cache.check(target) is not None:  # a build: room for its checkpoint, before the training
            check_free_space(target.parent, 4 * sum(p.numel() for p in (current.hf if current else hf).parameters())
                             + (32 << 20), f"the cache entry of {spec!r}")
        command = None if rebuild_damaged else rebuild_command(spec, recipe)
        adopt = lambda e: cache.looks_complete(e, ("config.json", RECIPE_FILE))  # noqa: E731
        t0 = time.time()
        with quiet_build():  # accelerate's checkpoint lines stay off the terminal unless --verbose
            if state is not None and cache.check(target) is not None:
                train()  # every rank: the training steps are collective
                if main_rank:
                    cache.ensure(target, write, command=None, adopt=adopt)
                state.wait_for_everyone()  # the other ranks load rank 0's entry below
                current = None
            else:
                cache.ensure(target, lambda tmp: (train(), write(tmp)), command=command, adopt=adopt)  # type: ignore[func-returns-value]
                if not built:  # reused: the next step (if built) starts from this entry on disk
                    current = None
        if built and main_rank:
            log.info("Built %s in %s: cache entry %s", spec, _duration(time.time() - t0), target)
        current_dir = target
    if current_dir is None:  # no recipes
        return wrap(hf, tok, spec, prov, device, dtype)
    hf, tok, prov = load_dir(current_dir)
    return wrap(hf, tok, spec, {**prov, "recipe_chain": chain, "base": base}, device, dtype)


def _duration(seconds: float) -> str:
    """``"4 min 07 s"`` / ``"12.3 s"``: a build time for the log line."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m depthlens.models.recipes SPEC [--rebuild]``: build (or load) ``SPEC``'s recipe chain.

    With ``--rebuild``, damaged cache entries on the chain are built again instead of refused.
    Prints ``error: <message>`` and returns 2 on a usage error.
    """
    parser = argparse.ArgumentParser(prog="python -m depthlens.models.recipes", description=(main.__doc__ or "").split("\n")[0])
    parser.add_argument("spec", help="model spec with recipe suffixes, e.g. smollm2-135m-instruct:sft")
    parser.add_argument("--rebuild", action="store_true", help="rebuild damaged cache entries on the chain")
    parser.add_argument("--verbose", action="store_true",
                        help="show every library's log lines during the build (accelerate's checkpoints …)")
    args = parser.parse_args(argv)
    if args.verbose:
        set_verbose(True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        base, names = split_spec(args.spec)
        model = build_or_load(base, names, rebuild_damaged=args.rebuild)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{model.spec} ready: {model.provenance.get('source')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
