"""Interventions on a model: directional ablation, perturbations, divergence, the SPSA engine.

- ``ablation``: directional ablation and activation addition hooks
- ``perturbation``: per-layer perturbations (parameter noise, activation noise, weight quantization)
- ``divergence``: per-position KL divergence between two models on the same sequences
- ``spsa``: MeZO / SPSA, zeroth-order optimisation from forward passes only

It imports the rooms below it, up to `depthlens.runtime`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depthlens.infra.exports import lazy_exports

# every public name of the room, and the module that defines it (imported on first use)
_EXPORTS = {
    "unit_direction": "ablation", "ablation_hook": "ablation", "ablation_hooks": "ablation",
    "addition_hooks": "ablation",
    "param_noise": "perturbation", "rtn_quantize": "perturbation", "quantize": "perturbation",
    "activation_noise_hooks": "perturbation", "activation_noise": "perturbation", "PerturbationKind": "perturbation",
    "PERTURBATIONS": "perturbation", "perturb": "perturbation",
    "PositionKL": "divergence", "per_position_kl": "divergence",
    "Reduce": "spsa", "ZOConfig": "spsa", "ZOStepResult": "spsa", "derive_seed": "spsa",
    "SymmetricPerturbation": "spsa",
    "symmetric_perturbation": "spsa", "spsa_grad_scalar": "spsa", "mezo_step": "spsa", "mezo_train": "spsa",
    "zo_layer_probes": "spsa",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, spelled out for type checkers and editors
    from depthlens.interventions.ablation import unit_direction, ablation_hook, ablation_hooks, addition_hooks
    from depthlens.interventions.perturbation import (
        param_noise, rtn_quantize, quantize, activation_noise_hooks, activation_noise, PerturbationKind,
        PERTURBATIONS, perturb,
    )
    from depthlens.interventions.divergence import PositionKL, per_position_kl
    from depthlens.interventions.spsa import (
        Reduce, ZOConfig, ZOStepResult, derive_seed,
        SymmetricPerturbation, symmetric_perturbation, spsa_grad_scalar, mezo_step, mezo_train, zo_layer_probes,
    )
