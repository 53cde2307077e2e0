"""Interventions on a model: directional ablation, perturbations, divergence, the SPSA engine.

- ``ablation``: directional ablation and activation addition hooks
- ``perturbation``: per-layer perturbations (parameter noise, activation noise, weight quantization)
- ``divergence``: per-position KL divergence between two models on the same sequences
- ``spsa``: MeZO / SPSA, zeroth-order optimisation from forward passes only

It imports the rooms below it, up to `depthlens.runtime`.
"""

from __future__ import annotations

from depthlens.interventions.ablation import unit_direction, ablation_hook, ablation_hooks, addition_hooks
from depthlens.interventions.perturbation import (
    param_noise, rtn_quantize, quantize, activation_noise_hooks, activation_noise, PerturbationKind, PERTURBATIONS,
    perturb,
)
from depthlens.interventions.divergence import PositionKL, per_position_kl
from depthlens.interventions.spsa import (
    Reduce, ZOConfig, ZOStepResult, derive_seed, perturbation_direction, perturb_inplace, SymmetricPerturbation,
    symmetric_perturbation, spsa_grad_scalar, mezo_step, mezo_train, zo_layer_probes,
)

__all__ = [
    "unit_direction",
    "ablation_hook",
    "ablation_hooks",
    "addition_hooks",
    "param_noise",
    "rtn_quantize",
    "quantize",
    "activation_noise_hooks",
    "activation_noise",
    "PerturbationKind",
    "PERTURBATIONS",
    "perturb",
    "PositionKL",
    "per_position_kl",
    "Reduce",
    "ZOConfig",
    "ZOStepResult",
    "derive_seed",
    "perturbation_direction",
    "perturb_inplace",
    "SymmetricPerturbation",
    "symmetric_perturbation",
    "spsa_grad_scalar",
    "mezo_step",
    "mezo_train",
    "zo_layer_probes",
]
