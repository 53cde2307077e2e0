"""Where depthlens keeps its caches and results.

Everything that is built once and reused (the de-quantized default model, organisms,
prompt-set downloads, response sets) lives under ``$DEPTHLENS_CACHE`` (default
``~/.cache/depthlens``); analyses write under ``./results`` unless ``--out`` says otherwise.

    >>> from depthlens.paths import cache_dir
    >>> cache_dir("datasets")            # ~/.cache/depthlens/datasets, created on demand
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache root (``$DEPTHLENS_CACHE`` or ``~/.cache/depthlens``) joined with ``parts``, created."""
    root = Path(os.environ.get("DEPTHLENS_CACHE", Path.home() / ".cache" / "depthlens")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
