"""Per-layer perturbations — parameter noise, activation noise, weight quantization — that
restore the model bit for bit.

Used to find the robustness-critical layers (METHODS §5): perturb one layer, measure safety,
restore. Each perturbation is a context manager; ``layer=None`` perturbs every layer (the
whole-model reference).

- ``param_noise``: every weight matrix W of the layer gets ``W += σ ‖W‖_F/√n · z``.
- ``activation_noise``: ``x ← x + σ · rms(x) · z`` on the layer's output
  (``blocks.{l}.hook_resid_post``; rms per token over d_model), also during generation.
- ``quantize``: round-to-nearest, symmetric, per output channel, int8 or int4 (simulated).

Weights are restored from copies of exactly the touched tensors (one layer is small), never by
subtracting the noise again, which is not exact in floating point.

    >>> with perturb(model, "param_noise", layer=3, sigma=0.2, seed=0):
    ...     scores = refusal_score(model, prompts).scores
    >>> with quantize(model, layer=None, bits=4): ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor

from depthlens.models import hook_name

KINDS = ("param_noise", "act_noise", "int8", "int4")


def _layers(model, layer: int | None) -> list[int]:
    return list(range(model.n_layers)) if layer is None else [model.check_layer(layer)]


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
    if not sigma >= 0:
        raise ValueError(f"Noise scale sigma must be >= 0, got {sigma}.")


@contextmanager
def param_noise(model, layer: int | None, sigma: float, seed: int = 0) -> Iterator[None]:
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
        raise ValueError(f"Quantization supports 4 or 8 bits, got {bits}.")
    qmax = 2 ** (bits - 1) - 1
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
    return ((w / scale).round().clamp(-qmax, qmax) * scale).to(weight.dtype)


@contextmanager
def quantize(model, layer: int | None, bits: int) -> Iterator[None]:
    """RTN int8/int4 weights (per output channel) for the matrices of ``layer`` (None: all)."""
    if bits not in (4, 8):
        raise ValueError(f"Quantization supports 4 or 8 bits, got {bits}.")
    params = _matrices(model, _layers(model, layer))
    with _restoring(params), torch.no_grad():
        for _, p in params:
            p.copy_(rtn_quantize(p, bits))
        yield


def activation_noise_hooks(model, layer: int | None, sigma: float, seed: int = 0) -> list[tuple[str, Callable]]:
    """Hooks adding ``σ · rms(x) · z`` to ``hook_resid_post`` of the layer(s); seeded per context."""
    _check_sigma(sigma)
    hooks = []
    for l in _layers(model, layer):
        gen = _generator(seed, f"act{l}", model.device)

        def add_noise(x, hook, gen=gen):
            rms = x.float().pow(2).mean(-1, keepdim=True).sqrt()
            z = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)
            return (x.float() + sigma * rms * z).to(x.dtype)

        hooks.append((hook_name("resid_post", l), add_noise))
    return hooks


@contextmanager
def activation_noise(model, layer: int | None, sigma: float, seed: int = 0) -> Iterator[None]:
    """Activation noise active for every forward (and generation step) inside the block."""
    with model.bridge.hooks(fwd_hooks=activation_noise_hooks(model, layer, sigma, seed)):
        yield


@contextmanager
def perturb(model, kind: str, layer: int | None, sigma: float = 0.0, seed: int = 0) -> Iterator[None]:
    """Dispatch to one perturbation by name: ``param_noise``, ``act_noise``, ``int8``, ``int4``."""
    if kind == "param_noise":
        ctx = param_noise(model, layer, sigma, seed)
    elif kind == "act_noise":
        ctx = activation_noise(model, layer, sigma, seed)
    elif kind in ("int8", "int4"):
        ctx = quantize(model, layer, int(kind[3:]))
    else:
        raise ValueError(f"Unknown perturbation kind {kind!r}; use one of {', '.join(KINDS)}.")
    with ctx:
        yield
