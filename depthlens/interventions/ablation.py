"""Directional ablation and activation addition as hooks: ``x ← x − (x·r̂) r̂`` and ``x ← x + c·r``.

Arditi et al. (2024) bypass refusal by projecting the refusal direction out of the residual
stream (:func:`ablation_hooks`: every layer's block input, attention output and MLP output);
layer-ablation analyses project it out at one layer. All use the hook made here, so the
projection, its normalization and its checks are written once (``probes.orthogonalize``
folds the same projection into the weights). :func:`addition_hooks` adds the raw vector at
one layer's input (``c = +1`` induces refusal, ``−1`` bypasses it).

    >>> import torch
    >>> r = unit_direction(torch.tensor([3.0, 4.0]), d_model=2)
    >>> ablate = ablation_hook(r)
    >>> ablate(torch.tensor([[[3.0, 4.0], [4.0, -3.0]]]), None)   # along r: removed; orthogonal: kept
    tensor([[[ 0.,  0.],
             [ 4., -3.]]])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from depthlens.infra.errors import UsageError
from depthlens.models.hooked_model import hook_name
from depthlens.runtime.hooks import Hook

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel


def unit_direction(direction, d_model: int, *, normalize: bool = True) -> Float[Tensor, " d_model"]:
    """``direction`` as a float64 CPU vector of shape ``(d_model,)``, divided by its norm when ``normalize``.

    Refuses a wrong shape, NaN/inf, and (when normalizing) the zero vector, which has no
    orientation to ablate.
    """
    r = torch.as_tensor(direction).detach().to("cpu", torch.float64)
    if r.shape != (d_model,):
        raise UsageError(f"The direction must be a finite non-zero vector of shape ({d_model},) for this model, "
                         f"got shape {tuple(r.shape)}.")
    if not torch.isfinite(r).all():
        raise UsageError("The direction must be a finite non-zero vector; it contains NaN or inf.")
    if normalize:
        norm = r.norm()
        if norm == 0:
            raise UsageError("The direction must be a finite non-zero vector; the zero vector has no orientation to ablate.")
        r = r / norm
    return r


def ablation_hook(unit: Float[Tensor, " d_model"]) -> Callable[[Tensor, object], Tensor]:
    """A TransformerLens hook function ``fn(x, hook)`` returning ``x − (x·r̂) r̂`` for a unit vector ``r̂``.

    The projection runs in the activation's dtype and device; ``r̂`` is converted once per
    (device, dtype). Attach it at any ``[batch, pos, d_model]`` hook point, e.g. with
    ``depthlens.runtime.generation.hooks_active``.
    """
    casts: dict = {}

    def ablate(x: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
        key = (x.device, x.dtype)
        if key not in casts:
            casts[key] = unit.to(device=x.device, dtype=x.dtype)
        rh = casts[key]
        return x - (x @ rh).unsqueeze(-1) * rh

    return ablate


def _as_direction(model, direction, normalize: bool) -> Tensor:
    return unit_direction(direction, model.d_model, normalize=normalize)


class _Cast:
    """A vector handed to hooks in each activation's device and dtype (converted once)."""

    def __init__(self, r: Tensor):
        self.r = r
        self._cache: dict = {}

    def like(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self.r.to(device=x.device, dtype=x.dtype)
        return self._cache[key]


def ablation_hooks(model: HookedModel, direction: Float[Tensor, " d_model"]) -> list[Hook]:
    """Hooks that project ``r̂`` out at every layer's resid_pre, attn_out and mlp_out (all positions).

    The direction is normalized here; the projection is computed in the activation's dtype.
    Use with ``depthlens.runtime.generation.hooks_active`` or any ``fwd_hooks=`` argument.

    Example: notebooks/04_refusal_direction_and_wo.ipynb, cell 10.
    """
    ablate = ablation_hook(_as_direction(model, direction, normalize=True))
    return [(hook_name(kind, l), ablate) for l in range(model.n_layers) for kind in ("resid_pre", "attn_out", "mlp_out")]


def addition_hooks(model: HookedModel, direction: Float[Tensor, " d_model"], layer: int, coeff: float = 1.0) -> list[Hook]:
    """A hook adding ``coeff · r`` (raw, not normalized) to ``blocks.{layer}.hook_resid_pre`` at all positions.

    Example: notebooks/04_refusal_direction_and_wo.ipynb, cell 10.
    """
    model.check_layer(layer)
    r = _Cast(_as_direction(model, direction, normalize=False) * float(coeff))

    def add(x: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
        return x + r.like(x)

    return [(hook_name("resid_pre", layer), add)]
