"""The infrastructure every room stands on: errors, argument checks, paths, cache entries, results records.

- ``errors``: `UsageError` (bad input: one sentence, exit 2) and `NonFiniteError`
- ``validate``: the shared argument checks (`integer`, `positive_int`, `one_of`, `prompt_list`)
- ``paths``: the cache root and how a model spec becomes a file name (`cache_dir`, `model_tag`, `entry_name`)
- ``cache``: cache entries that are complete or absent (manifests, checks, locks, one builder per entry)
- ``results``: run records, one `results.json` per analysis run, written atomically
- ``exports``: how each room's ``__init__`` hands on its modules' public names, on first use

It imports no other room of depthlens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depthlens.infra.exports import lazy_exports

# every public name of the room, and the module that defines it (imported on first use)
_EXPORTS = {
    "UsageError": "errors", "NonFiniteError": "errors",
    "integer": "validate", "positive_int": "validate", "one_of": "validate", "prompt_list": "validate",
    "cache_dir": "paths", "cache_root": "paths", "model_tag": "paths", "entry_name": "paths",
    "MANIFEST": "cache", "MISSING": "cache", "CacheEntryDamaged": "cache", "file_sha256": "cache",
    "atomic_write_text": "cache", "write_manifest": "cache", "read_manifest": "cache", "check": "cache",
    "looks_complete": "cache", "lock": "cache", "ensure": "cache", "publish": "cache", "remove": "cache",
    "SCHEMA_VERSION": "results", "RunRecord": "results", "package_versions": "results", "git_commit": "results",
    "git_dirty": "results", "nonfinite_paths": "results", "describe_nonfinite": "results", "jsonable": "results",
    "write_run": "results", "atomic_write_json": "results", "read_run": "results", "SCORED_ROWS": "results",
    "latest_run": "results",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, spelled out for type checkers and editors
    from depthlens.infra.errors import UsageError, NonFiniteError
    from depthlens.infra.validate import integer, positive_int, one_of, prompt_list
    from depthlens.infra.paths import cache_dir, cache_root, model_tag, entry_name
    from depthlens.infra.cache import (
        MANIFEST, MISSING, CacheEntryDamaged, file_sha256, atomic_write_text, write_manifest, read_manifest,
        check, looks_complete, lock, ensure, publish, remove,
    )
    from depthlens.infra.results import (
        SCHEMA_VERSION, RunRecord, package_versions, git_commit, git_dirty, nonfinite_paths, describe_nonfinite,
        jsonable, write_run, atomic_write_json, read_run, SCORED_ROWS, latest_run,
    )
