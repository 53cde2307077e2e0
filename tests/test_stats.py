"""depthlens.stats: the one bootstrap, AUROC and difference in means, against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from depthlens.infra.errors import UsageError
from depthlens.stats import (Interval, auroc, bootstrap_mean, cluster_weights, diff_in_means, percentile_interval,
                             resample_indices)


def _reference_bootstrap(values, n_boot, seed):
    """The loop every analysis used to write: i.i.d. resamples, mean, 2.5/97.5 percentiles."""
    rng = np.random.default_rng(seed)
    boots = [np.mean(values[rng.integers(0, len(values), len(values))]) for _ in range(n_boot)]
    return float(np.mean(values)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def test_bootstrap_mean_equals_the_reference_loop_and_is_seeded():
    values = np.random.default_rng(0).standard_normal(41)
    ci = bootstrap_mean(values, n_boot=400, seed=3)
    assert isinstance(ci, Interval) and tuple(ci) == _reference_bootstrap(values, 400, 3)
    assert tuple(bootstrap_mean(values, 400, 3)) == tuple(ci)
    assert tuple(bootstrap_mean(values, 400, 4)) != tuple(ci)


def test_bootstrap_interval_covers_the_true_mean_at_about_its_level():
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(200):
        ci = bootstrap_mean(rng.normal(2.0, 1.0, 50), n_boot=300, seed=trial)
        hits += ci.lo <= 2.0 <= ci.hi
    assert 0.88 <= hits / 200 <= 0.99  # a 95 % interval (percentile intervals run a little narrow at n=50)


def test_paired_bootstrap_resamples_pairs_together():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 5, 60)                     # large between-item spread ...
    new = base + 0.3 + rng.normal(0, 0.1, 60)       # ... that the pairing removes
    paired = bootstrap_mean(new, baseline=base, n_boot=500, seed=0)
    unpaired_width = np.diff(percentile_interval(
        [np.mean(new[i]) - np.mean(base[j]) for i, j in zip(resample_indices(60, 500, 0), resample_indices(60, 500, 1))]))
    assert paired.lo < 0.3 < paired.hi and paired.hi - paired.lo < 0.1 * unpaired_width[0]
    idx = resample_indices(60, 500, np.random.default_rng(0))
    assert tuple(bootstrap_mean(new, baseline=base, indices=idx)) == tuple(paired)  # shared resamples


def test_cluster_bootstrap_moves_whole_groups_and_is_wider_for_clustered_data():
    groups = np.repeat(np.arange(20), 10)
    w = cluster_weights(groups, 50, seed=0)
    assert w.shape == (50, 200) and np.all(w.sum(1) == 200)
    assert all(len(set(row[groups == g])) == 1 for row in w for g in range(20))  # a group moves as one
    rng = np.random.default_rng(3)
    values = np.repeat(rng.normal(0, 1, 20), 10) + rng.normal(0, 0.1, 200)
    clustered = bootstrap_mean(values, n_boot=500, seed=0, groups=groups)
    naive = bootstrap_mean(values, n_boot=500, seed=0)
    assert clustered.estimate == pytest.approx(naive.estimate)
    assert clustered.hi - clustered.lo > 2 * (naive.hi - naive.lo)


def test_bootstrap_per_column_skips_missing_values_only_when_told():
    values = np.array([[1.0, 5.0], [3.0, np.nan], [2.0, np.nan]])
    ci = bootstrap_mean(values, n_boot=200, seed=0, skip_nan=True)
    assert ci.estimate.tolist() == [2.0, 5.0] and ci.lo[1] == ci.hi[1] == 5.0
    empty = bootstrap_mean(np.array([[1.0, np.nan]]), n_boot=10, seed=0, skip_nan=True)
    assert np.isnan(empty.estimate[1]) and np.isnan(empty.lo[1])
    broken = bootstrap_mean(values, n_boot=200, seed=0)  # by default a NaN is a broken number: it propagates
    assert broken.estimate[0] == 2.0 and np.isnan([broken.estimate[1], broken.lo[1], broken.hi[1]]).all()
    one = bootstrap_mean([1.0, np.nan, 2.0], n_boot=50, seed=0)
    assert np.isnan([one.estimate, one.lo, one.hi]).all()
    nothing = bootstrap_mean([1.0, 2.0], n_boot=0)
    assert nothing.estimate == 1.5 and np.isnan(nothing.lo) and np.isnan(nothing.hi)


def test_auroc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    scores = np.round(y + rng.standard_normal(200), 1)  # many ties
    pos, neg = scores[y == 1], scores[y == 0]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(y, scores))
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0], [1]) == 0.0 and auroc([1], [1]) == 0.5
    # integer weights equal the AUROC of the duplicated sample; a row without positives is NaN
    w = rng.integers(0, 3, size=(3, 200)).astype(float)
    w[2, y == 1] = 0
    got = auroc(pos, neg, pos_weights=w[:, y == 1], neg_weights=w[:, y == 0])
    for row in range(2):
        rep = np.repeat(np.arange(200), w[row].astype(int))
        assert got[row] == pytest.approx(roc_auc_score(y[rep], scores[rep]))
    assert np.isnan(got[2])


def test_diff_in_means_torch_and_numpy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 3, 8, generator=gen), torch.randn(20, 3, 8, generator=gen)
    d = diff_in_means(a, b)
    assert d.dtype == torch.float64 and torch.equal(d, a.double().mean(0) - b.double().mean(0))
    x, z = a.numpy().transpose(1, 0, 2), b.numpy().transpose(1, 0, 2)  # [layer, n, d], the probes' layout
    u = diff_in_means(x, z, axis=1, unit=True)
    assert isinstance(u, np.ndarray) and np.allclose(np.linalg.norm(u, axis=-1), 1.0)
    assert np.allclose(u, (d / d.norm(dim=-1, keepdim=True)).numpy())


@pytest.mark.parametrize("call, words", [
    (lambda: bootstrap_mean([], 10), "n >= 1"),
    (lambda: bootstrap_mean([1.0, 2.0], 2.5), "n_boot must be an integer >= 0"),
    (lambda: bootstrap_mean([1.0, 2.0], 10, baseline=[1.0]), "paired bootstrap needs them equal"),
    (lambda: bootstrap_mean([1.0, 2.0], 10, groups=["a"]), "one per value"),
    (lambda: bootstrap_mean([1.0, 2.0], indices=np.array([[0, 5]])), "resamples of the 2 values"),
    (lambda: percentile_interval([1.0, 2.0], level=95), "strictly between 0 and 1"),
    (lambda: auroc([], [1.0]), "at least one positive and one negative"),
    (lambda: auroc([np.nan], [1.0]), "NaN or inf"),
    (lambda: auroc([1.0], [0.0], pos_weights=np.ones((2, 3))), "weights must be"),
    (lambda: diff_in_means(np.ones((2, 3)), np.ones((2, 4))), "agree apart from axis 0"),
    (lambda: diff_in_means(np.ones((0, 3)), np.ones((2, 3))), "at least one row"),
    (lambda: diff_in_means(np.ones((2, 3)), np.ones((2, 3)), unit=True), "means coincide"),
    (lambda: diff_in_means(np.full((2, 3), np.nan), np.ones((2, 3))), "NaN or inf"),
])
def test_bad_arguments_raise_one_usage_error(call, words):
    with pytest.raises(UsageError, match=words):
        call()
