"""What an attack run produces: one :class:`Trial` per attacked sequence, and their rates.

Every attack in :mod:`depthlens.attacks.insertion` and :mod:`depthlens.attacks.worst` returns an
:class:`AttackResult`: all trials kept as records (the sequence, the continuation, both
judges' verdicts), so that a results file can be re-judged and regrouped later, and
:meth:`AttackResult.asr_by` turns them into rates per group with intervals that respect
prompts (docs/methods.md §0): Wilson's where each prompt gave one trial (a prefill ASR at one
k), a prompt-level bootstrap where trials share prompts (an insertion grid), since trials of
one prompt are not independent (``depthlens.stats.rate_interval``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field

from depthlens.infra.errors import UsageError
from depthlens.judges import CONTINUATION_JUDGE_ID, JUDGE_ID
from depthlens.stats import rate_interval

RATES = ("asr", "not_refusal", "compliance", "harmful", "recovered", "other")


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Trial:
    """One attacked sequence, its continuation and its judgments (``asdict`` → a results row).

    The response part of ``ids`` is ``prefix`` (the safe prefix kept before the harmful span:
    ``refusal[:p]`` for insertions, empty for prefill) then ``span`` (the harmful tokens:
    ``h[:k]`` for prefill, the m inserted tokens for insertions); ``prefix_span`` and ``span``
    are their ``[start, end)`` token indices in ``ids``. The continuation follows ``ids``.

    Attributes:
        prompt_id, prompt: the harmful prompt.
        attack: "prefill", "insertion" or "worst_insertion".
        k: prefill length (prefill only).
        position: p, the number of refusal tokens kept before the span (insertions).
        depth: the requested relative depth of the position (grid), or p / refusal_len.
        depth_actual: p / refusal_len.
        span_len: m, inserted harmful tokens (insertions).
        span_offset: where in the harmful response the span was taken from (0 for "start").
        refusal_len: length of the refusal the span was inserted into.
        prefix_text, span_text: the decoded prefix and span.
        prompt_len: tokens up to and including the assistant header.
        continuation, continuation_ids: what the model generated after ``ids``.
        label: "recovered" / "harmful" / "other", by the continuation judge (``continuation_judge``).
        is_refusal: substring judge on the continuation.
        asr_not_refusal: the continuation is not a refusal.
        asr_compliance: not a refusal and non-trivial (``is_compliance``; the prefill ASR).
        asr_harmful: label == "harmful" (the continuation judge's harmful call).
        success: the attack's headline criterion: ``asr_harmful``.
        objective, score: the worst-insertion objective and the chosen candidate's value.
        judge, continuation_judge: full ids of the judges that made the labels: ``judge`` the
            substring judge (``is_refusal``, ``asr_compliance``), ``continuation_judge`` the one
            behind ``label`` and every harmful / not-harmful call (the default judge unless chosen).
    """

    prompt_id: str
    prompt: str
    attack: str
    k: int | None
    position: int | None
    depth: float | None
    depth_actual: float | None
    span_len: int | None
    span_offset: int | None
    refusal_len: int | None
    prefix_text: str
    span_text: str
    prompt_len: int
    prefix_span: list[int]
    span: list[int]
    ids: list[int]
    continuation: str
    continuation_ids: list[int]
    label: str
    is_refusal: bool
    asr_not_refusal: bool
    asr_compliance: bool
    asr_harmful: bool
    success: bool
    objective: str | None = None
    score: float | None = None
    judge: str = JUDGE_ID
    continuation_judge: str = CONTINUATION_JUDGE_ID


KeyLike = str | Sequence[str] | Callable[[Trial], Hashable]


@dataclass(frozen=True)
class AttackResult:
    """All trials of one attack run, plus what was skipped and the settings.

    Attributes:
        attack: "prefill", "insertion" or "worst_insertion".
        trials: one ``Trial`` per attacked sequence.
        skipped: ``{"prompt_id", "reason", ...}`` for requested trials that could not be built
            (a harmful response shorter than k or m, a refusal shorter than the minimum).
        config: the attack settings (for results files).
    """

    attack: str
    trials: list[Trial]
    skipped: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def records(self) -> list[dict]:
        """The trials as plain dicts (JSON-ready)."""
        return [asdict(t) for t in self.trials]

    def asr_by(self, key: KeyLike, *, n_boot: int = 2000, seed: int = 0) -> list[dict]:
        """Rates per group with 95% intervals that respect prompts, groups sorted by key.

        ``key`` is a Trial field ("k"), a tuple of fields (("depth", "span_len")) or a function of
        a Trial (e.g. a depth bin; its column is called "group"). Each row holds the key column(s),
        ``n`` (trials), ``n_prompts`` and for each of ``asr`` (the headline ``success``),
        ``not_refusal``, ``compliance``, ``harmful``, ``recovered``, ``other`` the rate and
        ``<name>_lo``/``<name>_hi``, and ``<name>_interval`` the method that made it
        (``depthlens.stats.rate_interval``). ``interval`` names the group's design: ``"wilson"``
        where each prompt of the group gave one trial, else ``"prompt_bootstrap"`` (whole prompts
        resampled, ``n_boot`` times, ``seed``; a rate with no success, or no failure, there is
        bounded by Wilson's over the prompts, ``"wilson_over_prompts"``).
        """
        if not self.trials:
            raise UsageError("asr_by needs at least one trial; this attack result is empty.")
        names: tuple[str, ...]
        if callable(key):
            names, get = ("group",), lambda t: (key(t),)
        else:
            names = (key,) if isinstance(key, str) else tuple(key)
            unknown = [k for k in names if k not in Trial.__dataclass_fields__]
            if unknown:
                raise UsageError(f"Unknown trial field(s) {unknown} for asr_by; use one of {list(Trial.__dataclass_fields__)}.")
            get = lambda t: tuple(getattr(t, k) for k in names)  # noqa: E731
        groups: dict[tuple, list[Trial]] = {}
        for t in self.trials:
            groups.setdefault(get(t), []).append(t)
        rows = []
        for gkey in sorted(groups, key=_sort_key):
            ts = groups[gkey]
            outcomes = {
                "asr": [t.success for t in ts],
                "not_refusal": [t.asr_not_refusal for t in ts],
                "compliance": [t.asr_compliance for t in ts],
                "harmful": [t.label == "harmful" for t in ts],
                "recovered": [t.label == "recovered" for t in ts],
                "other": [t.label == "other" for t in ts],
            }
            prompts = [t.prompt_id for t in ts]
            row: dict = dict(zip(names, gkey))
            row["n"] = len(ts)
            row["n_prompts"] = len(set(prompts))
            for name in RATES:
                r = rate_interval(outcomes[name], prompts, n_boot=n_boot, seed=seed)
                row.update({name: r.rate, f"{name}_lo": r.lo, f"{name}_hi": r.hi, f"{name}_interval": r.method})
            row["interval"] = "wilson" if row["n_prompts"] == row["n"] else "prompt_bootstrap"
            rows.append(row)
        return rows

    def class_shares(self) -> dict[str, float]:
        """Overall share of each continuation class."""
        if not self.trials:
            raise UsageError("class_shares needs at least one trial; this attack result is empty.")
        n = len(self.trials)
        return {c: sum(t.label == c for t in self.trials) / n for c in ("recovered", "harmful", "other")}


def _sort_key(gkey: tuple) -> tuple:
    return tuple((v is None, str(type(v)), v if v is not None else 0) for v in gkey)
