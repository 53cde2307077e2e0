"""Insertion trials as their consumers read them: found, loaded and checked.

``analyses.state_prediction`` and ``analyses.layer_ablation`` work on the per-trial records of
an ``analyses.insertion_robustness`` run. ``obtain_trials`` takes ``--trials`` when given;
otherwise the newest run of the model under ``--out``, named in a warning and recorded as
``chosen="newest"`` (never silently); otherwise it makes (and saves) a run first. Every record
is checked on the way in: a missing field, an unknown label or a non-finite number is a
``UsageError`` naming the trial, never a value read as 0.

    >>> source = obtain_trials("tiny-llama", None, "results", quick=True)  # runs an insertion_robustness analysis first (tests/test_state_prediction.py)  # doctest: +SKIP
    >>> source.chosen, source.path, len(source.trials)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from depthlens.infra.errors import UsageError
from depthlens.infra.results import latest_run, read_run, start_stamp, write_run

log = logging.getLogger(__name__)

_TRIAL_FIELDS = ("prompt_id", "prompt", "ids", "span", "label", "position", "depth_actual", "span_len", "prompt_len")
_NUMERIC_FIELDS = ("position", "depth_actual", "span_len", "prompt_len", "score")
TRIAL_LABELS = ("recovered", "harmful", "other")


@dataclass(frozen=True)
class TrialSource:
    """Insertion trials and where they came from.

    Attributes:
        trials: the trial records (dicts as ``depthlens.attacks.records.Trial``).
        path: the insertion_robustness results.json they were read from.
        model: the model spec that made them.
        ran_insertion: True when the run was made here because none was found.
        chosen: how the run was chosen: ``explicit`` (``--trials``), ``newest`` (the newest run
            of the model under ``--out``) or ``ran`` (made here).
    """

    trials: list[dict]
    path: Path
    model: str
    ran_insertion: bool = False
    chosen: str = "explicit"


def check_trials(trials: Sequence[Mapping], where: str) -> None:
    """Refuse trial records a consumer cannot trust: a missing field, an unknown label, a non-finite number."""
    for i, t in enumerate(trials):
        missing = [f for f in _TRIAL_FIELDS if t.get(f) is None]
        if missing:
            raise UsageError(f"Trial {i} ({t.get('prompt_id')!r}) in {where} lacks {missing}; re-run "
                             "analyses.insertion_robustness.")
        if t["label"] not in TRIAL_LABELS:
            raise UsageError(f"Trial {i} ({t['prompt_id']!r}) in {where} has label {t['label']!r}; "
                             f"labels are {', '.join(TRIAL_LABELS)}.")
        for f in _NUMERIC_FIELDS:
            v = t.get(f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise UsageError(f"Trial {i} ({t['prompt_id']!r}) in {where} has {f} = {v!r}, not a finite number.")


def _find_results(path: Path) -> Path:
    """A results.json given directly, in ``path``, or the newest one below it."""
    if path.is_file():
        return path
    if (path / "results.json").is_file():
        return path / "results.json"
    found = sorted(path.glob("**/results.json"), key=lambda p: p.parent.name)
    if not found:
        raise UsageError(f"--trials {str(path)!r} holds no results.json; pass an insertion_robustness run "
                         "directory or its results.json.")
    return found[-1]


def load_trials(path: str | Path, model: str | None = None) -> TrialSource:
    """Read the trials of an insertion_robustness results file or directory, checked.

    ``model``: when given, the record must have been made by that spec (activations of
    another model on these tokens would mean nothing).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--trials {str(p)!r} does not exist; pass an insertion_robustness run directory "
                         "or its results.json.")
    file = _find_results(p)
    try:
        rec = read_run(file)
    except (ValueError, OSError) as err:
        raise UsageError(f"--trials {str(file)!r}: {err}") from err
    if rec.analysis != "insertion_robustness":
        raise UsageError(f"{str(file)!r} is a {rec.analysis!r} record; --trials needs an insertion_robustness one.")
    trials = rec.tables.get("trials") or []
    if not trials:
        raise UsageError(f"{str(file)!r} has no per-trial records (tables['trials'] is empty or missing).")
    check_trials(trials, repr(str(file)))
    if model is not None and rec.model != model:
        raise UsageError(f"The trials in {str(file)!r} were made by {rec.model!r} but --model is {model!r}; "
                         f"pass --model {rec.model}.")
    return TrialSource(trials=list(trials), path=file, model=rec.model)


def obtain_trials(model: str, trials: str | None, out: str, *, seed: int = 0, device: str | None = None,
                  quick: bool = False, loaded=None, judge: str | None = None) -> TrialSource:
    """``trials`` if given; else the newest insertion_robustness run of ``model`` under ``out``
    (named in a warning: it was not chosen explicitly); else run ``analyses.insertion_robustness``
    (its defaults, or its quick settings, judged by ``judge``) and save it. ``TrialSource.chosen`` says which."""
    if trials is not None:
        return load_trials(trials, model)
    found = latest_run(out, "insertion_robustness", model=model)
    if found is not None:
        log.warning("--trials not given: using the newest insertion_robustness run of %s under %s: %s "
                    "(pass --trials to choose another).", model, out, found)
        return replace(load_trials(found, model), chosen="newest")
    from analyses import insertion_robustness

    log.info("No insertion_robustness run of %s under %s: running one first.", model, out)
    icfg = insertion_robustness.InsertionConfig(model=model, seed=seed, device=device, out=out, quick=quick, judge=judge)
    started = start_stamp()
    rec = insertion_robustness.run(icfg, model=loaded)   # ``loaded``: the model, if already loaded
    rec.started = started
    path = write_run(rec, out)
    log.info("Saved the insertion trials as %s", path)
    return replace(load_trials(path, model), ran_insertion=True, chosen="ran")


def judged_trials(source: TrialSource, judge: str | None) -> tuple[list[dict], bool]:
    """The trials labelled by ``judge`` (default: the default judge) and whether they were relabelled here.

    Trials whose recorded ``continuation_judge`` is that judge keep their labels; otherwise every
    continuation is judged again, with the refusal prefix and inserted span as its context and the
    span as the topic-overlap judge's reference (records keep no whole harmful answer).
    """
    from depthlens.judges import classify_many, judge_id

    full = judge_id(judge)
    recorded = {t.get("continuation_judge") or "substring+topic-overlap-v1" for t in source.trials}
    if recorded == {full}:
        return list(source.trials), False
    log.info("Relabelling %d trials (judged by %s) with %s.", len(source.trials), ", ".join(sorted(recorded)), full)
    trials = list(source.trials)
    labels = classify_many([t["prompt"] for t in trials], [t.get("continuation") or "" for t in trials],
                           [(t.get("prefix_text") or "") + (t.get("span_text") or "") for t in trials], judge=full,
                           references=[t.get("span_text") or "" for t in trials])
    out = [{**t, "label": lab, "label_recorded": t["label"], "asr_harmful": lab == "harmful",
            "continuation_judge": full} for t, lab in zip(trials, labels)]
    return out, True
