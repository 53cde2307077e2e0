"""Where depthlens keeps its caches and results, and how a model spec becomes a path name.

Everything that is built once and reused (the de-quantized default model, organisms,
prompt-set downloads, response sets) lives under ``$DEPTHLENS_CACHE`` (default
``~/.cache/depthlens``); analyses write under ``./results`` unless ``--out`` says otherwise.
Cache entries and results directories are named after the model spec (``model_tag``) and,
for cache entries, a prefix of a content hash (``entry_name``): the one place those names
are made, so every module names the same thing the same way.

    >>> cache_dir("datasets").relative_to(cache_root()).as_posix()   # created on demand
    'datasets'
    >>> entry_name("smollm2-135m-instruct:sft", "0123456789abcdef0123")
    'smollm2-135m-instruct-sft-0123456789abcdef'
"""

from __future__ import annotations

import os
from pathlib import Path

from depthlens.infra.errors import UsageError


def cache_dir(*parts: str) -> Path:
    """The cache root (``$DEPTHLENS_CACHE`` or ``~/.cache/depthlens``) joined with ``parts``, created."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_root() -> Path:
    """The cache root, ``$DEPTHLENS_CACHE`` or ``~/.cache/depthlens`` (not created)."""
    return Path(os.environ.get("DEPTHLENS_CACHE", Path.home() / ".cache" / "depthlens")).expanduser()


def model_tag(spec: str) -> str:
    """A filesystem-safe name for a model spec: ``/`` becomes ``_`` and ``:`` becomes ``-``.

    Results directories (``results/<analysis>/<tag>/``) and cache entries use it.

        >>> model_tag("smollm2-135m-instruct:sft:wo"), model_tag("org/name"), model_tag("ckpt/")
        ('smollm2-135m-instruct-sft-wo', 'org_name', 'ckpt')
    """
    return spec.rstrip("/").replace("/", "_").replace(":", "-")


def entry_name(spec: str, key: str, length: int = 16) -> str:
    """The directory name of a cache entry: the spec's tag and the first ``length`` hex digits of its key.

    The lengths in use (16 for recipe builds, 12 for the de-quantized default, 20 for response
    sets) are part of existing cache paths; changing one orphans the entries already built.
    """
    if not 8 <= length <= len(key):
        raise UsageError(f"A cache key prefix must be 8..{len(key)} characters long, got {length}.")
    return f"{model_tag(spec)}-{key[:length]}"
