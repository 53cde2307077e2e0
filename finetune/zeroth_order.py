"""MeZO / SPSA: zeroth-order fine-tuning from forward passes only, perturbing weights in place.

Malladi et al. (2023), docs/methods.md §5. Each step draws a seed s and, one parameter tensor at a
time, regenerates z ~ N(0, I) from a generator seeded by (s, tensor index), so nothing the
size of θ is ever allocated for z: θ += εz, L₊; θ −= 2εz, L₋; θ += εz (restore);
g = (L₊ − L₋)/2ε; then z is regenerated once more for θ ← θ − η(g·z + λθ). Memory stays at
inference memory. ``zo_layer_probes`` reuses the same probe per layer as the cheap
layer-sensitivity estimator ``c_l = |L(θ+εz_l) − L(θ−εz_l)| / 2ε``.

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

The ``zo`` recipe (spec suffix ``:zo``, stacking on any model: ``…:sft:deep:zo``) runs MeZO on
the matrices of the robustness-critical layers only (``critical_layers`` of a
layer_sensitivity results file, ``--layers``, or the top ZO probes), with the safety/recovery
loss under functional random parameter noise plus a utility term, n-SPSA, per-layer ZO probes
logged during the run, resumable checkpoints and fp32 master weights for the refined layers
on CUDA (bf16 autocast). See the section comment above ``ZORecipeConfig`` for the objective
and its sizing; multi-GPU in ``finetune.common``.

    $ python -m finetune.zeroth_order --model smollm2-135m-instruct:sft:deep --sensitivity RESULTS_JSON
    >>> load_model("smollm2-135m-instruct:sft:zo")          # layers chosen by ZO probes
    >>> params = [p for l in critical for p in model.layer_parameters(l).values() if p.ndim == 2]
    >>> steps = mezo_train(params, lambda i: loss_on(batches[i % len(batches)]), ZOConfig(steps=500, lr=1e-6))
    >>> probes = zo_layer_probes(model, None, lambda layer: -refusal_score(model, prompts).mean)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
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
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}.")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {self.eps!r}.")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a non-negative finite number, got {self.lr!r}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative finite number, got {self.weight_decay!r}.")
        if not (isinstance(self.n_spsa, int) and self.n_spsa >= 1):
            raise ValueError(f"n_spsa must be an integer >= 1, got {self.n_spsa!r}.")


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
        accepted: False when ``mezo_train``'s ``accept`` test refused the update and the weights
            were put back to their values before the step.
    """

    loss_plus: float
    loss_minus: float
    projected_grad: float
    seeds: tuple[int, ...] = ()
    projected_grads: tuple[float, ...] = ()
    stashed: float = 0.0
    accepted: bool = True

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


def perturbation_direction(params: Sequence[Tensor], seed: int) -> list[Tensor]:
    """The directions z (float32, one per tensor) that ``seed`` stands for.

    Allocates as much as ``params`` itself: for analysis and tests, not for training loops.
    """
    return [_z(p, seed, i) for i, p in enumerate(params)]


def _check_params(params: Sequence[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ValueError("Zeroth-order optimisation needs at least one parameter tensor, got none.")
    seen: set[tuple[int, int]] = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise ValueError(f"Parameter {i} is not a floating-point tensor; pass weight tensors only.")
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        if key in seen:
            raise ValueError(f"Parameter {i} appears twice (tied weights?); pass each tensor once.")
        seen.add(key)
    return params


def perturb_inplace(params: Sequence[Tensor], seed: int, scale: float) -> None:
    """θ += scale·z in place, one tensor at a time (z regenerated from ``seed``; see ``_increment``).

    Plain arithmetic: ``+ε, −2ε, +ε`` does *not* restore θ bit for bit. For a probe that
    must restore, use ``symmetric_perturbation`` (or ``spsa_grad_scalar``).
    """
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(_increment(p, seed, i, scale))


# ----------------------------------------------------------------------------- exact ±εz probe


class SymmetricPerturbation:
    """θ → θ + εz → θ − εz → θ in place, with a bit-exact restore (see the module docstring).

    ``plus()`` stashes, per tensor, what the plain additions would not bring back;
    ``minus()`` moves to θ − εz; ``restore()`` returns to θ from whichever state the tensors
    are in (also after a partial ``plus()``), so it is safe in a ``finally``.
    """

    def __init__(self, params: Sequence[Tensor], seed: int, eps: float):
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {eps!r}.")
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
        for i, p in enumerate(self.params):
            if self._stage[i] != 0:
                raise RuntimeError("plus() called twice without restore().")
            d = _increment(p, self.seed, i, self.eps)
            self._stash[i] = _plan_restore(p, d)
            self.n_stashed += p.numel() if self._stash[i][0] == "dense" else self._stash[i][1].numel()
            p.add_(d)
            self._stage[i] = 1

    @torch.no_grad()
    def minus(self) -> None:
        if any(s != 1 for s in self._stage):
            raise RuntimeError("minus() needs every tensor at θ + εz; call plus() first.")
        for i, p in enumerate(self.params):
            p.add_(_increment(p, self.seed, i, self.eps) * -2)
            self._stage[i] = 2

    @torch.no_grad()
    def restore(self) -> None:
        for i, p in enumerate(self.params):
            stage, stash = self._stage[i], self._stash[i]
            if stage == 0:
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


def _two_point(params: list[Tensor], loss_fn: Callable[[], float], eps: float, seed: int) -> tuple[float, float, float]:
    with torch.no_grad(), symmetric_perturbation(params, seed, eps) as sp:
        plus = float(loss_fn())
        sp.minus()
        minus = float(loss_fn())
    if not (math.isfinite(plus) and math.isfinite(minus)):
        raise FloatingPointError(f"The loss is not finite (L+ = {plus}, L- = {minus}); the weights were restored.")
    return plus, minus, sp.stashed


def spsa_grad_scalar(params: Sequence[Tensor], loss_fn: Callable[[], float], eps: float, seed: int) -> ZOStepResult:
    """Projected gradient g = (L(θ+εz) − L(θ−εz)) / 2ε ≈ ∇L·z, with θ restored bit for bit.

    Returns the two losses and g as a ``ZOStepResult`` (no update); ``float(result)`` is g.
    """
    plus, minus, frac = _two_point(_check_params(params), loss_fn, eps, seed)
    g = (plus - minus) / (2 * eps)
    return ZOStepResult(loss_plus=plus, loss_minus=minus, projected_grad=g, seeds=(seed,), projected_grads=(g,),
                        stashed=frac)


# ----------------------------------------------------------------------------- MeZO


def mezo_step(params: Sequence[Tensor], loss_fn: Callable[[], float], cfg: ZOConfig, step_seed: int) -> ZOStepResult:
    """One MeZO step: n_spsa two-point estimates at θ, then θ ← θ − η(mean_j g_j z_j + λθ)."""
    params = _check_params(params)
    seeds = [step_seed] if cfg.n_spsa == 1 else [derive_seed(step_seed, j) for j in range(cfg.n_spsa)]
    est = [spsa_grad_scalar(params, loss_fn, cfg.eps, s) for s in seeds]
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
               accept: Callable[[int], bool] | None = None) -> list[ZOStepResult]:
    """Run MeZO steps ``start … cfg.steps − 1`` on ``params`` in place; step i evaluates ``loss_fn(i)`` (its batch).

    ``loss_fn(i)`` must return the same value for the same weights within a step (same batch,
    no dropout): L₊ and L₋ are compared. ``on_step(i, result)`` is called after each step
    (evaluation, checkpoints). Seeded: the same config and losses give the same weights, and
    since step i's direction depends on (seed, i) only, resuming at ``start`` from the weights
    saved after step ``start − 1`` continues exactly as an uninterrupted run.

    ``accept(i)``, when given, is asked after step i's update (at the new weights); if it returns
    False the weights are put back, bit for bit, to their values before the step, and the result
    reads ``accepted=False``. It costs one copy of ``params`` (made before each step), so it is
    meant for small or few tensors; without it MeZO keeps no copy of the weights.
    """
    params = _check_params(params)
    if not (isinstance(start, int) and 0 <= start <= cfg.steps):
        raise ValueError(f"start must be an integer in 0..steps={cfg.steps}, got {start!r}.")
    n_el = sum(p.numel() for p in params)
    log.info("MeZO on %d tensors (%d weights): %s", len(params), n_el, cfg)
    results: list[ZOStepResult] = []
    bar = tqdm(range(start, cfg.steps), desc="MeZO", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        before = [p.detach().clone() for p in params] if accept is not None else None
        res = mezo_step(params, lambda: loss_fn(step), cfg, derive_seed(cfg.seed, step))
        if before is not None and not accept(step):
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)
            res = replace(res, accepted=False)
        del before
        results.append(res)
        bar.set_postfix(loss=f"{res.loss:.4f}", g=f"{res.projected_grad:.3g}")
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = results[-cfg.log_every:]
            log.info("MeZO step %d/%d: loss %.4f (mean of last %d), |g| %.3g, restore stash %.1f%%, %d updates kept",
                     step + 1, cfg.steps, sum(r.loss for r in recent) / len(recent), len(recent),
                     sum(abs(r.projected_grad) for r in recent) / len(recent), 100 * res.stashed,
                     sum(r.accepted for r in recent))
        if on_step is not None:
            on_step(step, res)
    return results


# ----------------------------------------------------------------------------- layer probes


def zo_layer_probes(model, layers: Sequence[int] | None, loss_fn: Callable[[int], float], eps: float = 1e-3,
                    seed: int = 0, n_samples: int = 1) -> dict[int, float]:
    """Cheap layer sensitivity ``c_l = |L(θ+εz_l) − L(θ−εz_l)| / 2ε``, only layer l's matrices perturbed.

    ``loss_fn(l)`` is the loss with layer l perturbed; it gets l so that it can restart the
    forward pass from a cached ``blocks.{l}.hook_resid_pre`` (earlier layers are unchanged).
    ``n_samples`` independent directions are averaged per layer (E|g| = √(2/π)·‖∇_l L‖ for a
    smooth loss). Returns {layer: c_l}; θ is restored bit for bit after every probe.
    """
    layers = list(range(model.n_layers)) if layers is None else [model.check_layer(l) for l in layers]
    if not (isinstance(n_samples, int) and n_samples >= 1):
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}.")
    out: dict[int, float] = {}
    for layer in layers:
        params = [p for p in model.layer_parameters(layer).values() if p.ndim == 2]
        vals = [abs(spsa_grad_scalar(params, lambda: loss_fn(layer), eps, derive_seed(seed, layer, k)).projected_grad)
                for k in range(n_samples)]
        out[layer] = sum(vals) / n_samples
        log.debug("ZO probe layer %d: c = %.4g", layer, out[layer])
    return out


# ----------------------------------------------------------------------------- the `zo` recipe
#
# Zeroth-order refinement of the robustness-critical layers (docs/methods.md §5, Liu, Wu et al. 2026).
# Only the weight matrices of the chosen layers move; the objective is the safety
# (recovery) loss under random parameter noise plus a utility term:
#
#     L(θ) = E_δ[ NLL(r | x, h[:k]; θ + δ) ] + λ_u · NLL(y′ | x′; θ)
#
# (x, h[:k], r): harmful prompt, a prefix of the base's harmful answer (k as docs/methods.md §2),
# a refusal; (x′, y′): a benign prompt and the starting model's own greedy answer. The noise
# δ = σ‖W‖_F/√n · ζ on every matrix of the noised layers is applied *functionally*: a forward
# hook on each ``nn.Linear`` adds ``F.linear(x, δ)`` with δ regenerated from a seed, so no
# weight is touched or copied (memory stays at inference memory) and L₊ and L₋ of one step see
# the same δ (the SPSA difference measures the move along z, not two noise draws).
#
# ``objective="margin"`` replaces the recovery NLL by a two-sided hinge on the refusal decision
# at the first response token, the decision the compare noise suite measures:
#
#     S(θ + δ) = mean_rows softplus(m − y · s(x; θ + δ)),   s = log p_R − log(1 − p_R),
#
# y = +1 on harmful train prompts, −1 on harmless ones (their own answers do not start with a
# refusal token). :sft:deep was trained on the recovery NLL, so that objective sits near its
# minimum there and MeZO has little to descend; the hinge is still active on the prompts whose
# refusal is weakest under noise (m = 4: p_R ≈ 0.98).
#
# ``refusal_guard=λ_g`` adds ``λ_g · G(θ)``, a guard on the utility rows against refusal
# break-offs inside benign answers ("…you can use a service called FINRA.I'm sorry, but I
# can't…"), which the margin's benign rows (first token only) do not see:
#
#     G(θ) = mean_answers max_t relu(s_t(θ) − s_t(θ₀)),
#
# s_t the refusal log-odds of the next token at response position t of the starting model's
# own benign answer, θ₀ the starting weights (their s_t computed once, when the objective is
# built). It is 0 at the start and charges only a rise, so answers that already mention "I"
# keep their own level.
#
# Sizing (2 CPU cores, 135M default): one loss evaluation = a safety forward (8 sequences of
# ≤ 256 tokens, logits only on the scored tokens) + a utility forward, ≈ 2–3 s; a MeZO step
# is 2·n_spsa of them: measured 12.8 s a step on :sft:deep (2026-12-01), so the default 100
# steps take ≈ 21 min, plus the per-layer probes (2 evaluations per layer at the start, every
# ``probe_every`` steps and at the end) and ≈ 5 min of base answers the first time. At lr 1e-5
# those 100 steps moved the objective by 0.1 % (0.4813 → 0.4807 on batch 0). MeZO
# usually runs thousands of steps at lr 1e-7…1e-6 on *all* weights; restricted to ≤ 5 layers
# and ~100 steps we default to lr 1e-5 (per-weight random walk ≈ lr·|g|·√steps ≈ 1e-3 of a
# weight's scale, far below the σ = 0.1 noise NOTES.md found harmless): a small, cheap
# refinement, not a retraining. A larger lr does not help either (scratch sweep on :sft:deep,
# the same layers, objective averaged over 4 fixed batches, 0.4593 before): 12 steps at lr 1e-4
# → 0.4597, at lr 1e-3 → 0.4783 (worse); ≈ 15 s a step on 2 shared cores.
# Moving only the RMSNorm gains (``tensors="norms"``, 5 760 weights on five layers) does not
# rescue the NLL objective (20 steps on :sft:deep: lr 1e-3 0.40851 → 0.40832, lr 1e-2 → 0.502,
# lr 5e-2 diverges). The margin objective moves (0.964 → 0.912 in 20 steps at lr 3e-5 on the
# matrices, utility flat), and 100 steps raise refusal under parameter and activation noise on
# validation but lower it under int4 (README, "Zeroth-order refinement variants").

NOISE_LAYERS = ("trained", "all")
TENSORS = ("matrices", "norms", "all")
OBJECTIVES = ("nll", "margin")
SUITE_KINDS = ("param", "act", "int4")


def zo_parameters(model, layers: Sequence[int], tensors: str = "matrices") -> list[Tensor]:
    """The tensors of ``layers`` that the zo recipe refines.

    ``matrices``: every weight matrix (attention and MLP projections); ``norms``: the 1-D
    tensors only (the RMSNorm gains of a Llama block, and biases where a block has them),
    ≈ 0.03 % of a block's weights; ``all``: both. SPSA's per-step noise grows with the number
    of perturbed weights d (the estimate g·z has variance ≈ d·|∇L|²), so on ~100 steps a few
    thousand gains can move while 17.7 M matrix weights cannot.
    """
    if tensors not in TENSORS:
        raise ValueError(f"tensors must be one of {TENSORS}, got {tensors!r}.")
    out = []
    for l in layers:
        for p in model.layer_parameters(l).values():
            if tensors == "all" or (p.ndim >= 2) == (tensors == "matrices"):
                out.append(p)
    if not out:
        raise ValueError(f"Layers {list(layers)} have no {tensors} tensors to refine.")
    return out


@dataclass(frozen=True)
class ZORecipeConfig:
    """The ``zo`` recipe: MeZO on the robustness-critical layers with a noise-robust safety objective.

    Args:
        layers: layers to refine (takes precedence over ``sensitivity``).
        sensitivity: a layer_sensitivity results.json (or its run directory) whose
            ``metrics.critical_layers`` are refined. Without ``layers`` and ``sensitivity`` the
            ``top_k`` layers with the largest ZO probe c_l of this objective are refined.
        top_k: how many critical layers to take from the file or the probes.
        steps: MeZO steps (each 2·n_spsa loss evaluations).
        eps: SPSA perturbation scale ε (absolute, z ~ N(0, I)).
        lr: MeZO learning rate.
        weight_decay: λ of θ ← θ − η(g z + λθ).
        n_spsa: SPSA estimates averaged per step (n-SPSA / MeZO-n).
        noise_sigma: parameter noise σ of the robust objective, relative (δ = σ‖W‖_F/√n·ζ, as
            ``depthlens.perturb.param_noise``); 0 turns the noise off.
        noise_layers: trained (noise on the refined layers) or all (noise on every layer).
        tensors: which tensors of the refined layers move: matrices, norms (RMSNorm gains) or
            all (``zo_parameters``).
        objective: the safety term: nll (recovery NLL of the whole refusal after h[:k]) or
            margin (``first_token_margin``: softplus(margin − refusal log-odds) at the first
            response token of each harmful prompt, the decision the noise suite measures).
        margin: the refusal log-odds the margin objective asks for (2: p_R ≈ 0.88).
        int4_every: every this many steps the safety term runs under int4 round-to-nearest
            weights of the noised layers instead of Gaussian noise (0: never).
        suite: perturbations the safety term cycles through, one per step (step s runs under
            ``suite[s % len(suite)]``): param (Gaussian parameter noise σ ``noise_sigma``), act
            (activation noise σ ``act_sigma`` on ``hook_resid_post`` of the noised layers, as
            ``depthlens.perturb.activation_noise``) or int4 (round-to-nearest weights of the
            noised layers). Empty: ``int4_every`` decides. ``param,act,int4`` with
            ``noise_layers=all`` trains under the three kinds ``analyses.compare`` measures.
        act_sigma: activation noise σ of the ``act`` steps, relative to the residual RMS per token.
        utility_weight: λ_u, weight of the utility NLL.
        refusal_guard: λ_g, weight of the refusal guard on the utility rows (``refusal_rise``:
            mean over the benign answers of the largest rise, at any position, of the refusal
            log-odds over the starting model's); 0: off. It holds back the mid-answer refusal
            break-offs on benign prompts that a first-token objective cannot see.
        guard_tolerance: τ, a hard form of the guard: after each update the guard G is computed
            exactly (noise-free) on the first ``guard_batches`` utility batches, and an update
            that takes it above τ is undone (``mezo_train``'s ``accept``; one copy of the
            refined tensors). None: off.
        guard_batches: utility batches the hard guard is computed on (each one more forward a step).
        n_safety: harmful train prompts (recovery examples with the base's harmful answers).
        n_utility: benign train prompts answered by the starting model (utility targets).
        harmful_tokens: length of the base's harmful answers.
        utility_tokens: length of the starting model's benign answers.
        max_len: sequences are cut to this many tokens.
        batch_size: safety sequences and utility sequences per loss evaluation.
        probe_every: per-layer ZO probes c_l are logged every this many steps (and at the
            start and end); 0: start and end only.
        checkpoint_every: save a resumable state every this many steps (0: never).
        seed: data, direction and noise seed.
    """

    layers: tuple[int, ...] | None = None
    sensitivity: str | None = None
    top_k: int = 5
    steps: int = 100
    eps: float = 1e-3
    lr: float = 1e-5
    weight_decay: float = 0.0
    n_spsa: int = 1
    noise_sigma: float = 0.1
    noise_layers: str = "trained"
    tensors: str = "matrices"
    objective: str = "nll"
    margin: float = 2.0
    int4_every: int = 0
    suite: tuple[str, ...] = ()
    act_sigma: float = 0.1
    utility_weight: float = 1.0
    refusal_guard: float = 0.0
    guard_tolerance: float | None = None
    guard_batches: int = 2
    n_safety: int = 64
    n_utility: int = 64
    harmful_tokens: int = 96
    utility_tokens: int = 48
    max_len: int = 256
    batch_size: int = 8
    probe_every: int = 50
    checkpoint_every: int = 10
    seed: int = 0

    def __post_init__(self):
        ZOConfig(steps=self.steps, eps=self.eps, lr=self.lr, weight_decay=self.weight_decay, n_spsa=self.n_spsa)
        if self.noise_layers not in NOISE_LAYERS:
            raise ValueError(f"noise_layers must be one of {NOISE_LAYERS}, got {self.noise_layers!r}.")
        if self.tensors not in TENSORS:
            raise ValueError(f"tensors must be one of {TENSORS}, got {self.tensors!r}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if not math.isfinite(self.margin):
            raise ValueError(f"margin must be finite, got {self.margin!r}.")
        if not (math.isfinite(self.noise_sigma) and self.noise_sigma >= 0):
            raise ValueError(f"noise_sigma must be >= 0 and finite, got {self.noise_sigma!r}.")
        if self.top_k < 1 or self.n_safety < 1 or self.batch_size < 1:
            raise ValueError(f"top_k, n_safety and batch_size must be >= 1, got {self.top_k}, {self.n_safety}, "
                             f"{self.batch_size}.")
        if not (isinstance(self.int4_every, int) and self.int4_every >= 0):
            raise ValueError(f"int4_every must be an integer >= 0, got {self.int4_every!r}.")
        object.__setattr__(self, "suite", tuple(self.suite))  # a list from Python stays hashable
        bad = [k for k in self.suite if k not in SUITE_KINDS]
        if bad:
            raise ValueError(f"suite entries must be among {SUITE_KINDS}, got {bad[0]!r}.")
        if self.suite and self.int4_every:
            raise ValueError("Give either suite or int4_every, not both: suite already says which steps run under int4.")
        if not (math.isfinite(self.act_sigma) and self.act_sigma >= 0):
            raise ValueError(f"act_sigma must be >= 0 and finite, got {self.act_sigma!r}.")
        if self.utility_weight < 0:
            raise ValueError(f"utility_weight must be >= 0, got {self.utility_weight}.")
        if not (math.isfinite(self.refusal_guard) and self.refusal_guard >= 0):
            raise ValueError(f"refusal_guard must be >= 0 and finite, got {self.refusal_guard!r}.")
        if self.guard_tolerance is not None and not (math.isfinite(self.guard_tolerance) and self.guard_tolerance >= 0):
            raise ValueError(f"guard_tolerance must be None or >= 0 and finite, got {self.guard_tolerance!r}.")
        if not (isinstance(self.guard_batches, int) and self.guard_batches >= 1):
            raise ValueError(f"guard_batches must be an integer >= 1, got {self.guard_batches!r}.")

    def zo(self) -> ZOConfig:
        return ZOConfig(steps=self.steps, eps=self.eps, lr=self.lr, weight_decay=self.weight_decay,
                        n_spsa=self.n_spsa, seed=self.seed, log_every=max(1, self.steps // 10))


def critical_layers_from(path: str | Path, top_k: int | None = None) -> list[int]:
    """``metrics.critical_layers`` of a layer_sensitivity results file (first ``top_k``)."""
    from depthlens.results import read_run

    rec = read_run(path)
    if rec.analysis != "layer_sensitivity":
        raise ValueError(f"{str(path)!r} holds a {rec.analysis!r} run; the zo recipe needs a layer_sensitivity "
                         "results file (python -m analyses.layer_sensitivity).")
    crit = rec.metrics.get("critical_layers") or []
    layers = [int(c["layer"] if isinstance(c, dict) else c) for c in crit]
    if not layers:
        raise ValueError(f"{str(path)!r} lists no critical_layers; re-run analyses.layer_sensitivity.")
    return layers[:top_k] if top_k else layers


def _noise_z(weight: Tensor, seed: int) -> Tensor:
    gen = torch.Generator(device=weight.device)
    gen.manual_seed(seed)
    return torch.randn(weight.shape, generator=gen, device=weight.device, dtype=torch.float32)


def _linear_modules(model, layers: Sequence[int]) -> list[tuple[int, str, torch.nn.Linear]]:
    """The ``nn.Linear`` modules of the given blocks of ``model.plain()`` (the view the losses run on)."""
    blocks = model.plain().model.layers
    return [(l, name, mod) for l in layers for name, mod in blocks[l].named_modules() if isinstance(mod, torch.nn.Linear)]


@contextmanager
def functional_param_noise(model, layers: Sequence[int], sigma: float, seed: int) -> Iterator[None]:
    """Parameter noise δ = σ‖W‖_F/√n·ζ on every linear map of ``layers``, as ``y += F.linear(x, δ)``.

    Equal to running with W + δ (checked in the tests), but nothing is written to the weights:
    ζ is regenerated from (seed, layer, module name) at every call, so two forwards inside the
    block see the same δ, and the memory cost is one matrix-sized temporary at a time. Acts on
    ``model.plain()``.
    """
    if sigma == 0:
        yield
        return
    handles = []

    def make(seed_i: int):
        def hook(mod, args, out):
            w = mod.weight
            delta = _noise_z(w, seed_i).mul_(sigma * float(w.detach().float().norm()) / w.numel() ** 0.5)
            return out + torch.nn.functional.linear(args[0], delta.to(out.dtype))

        return hook

    try:
        for l, name, mod in _linear_modules(model, layers):
            handles.append(mod.register_forward_hook(make(derive_seed(seed, l, zlib.crc32(name.encode())))))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def functional_int4(model, layers: Sequence[int]) -> Iterator[None]:
    """Int4 round-to-nearest weights on every linear map of ``layers``, as ``y += F.linear(x, Q(W) − W)``.

    ``Q`` is ``depthlens.perturb.rtn_quantize`` of the *current* weights (so inside an SPSA
    step it quantizes θ ± εz); nothing is written to the weights. Acts on ``model.plain()``.
    """
    from depthlens.perturb import rtn_quantize

    def hook(mod, args, out):
        w = mod.weight.detach()
        return out + torch.nn.functional.linear(args[0], (rtn_quantize(w, 4).float() - w.float()).to(out.dtype))

    handles = []
    try:
        for _, _, mod in _linear_modules(model, layers):
            handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _response_logits(model, ids: Tensor, att: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float32 logits at the positions that predict a masked (response) token, their targets, and
    the row of each such position; the lm_head runs only there."""
    view = model.plain()
    hidden = view.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
    sel = mask[:, 1:].bool()
    if not sel.any():
        raise ValueError("The zo objective got a batch without any response token.")
    return view.lm_head(hidden[sel]).float(), ids[:, 1:][sel], sel.nonzero()[:, 0]


def masked_nll(model, ids: Tensor, att: Tensor, mask: Tensor) -> Tensor:
    """Mean NLL of the masked (response) tokens; logits are computed only where the loss needs them."""
    logits, targets, _ = _response_logits(model, ids, att, mask)
    return torch.nn.functional.cross_entropy(logits, targets)


def utility_terms(model, batch: "_Batch", refusal_ids: Sequence[int] | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(NLL, s, rows)`` of a utility batch from one forward pass.

    NLL: ``masked_nll``. s: with ``refusal_ids``, the refusal log-odds log p_R − log(1 − p_R)
    of the next token at every position that predicts a response token (flat, one entry per
    such position; ``rows`` gives each entry's row), else None.
    """
    from depthlens.judge import score_from_logprobs

    logits, targets, rows = _response_logits(model, batch.ids, batch.att, batch.mask)
    nll = torch.nn.functional.cross_entropy(logits, targets)
    if refusal_ids is None:
        return nll, None, rows
    return nll, score_from_logprobs(torch.log_softmax(logits, dim=-1), refusal_ids), rows


def refusal_rise(score: Tensor, reference: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """``mean_rows max_t relu(s_t − s_t^ref)``: the largest rise of the refusal log-odds anywhere in
    each benign answer, averaged over the answers (0 when no position rose)."""
    if score.shape != reference.shape or rows.shape != score.shape:
        raise ValueError(f"refusal_rise: scores {tuple(score.shape)}, reference {tuple(reference.shape)} and rows "
                         f"{tuple(rows.shape)} must have one entry per response position.")
    rise = torch.relu(score.float() - reference.float())
    worst = torch.zeros(n_rows, dtype=rise.dtype, device=rise.device).scatter_reduce(0, rows, rise, "amax")
    return worst.mean()


def first_token_margin(model, ids: Tensor, att: Tensor, mask: Tensor, refusal_ids: Sequence[int],
                       margin: float, sign: Tensor | None = None) -> Tensor:
    """``mean softplus(margin − y·s)``: s = log p_R − log(1 − p_R) where each row's response begins.

    ``y`` (``sign``, default all +1) is +1 on rows that should refuse and −1 on rows that
    should not: a two-sided margin on the refusal decision.

    ``p_R`` is the probability of the refusal first tokens R (docs/methods.md §1) at the position that
    predicts the first masked token: for a recovery example chat(x) + h[:k] + r, the point
    where the refusal must start (at k = 0, the first response token, the decision the noise
    suite's refusal rate hinges on). Only the tokens up to the latest such position are run.
    """
    from depthlens.judge import score_from_logprobs

    if not bool(mask.any(1).all()):
        raise ValueError("first_token_margin got a row without any response token.")
    first = mask.float().argmax(1)  # index of the first response token of each row
    if int(first.min()) < 1:
        raise ValueError("first_token_margin needs at least one context token before each response.")
    width = int(first.max())
    view = model.plain()
    hidden = view.model(input_ids=ids[:, :width], attention_mask=att[:, :width]).last_hidden_state
    rows = torch.arange(ids.shape[0], device=ids.device)
    logprobs = torch.log_softmax(view.lm_head(hidden[rows, first - 1]).float(), dim=-1)
    score = score_from_logprobs(logprobs, refusal_ids)
    if sign is not None:
        score = score * sign.to(score.dtype)
    return torch.nn.functional.softplus(margin - score).mean()


@dataclass(frozen=True)
class _Batch:
    ids: Tensor
    att: Tensor
    mask: Tensor
    sign: Tensor | None = None  # per row: +1 should refuse, −1 should not (the margin objective)


def _fixed_batches(model, examples, max_len: int, batch_size: int, seed: int) -> list[_Batch]:
    """Length-bucketed, right-padded batches, in a seeded order, on the model's device.

    ``sign`` is −1 for examples whose ``kind`` starts with "benign" and +1 for the rest.
    """
    from depthlens.chat import pad_batch
    from finetune.sft import _batches, tokenize_examples

    kept = [(d, ex) for d, ex in zip(tokenize_examples(model.tokenizer, examples, max_len), examples) if sum(d[1][1:])]
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for idx in _batches([len(d[0]) for d, _ in kept], batch_size, random.Random(seed)):
        b = pad_batch([kept[i][0][0] for i in idx], pad, side="right")
        m = pad_batch([kept[i][0][1] for i in idx], 0, side="right").input_ids
        sign = torch.tensor([-1.0 if kept[i][1].kind.startswith("benign") else 1.0 for i in idx])
        out.append(_Batch(b.input_ids.to(model.device), b.attention_mask.to(model.device), m.to(model.device),
                          sign.to(model.device)))
    return out


def _batch_nll(model, batch: _Batch) -> Tensor:
    return masked_nll(model, batch.ids, batch.att, batch.mask)


class RobustObjective:
    """``L = S(θ + δ_step) + λ_u · NLL_utility(θ) + λ_g · G(θ)`` on batch ``step`` (see the section comment).

    ``S`` is ``safety_loss`` on the safety batch: the recovery NLL (``masked_nll``, default) or
    the first-token refusal margin (``first_token_margin``). ``G`` (``guard_weight`` λ_g > 0,
    needs ``refusal_ids``) is the refusal guard on the utility batch: ``refusal_rise`` of the
    refusal log-odds at every position of the benign answers against their values under the
    weights the objective was built on (computed once, here). ``components(step)`` gives the
    three parts separately (noise-free safety loss with ``noise=False``) for logging and tests.
    """

    def __init__(self, model, safety: list[_Batch], utility: list[_Batch], noise_layers: Sequence[int],
                 sigma: float, utility_weight: float, seed: int,
                 safety_loss: Callable[[object, _Batch], Tensor] | None = None, int4_every: int = 0,
                 suite: Sequence[str] = (), act_sigma: float = 0.1, guard_weight: float = 0.0,
                 refusal_ids: Sequence[int] | None = None, track_guard: bool = False):
        if not safety:
            raise ValueError("The zo objective needs at least one safety batch.")
        track_guard = bool(guard_weight) or track_guard
        if track_guard and (not utility or not refusal_ids):
            raise ValueError("The refusal guard needs utility batches and the refusal token ids.")
        self.model, self.safety, self.utility = model, safety, utility
        self.noise_layers, self.sigma = list(noise_layers), sigma
        self.utility_weight, self.seed = utility_weight, seed
        self.safety_loss = safety_loss or _batch_nll
        self.int4_every = int4_every
        self.suite, self.act_sigma = tuple(suite), act_sigma
        self.guard_weight = guard_weight
        self.refusal_ids = list(refusal_ids) if track_guard else None
        self.guard_reference = [self._utility(u)[1] for u in utility] if track_guard else []

    @torch.inference_mode()
    def _utility(self, u: _Batch) -> tuple[Tensor, Tensor | None, Tensor]:
        from finetune.common import autocast

        with autocast(self.model):
            return utility_terms(self.model, u, self.refusal_ids)

    def kind(self, step: int) -> str:
        """Which perturbation the safety term of ``step`` runs under: param, act or int4."""
        if self.suite:
            return self.suite[step % len(self.suite)]
        if self.int4_every and step % self.int4_every == self.int4_every - 1:
            return "int4"
        return "param"

    def perturbation(self, step: int, noise: bool = True):
        """The perturbation of ``step``'s safety term (``kind``); ``noise=False``: none.

        Every kind is a pure function of (step, current weights): the two SPSA evaluations of a
        step enter it afresh and see the same noise draw.
        """
        kind = self.kind(step) if noise else "param"
        if kind == "int4":
            return functional_int4(self.model, self.noise_layers)
        if kind == "act":
            from depthlens.perturb import activation_noise

            return activation_noise(self.model, self.noise_layers, self.act_sigma, self.noise_seed(step))
        return functional_param_noise(self.model, self.noise_layers, self.sigma if noise else 0.0, self.noise_seed(step))

    def noise_seed(self, step: int) -> int:
        return derive_seed(self.seed, 0x5A, step)

    @torch.inference_mode()
    def components(self, step: int, noise: bool = True) -> tuple[float, float, float]:
        """``(S, NLL_utility, G)`` of ``step`` (``S`` noise-free with ``noise=False``); an unweighted
        term is not computed and reads 0."""
        from finetune.common import autocast

        s = self.safety[step % len(self.safety)]
        with autocast(self.model):
            with self.perturbation(step, noise):
                safety = float(self.safety_loss(self.model, s))
        util = guard = 0.0
        if self.utility and (self.utility_weight or self.guard_weight):
            i = step % len(self.utility)
            nll, score, rows = self._utility(self.utility[i])
            util = float(nll)
            if self.guard_weight:
                guard = float(refusal_rise(score, self.guard_reference[i], rows, self.utility[i].ids.shape[0]))
        return safety, util, guard

    def __call__(self, step: int) -> float:
        safety, util, guard = self.components(step)
        return safety + self.utility_weight * util + self.guard_weight * guard

    @torch.inference_mode()
    def guard(self, batches: Sequence[int]) -> float:
        """The refusal guard G at the current weights, averaged over the utility batches ``batches``
        (needs ``guard_weight`` > 0 or ``track_guard``: the starting model's scores)."""
        if not self.guard_reference:
            raise ValueError("This objective keeps no refusal-guard reference: build it with track_guard=True.")
        vals = []
        for i in batches:
            _, score, rows = self._utility(self.utility[i])
            vals.append(float(refusal_rise(score, self.guard_reference[i], rows, self.utility[i].ids.shape[0])))
        return sum(vals) / len(vals)


def _fp32_masters(model, params: list[Tensor]) -> bool:
    """On CUDA (bf16 autocast) keep the refined matrices in float32 so that small updates are not lost."""
    if model.device.type != "cuda" or all(p.dtype == torch.float32 for p in params):
        if any(p.dtype != torch.float32 for p in params):
            log.warning("Zeroth-order updates on %s weights off CUDA: steps below half an ulp are lost.", params[0].dtype)
        return False
    for p in params:
        p.data = p.data.float()
    return True


class ZORecipe:
    """Entry point ``zo``: MeZO refinement of the robustness-critical layers (stacks on any model)."""

    name = "zo"
    version = 1

    def __init__(self, cfg: ZORecipeConfig | None = None):
        self.cfg = cfg or ZORecipeConfig()

    def config(self) -> dict:
        out = asdict(self.cfg)
        # options added later: at their original setting the keys stay as they were
        for name, original in (("tensors", "matrices"), ("objective", "nll"), ("int4_every", 0), ("suite", ()),
                               ("refusal_guard", 0.0), ("guard_tolerance", None)):
            if out[name] == original:
                del out[name]
        if self.cfg.guard_tolerance is None:
            del out["guard_batches"]
        if "act" not in self.cfg.suite:
            del out["act_sigma"]
        if self.cfg.objective == "nll":
            del out["margin"]
        else:  # the first margin objective was one-sided (harmful rows only); its builds must not be reused
            out["margin_rows"] = "two-sided"
        if self.cfg.layers is None and self.cfg.sensitivity:
            from depthlens.models import _file_sha256

            path = Path(self.cfg.sensitivity)
            path = path / "results.json" if path.is_dir() else path
            out["resolved_layers"] = critical_layers_from(path, self.cfg.top_k)
            out["sensitivity_sha256"] = _file_sha256(path)
        return out

    def _layers(self, model, objective_for_probes) -> tuple[list[int], str, dict[int, float]]:
        cfg = self.cfg
        if cfg.layers is not None:
            return list(dict.fromkeys(model.check_layer(int(l)) for l in cfg.layers)), "given", {}
        if cfg.sensitivity:
            from depthlens.results import read_run

            layers = [model.check_layer(l) for l in critical_layers_from(cfg.sensitivity, cfg.top_k)]
            measured_on = read_run(cfg.sensitivity).model
            if measured_on != model.spec:
                log.warning("Critical layers were measured on %s; refining %s.", measured_on, model.spec)
            return layers, f"file:{cfg.sensitivity}", {}
        probes = zo_layer_probes(model, None, lambda layer: objective_for_probes(), eps=cfg.eps,
                                 seed=derive_seed(cfg.seed, 0xC1))
        ranked = sorted(probes, key=lambda l: -probes[l])[: cfg.top_k]
        return sorted(ranked), "zo_probes", probes

    def batches(self, model, progress: bool = True) -> tuple[list[_Batch], list[_Batch]]:
        """The fixed safety (recovery) and utility batches of the objective, for ``model``."""
        from depthlens.data import default_splits, refusal_templates
        from depthlens.models import load_model
        from depthlens.organism import base_spec
        from depthlens.responses import response_set
        from finetune.deep import DeepConfig, recovery_examples, utility_examples
        from finetune.sft import Example

        cfg = self.cfg
        rng = random.Random(cfg.seed)
        splits = default_splits(cfg.seed)
        harmful = splits.harmful.train.subset(cfg.n_safety, seed=cfg.seed + 1)
        if cfg.objective == "margin":
            # the refusal decision at the first response token (k = 0) only: after a harmful
            # prefix the refusal of a recovery example is spliced in mid-sentence, where a
            # well-behaved model finishes the clause first (measured on :sft:deep: log-odds ≈ −9
            # there against ≈ +6 at k = 0), so a first-token margin would demand an abrupt switch.
            # Two-sided: as many harmless train prompts must keep *not* refusing (sign −1), scored
            # on the starting model's own first answer tokens; a harmless prompt whose own answer
            # already starts with a refusal token is left out. One-sided (harmful rows only), the
            # objective mostly taught "refuse more": on :sft:deep's val split it raised harmless
            # refusal 0.167 → 0.208 with the noise-suite gains (README, the zo row).
            from depthlens.judge import refusal_token_ids

            from depthlens.chat import encode

            # only the first response position is scored: 4 tokens of each side keep the two
            # kinds of rows the same length, so length bucketing mixes them within a batch
            starts = [tuple(encode(model.tokenizer, t)[:4]) for t in refusal_templates()]
            safety_ex = [Example(x, rng.choice(starts), eos=False, kind="refusal:k=0") for x in harmful.prompts]
            harmless = splits.harmless.train.subset(cfg.n_safety, seed=cfg.seed + 3).prompts
            firsts = response_set(model, harmless, max_new_tokens=4, progress=progress).tokens
            r_ids = set(refusal_token_ids(model.tokenizer))
            safety_ex += [Example(x, tuple(t), eos=False, kind="benign:k=0")
                          for x, t in zip(harmless, firsts) if t and t[0] not in r_ids]
        else:
            base_name = base_spec(model.spec)
            base = model if base_name == model.spec else load_model(base_name, device=model.device)
            h = response_set(base, harmful.prompts, max_new_tokens=cfg.harmful_tokens, progress=progress).tokens
            del base
            safety_ex = recovery_examples(harmful.prompts, h, refusal_templates(), DeepConfig(), rng)
        benign = list(splits.harmless.train.prompts) + list(splits.borderline.train.prompts)
        benign = sorted(random.Random(cfg.seed + 2).sample(benign, min(cfg.n_utility, len(benign))), key=benign.index)
        own = response_set(model, benign, max_new_tokens=cfg.utility_tokens, progress=progress)
        util_ex = utility_examples(benign, own.tokens, cfg.utility_tokens)
        safety = _fixed_batches(model, safety_ex, cfg.max_len, cfg.batch_size, cfg.seed)
        utility = _fixed_batches(model, util_ex, cfg.max_len, cfg.batch_size, cfg.seed + 1)
        return safety, utility

    def build(self, model, workdir: Path | None, progress: bool = True) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        safety, utility = self.batches(model, progress)

        from depthlens.judge import refusal_token_ids

        r_ids = refusal_token_ids(model.tokenizer)
        safety_loss = _batch_nll
        if cfg.objective == "margin":
            def safety_loss(m, b: _Batch) -> Tensor:
                return first_token_margin(m, b.ids, b.att, b.mask, r_ids, cfg.margin, b.sign)

        def objective_on(noise_layers):
            # built before any update or checkpoint load: the refusal guard's reference is the starting model
            return RobustObjective(model, safety, utility, noise_layers, cfg.noise_sigma, cfg.utility_weight, cfg.seed,
                                   safety_loss, cfg.int4_every, cfg.suite, cfg.act_sigma, cfg.refusal_guard, r_ids,
                                   track_guard=cfg.guard_tolerance is not None)

        probe_step = 0  # the probes use batch 0 and one fixed noise draw
        all_layers = list(range(model.n_layers))
        selection = functools.cache(lambda: objective_on(all_layers))
        layers, source, selection_probes = self._layers(model, lambda: selection()(probe_step))
        noise_layers = layers if cfg.noise_layers == "trained" else all_layers
        objective = objective_on(noise_layers)
        params = zo_parameters(model, layers, cfg.tensors)
        masters = _fp32_masters(model, params)
        n_weights = sum(p.numel() for p in params)
        log.info("zo: refining layers %s (%s), %d weights, noise σ=%g on %s layers", layers, source, n_weights,
                 cfg.noise_sigma, cfg.noise_layers)

        clean_before = objective.components(probe_step, noise=False)
        noisy_before = objective(probe_step)
        state_path = Path(workdir) / "zo_state.pt" if workdir is not None else None
        start, history, probes = 0, [], []
        if state_path is not None and state_path.exists():
            state = torch.load(state_path, weights_only=True, map_location=model.device)
            if state["layers"] != layers:
                raise ValueError(f"The checkpoint in {state_path.parent} refines layers {state['layers']}, not {layers}; "
                                 "delete it to start over.")
            with torch.no_grad():
                for p, saved in zip(params, state["params"]):
                    p.copy_(saved)
            start, history, probes = int(state["step"]), json.loads(state["history"]), json.loads(state["probes"])
            log.info("zo: resuming from step %d of %d", start, cfg.steps)

        def probe(step: int) -> None:
            c = zo_layer_probes(model, layers, lambda layer: objective(probe_step), eps=cfg.eps,
                                seed=derive_seed(cfg.seed, 0xB0, step))
            probes.extend({"step": step, "layer": l, "c": v} for l, v in c.items())
            log.info("zo probes at step %d: %s", step, ", ".join(f"L{l}={v:.4g}" for l, v in c.items()))

        def save(step: int) -> None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            torch.save({"params": [p.detach() for p in params], "step": step, "layers": layers,
                        "history": json.dumps(history), "probes": json.dumps(probes)}, tmp)
            tmp.replace(state_path)

        accept, guard_seen = None, {}
        if cfg.guard_tolerance is not None:
            guard_on = list(range(min(cfg.guard_batches, len(utility))))

            def accept(step: int) -> bool:
                guard_seen[step] = objective.guard(guard_on)
                return guard_seen[step] <= cfg.guard_tolerance

        def on_step(step: int, res: ZOStepResult) -> None:
            entry = {"step": step, "loss_plus": res.loss_plus, "loss_minus": res.loss_minus,
                     "projected_grad": res.projected_grad, "stashed": res.stashed}
            if accept is not None:
                entry.update(accepted=res.accepted, guard=guard_seen.pop(step))
            history.append(entry)
            done = step + 1
            if cfg.probe_every and done % cfg.probe_every == 0 and done < cfg.steps:
                probe(done)
            if state_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save(done)

        if start == 0:
            probe(0)
        t0 = time.time()
        mezo_train(params, objective, cfg.zo(), progress=progress, on_step=on_step, start=start, accept=accept)
        seconds = time.time() - t0
        probe(cfg.steps)
        clean_after = objective.components(probe_step, noise=False)
        noisy_after = objective(probe_step)
        # fp32 masters stay fp32: the checkpoint is saved in float32 and keeps the small updates.
        if state_path is not None and state_path.exists():
            state_path.unlink()
        return {"layers": layers, "layer_source": source, "selection_probes": selection_probes,
                "n_weights": n_weights, "noise_layers": noise_layers, "steps": cfg.steps, "resumed_from": start,
                "seconds": round(seconds, 1), "device": str(model.device), "fp32_masters": masters,
                "objective_batch0_before": {"noisy": noisy_before, "safety_clean": clean_before[0],
                                            "utility": clean_before[1], "refusal_guard": clean_before[2]},
                "objective_batch0_after": {"noisy": noisy_after, "safety_clean": clean_after[0],
                                           "utility": clean_after[1], "refusal_guard": clean_after[2]},
                "probes": probes, "history": history,
                **({"updates_kept": sum(h["accepted"] for h in history)} if accept is not None else {})}


recipe = ZORecipe()


def main(argv: Sequence[str] | None = None):
    """``python -m finetune.zeroth_order --model SPEC --sensitivity RESULTS`` (or ``--layers 0,1,2``)."""
    from depthlens.cli import recipe_main
    from finetune.common import build_on

    return recipe_main(ZORecipeConfig, lambda cfg, spec, device: build_on(spec, ZORecipe(cfg), device=device), argv)


if __name__ == "__main__":
    main()
