"""The infrastructure every room stands on: errors, argument checks, paths, cache entries, results records.

- ``errors``: `UsageError` (bad input: one sentence, exit 2) and `NonFiniteError`
- ``validate``: the shared argument checks (`integer`, `positive_int`, `one_of`, `prompt_list`)
- ``paths``: the cache root and how a model spec becomes a file name (`cache_dir`, `model_tag`, `entry_name`)
- ``cache``: cache entries that are complete or absent (manifests, checks, locks, one builder per entry)
- ``results``: run records, one `results.json` per analysis run, written atomically

It imports no other room of depthlens.
"""

from __future__ import annotations

from depthlens.infra.errors import UsageError, NonFiniteError
from depthlens.infra.validate import integer, positive_int, one_of, prompt_list
from depthlens.infra.paths import cache_dir, cache_root, model_tag, entry_name
from depthlens.infra.cache import (
    MANIFEST, MISSING, CacheEntryDamaged, file_sha256, atomic_write_text, write_manifest, read_manifest, check,
    looks_complete, lock, ensure, publish, remove,
)
from depthlens.infra.results import (
    SCHEMA_VERSION, RunRecord, package_versions, git_commit, git_dirty, nonfinite_paths, describe_nonfinite,
    jsonable, write_run, atomic_write_json, read_run, SCORED_ROWS, latest_run,
)

__all__ = [
    "UsageError",
    "NonFiniteError",
    "integer",
    "positive_int",
    "one_of",
    "prompt_list",
    "cache_dir",
    "cache_root",
    "model_tag",
    "entry_name",
    "MANIFEST",
    "MISSING",
    "CacheEntryDamaged",
    "file_sha256",
    "atomic_write_text",
    "write_manifest",
    "read_manifest",
    "check",
    "looks_complete",
    "lock",
    "ensure",
    "publish",
    "remove",
    "SCHEMA_VERSION",
    "RunRecord",
    "package_versions",
    "git_commit",
    "git_dirty",
    "nonfinite_paths",
    "describe_nonfinite",
    "jsonable",
    "write_run",
    "atomic_write_json",
    "read_run",
    "SCORED_ROWS",
    "latest_run",
]
