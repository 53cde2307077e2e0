"""Deterministic train/val/test splits of a prompt set, disjoint by normalized prompt text.

Fitting (probes, directions, recipes) sees train, selection sees val, reported numbers come
from test; a prompt that occurs twice (up to case, punctuation and whitespace) must never be
on both sides of that line. :func:`split` groups equal :func:`normalize` texts (and, on
request, whole categories) and orders the groups by a seeded sha256, so the same seed gives
the same parts in every process and Python version. The project's standard splits of its
own sets are :func:`depthlens.data.prompts.default_splits`.

    >>> from depthlens.data.promptset import PromptSet
    >>> from depthlens.data.splits import split
    >>> ps = PromptSet("demo", tuple(f"prompt {i}" for i in range(10)), tuple(f"demo-{i:04d}" for i in range(10)))
    >>> parts = split(ps, (0.6, 0.2, 0.2), seed=0)
    >>> [len(parts.train), len(parts.val), len(parts.test)]
    [6, 2, 2]
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, replace

from depthlens.infra.errors import UsageError
from depthlens.data.promptset import PromptSet


@dataclass(frozen=True)
class Splits:
    """Train/val/test parts of one prompt set, disjoint by normalized prompt text."""

    train: PromptSet
    val: PromptSet
    test: PromptSet


# --------------------------------------------------------------------------- normalization


def normalize(text: str) -> str:
    """Lowercase, drop punctuation (Unicode category P*), collapse whitespace.

    Two prompts with the same normalized text count as the same prompt for splitting.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


# --------------------------------------------------------------------------- splitting


def _order_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).hexdigest()


def _groups(ps: PromptSet, by: str) -> list[list[int]]:
    """Indices grouped so that equal normalized texts (and, with by="category", equal categories) stay together."""
    parent = list(range(len(ps)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, text in enumerate(ps.prompts):
        keys = [("text", normalize(text))]
        if by == "category":
            keys.append(("category", ps.categories[i]))  # type: ignore[index]  # by="category" has them
        for key in keys:
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(ps)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def split(ps: PromptSet, fractions: tuple[float, ...] = (0.6, 0.2, 0.2), seed: int = 0,
          by: str = "prompt") -> Splits:
    """Deterministic train/val/test split, disjoint by normalized prompt text.

    Prompts with equal :func:`normalize` text form one group that lands in one split. Groups
    are ordered by ``sha256(seed, key)`` (stable across processes and Python versions) and cut
    at the cumulative ``fractions`` of the group count; each split keeps the original order.

    Args:
        ps: the set to split.
        fractions: (train, val, test) shares summing to 1; a 2-tuple means no test split.
        seed: changes the assignment.
        by: ``"prompt"`` (default) or ``"category"``: whole categories (e.g. harmless topics)
            go to one split, to measure transfer to topics unseen in training.
    """
    fr = tuple(float(f) for f in fractions)
    if len(fr) == 2:
        fr = fr + (0.0,)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise UsageError(
            f"Split fractions {fractions!r} are invalid; "
            "pass 2 or 3 non-negative shares summing to 1, e.g. (0.6, 0.2, 0.2)."
        )
    if by not in ("prompt", "category"):
        raise UsageError(f"Split mode by={by!r} is unknown; accepted are 'prompt' and 'category'.")
    if by == "category" and ps.categories is None:
        raise UsageError(f"Cannot split {ps.name!r} by category: it has no categories; use by='prompt'.")
    groups = _groups(ps, by)

    def group_key(g: list[int]) -> str:
        if by == "category":
            return _order_key(seed, "\x01".join(sorted({ps.categories[i] for i in g})))  # type: ignore[index]
        return _order_key(seed, normalize(ps.prompts[g[0]]))

    groups.sort(key=group_key)
    n = len(groups)
    cut1 = round(fr[0] * n)
    cut2 = cut1 + round(fr[1] * n) if fr[2] > 0 else n
    cut2 = min(max(cut2, cut1), n)
    parts = (groups[:cut1], groups[cut1:cut2], groups[cut2:])
    out = []
    for part_name, part in zip(("train", "val", "test"), parts):
        idx = sorted(i for g in part for i in g)
        sub = ps.take(idx, name=f"{ps.name}/{part_name}")
        info = {"part": part_name, "fractions": list(fr), "seed": seed, "by": by}
        out.append(replace(sub, source={**ps.source, "split": info}))
    return Splits(*out)
