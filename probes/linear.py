"""Per-layer linear probes with grouped cross-validation, cluster-bootstrap AUROC and baselines.

Question 3 of the design asks whether hidden states at some position (e.g. the last token of
an inserted harmful span) predict a binary outcome (the model recovers vs continues). This
module answers it per layer with honest statistics:

- a probe is ``StandardScaler`` + L2 ``LogisticRegression(class_weight="balanced")`` (see
  :func:`make_probe`), fitted inside each training fold only;
- folds come from ``StratifiedGroupKFold`` on prompt ids, so trials of one prompt never
  straddle train and test (checked on every fold by ``check_group_split``);
- every trial gets an out-of-fold score, pooled into one AUROC per layer, with a 95 %
  interval from a *cluster* bootstrap that resamples prompts, not trials (folds, AUROC rows
  and the cluster bootstrap are :mod:`probes.grouped_cv`);
- the same folds and the same bootstrap resamples score four baselines: shuffled labels,
  probes on random directions, surface features only, and the 1-D projection on a given
  direction per layer (e.g. the refusal direction).

:meth:`ProbeReport.verdict` then asks the one question that matters: does the best layer beat
the best baseline by more than its interval? Decodable is not causal: back a probe with an
ablation.

Example::

    report = probe_layers(X, recovered, prompt_ids, surface=surface_feats, directions=refusal_dirs)
    print(report.verdict()["sentence"])
    rows = report.to_records()  # long-format table for results.json

Choices worth knowing:

- Shuffled labels: when every prompt's trials share one label, the *prompt-level* labels are
  permuted across prompts (keeps the cluster structure); otherwise the trial labels are
  permuted. ``ProbeReport.shuffle_level`` says which ("group" or "trial").
- Random directions are drawn (seeded, independently per layer) in the raw residual basis and
  the 16-d projections are then standardized per fold like any other feature.
- The direction baseline fits a 1-D probe through the same CV, so its orientation is learned
  on training folds. A direction computed from the very trials being probed (e.g.
  :func:`diff_in_means` on them) leaks the test labels: derive it from held-out prompts.
- Best layer and best baseline are both maxima over many rows, so both are optimistic; the
  verdict compares intervals, which is conservative only to the extent the intervals are.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from jaxtyping import Float, Shaped
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from depthlens import stats as st
from depthlens.infra.errors import UsageError
from probes.grouped_cv import GroupedFolds, LayerAUROC, auroc_row, check_labels_groups, grouped_folds

logger = logging.getLogger(__name__)

__all__ = [
    "ProbeReport",
    "probe_layers",
    "diff_in_means",
    "make_probe",
]


@dataclass
class ProbeReport:
    """Per-layer probe AUROCs at one site, with the baselines scored on the same folds.

    Args:
        site: free label for the position probed, e.g. ``"last_inserted"``.
        layers: the real probe, one row per layer.
        shuffled: the probe refitted on shuffled labels, per layer.
        random_directions: the probe on k random directions of each layer, per layer.
        surface: the probe on surface features only (``layer == -1``), or None.
        direction_projection: the 1-D probe on the projection on a given direction per layer,
            or None.
        n_trials, n_groups, n_pos: trials, prompts and positive trials.
        n_splits: folds actually used; seed: the seed of folds, shuffles and bootstrap.
        shuffle_level: ``"group"`` (prompt labels permuted) or ``"trial"``.
        oof_scores: out-of-fold logits of the real probe, ``[n_layers, n_trials]``.
    """

    site: str
    layers: list[LayerAUROC]
    shuffled: list[LayerAUROC]
    random_directions: list[LayerAUROC]
    surface: LayerAUROC | None
    direction_projection: list[LayerAUROC] | None
    n_trials: int
    n_groups: int
    n_pos: int
    n_splits: int
    seed: int
    shuffle_level: str = "trial"
    oof_scores: np.ndarray | None = field(default=None, repr=False, compare=False)

    def best_layer(self) -> LayerAUROC:
        """The real-probe row with the highest AUROC (earliest layer on ties)."""
        return _argmax_row(self.layers)

    def _baselines(self) -> dict[str, list[LayerAUROC]]:
        out = {"shuffled": self.shuffled, "random_directions": self.random_directions}
        if self.surface is not None:
            out["surface"] = [self.surface]
        if self.direction_projection is not None:
            out["direction_projection"] = self.direction_projection
        return out

    def best_baseline(self) -> tuple[str, LayerAUROC]:
        """The strongest baseline row over all baselines and layers, with its kind."""
        best_name, best_row = "", None
        for name, rows in self._baselines().items():
            row = _argmax_row(rows)
            if best_row is None or _key(row) > _key(best_row):
                best_name, best_row = name, row
        assert best_row is not None  # shuffled and random_directions are never empty
        return best_name, best_row

    def verdict(self) -> dict[str, Any]:
        """Does the best layer beat the best baseline by more than its interval?

        ``beats_baseline`` is ``best.lo > baseline.hi``: the lower end of the best layer's
        interval lies above the upper end of the strongest baseline's interval.
        """
        best = self.best_layer()
        name, base = self.best_baseline()
        beats = bool(best.lo > base.hi)  # False when either is NaN
        where = "" if base.layer < 0 else f" at layer {base.layer}"
        head = (
            f"{self.site or 'probe'}: best layer {best.layer} AUROC {best.auroc:.3f} "
            f"[{best.lo:.3f}, {best.hi:.3f}]"
        )
        tail = f"best baseline {name}{where} AUROC {base.auroc:.3f} [{base.lo:.3f}, {base.hi:.3f}]"
        if beats:
            sentence = f"{head} beats the {tail}: the intervals do not overlap."
        else:
            sentence = f"{head} does not beat the {tail} by more than its interval."
        return {
            "best_layer": best.layer,
            "best_auroc": best.auroc,
            "best_lo": best.lo,
            "best_hi": best.hi,
            "best_baseline": name,
            "baseline_layer": base.layer,
            "baseline_auroc": base.auroc,
            "baseline_lo": base.lo,
            "baseline_hi": base.hi,
            "beats_baseline": beats,
            "sentence": sentence,
        }

    def to_records(self) -> list[dict[str, Any]]:
        """Long-format rows ``{site, kind, layer, auroc, lo, hi, accuracy}``; NaN -> None."""
        rows: list[dict[str, Any]] = []
        for kind, group in [("probe", self.layers), *self._baselines().items()]:
            for r in group:
                rec = {"site": self.site, "kind": kind}
                for k, v in asdict(r).items():
                    rec[k] = None if isinstance(v, float) and math.isnan(v) else v
                rows.append(rec)
        return rows


def _key(row: LayerAUROC) -> float:
    return -math.inf if math.isnan(row.auroc) else row.auroc


def _argmax_row(rows: list[LayerAUROC]) -> LayerAUROC:
    if not rows:
        raise ValueError("cannot pick the best of an empty list of rows.")
    best = rows[0]
    for r in rows[1:]:
        if _key(r) > _key(best):
            best = r
    return best


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


def make_probe(C: float = 1.0, max_iter: int = 1000) -> Pipeline:
    """The probe: ``StandardScaler`` then L2 ``LogisticRegression`` with balanced classes.

    :func:`probe_layers` fits exactly this model per fold, but fits the scaler once per layer
    and fold and reuses it for the real and the shuffled-label probe.
    """
    return Pipeline([("scale", StandardScaler()), ("logreg", _logreg(C, max_iter))])


def _logreg(C: float, max_iter: int) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs", class_weight="balanced")


def _cv_scores(
    F: np.ndarray, labels: list[np.ndarray], folds: GroupedFolds, C: float, max_iter: int,
    stats: dict[str, int],
) -> list[np.ndarray]:
    """Out-of-fold logits of the probe on features ``F [n, k]``, one array per label vector."""
    out = [np.zeros(F.shape[0]) for _ in labels]
    for train, test in folds.splits:
        scaler = StandardScaler().fit(F[train])
        f_train, f_test = scaler.transform(F[train]), scaler.transform(F[test])
        for lab, scores in zip(labels, out):
            if np.unique(lab[train]).size < 2:  # only possible for shuffled labels
                stats["one_class"] += 1
                scores[test] = 0.0
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                clf = _logreg(C, max_iter).fit(f_train, lab[train])
            for w in caught:  # count convergence warnings, pass any other warning on
                if w.category is ConvergenceWarning:
                    stats["no_convergence"] += 1
                else:
                    warnings.warn(w.message, w.category, stacklevel=2)
            scores[test] = clf.decision_function(f_test)
    return out


def _shuffle_labels(
    y: np.ndarray, gcodes: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """Permute prompt-level labels if labels are constant within prompts, else trial labels."""
    n_groups = int(gcodes.max()) + 1
    first = np.zeros(n_groups, dtype=y.dtype)
    first[gcodes] = y  # some trial's label per group
    if np.all(first[gcodes] == y):  # labels constant within every group
        return rng.permutation(first)[gcodes], "group"
    return rng.permutation(y), "trial"


def probe_layers(
    X: Float[np.ndarray, "n_layers n_trials d_model"],
    y: Shaped[np.ndarray, " n_trials"],
    groups: Shaped[np.ndarray, " n_trials"],
    *,
    surface: Float[np.ndarray, "n_trials n_surface"] | None = None,
    directions: Float[np.ndarray, "n_layers d_model"] | None = None,
    n_splits: int = 5,
    C: float = 1.0,
    n_boot: int = 1000,
    n_random_directions: int = 16,
    seed: int = 0,
    site: str = "",
    max_iter: int = 1000,
) -> ProbeReport:
    """Probe every layer for ``y`` with grouped CV and score the baselines on the same folds.

    Args:
        X: features per layer, e.g. the residual stream at one position.
        y: binary labels (0/1 or bool), one per trial.
        groups: prompt id per trial; a prompt's trials never straddle train and test.
        surface: optional surface features (position, span length, prompt length, ...).
        directions: optional direction per layer (need not be unit); its 1-D projection is
            probed through the same CV.
        n_splits: folds requested (fewer are used, with a warning, if groups are scarce).
        C: inverse L2 strength of the logistic regression.
        n_boot: prompt-level bootstrap resamples for the intervals (0: no interval).
        n_random_directions: random directions per layer for that baseline.
        seed: seeds the folds, the label shuffle, the random directions and the bootstrap.
        site: free label copied into the report.
        max_iter: lbfgs iteration cap.
    """
    X = np.asarray(X)
    if X.ndim != 3:
        raise UsageError(f"X has shape {X.shape}; expected [n_layers, n_trials, d_model].")
    n_layers, n_trials, d_model = X.shape
    if n_layers == 0 or d_model == 0:
        raise UsageError(f"X has shape {X.shape}; it needs at least one layer and one feature.")
    y, groups, gcodes, _ = check_labels_groups(y, groups, n_trials=n_trials)
    for layer in range(n_layers):
        if not np.all(np.isfinite(X[layer])):
            raise UsageError(
                f"X contains NaN or inf at layer {layer}; drop or impute those trials."
            )
    if surface is not None:
        surface = np.asarray(surface, dtype=np.float64)
        if surface.ndim == 1:
            surface = surface[:, None]
        if surface.ndim != 2 or surface.shape[0] != n_trials:
            raise UsageError(
                f"surface has shape {surface.shape}; expected [{n_trials}, n_surface]."
            )
        if not np.all(np.isfinite(surface)):
            raise UsageError("surface contains NaN or inf; drop or impute those trials.")
    units = None
    if directions is not None:
        directions = np.asarray(directions, dtype=np.float64)
        if directions.shape != (n_layers, d_model):
            raise UsageError(
                f"directions has shape {directions.shape}; expected {(n_layers, d_model)}."
            )
        norms = np.linalg.norm(directions, axis=1, keepdims=True)
        if not np.all(np.isfinite(directions)) or np.any(norms == 0):
            raise UsageError("directions must be finite and non-zero at every layer.")
        units = directions / norms
    if n_random_directions < 1:
        raise UsageError(f"n_random_directions={n_random_directions} must be >= 1.")
    if n_boot < 0:
        raise UsageError(f"n_boot={n_boot} must be >= 0.")

    folds = grouped_folds(y, groups, n_splits=n_splits, seed=seed)
    weights = st.cluster_weights(gcodes, n_boot, seed)  # same resamples for every row
    perm_rng, dir_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    y_shuf, shuffle_level = _shuffle_labels(y, gcodes, perm_rng)
    stats = {"one_class": 0, "no_convergence": 0}

    rows, shuf_rows, rand_rows = [], [], []
    proj_rows: list[LayerAUROC] | None = [] if units is not None else None
    oof = np.zeros((n_layers, n_trials))
    # Thousands of small fits: multi-threaded BLAS only adds overhead here, and under CPU
    # contention its busy-waiting threads made the same run ~8x slower (measured, 2 cores).
    # One thread also keeps the numbers independent of the BLAS thread count.
    with threadpool_limits(limits=1, user_api="blas"):
        for layer in range(n_layers):
            Xl = X[layer].astype(np.float64, copy=False)
            real, shuf = _cv_scores(Xl, [y, y_shuf], folds, C, max_iter, stats)
            oof[layer] = real
            rows.append(auroc_row(real, y, weights, layer))
            shuf_rows.append(auroc_row(shuf, y_shuf, weights, layer))
            R = dir_rng.standard_normal((d_model, n_random_directions))
            R /= np.linalg.norm(R, axis=0, keepdims=True)
            (rand,) = _cv_scores(Xl @ R, [y], folds, C, max_iter, stats)
            rand_rows.append(auroc_row(rand, y, weights, layer))
            if units is not None and proj_rows is not None:
                (proj,) = _cv_scores((Xl @ units[layer])[:, None], [y], folds, C, max_iter, stats)
                proj_rows.append(auroc_row(proj, y, weights, layer))
        surf_row = None
        if surface is not None:
            (surf,) = _cv_scores(surface, [y], folds, C, max_iter, stats)
            surf_row = auroc_row(surf, y, weights, -1)

    if stats["no_convergence"]:
        logger.warning(
            "%d probe fits did not converge in max_iter=%d", stats["no_convergence"], max_iter
        )
    if stats["one_class"]:
        logger.warning(
            "%d shuffled-label training folds held one class; scored 0", stats["one_class"]
        )
    return ProbeReport(
        site=site,
        layers=rows,
        shuffled=shuf_rows,
        random_directions=rand_rows,
        surface=surf_row,
        direction_projection=proj_rows,
        n_trials=n_trials,
        n_groups=int(gcodes.max()) + 1,
        n_pos=int(y.sum()),
        n_splits=folds.n_splits,
        seed=seed,
        shuffle_level=shuffle_level,
        oof_scores=oof,
    )


def diff_in_means(
    X_pos: Float[np.ndarray, "n_layers n_pos d_model"],
    X_neg: Float[np.ndarray, "n_layers n_neg d_model"],
) -> Float[np.ndarray, "n_layers d_model"]:
    """Unit difference-in-means direction per layer, ``mean(X_pos) − mean(X_neg)`` over trials, in float64.

    ``depthlens.stats.diff_in_means`` over the trial axis (1), normalized per layer.

        >>> X_pos, X_neg = np.ones((2, 3, 4)), np.zeros((2, 5, 4))
        >>> diff_in_means(X_pos, X_neg)[0]
        array([0.5, 0.5, 0.5, 0.5])
    """
    X_pos, X_neg = np.asarray(X_pos), np.asarray(X_neg)
    if X_pos.ndim != 3 or X_neg.ndim != 3:
        raise UsageError(f"X_pos {X_pos.shape} and X_neg {X_neg.shape} must both be [n_layers, n, d_model].")
    return st.diff_in_means(X_pos, X_neg, axis=1, unit=True)
