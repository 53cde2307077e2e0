"""The statistics every room shares: one bootstrap, Wilson, AUROC, Rogan–Gladen, a difference in means.

Results are only comparable across analyses if their intervals and scores are computed the
same way, so there is one implementation of each here, and nothing else in the repository
draws a resample or computes an interval by itself (docs/methods.md; CONVENTIONS "Statistics"):

- **bootstrap** — ``bootstrap_mean``: a mean with a seeded percentile interval (95 % by
  default). Plain by default; ``groups=`` makes it a cluster bootstrap (whole groups, e.g.
  prompts, are resampled, never single trials of one: the rule for a rate over trials that
  share prompts); ``baseline=`` makes it paired (the mean of ``values − baseline`` with both
  resampled together: the rule for a difference on the same prompts); both together give a
  paired cluster bootstrap. ``indices=`` reuses resamples drawn once for several statistics.
  The building blocks are public for statistics other than a mean (ratios, AUROCs, a
  corrected rate): ``resample_indices`` (plain resamples), ``cluster_weights`` (cluster
  resamples as multiplicities) and ``percentile_interval`` (replicates → interval).
- **Wilson** — ``wilson_interval(successes, n)``: the interval of a binomial rate where each
  prompt gives one outcome; honest at 0 and n, where the normal interval collapses.
- **AUROC** — ``auroc``: P(a positive scores above a negative), ties counted ½, optionally
  under resampling weights (one AUROC per bootstrap replicate, in one vectorized pass).
- **Rogan–Gladen** — ``rogan_gladen(p_obs, se, sp)``: a rate measured by an imperfect judge,
  corrected for its sensitivity and specificity (``depthlens.judges.accuracy`` bootstraps it).
- ``diff_in_means``: ``mean(a) − mean(b)`` over one axis in float64, optionally normalized.
- ``rate_interval``: a rate over 0/1 trials with the interval that respects prompts (Wilson
  where each prompt gave one trial, else a prompt-level bootstrap), ``paired_rate_difference``
  the paired prompt bootstrap of a difference of two such rates on the same prompts, and
  ``top_k_probability`` how stable a ranking is over bootstrap replicates (docs/methods.md §0).

Every function takes a ``seed`` (an int or one ``np.random.Generator`` to draw several
resample sets from one stream) where it draws, and raises ``UsageError`` on misuse.

    >>> ci = bootstrap_mean([1.0, 2.0, 3.0, 4.0], n_boot=500, seed=0)
    >>> ci.estimate, bool(ci.lo < 2.5 < ci.hi)
    (2.5, True)
    >>> tuple(round(x, 3) for x in wilson_interval(3, 10))
    (0.108, 0.603)
    >>> auroc([2.0, 3.0], [0.0, 2.0])
    0.875
    >>> round(rogan_gladen(0.5, sensitivity=0.9, specificity=0.8), 4)
    0.4286
    >>> diff_in_means(np.array([[1.0, 0.0], [3.0, 0.0]]), np.array([[0.0, 1.0]]), unit=True)
    array([ 0.89442719, -0.4472136 ])
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from depthlens.infra.errors import UsageError


@dataclass(frozen=True)
class Interval:
    """An estimate with its bootstrap percentile interval; arrays when computed per column.

    Unpacks as ``estimate, lo, hi``. ``lo``/``hi`` are NaN when there were no resamples.
    """

    estimate: float | np.ndarray
    lo: float | np.ndarray
    hi: float | np.ndarray

    def __iter__(self):
        return iter((self.estimate, self.lo, self.hi))


class RateInterval(NamedTuple):
    """A confidence interval ``[lo, hi]`` of a rate, without an estimate (unpacks like a tuple);
    ``Interval`` is the bootstrap one that carries its estimate."""

    lo: float
    hi: float


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _n_boot(n_boot) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise UsageError(f"n_boot must be an integer >= 0, got {n_boot!r}.")
    return int(n_boot)


def resample_indices(n: int, n_boot: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``[n_boot, n]`` indices of ``n_boot`` i.i.d. resamples of ``n`` items, with replacement.

    Pass one ``np.random.Generator`` to draw several index sets from one stream.

        >>> resample_indices(3, 2, seed=0).shape
        (2, 3)
    """
    return _rng(seed).integers(0, n, size=(_n_boot(n_boot), n))


def cluster_weights(groups, n_boot: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``[n_boot, n]`` multiplicities of each item when whole groups are resampled with replacement.

    Item i appears as often as its group was drawn, so the items of one group (e.g. the trials
    of one prompt) always move together.

        >>> cluster_weights(["a", "a", "b"], 1, seed=0).tolist()
        [[1.0, 1.0, 1.0]]
    """
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    codes = codes.reshape(-1)
    n_groups = int(codes.max()) + 1 if codes.size else 0
    counts = _rng(seed).multinomial(n_groups, np.full(n_groups, 1.0 / max(n_groups, 1)), size=_n_boot(n_boot))
    return counts[:, codes].astype(np.float64)


def percentile_interval(boots, level: float = 0.95) -> tuple[Any, Any]:
    """The ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of bootstrap replicates over axis 0, NaNs ignored."""
    if not 0.0 < level < 1.0:
        raise UsageError(f"level must lie strictly between 0 and 1, got {level!r}.")
    boots = np.asarray(boots, dtype=np.float64)
    if boots.shape[0] == 0:
        nan = np.full(boots.shape[1:], np.nan)
        return (float("nan"),) * 2 if nan.ndim == 0 else (nan, nan.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with no finite replicate gives NaN
        tail = round((1 - level) / 2, 12)  # 0.025 for 95 %, not 0.025000000000000022
        lo, hi = np.nanquantile(boots, [tail, 1 - tail], axis=0)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def bootstrap_mean(values, n_boot: int = 1000, seed: int | np.random.Generator = 0, *, baseline=None,
                   groups=None, indices: np.ndarray | None = None, level: float = 0.95,
                   skip_nan: bool = False) -> Interval:
    """Mean of ``values`` (over axis 0) with a seeded percentile bootstrap interval.

    Args:
        values: ``[n]`` or ``[n, k]`` (then every column separately).
        n_boot, seed: number of resamples and their seed (or a ``np.random.Generator``).
        baseline: paired variant: the statistic is the mean of ``values − baseline``.
        groups: cluster variant: ``[n]`` group labels; whole groups are resampled.
        indices: ``[B, n]`` resamples drawn beforehand (``resample_indices``), to share them
            between statistics; ``n_boot`` and ``seed`` are then unused.
        level: coverage of the interval.
        skip_nan: NaN marks a missing value (e.g. a response shorter than that position) and
            is left out. By default a NaN makes the estimate and interval NaN: a broken number
            is never averaged away.

        >>> bootstrap_mean([1.0, 1.0, 0.0, 0.0], baseline=[0.0, 0.0, 0.0, 0.0], n_boot=200).estimate
        0.5
    """
    v = np.asarray(values, dtype=np.float64)
    if baseline is not None:
        b = np.asarray(baseline, dtype=np.float64)
        if b.shape != v.shape:
            raise UsageError(f"baseline has shape {b.shape} but values have shape {v.shape}; a paired bootstrap needs them equal.")
        v = v - b
    if v.ndim not in (1, 2) or v.shape[0] == 0:
        raise UsageError(f"bootstrap_mean needs values of shape [n] or [n, k] with n >= 1, got {v.shape}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column without values has NaN for its mean
        mean = np.nanmean if skip_nan else np.mean
        estimate = mean(v, axis=0)
        if groups is not None:
            if len(groups) != v.shape[0]:
                raise UsageError(f"groups has {len(groups)} labels but there are {v.shape[0]} values; give one per value.")
            w = cluster_weights(groups, n_boot, seed)
            present = ~np.isnan(v) if skip_nan else np.ones(v.shape, bool)
            boots = np.tensordot(w, np.where(present, v, 0.0) if skip_nan else v, axes=1) / np.tensordot(w, present, axes=1)
        else:
            idx = resample_indices(v.shape[0], n_boot, seed) if indices is None else np.asarray(indices)
            if idx.ndim != 2 or (idx.size and idx.max() >= v.shape[0]):
                raise UsageError(f"indices must be [n_boot, n] resamples of the {v.shape[0]} values, got shape {idx.shape}.")
            boots = mean(v[idx], axis=1)
        if not skip_nan and np.isnan(boots).any():  # a NaN value: no interval either, not one from the rest
            boots = np.where(np.isnan(boots).any(axis=0), np.nan, boots)
    lo, hi = percentile_interval(boots, level)
    return Interval(float(estimate) if np.ndim(estimate) == 0 else estimate, lo, hi)


def auroc(pos, neg, *, pos_weights=None, neg_weights=None) -> float | np.ndarray:
    """Area under the ROC curve of scores ``pos`` (positives) against ``neg`` (negatives).

    P(a random positive scores above a random negative), ties counted ½ (Mann–Whitney U over
    ``n_pos · n_neg``), computed by one sort, O(n log n). With ``pos_weights``/``neg_weights``
    of shape ``[B, n_pos]``/``[B, n_neg]`` (bootstrap multiplicities, e.g. ``cluster_weights``
    split by label) it returns the ``[B]`` AUROCs of the weighted samples, NaN where a row
    has no weight on one side.

        >>> auroc([1.0], [1.0]), auroc([0.0], [1.0])
        (0.5, 0.0)
    """
    pos, neg = np.asarray(pos, dtype=np.float64).reshape(-1), np.asarray(neg, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise UsageError(f"AUROC needs at least one positive and one negative score, got {pos.size} and {neg.size}.")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise UsageError("AUROC scores contain NaN or inf; pass finite scores.")
    weighted = pos_weights is not None or neg_weights is not None
    pw = np.ones((1, pos.size)) if pos_weights is None else np.asarray(pos_weights, dtype=np.float64)
    nw = np.ones((1, neg.size)) if neg_weights is None else np.asarray(neg_weights, dtype=np.float64)
    pw, nw = np.atleast_2d(pw), np.atleast_2d(nw)
    if pw.shape[1] != pos.size or nw.shape[1] != neg.size or pw.shape[0] != nw.shape[0]:
        raise UsageError(f"AUROC weights must be [B, n_pos] and [B, n_neg] = [B, {pos.size}] and [B, {neg.size}], "
                         f"got {pw.shape} and {nw.shape}.")
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # one block per distinct score
    w = np.concatenate([pw, nw], axis=1)[:, order]
    wp = np.add.reduceat(w * is_pos[order], starts, axis=1)  # [B, n_distinct]
    wn = np.add.reduceat(w * ~is_pos[order], starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each block
    num = (wp * (below + 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / den, np.nan)
    return out if weighted else float(out[0])


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> RateInterval:
    """Wilson score interval for a binomial rate (95% by default); well-behaved at 0 and n.

    For a rate where each prompt gives one outcome. Attack success rates are proportions of
    few trials, often 0 or 1, where the normal interval collapses to a point; Wilson's stays
    honest there. Trials that share prompts need ``bootstrap_mean(..., groups=prompts)`` instead.

        >>> tuple(round(x, 3) for x in wilson_interval(0, 10))
        (0.0, 0.278)
    """
    if n < 1:
        raise UsageError(f"wilson_interval needs n >= 1 trials, got n={n}.")
    if not 0 <= successes <= n:
        raise UsageError(f"successes must lie in 0..n={n}, got {successes}.")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return RateInterval(lo, hi)


def rogan_gladen(p_obs, sensitivity, specificity):
    """``(p_obs + sp − 1) / (se + sp − 1)`` clipped to [0, 1]; NaN where ``se + sp ≤ 1`` (an uninformative judge).

    The true rate behind a rate ``p_obs`` observed through a judge of sensitivity ``se`` and
    specificity ``sp``. Scalars give a float; arrays (e.g. bootstrap replicates) an array.

        >>> rogan_gladen([0.1, 0.5], 0.9, 0.9).round(6).tolist(), rogan_gladen(0.3, 0.5, 0.5)
        ([0.0, 0.5], nan)
    """
    p, se, sp = (np.asarray(x, float) for x in (p_obs, sensitivity, specificity))
    den = se + sp - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, np.clip((p + sp - 1) / np.where(den > 0, den, 1), 0.0, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def diff_in_means(a, b, *, axis: int = 0, unit: bool = False):
    """``mean(a) − mean(b)`` over ``axis`` in float64; a torch tensor for torch input, else a NumPy array.

    The raw difference is what activation addition adds; ``unit=True`` divides each vector
    (the last axis) by its norm, for probing and ablation, and refuses a zero difference.

        >>> diff_in_means(torch.ones(3, 2), torch.zeros(5, 2))
        tensor([1., 1.], dtype=torch.float64)
    """
    as_torch = isinstance(a, torch.Tensor)
    ta, tb = (torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x) for x in (a, b))
    if ta.ndim < 1 or ta.ndim != tb.ndim or not -ta.ndim <= axis < ta.ndim:
        raise UsageError(f"diff_in_means needs two arrays with the same number of axes and axis {axis} among them, "
                         f"got shapes {tuple(ta.shape)} and {tuple(tb.shape)}.")
    rest = lambda t: t.shape[:axis % t.ndim] + t.shape[axis % t.ndim + 1:]  # noqa: E731
    if rest(ta) != rest(tb):
        raise UsageError(f"diff_in_means needs shapes that agree apart from axis {axis}, got {tuple(ta.shape)} and {tuple(tb.shape)}.")
    if ta.shape[axis] == 0 or tb.shape[axis] == 0:
        raise UsageError(f"diff_in_means needs at least one row on each side along axis {axis}, "
                         f"got {ta.shape[axis]} and {tb.shape[axis]}.")
    diff = ta.to(torch.float64).mean(axis) - tb.to(torch.float64).mean(axis)
    if not torch.isfinite(diff).all():
        raise UsageError("diff_in_means got NaN or inf in its inputs; drop or impute those rows.")
    if unit:
        norms = diff.norm(dim=-1, keepdim=True)
        if (norms == 0).any():
            where = torch.nonzero(norms[..., 0] == 0).tolist() if diff.ndim > 1 else []
            raise UsageError(f"the means coincide{f' at {where}' if where else ''}; no direction is defined there.")
        diff = diff / norms
    return diff if as_torch else diff.numpy()


# ----------------------------------------------------------------------------- rates over prompts

#: the names a record gives the interval of a rate (``RateEstimate.method``)
PROMPT_BOOTSTRAP = "prompt_bootstrap"
PAIRED_PROMPT_BOOTSTRAP = "paired_prompt_bootstrap"
WILSON = "wilson"
WILSON_PROMPTS = "wilson_over_prompts"
SINGLE_PROMPT = "single_prompt"


@dataclass(frozen=True)
class RateEstimate:
    """A rate over trials with its interval and the name of the method that made the interval.

    Attributes:
        rate: successes / trials (for a difference: ``rate(b) − rate(a)``).
        lo, hi: the interval (95 % by default).
        n: trials; n_prompts: distinct prompts among them.
        method: ``"wilson"`` (each prompt gave one outcome), ``"prompt_bootstrap"`` (whole
            prompts resampled with all their trials), ``"wilson_over_prompts"`` (a clustered
            rate without a success or without a failure), ``"single_prompt"`` (several trials
            of one prompt: [0, 1]) or ``"paired_prompt_bootstrap"`` (a difference).
    """

    rate: float
    lo: float
    hi: float
    n: int
    n_prompts: int
    method: str

    def __iter__(self):
        return iter((self.rate, self.lo, self.hi))


def _prompt_codes(groups, n: int, what: str) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups).reshape(-1)
    if g.size != n:
        raise UsageError(f"{what} has {g.size} prompt labels but {n} outcomes; give one label per trial.")
    if g.dtype == object:  # mixed labels (e.g. None beside strings) compare as their text
        g = g.astype(str)
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def _outcomes(outcomes, what: str) -> np.ndarray:
    x = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise UsageError(f"{what} needs at least one trial.")
    if not np.all((x == 0) | (x == 1)):
        raise UsageError(f"{what} needs 0/1 (or boolean) outcomes, one per trial.")
    return x


def rate_interval(outcomes, groups=None, *, n_boot: int = 2000, seed: int | np.random.Generator = 0,
                  level: float = 0.95) -> RateEstimate:
    """A rate over 0/1 trials and its interval, chosen by how the trials share prompts.

    Where every prompt (``groups``: one prompt id per trial; None: every trial its own prompt)
    gave one outcome the trials are independent and the interval is Wilson's. Where some
    prompt gave several, trials of one prompt are correlated and the interval is a prompt-level
    (cluster) percentile bootstrap: whole prompts are resampled with all their trials and the
    rate is recomputed as successes / trials of the resample. With no success (or no failure)
    at all every resample repeats the estimate, so the bootstrap interval would be a point;
    the interval is then Wilson's over the prompts (0 of ``n_prompts`` prompts, as if all
    trials of a prompt were one outcome), method ``"wilson_over_prompts"``. Several trials of a
    single prompt get [0, 1] (``"single_prompt"``): one prompt says nothing about the others.

        >>> r = rate_interval([1, 1, 0, 0, 0, 0], groups=["a", "a", "b", "b", "c", "c"], n_boot=500)
        >>> r.method, round(r.rate, 3)
        ('prompt_bootstrap', 0.333)
    """
    x = _outcomes(outcomes, "rate_interval")
    codes = _prompt_codes(groups, x.size, "rate_interval")
    n_prompts = int(codes.max()) + 1
    if n_prompts == x.size:  # one outcome per prompt
        lo, hi = wilson_interval(int(x.sum()), int(x.size), z=_z(level))
        return RateEstimate(float(x.mean()), lo, hi, int(x.size), n_prompts, WILSON)
    if n_prompts == 1:  # one prompt says nothing about other prompts
        return RateEstimate(float(x.mean()), 0.0, 1.0, int(x.size), 1, SINGLE_PROMPT)
    if x.min() == x.max():  # no success or no failure: every resample repeats it, so bound it by the prompts
        lo, hi = wilson_interval(int(x[0]) * n_prompts, n_prompts, z=_z(level))
        return RateEstimate(float(x.mean()), lo, hi, int(x.size), n_prompts, WILSON_PROMPTS)
    counts = _prompt_draws(n_prompts, n_boot, seed)  # [B, prompts]: how often each prompt was drawn
    succ, trials = np.bincount(codes, weights=x, minlength=n_prompts), np.bincount(codes, minlength=n_prompts)
    lo, hi = percentile_interval(counts @ succ / (counts @ trials), level)
    return RateEstimate(float(x.mean()), lo, hi, int(x.size), n_prompts, PROMPT_BOOTSTRAP)


def _prompt_draws(n_prompts: int, n_boot: int, seed) -> np.ndarray:
    """``[n_boot, n_prompts]`` multiplicities of resamples of whole prompts (multinomial, as ``cluster_weights``)."""
    b = _n_boot(n_boot)
    draws = _rng(seed).integers(0, n_prompts, size=(b, n_prompts)) + n_prompts * np.arange(b)[:, None]
    return np.bincount(draws.reshape(-1), minlength=b * n_prompts).reshape(b, n_prompts).astype(np.float64)


def paired_rate_difference(a, b, groups_a=None, groups_b=None, *, n_boot: int = 2000,
                           seed: int | np.random.Generator = 0, level: float = 0.95) -> RateEstimate:
    """``rate(b) − rate(a)`` of two sets of 0/1 trials on the same prompts, with a paired prompt bootstrap.

    Each replicate draws the prompts once (with replacement) and recomputes both rates on the
    same draw, so what the prompts share (an easy prompt is easy for both) cancels. ``groups_*``
    are prompt ids per trial (None: trial i of ``a`` and of ``b`` is prompt i, which needs equal
    lengths). A prompt present in one set only still counts for that set's rate.

        >>> d = paired_rate_difference([0, 0, 1, 0], [1, 0, 1, 1], n_boot=500)
        >>> d.method, d.rate
        ('paired_prompt_bootstrap', 0.5)
    """
    xa, xb = _outcomes(a, "paired_rate_difference"), _outcomes(b, "paired_rate_difference")
    if groups_a is None and groups_b is None:
        if xa.size != xb.size:
            raise UsageError(f"paired_rate_difference without prompt ids needs equal lengths, got {xa.size} and "
                             f"{xb.size}; pass groups_a and groups_b.")
        ga = gb = np.arange(xa.size).astype(str)
    elif groups_a is None or groups_b is None:
        raise UsageError("paired_rate_difference needs prompt ids for both sets or for neither.")
    else:
        ga, gb = (np.asarray(g, dtype=object).reshape(-1).astype(str) for g in (groups_a, groups_b))
    if ga.size != xa.size or gb.size != xb.size:
        raise UsageError(f"paired_rate_difference needs one prompt id per trial: {ga.size} ids for {xa.size} trials "
                         f"and {gb.size} ids for {xb.size}.")
    if not set(ga.tolist()) & set(gb.tolist()):
        raise UsageError("paired_rate_difference found no prompt in both sets; an unpaired comparison needs "
                         "rate_interval on each.")
    codes = np.unique(np.concatenate([ga, gb]), return_inverse=True)[1].reshape(-1)
    ca, cb, k = codes[:xa.size], codes[xa.size:], int(codes.max()) + 1
    counts = _prompt_draws(k, n_boot, seed)              # one draw of prompts for both sets
    rate = lambda c, x: (counts @ np.bincount(c, weights=x, minlength=k)) / (counts @ np.bincount(c, minlength=k))  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = rate(cb, xb) - rate(ca, xa)              # NaN: a draw without one set's prompts
    lo, hi = percentile_interval(boots, level)
    return RateEstimate(float(xb.mean() - xa.mean()), lo, hi, int(xa.size + xb.size), k, PAIRED_PROMPT_BOOTSTRAP)


def _z(level: float) -> float:
    from scipy.stats import norm

    if not 0.0 < level < 1.0:
        raise UsageError(f"level must lie strictly between 0 and 1, got {level!r}.")
    return float(norm.ppf(0.5 + level / 2))


def top_k_probability(boots, k: int) -> np.ndarray:
    """``[n_items]`` share of bootstrap replicates ``boots [B, n_items]`` in which each item ranks in the top ``k``.

    The stability of a ranking: an item with P = 1 is in the top k on every resample of the
    data, one with P ≈ k / n is there by chance. Ties are broken by item order (stable sort);
    a replicate with a NaN score is left out.

        >>> top_k_probability([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]], 1).tolist()
        [0.5, 0.5, 0.0]
    """
    b = np.asarray(boots, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] == 0:
        raise UsageError(f"top_k_probability needs replicates of shape [B, n_items], got {b.shape}.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k:
        raise UsageError(f"k must be an integer >= 1, got {k!r}.")
    b = b[~np.isnan(b).any(axis=1)]
    if b.shape[0] == 0:
        return np.full(b.shape[1], np.nan)
    ranks = np.argsort(np.argsort(-b, axis=1, kind="stable"), axis=1, kind="stable")
    return (ranks < k).mean(axis=0)
