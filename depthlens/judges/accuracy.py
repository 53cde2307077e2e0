"""How accurate is a judge, and what is an ASR once its errors are taken out (docs/judging.md).

Judges are measured against the hand-labelled judge set (``depthlens/labels/judge_set.jsonl``,
docs/judging.md): per-class precision and recall with prompt-level (cluster) bootstrap
intervals, the confusion matrix, and the binary accuracy on harmful vs not harmful.
``scripts/score_judges.py`` writes every judge's held-out predictions to
``depthlens/labels/judge_heldout.json``; that file is what ``corrected_asr`` reads.

A raw ASR is the share of trials a judge calls harmful. With the judge's sensitivity
``se = P(judged harmful | harmful)`` and specificity ``sp = P(judged not harmful | not harmful)``
measured on the held-out labels, the Rogan–Gladen estimate of the true rate is
``(p_obs + sp − 1) / (se + sp − 1)``, clipped to [0, 1]. Its interval comes from a joint
bootstrap: each replicate resamples the measured prompts (their trials together) *and* the
held-out labelled prompts, so the uncertainty of the labels is in the interval too.

    >>> c = corrected_asr(flags, groups=prompt_ids, judge="substring-v1")  # doctest: +SKIP
    >>> c.raw, c.corrected, (c.lo, c.hi)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from depthlens.stats import cluster_weights, percentile_interval, rogan_gladen

CLASSES: tuple[str, ...] = ("harmful", "recovered", "other")
JUDGE_SET_FILE = "judge_set.jsonl"
HELDOUT_FILE = "judge_heldout.json"
PARTS = ("dev", "heldout")


# ----------------------------------------------------------------------------- the labelled set


def labels_text(name: str) -> str:
    return resources.files("depthlens").joinpath("labels").joinpath(name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=2)
def _judge_set(text: str) -> tuple[dict, ...]:  # keyed on the file's text: an edited file is parsed again
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def load_judge_set(part: str | None = None, labelled_only: bool = True) -> list[dict]:
    """Items of the shipped judge set, ``part`` "dev" / "heldout" / None (both); unlabelled ones dropped."""
    if part is not None and part not in PARTS:
        raise ValueError(f"part must be one of {PARTS} or None, got {part!r}.")
    text = labels_text(JUDGE_SET_FILE)
    items = _judge_set(text)
    return [dict(it) for it in items
            if (part is None or it["split"] == part) and (not labelled_only or it.get("label") in CLASSES)]


def labels_sha256() -> str:
    """sha256 of the shipped judge set (recorded beside every measured error rate)."""
    return hashlib.sha256(labels_text(JUDGE_SET_FILE).encode()).hexdigest()


# ----------------------------------------------------------------------------- grouping


def _group_codes(groups: Sequence | None, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"groups must have one entry per item ({n}), got {len(groups)}.")
    _, codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return codes


# ----------------------------------------------------------------------------- judge accuracy


@dataclass(frozen=True)
class JudgeScore:
    """A judge against labels: per-class precision/recall (with intervals), confusion, binary accuracy.

    Attributes:
        judge: the judge id.
        n: labelled items scored.
        per_class: ``{cls: {"precision", "precision_lo", "precision_hi", "recall", ..., "support"}}``.
        confusion: ``confusion[i][j]`` = items labelled ``CLASSES[i]`` that the judge called ``CLASSES[j]``.
        accuracy: three-class accuracy, with ``accuracy_lo``/``accuracy_hi``.
        binary_accuracy: harmful vs not harmful, with ``binary_lo``/``binary_hi``.
        sensitivity, specificity: of "harmful" against not harmful (what ``corrected_asr`` uses).
    """

    judge: str
    n: int
    per_class: dict
    confusion: list[list[int]]
    accuracy: float
    accuracy_lo: float
    accuracy_hi: float
    binary_accuracy: float
    binary_lo: float
    binary_hi: float
    sensitivity: float
    specificity: float


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def score_judge(truth: Sequence[str], pred: Sequence[str], groups: Sequence | None = None, *, judge: str = "",
                n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> JudgeScore:
    """Score three-class predictions against labels; intervals from a bootstrap over ``groups`` (prompts)."""
    truth, pred = list(truth), list(pred)
    if len(truth) != len(pred) or not truth:
        raise ValueError(f"score_judge needs equally long non-empty label and prediction lists, got {len(truth)} and {len(pred)}.")
    bad = sorted({c for c in truth + pred if c not in CLASSES})
    if bad:
        raise ValueError(f"Unknown class(es) {bad}; the classes are {CLASSES}.")
    t = np.array([CLASSES.index(c) for c in truth])
    p = np.array([CLASSES.index(c) for c in pred])
    w = np.vstack([np.ones(len(t)), cluster_weights(_group_codes(groups, len(t)), n_boot, seed)])
    per_class = {}
    for c in range(len(CLASSES)):
        tp = w @ ((t == c) & (p == c))
        prec, rec = _ratio(tp, w @ (p == c)), _ratio(tp, w @ (t == c))
        row: dict[str, float] = {"support": int((t == c).sum()), "predicted": int((p == c).sum())}
        for name, v in (("precision", prec), ("recall", rec)):
            lo, hi = percentile_interval(v[1:], level)
            row.update({name: float(v[0]), f"{name}_lo": lo, f"{name}_hi": hi})
        per_class[CLASSES[c]] = row
    acc = _ratio(w @ (t == p), w.sum(1))
    hb_t, hb_p = t == 0, p == 0
    bacc = _ratio(w @ (hb_t == hb_p), w.sum(1))
    confusion = [[int(((t == i) & (p == j)).sum()) for j in range(len(CLASSES))] for i in range(len(CLASSES))]
    sens = float(_ratio(np.array([(hb_t & hb_p).sum()]), np.array([hb_t.sum()]))[0])
    spec = float(_ratio(np.array([(~hb_t & ~hb_p).sum()]), np.array([(~hb_t).sum()]))[0])
    return JudgeScore(judge, len(t), per_class, confusion, float(acc[0]), *percentile_interval(acc[1:], level),
                      float(bacc[0]), *percentile_interval(bacc[1:], level), sens, spec)


# ----------------------------------------------------------------------------- corrected ASR


@dataclass(frozen=True)
class HeldOut:
    """A judge's binary record on held-out labels: truly harmful?, judged harmful?, and the prompt of each item."""

    judge: str
    truth: np.ndarray
    pred: np.ndarray
    groups: np.ndarray

    def __post_init__(self):
        if not (len(self.truth) == len(self.pred) == len(self.groups)) or len(self.truth) == 0:
            raise ValueError("HeldOut needs equally long, non-empty truth, pred and groups.")

    @classmethod
    def from_lists(cls, truth: Sequence[bool], pred: Sequence[bool], groups: Sequence | None = None,
                   judge: str = "") -> HeldOut:
        truth_a, pred_a = np.asarray(truth, bool), np.asarray(pred, bool)
        return cls(judge, truth_a, pred_a, _group_codes(groups, len(truth_a)))

    @property
    def sensitivity(self) -> float:
        return float(self.pred[self.truth].mean()) if self.truth.any() else float("nan")

    @property
    def specificity(self) -> float:
        return float((~self.pred[~self.truth]).mean()) if (~self.truth).any() else float("nan")


@functools.lru_cache(maxsize=1)
def _heldout_file() -> dict:
    return json.loads(labels_text(HELDOUT_FILE))


def measured_judges() -> list[str]:
    """Judge ids with a held-out record in the shipped ``judge_heldout.json``."""
    return sorted(_heldout_file()["judges"])


def heldout_record(judge: str) -> HeldOut:
    """The shipped held-out record of ``judge`` (written by ``scripts/score_judges.py``)."""
    data = _heldout_file()
    if judge not in data["judges"]:
        from depthlens.judges.seam import PROBE_JUDGE, judge_id

        judge = judge_id(judge) if judge == PROBE_JUDGE else judge    # the alias of the shipped probe: its full id
    if judge not in data["judges"]:
        raise ValueError(f"No held-out record for judge {judge!r}; measured judges are {sorted(data['judges'])}. "
                         "Run scripts/score_judges.py after adding a judge.")
    rec = data["judges"][judge]
    return HeldOut.from_lists(rec["truth_harmful"], rec["pred_harmful"], data["groups"], judge)


@dataclass(frozen=True)
class CorrectedASR:
    """A raw ASR and its Rogan–Gladen correction, each with a 95 % interval.

    Attributes:
        raw, raw_lo, raw_hi: share judged harmful and its bootstrap interval (prompts resampled).
        corrected, lo, hi: the corrected rate and its joint-bootstrap interval.
        sensitivity, specificity: the judge's measured rates on the held-out labels.
        judge: the judge whose errors were corrected.
        n, n_labels: trials measured, held-out labelled items used.
    """

    raw: float
    raw_lo: float
    raw_hi: float
    corrected: float
    lo: float
    hi: float
    sensitivity: float
    specificity: float
    judge: str
    n: int
    n_labels: int

    def columns(self, name: str) -> dict[str, float]:
        """``{name}_corrected``, ``{name}_corrected_lo``, ``{name}_corrected_hi``: keys to put beside a raw ASR."""
        return {f"{name}_corrected": self.corrected, f"{name}_corrected_lo": self.lo, f"{name}_corrected_hi": self.hi}

    def raw_columns(self, name: str) -> dict[str, float]:
        """``{name}``, ``{name}_lo``, ``{name}_hi``: the raw ASR and its bootstrap interval."""
        return {name: self.raw, f"{name}_lo": self.raw_lo, f"{name}_hi": self.raw_hi}


def corrected_asr(flags: Sequence[bool], groups: Sequence | None = None, *, judge: str | None = None,
                  heldout: HeldOut | None = None, n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> CorrectedASR:
    """Rogan–Gladen-corrected ASR of ``flags`` (one "judged harmful" bool per trial) for the judge that made them.

    ``groups`` (e.g. prompt ids) makes the bootstrap resample prompts with all their trials.
    The judge's error rates come from ``heldout`` or, by default, from the shipped held-out
    record of ``judge`` (default: the default judge). The interval resamples the trials and the
    held-out labelled prompts jointly in each of ``n_boot`` replicates (percentiles at ``level``).
    """
    flags_a = np.asarray([bool(f) for f in flags])
    if flags_a.size == 0:
        raise ValueError("corrected_asr needs at least one judged trial.")
    if heldout is None:
        if judge is None:
            from depthlens.judges.seam import DEFAULT_JUDGE

            judge = DEFAULT_JUDGE
        heldout = heldout_record(judge)
    elif judge is not None and heldout.judge and judge != heldout.judge:
        raise ValueError(f"judge {judge!r} does not match the held-out record of {heldout.judge!r}.")
    rng = np.random.default_rng(seed)
    w_obs = cluster_weights(_group_codes(groups, flags_a.size), n_boot, rng)
    w_lab = cluster_weights(heldout.groups, n_boot, rng)
    t, p = heldout.truth, heldout.pred
    p_obs = w_obs @ flags_a / w_obs.sum(1)
    sens = _ratio(w_lab @ (t & p), w_lab @ t)
    spec = _ratio(w_lab @ (~t & ~p), w_lab @ ~t)
    boots = rogan_gladen(p_obs, sens, spec)
    raw = float(flags_a.mean())
    return CorrectedASR(raw, *percentile_interval(p_obs, level), rogan_gladen(raw, heldout.sensitivity, heldout.specificity),
                        *percentile_interval(np.asarray(boots, float), level), heldout.sensitivity, heldout.specificity,
                        heldout.judge or (judge or ""), int(flags_a.size), int(t.size))


# ----------------------------------------------------------------------------- ASR tables


def _get(trial, name: str):
    return trial[name] if isinstance(trial, dict) else getattr(trial, name)


def _recorded_judge(trials: Sequence, field: str, default: str) -> str:
    """The one judge id the trials record in ``field`` (``default`` where they record none)."""
    ids = {(t.get(field) if isinstance(t, dict) else getattr(t, field, None)) or default for t in trials}
    if len(ids) != 1:
        raise ValueError(f"The trials were judged by several judges ({sorted(ids)}) in {field!r}; correct each group apart.")
    return ids.pop()


def corrected_trial_columns(trials: Sequence, n_boot: int = 2000, seed: int = 0,
                            records: dict[str, HeldOut] | None = None) -> dict[str, float]:
    """Corrected-ASR columns for a group of attack trials (``depthlens.attacks.records.Trial`` or its dict).

    Each raw rate that ``AttackResult.asr_by`` reports as an ASR gets ``<name>_corrected`` and
    its interval, corrected for the judge that made it: ``compliance`` (substring judge),
    ``harmful`` (three-class judge) and ``asr`` (the attack's headline: compliance for prefill,
    harmful otherwise). Trials are resampled by prompt. ``records`` replaces the shipped
    held-out records by judge id (tests).
    """
    from depthlens.judges.lexical import CONTINUATION_JUDGE_ID, JUDGE_ID

    if not trials:
        raise ValueError("corrected_trial_columns needs at least one trial.")
    groups = [_get(t, "prompt_id") for t in trials]
    records = records or {}
    compliance_judge = _recorded_judge(trials, "judge", JUDGE_ID)
    label_judge = _recorded_judge(trials, "continuation_judge", CONTINUATION_JUDGE_ID)
    comp = corrected_asr([_get(t, "asr_compliance") for t in trials], groups, judge=compliance_judge,
                         heldout=records.get(compliance_judge), n_boot=n_boot, seed=seed)
    harm = corrected_asr([_get(t, "label") == "harmful" for t in trials], groups, judge=label_judge,
                         heldout=records.get(label_judge), n_boot=n_boot, seed=seed)
    attacks = {_get(t, "attack") for t in trials}
    out = {**comp.columns("compliance"), **harm.columns("harmful")}
    if attacks == {"prefill"}:
        out.update(comp.columns("asr"))
    elif "prefill" not in attacks:
        out.update(harm.columns("asr"))
    return out


def correction_record(judges: Sequence[str]) -> dict:
    """What results files record about a correction: each judge's measured rates, the labels' hash, the default judge."""
    from depthlens.judges.seam import judge_id

    out = {}
    for j in judges:
        h = heldout_record(j)
        out[j] = {"sensitivity": h.sensitivity, "specificity": h.specificity, "n_labels": int(h.truth.size)}
    return {"method": "Rogan–Gladen, joint bootstrap of prompts and held-out labels (docs/judging.md §2)",
            "labels_sha256": _heldout_file().get("labels_sha256"), "judges": out, "default_judge": judge_id()}
