"""Grouped cross-validation and cluster-bootstrap AUROC: the honest statistics under every probe.

Trials of one prompt are not independent (same prompt, several positions or spans), so a
probe's test score is only honest if no prompt straddles train and test, and its interval
only honest if the bootstrap resamples prompts, not trials. This module holds exactly that:
:func:`grouped_folds` (``StratifiedGroupKFold`` on prompt ids, every fold checked by
:func:`check_group_split`, fewer folds with a warning when a class lives in few prompts),
:func:`grouped_auroc` / :func:`auroc_row` (AUROC with a cluster-bootstrap 95 % interval, one
:class:`LayerAUROC` row) and the label/group validation. The probes themselves, their
baselines and the verdict are :mod:`probes.linear`.

    >>> y = np.array([0, 1] * 6); groups = np.repeat(np.arange(6), 2) % 4
    >>> grouped_auroc(y * 2.0 - 1.0, y, groups, n_boot=0).auroc
    1.0
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float, Shaped
from sklearn.model_selection import StratifiedGroupKFold

from depthlens import stats as st
from depthlens.infra.errors import UsageError

logger = logging.getLogger(__name__)


@dataclass
class LayerAUROC:
    """One row: AUROC of out-of-fold scores with its cluster-bootstrap 95 % interval.

    Args:
        layer: layer index, or -1 for a row that is not per layer (surface features).
        auroc: AUROC of the pooled out-of-fold scores.
        lo, hi: 2.5 and 97.5 percentiles of the AUROC over prompt-level bootstrap resamples
            (NaN when ``n_boot=0``).
        accuracy: fraction of trials whose out-of-fold prediction (logit > 0) is right.
    """

    layer: int
    auroc: float
    lo: float
    hi: float
    accuracy: float


@dataclass
class GroupedFolds:
    """Cross-validation folds in which no group straddles train and test.

    Args:
        splits: ``(train_idx, test_idx)`` index arrays, one pair per fold.
        n_splits: number of folds used (can be fewer than requested, see ``requested``).
        requested: number of folds asked for.
    """

    splits: list[tuple[np.ndarray, np.ndarray]]
    n_splits: int
    requested: int


# --------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------


def check_group_split(
    train_idx: Shaped[np.ndarray, " n_train"],
    test_idx: Shaped[np.ndarray, " n_test"],
    groups: Shaped[np.ndarray, " n_trials"],
) -> None:
    """Raise ``UsageError`` naming the group if any group has trials in both train and test."""
    groups = np.asarray(groups)
    leak = np.intersect1d(groups[np.asarray(train_idx)], groups[np.asarray(test_idx)])
    if leak.size:
        more = f" (and {leak.size - 1} more)" if leak.size > 1 else ""
        raise UsageError(
            f"group {leak[0].item()!r}{more} has trials in both train and test of a fold; "
            "trials of one prompt must stay on one side."
        )


def grouped_folds(
    y: Shaped[np.ndarray, " n_trials"],
    groups: Shaped[np.ndarray, " n_trials"],
    *,
    n_splits: int = 5,
    seed: int = 0,
) -> GroupedFolds:
    """Stratified group k-fold splits, with fewer folds (and a warning) if groups are scarce.

    The number of folds is capped by the number of groups that contain the rarer class; fewer
    than 2 such groups is an error. Every fold is checked with :func:`check_group_split`, and
    every training fold must hold both classes.
    """
    if n_splits < 2:
        raise UsageError(f"n_splits={n_splits} is too small; use at least 2 folds.")
    y, _, gcodes, names = check_labels_groups(y, groups)
    per_class = [np.unique(gcodes[y == c]).size for c in (0, 1)]
    n_eff = min(n_splits, *per_class)
    if n_eff < n_splits:
        msg = (
            f"only {min(per_class)} groups contain label {int(np.argmin(per_class))}; "
            f"using {n_eff} folds instead of {n_splits}."
        )
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    cv = StratifiedGroupKFold(n_splits=n_eff, shuffle=True, random_state=seed)
    splits = []
    for train, test in cv.split(np.zeros(len(y)), y, gcodes):
        check_group_split(train, test, names[gcodes])
        if np.unique(y[train]).size < 2:
            raise UsageError(
                "a training fold holds only one class; use fewer folds or more prompts per class."
            )
        splits.append((train, test))
    return GroupedFolds(splits=splits, n_splits=n_eff, requested=n_splits)


# --------------------------------------------------------------------------------------------
# Cluster bootstrap AUROC
# --------------------------------------------------------------------------------------------


def auroc_row(
    scores: np.ndarray, y: np.ndarray, weights: np.ndarray, layer: int, threshold: float = 0.0
) -> LayerAUROC:
    """AUROC of ``scores`` for labels ``y`` with the percentile interval over the resampling ``weights [B, n]``."""
    pos, neg = y == 1, y == 0
    auroc = st.auroc(scores[pos], scores[neg])
    acc = float(np.mean((scores > threshold) == pos))
    lo = hi = math.nan
    if weights.shape[0]:
        boots = st.auroc(scores[pos], scores[neg], pos_weights=weights[:, pos], neg_weights=weights[:, neg])
        n_bad = int(np.isnan(boots).sum())  # resamples that drew one class only are left out
        if n_bad:
            logger.debug("%d of %d bootstrap resamples had one class", n_bad, boots.size)
        if n_bad < boots.size:
            lo, hi = st.percentile_interval(boots)
    return LayerAUROC(layer=layer, auroc=auroc, lo=lo, hi=hi, accuracy=acc)


def grouped_auroc(
    scores: Float[np.ndarray, " n_trials"],
    y: Shaped[np.ndarray, " n_trials"],
    groups: Shaped[np.ndarray, " n_trials"],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.0,
) -> LayerAUROC:
    """AUROC of ``scores`` with a 95 % interval from a bootstrap over groups (``layer=-1``).

    Prompts are resampled with replacement and carry all their trials; resamples with one
    class only are dropped. ``accuracy`` thresholds ``scores`` at ``threshold`` (0 for logits,
    pass 0.5 for probabilities).
    """
    y, _, gcodes, _ = check_labels_groups(y, groups)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != y.shape:
        raise UsageError(
            f"scores has shape {scores.shape} but y has shape {y.shape}; they must match."
        )
    if not np.all(np.isfinite(scores)):
        raise UsageError("scores contain NaN or inf; pass finite scores.")
    if n_boot < 0:
        raise UsageError(f"n_boot={n_boot} must be >= 0.")
    weights = st.cluster_weights(gcodes, n_boot, seed)
    return auroc_row(scores, y, weights, layer=-1, threshold=threshold)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_labels_groups(
    y: Any, groups: Any, n_trials: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(y as int 0/1, groups, group codes 0..G-1, group names)`` or raise."""
    y, groups = np.asarray(y), np.asarray(groups)
    if y.ndim != 1:
        raise UsageError(f"y has shape {y.shape}; expected one label per trial [n_trials].")
    if n_trials is not None and len(y) != n_trials:
        raise UsageError(f"y has {len(y)} labels but X has {n_trials} trials; they must match.")
    if groups.shape != y.shape:
        raise UsageError(
            f"groups has shape {groups.shape} but y has shape {y.shape}; they must match."
        )
    values = np.unique(y)
    if y.dtype == bool:
        y = y.astype(np.int64)
    elif not np.isin(values, [0, 1]).all():
        raise UsageError(
            f"y must hold binary labels 0/1 or bool; got values {values[:5].tolist()}."
        )
    else:
        y = y.astype(np.int64)
    if values.size < 2:
        raise UsageError(f"y has only one class ({values.tolist()}); a probe needs both 0 and 1.")
    names, gcodes = np.unique(groups, return_inverse=True)
    gcodes = gcodes.reshape(-1)
    for c in (0, 1):
        g = np.unique(gcodes[y == c])
        if g.size < 2:
            raise UsageError(
                f"label {c} occurs in only {g.size} group ({names[g[0]].item()!r}); grouped "
                "cross-validation needs at least 2 groups per class."
            )
    return y, groups, gcodes, names
