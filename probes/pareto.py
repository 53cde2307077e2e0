"""Refusal removal as a two-objective search over parametrised ablations, and the ``wo-opt`` recipe.

Arditi et al.'s one direction at full strength (``probes.orthogonalize``) removes refusal at
a first-token KL the filters cannot push down. Treated as an optimisation (the public
abliteration tool heretic does this), the ablation of ``probes.ablation`` has 9–10 parameters
(direction index; per write a kernel peak weight, peak layer, floor weight as a fraction of the
peak, and half-width; optionally norm preservation), searched with Optuna's multi-objective
TPE (docs/methods.md §4.7) for two objectives measured on the *validation* splits:

1. the refusal rate on harmful validation prompts (DoNotAnswer), greedy answers of
   ``gen_tokens`` tokens judged by the project's substring judge (``depthlens.judges.seam.is_refusal``);
2. the mean first-token ``KL(P_model ‖ P_ablated)`` on harmless validation prompts.

Each trial folds the ablation into the weights (exact, ``probes.ablation.ablated``), so the
plain fast paths generate, and puts the weights back. The result is a Pareto front
(``pareto_front``); ``choose`` takes the point with the lowest validation KL among those whose
validation refusal rate is at most ``max_refusal``.

Resumable and reproducible. The study lives in an Optuna journal file in the search
directory (beside the cached layer directions): an interrupted search continues where it
stopped, a trial cut off mid-way is marked failed and drawn again. The sampler is re-seeded
from (seed, number of completed trials) before every trial, so the k-th completed trial
depends only on the seed and the k − 1 before it: a resumed search draws exactly what an
uninterrupted one would, and raising ``n_trials`` extends a finished study instead of
restarting it (``n_trials`` is not part of the directory's key).

The ``wo-opt`` recipe (``load_model("smollm2-135m-instruct:sft:wo-opt")``) runs the search and
folds the chosen point into a standard HF checkpoint, like ``:wo``.

    >>> res = run_pareto(model, ParetoConfig(n_trials=40))  # doctest: +SKIP
    >>> [(t.number, t.refusal, t.kl) for t in res.front]  # doctest: +SKIP
    >>> load_model("smollm2-135m-instruct:sft:wo-opt")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from depthlens.runtime.generation import as_chats, generate
from depthlens.judges import is_refusal
from depthlens.infra.paths import cache_dir
from probes.ablation import AblationParams, Kernel, ablated, fold_ablation, interpolate_direction, weighted_ablation_hooks

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

STUDY = "refusal-pareto"
JOURNAL = "study.journal"
DIRECTIONS = "directions.safetensors"
PROJECTIONS = ("plain", "norm", "search")

__all__ = ["ParetoConfig", "Trial", "ParetoResult", "Objectives", "first_token_kl", "run_pareto", "search",
           "pareto_front", "choose", "WOOptRecipe", "recipe"]


@dataclass(frozen=True)
class ParetoConfig:
    """Settings of the ablation search (and of the ``wo-opt`` recipe).

    Args:
        n_trials: completed trials the search runs to. 40: heretic found its front with 30; the
            cost of a trial is in docs/findings.md "Costs measured on the way".
        n_startup: trials drawn at random before TPE models the history.
        n_train: harmful and harmless train prompts each for the difference in means.
        n_val_harmful: harmful validation prompts (DoNotAnswer) whose refusal rate is objective 1.
        n_val_harmless: harmless validation prompts whose mean first-token KL is objective 2.
        gen_tokens: greedy tokens generated per harmful prompt for the refusal judge.
        direction_range: range of the direction index, fractions of the last layer index.
        peak_range: range of each kernel's peak layer, fractions of the last layer index.
        max_weight_range: range of each kernel's peak weight.
        width_range: range of each kernel's half-width, fractions of the last layer index
            (never below one layer).
        projection: ``plain``, ``norm`` (norm-preserving) or ``search`` (a parameter of the search).
        max_refusal: a point is eligible for ``wo-opt`` when its validation refusal rate is at most this.
        batch_size: prompts per generation / forward batch.
        seed: data subsets and sampler seed.
    """

    n_trials: int = 40
    n_startup: int = 15
    n_train: int = 128
    n_val_harmful: int = 64
    n_val_harmless: int = 64
    gen_tokens: int = 24
    direction_range: tuple[float, float] = (0.4, 0.9)
    peak_range: tuple[float, float] = (0.6, 1.0)
    max_weight_range: tuple[float, float] = (0.8, 1.5)
    width_range: tuple[float, float] = (0.0, 0.6)
    projection: str = "search"
    max_refusal: float = 0.02
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}.")
        if self.n_trials < 1 or self.n_startup < 0:
            raise ValueError(f"n_trials must be >= 1 and n_startup >= 0, got {self.n_trials} and {self.n_startup}.")
        for name in ("direction_range", "peak_range", "max_weight_range", "width_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}.")

    def key_fields(self) -> dict:
        """Everything that changes a trial's draws or values (all but ``n_trials``)."""
        d = asdict(self)
        d.pop("n_trials")
        return d


# ----------------------------------------------------------------------------- objectives


def first_token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(P ‖ Q)`` per row of log-probs (float64)."""
    logp, logq = logp.double(), logq.double()
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)


class Objectives:
    """The two objectives of a model on fixed prompts, against the reference log-probs taken at construction.

        >>> obj = Objectives(model, harmful_val, harmless_val)   # reference = model as it is now  # doctest: +SKIP
        >>> with ablated(model, r, params): obj(model)            # {"refusal": …, "kl": …, …}  # doctest: +SKIP
    """

    def __init__(self, model, harmful: Sequence[str], harmless: Sequence[str], *, gen_tokens: int = 24,
                 batch_size: int = 64):
        from depthlens.runtime.forward import last_logprobs

        if not harmful or not harmless:
            raise ValueError(f"Objectives need harmful and harmless prompts, got {len(harmful)} and {len(harmless)}.")
        self.harmful, self.harmless = as_chats(model, harmful), as_chats(model, harmless)
        self.gen_tokens, self.batch_size = gen_tokens, batch_size
        self.reference = last_logprobs(model, self.harmless, batch_size=batch_size)

    def __call__(self, model) -> dict:
        from depthlens.runtime.forward import last_logprobs

        gen = generate(model, self.harmful, max_new_tokens=self.gen_tokens, batch_size=self.batch_size, progress=False)
        refused = [is_refusal(t) for t in gen.texts]
        kl = first_token_kl(self.reference, last_logprobs(model, self.harmless, batch_size=self.batch_size))
        return {"refusal": sum(refused) / len(refused), "kl": float(kl.mean()), "n_refused": sum(refused),
                "n_harmful": len(refused), "kl_max": float(kl.max())}


# ----------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class Trial:
    """One completed trial: the ablation and its two objectives (validation splits).

    Attributes:
        number: index among the completed trials (0 = first), the order the sampler saw them in.
        params: the ablation.
        refusal, kl: objective 1 (refusal rate) and objective 2 (mean first-token KL).
        extra: ``n_refused``, ``n_harmful``, ``kl_max``, ``seconds`` (wall clock) and ``cpu_seconds``
            (process CPU time: on a machine shared with other jobs, ``cpu_seconds / n_cores`` is the
            better estimate of the wall clock an idle machine would take).
    """

    number: int
    params: AblationParams
    refusal: float
    kl: float
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """A flat results row."""
        p = self.params
        row = {"trial": self.number, "val_refusal": self.refusal, "val_kl": self.kl, **self.extra,
               "direction_index": p.direction_index, "norm_preserving": p.norm_preserving}
        for comp, k in (("attn", p.attn), ("mlp", p.mlp)):
            row.update({f"{comp}_max_weight": k.max_weight, f"{comp}_peak": k.position,
                        f"{comp}_min_weight": k.min_weight, f"{comp}_width": k.width})
        return row


def _space(cfg: ParetoConfig, n_layers: int, first_layer: int) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    last = max(n_layers - 1, 1)

    def frac(lo_hi, floor: float = 0.0, cap: float = float(n_layers - 1)):
        lo, hi = (max(floor, min(cap, f * last)) for f in lo_hi)
        return FloatDistribution(lo, max(lo, hi))

    space = {"direction_index": frac(cfg.direction_range, floor=float(first_layer))}
    for comp in ("attn", "mlp"):
        space[f"{comp}_max_weight"] = FloatDistribution(*cfg.max_weight_range)
        space[f"{comp}_peak"] = frac(cfg.peak_range)
        space[f"{comp}_min_frac"] = FloatDistribution(0.0, 1.0)
        space[f"{comp}_width"] = frac(cfg.width_range, floor=1.0, cap=float(max(n_layers - 1, 1)))
    if cfg.projection == "search":
        space["norm_preserving"] = CategoricalDistribution((False, True))
    return space


def _params(values: dict, cfg: ParetoConfig) -> AblationParams:
    kernels = {c: Kernel(max_weight=values[f"{c}_max_weight"], position=values[f"{c}_peak"],
                         min_weight=values[f"{c}_min_frac"] * values[f"{c}_max_weight"], width=values[f"{c}_width"])
               for c in ("attn", "mlp")}
    norm = values["norm_preserving"] if cfg.projection == "search" else cfg.projection == "norm"
    return AblationParams(direction_index=values["direction_index"], norm_preserving=bool(norm), **kernels)


def _trial_seed(seed: int, n_complete: int) -> int:
    return int(np.random.SeedSequence([seed, n_complete]).generate_state(1)[0])


def _open_study(path: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.create_study(study_name=STUDY, storage=storage, directions=["minimize", "minimize"],
                               load_if_exists=True)


def _completed(study) -> list:
    from optuna.trial import TrialState

    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def search(model: HookedModel, directions: torch.Tensor, objectives: Objectives, cfg: ParetoConfig, storage: Path,
           progress: bool = False) -> list[Trial]:
    """Run (or resume) the study in ``storage`` until ``cfg.n_trials`` trials are complete; the first n_trials.

    ``directions`` are the layers' raw difference-in-means vectors ``[n_layers, d_model]``.
    """
    from optuna.samplers import TPESampler
    from optuna.trial import TrialState

    study = _open_study(Path(storage))
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("Trial %d of %s was interrupted; marked failed, its draw is repeated.", t.number, storage)
        study.tell(t.number, state=TrialState.FAIL)
    nonzero = [l for l in range(directions.shape[0]) if float(directions[l].norm()) > 0]
    if not nonzero:
        raise ValueError("Every layer's difference-in-means direction is zero; there is nothing to ablate.")
    space = _space(cfg, model.n_layers, nonzero[0])
    while (n := len(_completed(study))) < cfg.n_trials:
        study.sampler = TPESampler(seed=_trial_seed(cfg.seed, n), n_startup_trials=cfg.n_startup, multivariate=True)
        trial = study.ask(space)
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            params = _params(trial.params, cfg)
            with ablated(model, interpolate_direction(directions, params.direction_index), params):
                m = objectives(model)
            for key in ("n_refused", "n_harmful", "kl_max"):
                trial.set_user_attr(key, m[key])
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
            trial.set_user_attr("cpu_seconds", round(time.process_time() - c0, 2))
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, [m["refusal"], m["kl"]])
        if progress:
            log.info("trial %d/%d: refusal %.3f, KL %.4f (%.1f s)", n + 1, cfg.n_trials, m["refusal"], m["kl"],
                     time.perf_counter() - t0)
    done = _completed(study)[:cfg.n_trials]
    return [Trial(number=i, params=_params(t.params, cfg), refusal=t.values[0], kl=t.values[1],
                  extra=dict(t.user_attrs)) for i, t in enumerate(done)]


def pareto_front(trials: Sequence[Trial]) -> list[Trial]:
    """The trials no other trial dominates (≤ in both objectives, < in one), by increasing KL."""
    def dominates(a: Trial, b: Trial) -> bool:
        return a.refusal <= b.refusal and a.kl <= b.kl and (a.refusal < b.refusal or a.kl < b.kl)

    front = [t for t in trials if not any(dominates(o, t) for o in trials)]
    return sorted(front, key=lambda t: (t.kl, t.refusal, t.number))


def choose(front: Sequence[Trial], max_refusal: float) -> tuple[Trial, bool]:
    """The lowest-KL point with refusal ≤ ``max_refusal``; (point, True). None qualifies: the lowest refusal, False."""
    if not front:
        raise ValueError("choose needs a non-empty front.")
    ok = [t for t in front if t.refusal <= max_refusal]
    if ok:
        return min(ok, key=lambda t: (t.kl, t.number)), True
    best = min(front, key=lambda t: (t.refusal, t.kl, t.number))
    log.warning("No front point has validation refusal <= %.3f; taking the lowest refusal (%.3f, KL %.4f).",
                max_refusal, best.refusal, best.kl)
    return best, False


# ----------------------------------------------------------------------------- one call: data, directions, search


@dataclass(frozen=True)
class ParetoResult:
    """A finished search.

    Attributes:
        trials: the first ``n_trials`` completed trials, in order.
        front: their Pareto front, by increasing KL.
        directions: the layers' raw difference-in-means vectors (float32, ``[n_layers, d_model]``).
        search_dir: where the journal and the directions are stored.
        baseline: the objectives of the unablated model (refusal, KL = 0).
        seconds: wall-clock seconds of this call.
    """

    trials: list[Trial]
    front: list[Trial]
    directions: torch.Tensor
    search_dir: Path
    baseline: dict
    seconds: float

    def direction(self, params: AblationParams) -> torch.Tensor:
        return interpolate_direction(self.directions, params.direction_index)


def search_dir(model: HookedModel, cfg: ParetoConfig) -> Path:
    """The directory of this model's study for these settings, keyed by its weights and ``cfg.key_fields()``."""
    from depthlens.models.recipes import base_key

    blob = json.dumps({"model": base_key(model), "search": cfg.key_fields(), "v": 1}, sort_keys=True, default=str)
    return cache_dir("work", f"pareto-{model.tag}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}")


def validation_prompts(cfg: ParetoConfig) -> tuple[list[str], list[str]]:
    """The harmful and harmless validation prompts of the objectives."""
    from depthlens.data import default_splits

    s = default_splits(cfg.seed)
    return (list(s.harmful.val.subset(cfg.n_val_harmful, seed=cfg.seed).prompts),
            list(s.harmless.val.subset(cfg.n_val_harmless, seed=cfg.seed).prompts))


def layer_directions(model, cfg: ParetoConfig, where: Path, progress: bool = False) -> torch.Tensor:
    """Last-position difference in means at every layer's input, train splits (cached in ``where``)."""
    from depthlens.data import default_splits
    from probes.directions import compute_candidates

    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = Path(where) / DIRECTIONS
    if path.exists():  # safetensors, never a pickle: the work folder may be shared
        try:
            return load_file(path)["directions"]
        except (SafetensorError, KeyError, OSError) as err:
            log.warning("Recomputing the directions: %s cannot be read (%s).", path, err)
    s = default_splits(cfg.seed)
    cands = compute_candidates(model, s.harmful.train.subset(cfg.n_train, seed=cfg.seed).prompts,
                               s.harmless.train.subset(cfg.n_train, seed=cfg.seed).prompts, n_pos=1,
                               batch_size=cfg.batch_size, progress=progress)
    dirs = cands.directions[0].to(torch.float32).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file({"directions": dirs}, tmp)
    tmp.replace(path)
    return dirs


def run_pareto(model, cfg: ParetoConfig = ParetoConfig(), *, where: Path | None = None,
               progress: bool = False) -> ParetoResult:
    """Directions (train), objectives (validation), the resumable search and its front."""
    t0 = time.perf_counter()
    where = Path(where) if where is not None else search_dir(model, cfg)
    where.mkdir(parents=True, exist_ok=True)
    dirs = layer_directions(model, cfg, where, progress)
    harmful, harmless = validation_prompts(cfg)
    obj = Objectives(model, harmful, harmless, gen_tokens=cfg.gen_tokens, batch_size=cfg.batch_size)
    baseline = obj(model)
    trials = search(model, dirs, obj, cfg, where / JOURNAL, progress=progress)
    return ParetoResult(trials=trials, front=pareto_front(trials), directions=dirs, search_dir=where,
                        baseline=baseline, seconds=round(time.perf_counter() - t0, 2))


# ----------------------------------------------------------------------------- the wo-opt recipe


class WOOptRecipe:
    """Entry point ``wo-opt``: the searched ablation with the lowest validation KL at refusal ≤ ``max_refusal``."""

    name = "wo-opt"
    version = 1

    def __init__(self, cfg: ParetoConfig | None = None):
        self.cfg = cfg or ParetoConfig()

    def config(self) -> dict:
        return asdict(self.cfg)

    def build(self, model, workdir: Path) -> dict:
        from depthlens.runtime.forward import last_logprobs

        res = run_pareto(model, self.cfg, progress=True)
        point, met = choose(res.front, self.cfg.max_refusal)
        r = res.direction(point.params)
        harmful, harmless = validation_prompts(self.cfg)
        check = as_chats(model, harmful[:4] + harmless[:4])
        hooked = last_logprobs(model, check, batch_size=self.cfg.batch_size,
                               fwd_hooks=weighted_ablation_hooks(model, r, point.params))
        folded = fold_ablation(model, r, point.params)
        diff = float((hooked - last_logprobs(model, check, batch_size=self.cfg.batch_size)).abs().max())
        log.info("wo-opt: trial %d, validation refusal %.3f, KL %.4f (target met: %s); |folded − hooked| = %.2e",
                 point.number, point.refusal, point.kl, met, diff)
        return {"chosen": point.record(), "params": point.params.to_dict(), "target_met": met,
                "unit_direction": [float(x) for x in r], "folded": asdict(folded),
                "folded_vs_hooked_max_abs_logprob_diff": diff, "baseline": res.baseline,
                "front": [t.record() for t in res.front], "trials": [t.record() for t in res.trials],
                "search_dir": str(res.search_dir), "search_seconds": res.seconds}


recipe = WOOptRecipe()
