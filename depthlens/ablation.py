"""Directional ablation: remove one direction's component from activations, ``x ← x − (x·r̂) r̂``.

Arditi et al. (2024) bypass refusal by projecting the refusal direction out of the residual
stream; layer-ablation analyses project it out at one layer. Both use the hook made here, so
the projection, its normalization and its checks are written once (``probes.orthogonalize``
folds the same projection into the weights).

    >>> import torch
    >>> r = unit_direction(torch.tensor([3.0, 4.0]), d_model=2)
    >>> ablate = ablation_hook(r)
    >>> ablate(torch.tensor([[[3.0, 4.0], [4.0, -3.0]]]), None)   # along r: removed; orthogonal: kept
    tensor([[[ 0.,  0.],
             [ 4., -3.]]])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from depthlens.errors import UsageError


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
    ``depthlens.generate.hooks_active``.
    """
    casts: dict = {}

    def ablate(x: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
        key = (x.device, x.dtype)
        if key not in casts:
            casts[key] = unit.to(device=x.device, dtype=x.dtype)
        rh = casts[key]
        return x - (x @ rh).unsqueeze(-1) * rh

    return ablate
