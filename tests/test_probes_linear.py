"""Tests for probes/linear.py and probes/grouped_cv.py: planted signals are found, controls stay at chance, no leaks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from probes import grouped_cv
from probes.grouped_cv import LayerAUROC, check_group_split, grouped_auroc, grouped_folds
from probes.linear import ProbeReport, diff_in_means, make_probe, probe_layers

N_LAYERS, D, SIGNAL_LAYER = 4, 64, 2
N_BOOT = 200


def make_data(signal: float = 2.5, seed: int = 0):
    """60 prompts of 3-5 trials, labels per trial, a prompt offset in every layer, and a
    y-dependent shift along one unit direction at SIGNAL_LAYER only."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 6, size=60)
    groups = np.repeat(np.array([f"p{i}" for i in range(60)]), sizes)
    n = groups.size
    y = rng.integers(0, 2, size=n)
    _, gidx = np.unique(groups, return_inverse=True)
    prompt_offset = rng.standard_normal((N_LAYERS, 60, D)) * 0.5
    X = rng.standard_normal((N_LAYERS, n, D)) + prompt_offset[:, gidx]
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    X[SIGNAL_LAYER] += signal * np.outer(2 * y - 1, u)
    surface = rng.standard_normal((n, 3))
    return X.astype(np.float32), y, groups, surface, u


@pytest.fixture(scope="module")
def planted():
    """Planted signal; the direction baseline gets unrelated random directions."""
    X, y, groups, surface, u = make_data()
    dirs = np.random.default_rng(1).standard_normal((N_LAYERS, D))
    report = probe_layers(
        X, y, groups, surface=surface, directions=dirs, n_boot=N_BOOT, seed=0, site="planted"
    )
    return report, (X, y, groups, surface, u)


@pytest.fixture(scope="module")
def planted_true_dir(planted):
    """Same data; the direction baseline gets the planted direction at the signal layer."""
    _, (X, y, groups, surface, u) = planted
    dirs = np.random.default_rng(1).standard_normal((N_LAYERS, D))
    dirs[SIGNAL_LAYER] = u
    report = probe_layers(X, y, groups, directions=dirs, n_boot=N_BOOT, seed=0, site="true_dir")
    return report, dirs


@pytest.fixture(scope="module")
def null_report():
    X, y, groups, surface, _ = make_data(signal=0.0, seed=3)
    return probe_layers(X, y, groups, surface=surface, n_boot=N_BOOT, seed=0, site="null")


# ------------------------------------------------------------------------------- planted signal


def test_planted_layer_is_found_and_others_are_chance(planted):
    report, _ = planted
    assert isinstance(report, ProbeReport)
    assert [r.layer for r in report.layers] == list(range(N_LAYERS))
    assert report.layers[SIGNAL_LAYER].auroc >= 0.95
    assert report.layers[SIGNAL_LAYER].accuracy >= 0.85
    for r in report.layers:
        assert r.lo <= r.auroc <= r.hi
        if r.layer != SIGNAL_LAYER:
            assert 0.35 <= r.auroc <= 0.65, r
    assert report.best_layer().layer == SIGNAL_LAYER


def test_controls_stay_below_the_probe(planted):
    report, _ = planted
    for r in report.shuffled:
        assert 0.35 <= r.auroc <= 0.65, r
    real = report.layers[SIGNAL_LAYER]
    rand = report.random_directions[SIGNAL_LAYER]
    assert rand.auroc < real.auroc - 0.05
    assert 0.35 <= report.surface.auroc <= 0.65
    assert report.surface.layer == -1


def test_direction_projection_recovers_planted_direction(planted_true_dir):
    report, _ = planted_true_dir
    proj = report.direction_projection
    assert proj is not None and len(proj) == N_LAYERS
    assert proj[SIGNAL_LAYER].auroc >= 0.95
    for r in proj:
        if r.layer != SIGNAL_LAYER:
            assert 0.35 <= r.auroc <= 0.65, r


def test_direction_orientation_is_learned_on_train_folds(planted, planted_true_dir):
    """Flipping the given direction must not flip the AUROC: the 1-D probe learns the sign."""
    report, dirs = planted_true_dir
    _, (X, y, groups, _, _) = planted
    flipped = probe_layers(X, y, groups, directions=-dirs, n_boot=0, seed=0)
    assert flipped.direction_projection[SIGNAL_LAYER].auroc == pytest.approx(
        report.direction_projection[SIGNAL_LAYER].auroc
    )


def test_verdict_planted_beats_baseline(planted):
    report, _ = planted
    v = report.verdict()
    assert v["beats_baseline"] is True
    assert v["best_layer"] == SIGNAL_LAYER
    name, base = report.best_baseline()
    assert v["best_baseline"] == name and v["baseline_auroc"] == base.auroc
    assert report.best_layer().lo > base.hi
    assert "beats" in v["sentence"] and "does not" not in v["sentence"]


def test_verdict_true_direction_explains_the_probe(planted_true_dir):
    """When the given direction already carries the signal, the probe adds nothing beyond it."""
    report, _ = planted_true_dir
    v = report.verdict()
    assert v["best_baseline"] == "direction_projection"
    assert v["baseline_layer"] == SIGNAL_LAYER
    assert v["beats_baseline"] is False


def test_verdict_no_signal_does_not_beat(null_report):
    v = null_report.verdict()
    assert v["beats_baseline"] is False
    assert "does not beat" in v["sentence"]
    for r in null_report.layers:
        assert 0.3 <= r.auroc <= 0.7, r


def test_to_records_long_format_and_json(planted):
    report, _ = planted
    recs = report.to_records()
    kinds = {r["kind"] for r in recs}
    assert kinds == {"probe", "shuffled", "random_directions", "surface", "direction_projection"}
    assert len(recs) == 4 * N_LAYERS + 1
    assert set(recs[0]) == {"site", "kind", "layer", "auroc", "lo", "hi", "accuracy"}
    assert all(r["site"] == "planted" for r in recs)
    json.dumps(recs, allow_nan=False)


def test_report_counts(planted):
    report, (X, y, groups, _, _) = planted
    assert report.n_trials == len(y)
    assert report.n_groups == 60
    assert report.n_pos == int(y.sum())
    assert report.n_splits == 5
    assert report.shuffle_level == "trial"  # labels vary within prompts
    assert report.oof_scores.shape == (N_LAYERS, len(y))


# ------------------------------------------------------------------------------- group leakage


def test_check_group_split_raises_on_leak_and_passes_clean():
    groups = np.array(["a", "a", "b", "b", "c", "c"])
    check_group_split(np.array([0, 1, 2, 3]), np.array([4, 5]), groups)
    with pytest.raises(ValueError, match="group 'b'.*both train and test"):
        check_group_split(np.array([0, 1, 2]), np.array([3, 4, 5]), groups)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_folds_never_leak_and_cover_every_trial(seed):
    _, y, groups, _, _ = make_data(seed=seed)
    folds = grouped_folds(y, groups, n_splits=5, seed=seed)
    assert folds.n_splits == len(folds.splits) == 5
    seen = np.concatenate([test for _, test in folds.splits])
    assert np.array_equal(np.sort(seen), np.arange(len(y)))
    for train, test in folds.splits:
        check_group_split(train, test, groups)
        assert np.intersect1d(train, test).size == 0


def test_probe_layers_checks_every_fold(monkeypatch):
    """probe_layers routes every fold through check_group_split, and every fold passes it."""
    real_check = grouped_cv.check_group_split
    calls = []

    def spy(train, test, groups):
        calls.append((train, test))
        real_check(train, test, groups)

    monkeypatch.setattr(grouped_cv, "check_group_split", spy)
    X, y, groups, _, _ = make_data()
    probe_layers(X[:1, :, :8], y, groups, n_boot=0, n_random_directions=2, seed=4)
    assert len(calls) == 5
    for train, test in calls:
        real_check(train, test, groups)


def test_fewer_folds_with_warning_when_groups_are_scarce():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 4)
    y = np.zeros(80, dtype=int)
    y[np.isin(groups, [0, 1, 2])] = 1  # positives live in 3 prompts only
    X = rng.standard_normal((1, 80, 5))
    with pytest.warns(UserWarning, match="using 3 folds instead of 5"):
        report = probe_layers(X, y, groups, n_boot=0, n_random_directions=2)
    assert report.n_splits == 3
    assert report.shuffle_level == "group"  # labels constant within prompts


# ------------------------------------------------------------------------------- bootstrap


def test_grouped_auroc_matches_sklearn_and_is_seeded():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 5)
    y = rng.integers(0, 2, 200)
    scores = y + rng.standard_normal(200)
    scores[:20] = 0.0  # ties
    a = grouped_auroc(scores, y, groups, n_boot=300, seed=7)
    b = grouped_auroc(scores, y, groups, n_boot=300, seed=7)
    assert isinstance(a, LayerAUROC) and a.layer == -1
    assert a == b
    assert a.auroc == pytest.approx(roc_auc_score(y, scores))
    assert a.lo < a.auroc < a.hi   # (the weighted AUROC behind the interval: tests/test_stats.py)


def test_cluster_bootstrap_is_wider_when_prompts_are_clustered():
    """Scores driven by a per-prompt effect: resampling prompts must give a wider interval
    than pretending every trial is its own prompt."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 8)
    y = np.repeat(rng.integers(0, 2, 30), 8)
    scores = np.repeat(rng.standard_normal(30), 8) + 0.5 * y + 0.1 * rng.standard_normal(240)
    clustered = grouped_auroc(scores, y, groups, n_boot=500, seed=0)
    naive = grouped_auroc(scores, y, np.arange(240), n_boot=500, seed=0)
    assert clustered.auroc == naive.auroc
    assert clustered.hi - clustered.lo > 1.5 * (naive.hi - naive.lo)


# ------------------------------------------------------------------------------- reproducibility


def test_seeded_runs_are_identical():
    X, y, groups, surface, _ = make_data(seed=5)
    X = X[:, :, :16]
    a = probe_layers(X, y, groups, surface=surface, n_boot=100, seed=11)
    b = probe_layers(X, y, groups, surface=surface, n_boot=100, seed=11)
    assert a.to_records() == b.to_records()
    assert np.array_equal(a.oof_scores, b.oof_scores)


def test_oof_scores_equal_the_sklearn_pipeline():
    """Reusing the scaler across probes is an optimisation only: same numbers as make_probe."""
    X, y, groups, _, _ = make_data()
    report = probe_layers(X[SIGNAL_LAYER:SIGNAL_LAYER + 1], y, groups, n_boot=0, seed=0)
    folds = grouped_folds(y, groups, n_splits=5, seed=0)
    expected = np.zeros(len(y))
    for train, test in folds.splits:
        Xl = X[SIGNAL_LAYER].astype(np.float64)  # probe_layers computes in float64
        pipe = make_probe().fit(Xl[train], y[train])
        expected[test] = pipe.decision_function(Xl[test])
    np.testing.assert_allclose(report.oof_scores[0], expected, rtol=1e-6, atol=1e-6)


def test_diff_in_means_is_unit_and_points_from_neg_to_pos():
    rng = np.random.default_rng(0)
    shift = np.zeros(8)
    shift[3] = 5.0
    pos = rng.standard_normal((2, 50, 8)).astype(np.float32) + shift
    neg = rng.standard_normal((2, 40, 8)).astype(np.float32)
    d = diff_in_means(pos, neg)
    assert d.shape == (2, 8) and d.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    assert np.all(np.argmax(d, axis=1) == 3)
    with pytest.raises(ValueError, match="agree apart from axis 1"):
        diff_in_means(pos, neg[:, :, :4])
    with pytest.raises(ValueError, match="means coincide"):
        diff_in_means(pos, pos)


# ------------------------------------------------------------------------------- errors


@pytest.fixture()
def small():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(10), 2)
    y = np.tile([0, 1], 10)
    X = rng.standard_normal((2, 20, 4))
    return X, y, groups


def test_error_mismatched_lengths(small):
    X, y, groups = small
    with pytest.raises(ValueError, match="y has 19 labels but X has 20 trials"):
        probe_layers(X, y[:-1], groups[:-1])
    with pytest.raises(ValueError, match="groups has shape"):
        probe_layers(X, y, groups[:-1])
    with pytest.raises(ValueError, match="surface has shape"):
        probe_layers(X, y, groups, surface=np.zeros((19, 2)))
    with pytest.raises(ValueError, match="directions has shape"):
        probe_layers(X, y, groups, directions=np.ones((3, 4)))
    with pytest.raises(ValueError, match="expected \\[n_layers, n_trials, d_model\\]"):
        probe_layers(X[0], y, groups)


def test_error_labels_not_binary_or_one_class(small):
    X, y, groups = small
    with pytest.raises(ValueError, match="binary labels 0/1"):
        probe_layers(X, y + 1, groups)
    with pytest.raises(ValueError, match="only one class"):
        probe_layers(X, np.zeros_like(y), groups)


def test_error_too_few_groups_per_class(small):
    X, y, groups = small
    y = np.zeros_like(y)
    y[groups == 3] = 1
    with pytest.raises(ValueError, match="label 1 occurs in only 1 group.*at least 2 groups"):
        probe_layers(X, y, groups)


def test_error_nan_features(small):
    X, y, groups = small
    X = X.copy()
    X[1, 5, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf at layer 1"):
        probe_layers(X, y, groups)
    with pytest.raises(ValueError, match="surface contains NaN"):
        probe_layers(X[:1], y, groups, surface=np.full((20, 1), np.nan))


def test_error_bad_options(small):
    X, y, groups = small
    with pytest.raises(ValueError, match="n_splits=1"):
        probe_layers(X, y, groups, n_splits=1)
    with pytest.raises(ValueError, match="non-zero"):
        probe_layers(X, y, groups, directions=np.zeros((2, 4)))
