"""Per-layer perturbations — parameter noise, activation noise, weight quantization — that
restore the model bit for bit.

Used to find the robustness-critical layers (docs/methods.md §5): perturb one layer, measure safety,
restore. Each perturbation is a context manager; ``layer=None`` perturbs every layer (the
whole-model reference).

- ``param_noise``: every weight matrix W of the layer gets ``W += σ ‖W‖_F/√n · z``.
- ``activation_noise``: ``x ← x + σ · s(x) · z`` on the layer's output
  (``blocks.{l}.hook_resid_post``), also during generation and on the hook-free view
  ``model.plain()`` that ``depthlens.runtime.forward.forward_from_layer`` runs. The scale s(x) is per
  token, by default the robust one, ``1.4826 · median_c |x_c|`` over the d_model channels
  (``scale="robust"``: the RMS of a Gaussian stream, blind to a few massive-activation
  channels, so the same σ is the same disturbance of the ordinary channels in every family;
  docs/methods.md §5.1); ``scale="rms"`` is the per-token RMS, which a family with massive
  activations (Gemma) inflates many times over. Kind ``act_noise_rms`` keeps the RMS scale.
- ``quantize``: round-to-nearest, symmetric, per output channel, int8 or int4 (simulated).

Weights are restored from copies of exactly the touched tensors (one layer is small), never by
subtracting the noise again, which is not exact in floating point. ``PERTURBATIONS`` names the
kinds for a uniform sweep (``perturb(model, kind, layer, sigma, seed)``); quantization is
deterministic and ignores ``sigma`` and ``seed``.

Cost: a perturbation of layer l leaves every earlier layer unchanged, so a sweep can cache
``blocks.{l}.hook_resid_pre`` once and re-run the model from layer l only
(``depthlens.runtime.forward.forward_from_layer``), and one seed suffices for int8/int4.

    >>> import torch
    >>> from depthlens.runtime.forward import last_logprobs
    >>> from depthlens.models.load import load_model
    >>> model = load_model("tiny-llama")
    >>> seqs = [[1, 5, 9, 13]]
    >>> clean = last_logprobs(model, seqs)
    >>> with perturb(model, "param_noise", layer=1, sigma=0.2, seed=0):
    ...     noisy = last_logprobs(model, seqs)
    >>> bool((noisy - clean).abs().max() > 0), bool(torch.equal(last_logprobs(model, seqs), clean))  # restored
    (True, True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from depthlens.infra.errors import UsageError
from depthlens.models.hooked_model import hook_name

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel


def _layers(model, layer: int | Sequence[int] | None) -> list[int]:
    """Every layer for None, else the given layer or layers (checked)."""
    if layer is None:
        return list(range(model.n_layers))
    return [model.check_layer(l) for l in (layer if isinstance(layer, Sequence) else [layer])]


def _matrices(model, layers: list[int]) -> list[tuple[str, torch.nn.Parameter]]:
    """Weight matrices (2-D parameters) of the given blocks, with stable names."""
    return [(f"{l}.{n}", p) for l in layers for n, p in model.layer_parameters(l).items() if p.ndim == 2]


def _generator(seed: int, name: str, device) -> torch.Generator:
    digest = int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:8], "little")
    gen = torch.Generator(device=device)
    gen.manual_seed(digest)
    return gen


@contextmanager
def _restoring(params: list[tuple[str, torch.nn.Parameter]]) -> Iterator[None]:
    saved = [p.detach().clone() for _, p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for (_, p), s in zip(params, saved):
                p.copy_(s)


def _check_sigma(sigma: float) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise UsageError(f"Noise scale sigma must be >= 0 and finite, got {sigma!r}.")


@contextmanager
def param_noise(model: HookedModel, layer: int | None, sigma: float, seed: int = 0) -> Iterator[None]:
    """Gaussian noise ``σ‖W‖_F/√n · z`` on every weight matrix of ``layer`` (None: all layers)."""
    _check_sigma(sigma)
    params = _matrices(model, _layers(model, layer))
    with _restoring(params), torch.no_grad():
        for name, p in params:
            z = torch.randn(p.shape, generator=_generator(seed, name, p.device), device=p.device, dtype=torch.float32)
            scale = sigma * p.float().norm() / p.numel() ** 0.5
            p.add_((scale * z).to(p.dtype))
        yield


def rtn_quantize(weight: Float[Tensor, "out inp"], bits: int) -> Float[Tensor, "out inp"]:
    """Round-to-nearest symmetric quantization per output channel (row), de-quantized back."""
    if bits not in (4, 8):
        raise UsageError(f"Quantization supports 4 or 8 bits, got {bits}.")
    if weight.ndim != 2:
        raise UsageError(f"rtn_quantize expects a 2-D [out, in] weight matrix, got shape {tuple(weight.shape)}.")
    qmax = 2 ** (bits - 1) - 1
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
    return ((w / scale).round().clamp(-qmax, qmax) * scale).to(weight.dtype)


@contextmanager
def quantize(model: HookedModel, layer: int | None, bits: int) -> Iterator[None]:
    """RTN int8/int4 weights (per output channel) for the matrices of ``layer`` (None: all)."""
    if bits not in (4, 8):
        raise UsageError(f"Quantization supports 4 or 8 bits, got {bits}.")
    params = _matrices(model, _layers(model, layer))
    with _restoring(params), torch.no_grad():
        for _, p in params:
            p.copy_(rtn_quantize(p, bits))
        yield


ACT_SCALES = ("robust", "rms")
_MAD_TO_SD = 1.482602218505602  # 1 / Φ⁻¹(3/4): median |x| of N(0, σ²) is σ / 1.4826


def activation_scale(x: Float[Tensor, "... d_model"], scale: str = "robust") -> Float[Tensor, "... 1"]:
    """The per-token scale activation noise is relative to: ``1.4826 · median_c |x_c|`` or the RMS."""
    if scale == "robust":
        return _MAD_TO_SD * x.float().abs().median(dim=-1, keepdim=True).values
    if scale == "rms":
        return x.float().pow(2).mean(-1, keepdim=True).sqrt()
    raise UsageError(f"Unknown activation-noise scale {scale!r}; use one of {', '.join(ACT_SCALES)}.")


def activation_noise_hooks(model: HookedModel, layer: int | Sequence[int] | None, sigma: float,
                           seed: int = 0, scale: str = "robust") -> list[tuple[str, Callable]]:
    """Hooks adding ``σ · s(x) · z`` to ``hook_resid_post`` of the layer(s) (``activation_scale``); seeded per context."""
    _check_sigma(sigma)
    if scale not in ACT_SCALES:
        raise UsageError(f"Unknown activation-noise scale {scale!r}; use one of {', '.join(ACT_SCALES)}.")
    hooks = []
    for l in _layers(model, layer):
        gen = _generator(seed, f"act{l}", model.device)

        def add_noise(x, hook, gen=gen):
            s = activation_scale(x, scale)
            z = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)
            return (x.float() + sigma * s * z).to(x.dtype)

        hooks.append((hook_name("resid_post", l), add_noise))
    return hooks


@contextmanager
def activation_noise(model: HookedModel, layer: int | Sequence[int] | None, sigma: float, seed: int = 0,
                     scale: str = "robust") -> Iterator[None]:
    """Activation noise active for every forward (and generation step) inside the block."""
    from depthlens.runtime import mirrored_hooks

    # on the bridge and on the hook-free view (forward_from_layer, generate's KV-cache path) alike
    with mirrored_hooks(model, activation_noise_hooks(model, layer, sigma, seed, scale)):
        yield


@dataclass(frozen=True)
class PerturbationKind:
    """One entry of ``PERTURBATIONS``.

    Attributes:
        name: the registry key.
        apply: ``apply(model, layer, sigma, seed)`` → a context manager that perturbs and restores.
        target: "weights" or "activations" (what is changed).
        stochastic: whether the seed matters (int8/int4 are deterministic: one seed suffices).
        uses_sigma: whether ``sigma`` sets the strength.
    """

    name: str
    apply: Callable[..., AbstractContextManager]
    target: str
    stochastic: bool
    uses_sigma: bool


PERTURBATIONS: dict[str, PerturbationKind] = {
    "param_noise": PerturbationKind("param_noise", param_noise, "weights", True, True),
    "act_noise": PerturbationKind("act_noise", activation_noise, "activations", True, True),
    "act_noise_rms": PerturbationKind("act_noise_rms", lambda model, layer, sigma, seed: activation_noise(
        model, layer, sigma, seed, scale="rms"), "activations", True, True),
    "int8": PerturbationKind("int8", lambda model, layer, sigma, seed: quantize(model, layer, 8), "weights", False, False),
    "int4": PerturbationKind("int4", lambda model, layer, sigma, seed: quantize(model, layer, 4), "weights", False, False),
}
KINDS = tuple(PERTURBATIONS)


@contextmanager
def perturb(model: HookedModel, kind: str, layer: int | None, sigma: float = 0.0, seed: int = 0) -> Iterator[None]:
    """Dispatch to one perturbation by name: ``param_noise``, ``act_noise``, ``act_noise_rms``, ``int8``, ``int4``."""
    if kind not in PERTURBATIONS:
        raise UsageError(f"Unknown perturbation kind {kind!r}; use one of {', '.join(KINDS)}.")
    _check_sigma(sigma)
    if layer is not None:
        model.check_layer(layer)
    with PERTURBATIONS[kind].apply(model, layer, sigma, seed):
        yield
