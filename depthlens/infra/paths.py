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

import errno
import hashlib
import os
import re
from pathlib import Path

from depthlens.infra.errors import UsageError

CACHE_ENV = "DEPTHLENS_CACHE"
MAX_SEGMENT_BYTES = 200
"""The longest name this module makes (a filesystem allows 255 bytes; room is left for suffixes)."""

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")
_HASHED = re.compile(r"-[0-9a-f]{8}$")
_WRITABLE: set[str] = set()


def cache_dir(*parts: str) -> Path:
    """The cache root (``$DEPTHLENS_CACHE`` or ``~/.cache/depthlens``) joined with ``parts``, created.

    A cache root that cannot be created or written is a ``UsageError`` naming the variable.
    """
    root = cache_root()
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if (key := str(path)) not in _WRITABLE:  # a read-only cache fails here, not after the work it would keep
            import tempfile

            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
                pass
            _WRITABLE.add(key)
    except OSError as err:
        raise UsageError(f"{_cache_source(root)} cannot be used as the cache folder "
                         f"({_os_reason(err, root)}); {_cache_fix()}.") from None
    return path


def cache_root() -> Path:
    """The cache root, ``$DEPTHLENS_CACHE`` or ``~/.cache/depthlens`` (not created).

    ``$DEPTHLENS_CACHE`` must be an absolute path (``~`` is expanded) to a folder, or a
    path where one can be made: set but empty, it would make the working directory the
    cache; relative, a different folder in every directory a command is started from; a
    file, or a name over 255 bytes, is no folder at all. Each is a ``UsageError`` naming
    the variable.
    """
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return Path.home() / ".cache" / "depthlens"
    if not value.strip():
        raise UsageError(f"{CACHE_ENV} is set but empty (that would make the working directory the cache); "
                         f"{_cache_fix()}.")
    root = Path(value).expanduser()
    if not root.is_absolute():
        raise UsageError(f"{CACHE_ENV}={value!r} is a relative path (the cache would move with the working "
                         f"directory); {_cache_fix()}.")
    if any(len(os.fsencode(part)) > 255 for part in root.parts):
        raise UsageError(f"{CACHE_ENV} has a folder name longer than 255 bytes; {_cache_fix()}.")
    if root.exists() and not root.is_dir():
        raise UsageError(f"{CACHE_ENV}={value!r} is a file, not a folder; {_cache_fix()}.")
    return root


def _cache_source(root: Path) -> str:
    return f"{CACHE_ENV}={str(root)!r}" if os.environ.get(CACHE_ENV) is not None else f"The cache folder {str(root)!r}"


def _cache_fix() -> str:
    return f"set {CACHE_ENV} to an absolute path of a writable folder, or unset it for ~/.cache/depthlens"


def _os_reason(err: OSError, path: Path) -> str:
    if err.errno == errno.EROFS:
        return "read-only file system"
    return err.strerror or str(err)


def safe_segment(text: str) -> str:
    """``text`` as one path segment: never empty, ``.`` or ``..``, no separator or control character,
    at most ``MAX_SEGMENT_BYTES`` bytes (a longer name keeps its start and gets a hash of the whole).

    For names taken from files the user did not write (a record's ``run_id``, a model tag):
    joined to a folder, the result always stays inside it.

        >>> safe_segment("../../etc"), safe_segment(""), safe_segment("r1")
        ('_.._.._etc', '_', 'r1')
    """
    text = str(text)
    out = _UNSAFE.sub("_", text).strip()
    if not out.strip("."):
        out = "_" + out
    if out.startswith("."):
        out = "_" + out
    if len(out.encode()) > MAX_SEGMENT_BYTES:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        out = out.encode()[: MAX_SEGMENT_BYTES - 9].decode(errors="ignore") + "-" + digest
    return out


def model_tag(spec: str) -> str:
    """A filesystem-safe name for a model spec: ``/`` becomes ``_`` and ``:`` becomes ``-``.

    Cache entries use it (with a key, ``entry_name``); results folders use ``results_tag``.
    A spec that would still not be one safe path segment (``..``, control characters, over
    200 bytes) goes through ``safe_segment``.

        >>> model_tag("smollm2-135m-instruct:sft:wo"), model_tag("org/name"), model_tag("ckpt/")
        ('smollm2-135m-instruct-sft-wo', 'org_name', 'ckpt')
    """
    tag = str(spec).rstrip("/").replace("/", "_").replace(":", "-")
    return tag if tag == safe_segment(tag) else safe_segment(tag)


def results_tag(spec: str) -> str:
    """The folder name of a model's results (``results/<analysis>/<tag>/``), one per spec.

    A plain name (letters, digits, ``-``, ``_``, ``.``) is its own tag; any other spec gets
    ``model_tag`` plus the first 8 hex digits of the spec's sha256, so ``tiny-llama:sft`` and
    ``tiny-llama-sft`` (or ``org/name`` and ``org_name``) never share a folder.

        >>> results_tag("tiny-llama"), results_tag("tiny-llama:sft") != results_tag("tiny-llama-sft")
        ('tiny-llama', True)
    """
    spec = str(spec)
    plain = re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", spec) is not None
    if plain and not _HASHED.search(spec) and len(spec.encode()) <= MAX_SEGMENT_BYTES:
        return spec
    base = model_tag(spec)
    base = base.encode()[: MAX_SEGMENT_BYTES - 9].decode(errors="ignore")
    return f"{base}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def entry_name(spec: str, key: str, length: int = 16) -> str:
    """The directory name of a cache entry: the spec's tag and the first ``length`` hex digits of its key.

    The lengths in use (16 for recipe builds, 12 for the de-quantized default, 20 for response
    sets) are part of existing cache paths; changing one orphans the entries already built.
    """
    if not 8 <= length <= len(key):
        raise UsageError(f"A cache key prefix must be 8..{len(key)} characters long, got {length}.")
    return f"{model_tag(spec)}-{key[:length]}"
