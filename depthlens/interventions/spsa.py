"""MeZO / SPSA: zeroth-order optimisation from forward passes only, perturbing weights in place.

Malladi et al. (2023), docs/methods.md §5. Each step draws a seed s and, one parameter tensor at a
time, regenerates z ~ N(0, I) from a generator seeded by (s, tensor index), so nothing the
size of θ is ever allocated for z: θ += εz, L₊; θ −= 2εz, L₋; θ += εz (restore);
g = (L₊ − L₋)/2ε; then z is regenerated once more for θ ← θ − η(g·z + λθ). Memory stays at
inference memory. ``zo_layer_probes`` reuses the same probe per layer as the cheap
layer-sensitivity estimator ``c_l = |L(θ+εz_l) − L(θ−εz_l)| / 2ε``.

This is the engine only, with no model-specific objective: the ``zo`` recipe
(``finetune.zeroth_order``) and ``analyses.layer_sensitivity`` both run on it, so it lives in
the core, which imports neither.

**Bit-exact restore.** ``fl(fl(fl(θ+d) − 2d) + d)`` is not θ in floating point (about half
of all fp32 weights come back one ulp off), and no in-place update θ ↦ ≈θ+d can be undone
from its output alone: where |θ| ≪ |d|, or where θ + d crosses a power of two, distinct
weights round to the same float, so information is lost. Two measures make the restore exact
and keep it memory-light:

1. The realized increment is d = εz rounded to 8 significant bits (bfloat16 precision; a
   relative change of at most 2⁻⁹, irrelevant for the estimate). Then d is a multiple of
   the ulp of almost every weight, and the three additions are exact unless θ ± d leaves θ's
   binade upwards or |θ| < |d| — in fp32 about 3–8 % of the elements of N(0, 0.02²) weights
   instead of ≈ 50 %.
2. Before a tensor is perturbed, the three additions are simulated on a temporary copy of
   *that tensor alone*; the original values of the elements that would not come back
   exactly are stashed sparsely (int32 index + value: ≈ 0.2–0.7 bytes per fp32 weight, none
   for the de-quantized default, whose weights have few significant bits) and written back
   after the last addition. Where the sparse stash would be larger than the
   tensor (bf16/fp16 weights, whose grid is too coarse for ε = 1e-3 steps to round-trip), the
   tensor itself is kept instead, so the stash never exceeds one copy of the perturbed
   weights. The same additions run again for real, deterministically, so every element ends
   bit-identical (checked with ``torch.equal`` in the tests, fp32 and bf16, also when the
   loss raises half-way).

The gradient update itself (θ ← θ − η(g z + λθ)) is computed in float32 per tensor and cast
back; in bf16 an update smaller than half an ulp is lost, as in any bf16 training.

    >>> w = torch.tensor([3.0, -2.0, 1.0, 0.5])                 # a quadratic bowl: L(w) = |w|²
    >>> loss = lambda step: float((w ** 2).sum())
    >>> steps = mezo_train([w], loss, ZOConfig(steps=300, lr=0.05, log_every=0), progress=False)
    >>> steps[0].loss_plus > 10 > 1e-6 > loss(300)               # forward passes only, weights updated in place
    True
    >>> snapshot = w.clone()
    >>> with symmetric_perturbation([w], seed=1, eps=1e-3) as pert:   # enters at θ + εz
    ...     moved = not torch.equal(w, snapshot)
    ...     pert.minus()                                          # now at θ − εz
    >>> moved, torch.equal(w, snapshot)                           # restored bit for bit
    (True, True)

On a model, ``params`` are e.g. the 2-D matrices of the critical layers
(``model.layer_parameters(l)``), ``loss_fn(i)`` a loss on batch i, and ``zo_layer_probes``
ranks layers by ``c_l``.

**Data-parallel (``accelerate launch``).** MeZO needs no gradient communication: every rank
holds the same weights and evaluates ``loss_fn`` on its own shard of the step's batch,
returning its *part* of the global loss (its shard's sum divided by the global count), and
``reduce`` sums the two scalars (L₊, L₋) over the ranks, one all-reduce per estimate. Every
rank then computes the same g, regenerates the same z from the shared seed and applies the
identical update (tested under a 2-process launch).

The call under a launch (``accelerator`` from ``accelerate``; ``shard_loss`` a rank's part of
the loss)::

    mezo_train(params, shard_loss, cfg, reduce=lambda t: accelerator.reduce(t.to(accelerator.device)).cpu())
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from depthlens.infra.errors import UsageError

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1

#: Sums a float64 CPU tensor over the processes of a data-parallel run and returns the sum
#: (the same on every rank), e.g. ``lambda t: accelerator.reduce(t.to(accelerator.device)).cpu()``.
Reduce = Callable[[Tensor], Tensor]
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class ZOConfig:
    """Settings of MeZO (zeroth-order SGD with SPSA gradient estimates).

    Args:
        steps: number of MeZO steps; step i evaluates the loss on batch i (2·n_spsa forward passes).
        eps: perturbation scale ε of z ~ N(0, I), absolute, on every parameter (MeZO: 1e-3).
        lr: learning rate η (MeZO full-parameter runs: 1e-7 … 1e-6).
        weight_decay: λ in θ ← θ − η(g·z + λθ), applied to every parameter given.
        n_spsa: independent SPSA estimates averaged per step (MeZO-n); the update is their mean.
        seed: seed from which every step's perturbation seeds are derived.
        log_every: log one line every this many steps (0: never).
    """

    steps: int = 100
    eps: float = 1e-3
    lr: float = 1e-6
    weight_decay: float = 0.0
    n_spsa: int = 1
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise UsageError(f"steps must be a non-negative integer, got {self.steps!r}.")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise UsageError(f"eps must be a positive finite number, got {self.eps!r}.")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise UsageError(f"lr must be a non-negative finite number, got {self.lr!r}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"weight_decay must be a non-negative finite number, got {self.weight_decay!r}.")
        if not (isinstance(self.n_spsa, int) and self.n_spsa >= 1):
            raise UsageError(f"n_spsa must be an integer >= 1, got {self.n_spsa!r}.")


@dataclass(frozen=True)
class ZOStepResult:
    """One MeZO step.

    Attributes:
        loss_plus: L(θ + εz), averaged over the step's SPSA estimates.
        loss_minus: L(θ − εz), averaged likewise.
        projected_grad: g = (L₊ − L₋)/2ε, averaged likewise (the update uses each g_j with its own z_j).
        seeds: the perturbation seed of each SPSA estimate (z can be regenerated from them).
        projected_grads: g_j of each estimate.
        stashed: fraction of the perturbed elements whose originals had to be stashed for the
            bit-exact restore (memory cost of the restore relative to one copy: see module doc).
    """

    loss_plus: float
    loss_minus: float
    projected_grad: float
    seeds: tuple[int, ...] = ()
    projected_grads: tuple[float, ...] = ()
    stashed: float = 0.0

    @property
    def loss(self) -> float:
        """(L₊ + L₋)/2, an O(ε²) estimate of the loss at θ."""
        return 0.5 * (self.loss_plus + self.loss_minus)

    def __float__(self) -> float:
        return float(self.projected_grad)


# ----------------------------------------------------------------------------- seeds and directions


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across runs and platforms)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def _z(p: Tensor, seed: int, index: int) -> Tensor:
    """z ~ N(0, I) of ``p``'s shape in float32, from a generator seeded by (seed, index)."""
    gen = torch.Generator(device=p.device)
    gen.manual_seed(derive_seed(seed, index))
    return torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)


def _increment(p: Tensor, seed: int, index: int, scale: float) -> Tensor:
    """The realized increment scale·z, rounded to 8 significant bits, in ``p``'s dtype."""
    return (scale * _z(p, seed, index)).to(torch.bfloat16).to(p.dtype)


def _check_params(params: Sequence[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise UsageError("Zeroth-order optimisation needs at least one parameter tensor, got none.")
    seen: set[tuple[int, int]] = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise UsageError(f"Parameter {i} is not a floating-point tensor; pass weight tensors only.")
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        if key in seen:
            raise UsageError(f"Parameter {i} appears twice (tied weights?); pass each tensor once.")
        seen.add(key)
    return params


# ----------------------------------------------------------------------------- exact ±εz probe


class SymmetricPerturbation:
    """θ → θ + εz → θ − εz → θ in place, with a bit-exact restore (see the module docstring).

    ``plus()`` stashes, per tensor, what the plain additions would not bring back;
    ``minus()`` moves to θ − εz; ``restore()`` returns to θ from whichever state the tensors
    are in (also after a partial ``plus()``), so it is safe in a ``finally``.
    """

    def __init__(self, params: Sequence[Tensor], seed: int, eps: float):
        if not (math.isfinite(eps) and eps > 0):
            raise UsageError(f"eps must be a positive finite number, got {eps!r}.")
        self.params = list(params)
        self.seed, self.eps = seed, eps
        self._stage = [0] * len(self.params)  # 0 clean, 1 at θ+εz, 2 at θ−εz
        self._stash: list[tuple[str, Tensor, Tensor | None] | None] = [None] * len(self.params)
        self.n_stashed = 0
        self.n_elements = sum(p.numel() for p in self.params)

    @property
    def stashed(self) -> float:
        """Fraction of elements kept aside for the restore (a dense tensor counts all its elements)."""
        return self.n_stashed / max(1, self.n_elements)

    @torch.no_grad()
    def plus(self) -> None:
        """Move every tensor from θ to θ + εz, stashing first what the additions would not restore."""
        for i, p in enumerate(self.params):
            if self._stage[i] != 0:
                raise RuntimeError("plus() called twice without restore().")
            d = _increment(p, self.seed, i, self.eps)
            plan = self._stash[i] = _plan_restore(p, d)
            self.n_stashed += p.numel() if plan[0] == "dense" else plan[1].numel()
            p.add_(d)
            self._stage[i] = 1

    @torch.no_grad()
    def minus(self) -> None:
        """Move every tensor from θ + εz to θ − εz."""
        if any(s != 1 for s in self._stage):
            raise RuntimeError("minus() needs every tensor at θ + εz; call plus() first.")
        for i, p in enumerate(self.params):
            p.add_(_increment(p, self.seed, i, self.eps) * -2)
            self._stage[i] = 2

    @torch.no_grad()
    def restore(self) -> None:
        """Return every tensor to θ exactly, from whichever stage it is in."""
        for i, p in enumerate(self.params):
            stage, stash = self._stage[i], self._stash[i]
            if stage == 0 or stash is None:
                continue
            if stash[0] == "dense":
                p.copy_(stash[1])
            else:
                d = _increment(p, self.seed, i, self.eps)
                if stage == 1:  # the same additions as the simulated path: −2d, then +d
                    p.add_(d * -2)
                p.add_(d)
                idx, vals = stash[1], stash[2]
                if idx.numel():
                    p.view(-1)[idx.long()] = vals
            self._stage[i], self._stash[i] = 0, None


def _plan_restore(p: Tensor, d: Tensor) -> tuple[str, Tensor, Tensor | None]:
    """Simulate +d, −2d, +d on a copy of ``p``; stash the originals of the elements that drift."""
    if not p.is_contiguous() or p.numel() >= 2**31:
        return ("dense", p.detach().clone(), None)
    t = p.detach().clone()
    t.add_(d)
    t.add_(d * -2)
    t.add_(d)
    ints = _INT_VIEW[p.element_size()]
    drift = (t.view(ints) != p.detach().view(ints)).view(-1)
    del t
    n = int(drift.sum())
    if n * (4 + p.element_size()) >= p.numel() * p.element_size():
        return ("dense", p.detach().clone(), None)
    idx = drift.nonzero().squeeze(1)
    return ("sparse", idx.to(torch.int32), p.detach().view(-1)[idx].clone())


@contextmanager
def symmetric_perturbation(params: Sequence[Tensor], seed: int, eps: float) -> Iterator[SymmetricPerturbation]:
    """Enter at θ + εz; call ``.minus()`` inside for θ − εz; θ is restored bit for bit on exit."""
    sp = SymmetricPerturbation(_check_params(params), seed, eps)
    try:
        sp.plus()
        yield sp
    finally:
        sp.restore()


def _two_point(params: list[Tensor], loss_fn: Callable[[], float], eps: float, seed: int,
               reduce: Reduce | None = None) -> tuple[float, float, float]:
    with torch.no_grad(), symmetric_perturbation(params, seed, eps) as sp:
        plus = float(loss_fn())
        sp.minus()
        minus = float(loss_fn())
    if reduce is not None:  # this rank's parts → the global losses, the same on every rank
        plus, minus = (float(v) for v in reduce(torch.tensor([plus, minus], dtype=torch.float64)))
    if not (math.isfinite(plus) and math.isfinite(minus)):
        raise FloatingPointError(f"The loss is not finite (L+ = {plus}, L- = {minus}); the weights were restored.")
    return plus, minus, sp.stashed


def spsa_grad_scalar(params: Sequence[Tensor], loss_fn: Callable[[], float], eps: float, seed: int,
                     reduce: Reduce | None = None) -> ZOStepResult:
    """Projected gradient g = (L(θ+εz) − L(θ−εz)) / 2ε ≈ ∇L·z, with θ restored bit for bit.

    Returns the two losses and g as a ``ZOStepResult`` (no update); ``float(result)`` is g.
    With ``reduce`` (a data-parallel run) ``loss_fn`` gives this rank's part of the loss and
    the two parts are summed over the ranks (see the module docstring).
    """
    plus, minus, frac = _two_point(_check_params(params), loss_fn, eps, seed, reduce)
    g = (plus - minus) / (2 * eps)
    return ZOStepResult(loss_plus=plus, loss_minus=minus, projected_grad=g, seeds=(seed,), projected_grads=(g,),
                        stashed=frac)


# ----------------------------------------------------------------------------- MeZO


def mezo_step(params: Sequence[Tensor], loss_fn: Callable[[], float], cfg: ZOConfig, step_seed: int,
              reduce: Reduce | None = None) -> ZOStepResult:
    """One MeZO step: n_spsa two-point estimates at θ, then θ ← θ − η(mean_j g_j z_j + λθ)."""
    params = _check_params(params)
    seeds = [step_seed] if cfg.n_spsa == 1 else [derive_seed(step_seed, j) for j in range(cfg.n_spsa)]
    est = [spsa_grad_scalar(params, loss_fn, cfg.eps, s, reduce) for s in seeds]
    grads = [e.projected_grad for e in est]
    _update(params, seeds, grads, cfg.lr, cfg.weight_decay)
    n = len(est)
    return ZOStepResult(loss_plus=sum(e.loss_plus for e in est) / n, loss_minus=sum(e.loss_minus for e in est) / n,
                        projected_grad=sum(grads) / n, seeds=tuple(seeds), projected_grads=tuple(grads),
                        stashed=max(e.stashed for e in est))


@torch.no_grad()
def _update(params: list[Tensor], seeds: Sequence[int], grads: Sequence[float], lr: float, weight_decay: float) -> None:
    """θ ← (1 − ηλ)θ − (η/n) Σ_j g_j z_j, tensor by tensor, computed in float32."""
    if lr == 0:
        return
    n = len(seeds)
    for i, p in enumerate(params):
        new = p.float()  # p itself for fp32 weights; a one-tensor float32 copy otherwise
        if weight_decay:
            new.mul_(1 - lr * weight_decay)
        for s, g in zip(seeds, grads):
            if g:
                new.add_(_z(p, s, i), alpha=-lr * g / n)
        if new is not p:
            p.copy_(new)


def mezo_train(params: Sequence[Tensor], loss_fn: Callable[[int], float], cfg: ZOConfig, progress: bool = True,
               on_step: Callable[[int, ZOStepResult], None] | None = None, start: int = 0,
               reduce: Reduce | None = None) -> list[ZOStepResult]:
    """Run MeZO steps ``start … cfg.steps − 1`` on ``params`` in place; step i evaluates ``loss_fn(i)`` (its batch).

    ``loss_fn(i)`` must return the same value for the same weights within a step (same batch,
    no dropout): L₊ and L₋ are compared. ``on_step(i, result)`` is called after each step
    (evaluation, checkpoints). Seeded: the same config and losses give the same weights, and
    since step i's direction depends on (seed, i) only, resuming at ``start`` from the weights
    saved after step ``start − 1`` continues exactly as an uninterrupted run. ``reduce``: a
    data-parallel run (``loss_fn`` gives this rank's part; see the module docstring).
    """
    params = _check_params(params)
    if not (isinstance(start, int) and 0 <= start <= cfg.steps):
        raise UsageError(f"start must be an integer in 0..steps={cfg.steps}, got {start!r}.")
    n_el = sum(p.numel() for p in params)
    log.info("MeZO on %d tensors (%d weights): %s", len(params), n_el, cfg)
    results: list[ZOStepResult] = []
    bar = tqdm(range(start, cfg.steps), desc="MeZO", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        res = mezo_step(params, lambda: loss_fn(step), cfg, derive_seed(cfg.seed, step), reduce)
        results.append(res)
        bar.set_postfix(loss=f"{res.loss:.4f}", g=f"{res.projected_grad:.3g}")
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = results[-cfg.log_every:]
            log.info("MeZO step %d/%d: loss %.4f (mean of last %d), |g| %.3g, restore stash %.1f%%",
                     step + 1, cfg.steps, sum(r.loss for r in recent) / len(recent), len(recent),
                     sum(abs(r.projected_grad) for r in recent) / len(recent), 100 * res.stashed)
        if on_step is not None:
            on_step(step, res)
    return results


# ----------------------------------------------------------------------------- layer probes


def zo_layer_probes(model: HookedModel, layers: Sequence[int] | None, loss_fn: Callable[[int], float], eps: float = 1e-3,
                    seed: int = 0, n_samples: int = 1, reduce: Reduce | None = None) -> dict[int, float]:
    """Cheap layer sensitivity ``c_l = |L(θ+εz_l) − L(θ−εz_l)| / 2ε``, only layer l's matrices perturbed.

    ``loss_fn(l)`` is the loss with layer l perturbed; it gets l so that it can restart the
    forward pass from a cached ``blocks.{l}.hook_resid_pre`` (earlier layers are unchanged).
    ``n_samples`` independent directions are averaged per layer (E|g| = √(2/π)·‖∇_l L‖ for a
    smooth loss). Returns {layer: c_l}; θ is restored bit for bit after every probe. ``reduce``:
    a data-parallel run, as ``mezo_train`` (every rank gets the same c_l).
    """
    layers = list(range(model.n_layers)) if layers is None else [model.check_layer(l) for l in layers]
    if not (isinstance(n_samples, int) and n_samples >= 1):
        raise UsageError(f"n_samples must be an integer >= 1, got {n_samples!r}.")
    out: dict[int, float] = {}
    for layer in layers:
        params = [p for p in model.layer_parameters(layer).values() if p.ndim == 2]
        vals = [abs(spsa_grad_scalar(params, lambda: loss_fn(layer), eps, derive_seed(seed, layer, k),
                                     reduce).projected_grad)
                for k in range(n_samples)]
        out[layer] = sum(vals) / n_samples
        log.debug("ZO probe layer %d: c = %.4g", layer, out[layer])
    return out
