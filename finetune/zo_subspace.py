"""What the ``zo`` recipe perturbs: the weight matrices, LoRA adapters or the norm gains of its layers.

SPSA's estimate of the gradient gets noisier with the number of coordinates moved (its
variance grows with the dimension), so MeZO at a small budget works best in a small
subspace (Malladi et al. 2023, docs/methods.md §5). Three subspaces of the chosen layers:

- ``full``: every weight matrix (attention and MLP projections); the recipe's original path.
- ``lora``: peft LoRA adapters ``W + (α/r)·B·A`` of rank r on the layers' linear maps
  (``finetune.lora``; A random from the seed, B = 0), only A and B perturbed and updated.
  They are injected into ``model.plain()``, the module tree the objective runs on; when the
  build ends they are merged into the weights (the cache entry is a standard checkpoint) and
  saved beside it in ``adapter/``, or removed unmerged if the build did not complete.
- ``norms``: the RMSNorm / LayerNorm gains of the layers (a few thousand numbers).

In every subspace the perturbation z is regenerated from the step seed (``depthlens.interventions.spsa``),
so nothing the size of the subspace is stored and memory stays at inference memory.

    >>> sub = open_subspace(model, "lora", [11, 15], LoraSettings(rank=8), seed=0)  # a fragment: model, objective and workdir come from the recipe  # doctest: +SKIP
    >>> mezo_train(sub.params, objective, cfg)  # doctest: +SKIP
    >>> sub.finish(done=True, adapter_dir=workdir / "adapter")    # merged into the weights  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch
from torch import Tensor

from finetune import lora
from finetune.lora import LoraSettings

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

SUBSPACES = ("full", "lora", "norms")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Subspace:
    """The tensors one zo build perturbs, grouped by layer (in the order the engine sees them).

    Attributes:
        kind: full, lora or norms.
        by_layer: layer → its perturbed tensors.
        peft_model: the peft wrapper holding the adapters (lora only).
    """

    kind: str
    by_layer: dict[int, list[Tensor]]
    peft_model: Any = field(default=None, repr=False)

    @property
    def params(self) -> list[Tensor]:
        """Every perturbed tensor, layer by layer."""
        return [p for l in self.by_layer for p in self.by_layer[l]]

    @property
    def n_weights(self) -> int:
        return sum(p.numel() for p in self.params)

    def finish(self, done: bool, adapter_dir: Path | None = None) -> None:
        """End the build: a completed LoRA build saves its adapter in ``adapter_dir`` and merges it
        into the weights; an interrupted one removes the adapters unmerged. No-op for full and norms."""
        if self.peft_model is None:
            return
        if done and adapter_dir is not None:
            lora.save_adapter(self.peft_model, adapter_dir)
        (lora.merge if done else lora.detach)(self.peft_model)
        self.peft_model = None


def matrices(model: HookedModel, layer: int) -> list[Tensor]:
    """The weight matrices of ``layer`` (attention and MLP projections)."""
    return [p for p in model.layer_parameters(layer).values() if p.ndim >= 2]


def norm_gains(model: HookedModel, layer: int) -> list[Tensor]:
    """The gains of ``layer``'s RMSNorm / LayerNorm modules (their 1-D ``weight``s)."""
    return [p for n, p in model.layer_parameters(layer).items() if p.ndim == 1 and "norm" in n.lower()
            and n.endswith("weight")]


def fp32_masters(model: HookedModel, params: list[Tensor]) -> bool:
    """On CUDA (bf16 autocast) keep the refined tensors in float32 so that small updates are not lost."""
    if model.device.type != "cuda" or all(p.dtype == torch.float32 for p in params):
        if any(p.dtype != torch.float32 for p in params):
            log.warning("Zeroth-order updates on %s weights off CUDA: steps below half an ulp are lost.", params[0].dtype)
        return False
    for p in params:
        p.data = p.data.float()
    return True


def open_subspace(model, kind: str, layers: Sequence[int], lora_settings: LoraSettings | None = None,
                  seed: int = 0) -> Subspace:
    """The subspace ``kind`` of ``layers`` of ``model``; for ``lora`` the adapters are injected now
    (A drawn from ``seed``, the same on every rank)."""
    if kind not in SUBSPACES:
        raise ValueError(f"subspace must be one of {SUBSPACES}, got {kind!r}.")
    layers = list(layers)
    if kind == "full":
        by_layer = {l: matrices(model, l) for l in layers}
    elif kind == "norms":
        by_layer = {l: norm_gains(model, l) for l in layers}
    else:
        settings = lora_settings or LoraSettings(rank=8)
        peft_model = lora.attach(model, settings, seed, layers)
        by_layer = {l: [] for l in layers}
        for name, p in peft_model.named_parameters():
            m = _LAYER.search(name)
            if "lora_" in name and m and int(m.group(1)) in by_layer:
                by_layer[int(m.group(1))].append(p)
        sub = Subspace(kind, by_layer, peft_model)
        if not sub.params:
            sub.finish(done=False)
            raise ValueError(f"The LoRA settings {lora_settings} adapt nothing in layers {layers}.")
        return sub
    empty = [l for l, ps in by_layer.items() if not ps]
    if empty:
        what = "weight matrices" if kind == "full" else "norm gains"
        raise ValueError(f"Layers {empty} have no {what} to refine (subspace {kind!r}).")
    return Subspace(kind, by_layer)
