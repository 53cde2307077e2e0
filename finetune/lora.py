"""LoRA for the first-order recipes, through peft: adapters on the loss path, merged back when done.

``finetune.train.train_sft`` trains LoRA adapters instead of the full weights when its
``TrainConfig.lora`` is set (``--lora-rank r`` on every first-order recipe CLI). The adapters
are injected into ``model.plain()``, the unbridged module tree the losses run on
(``finetune.losses.response_logits``), which shares its weight tensors with the bridge; the
bridge itself is never touched. After the last step ``merge`` adds ``(α/r)·B·A`` into those
shared weights and removes the adapter modules, so the recipe's cache entry is a standard
Hugging Face checkpoint (every weight that was not adapted is bit-identical to the parent's,
tested) and everything downstream — directions, weight orthogonalization, the analyses —
loads it like any other model. The adapter itself (peft's ``adapter_config.json`` +
``adapter_model.safetensors``) is kept beside the entry, in its ``adapter/`` folder.

On CUDA (bf16 weights) peft keeps the adapter weights in float32 and casts the merged update
to bf16 once, at the merge.

    >>> train_sft(model, examples, TrainConfig(lora=LoraSettings(rank=16)), workdir)  # a fragment: model, examples, parent and entry come from the recipe  # doctest: +SKIP
    >>> PeftModel.from_pretrained(parent.plain(), entry / "adapter")   # the adapter alone  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters ``W + (α/r)·B·A`` on the linear maps of the blocks (A random, B = 0 at the start).

    Args:
        rank: r, the rank of each adapter (≥ 1).
        alpha: α; None: α = 2r, so the update scale α/r is 2 whatever the rank.
        targets: names of the adapted linear maps (``q_proj``, ``down_proj`` …); empty: every
            linear map of the blocks (peft's ``all-linear``, which leaves the unembedding out).
    """

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"The LoRA rank must be an integer >= 1, got {self.rank!r}.")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"The LoRA alpha must be positive (or None for 2·rank), got {self.alpha!r}.")
        if any(not isinstance(t, str) or not t for t in self.targets):
            raise ValueError(f"The LoRA targets must be module names such as q_proj, got {self.targets!r}.")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else 2.0 * self.rank) / self.rank


def linear_names(model, layers: Sequence[int]) -> tuple[str, ...]:
    """The names of the linear maps in ``layers`` (``q_proj``, ``down_proj`` …), in module order."""
    blocks = model.plain().model.layers
    names = [name.rpartition(".")[2] for l in layers for name, mod in blocks[l].named_modules()
             if isinstance(mod, torch.nn.Linear)]
    return tuple(dict.fromkeys(names))


def attach(model, settings: LoraSettings, seed: int, layers: Sequence[int] | None = None, module=None):
    """Inject fresh adapters into ``model.plain()`` (or ``module``, e.g. QLoRA's 4-bit tree; A drawn from
    ``seed``); return the peft model.

    Every rank of a distributed run draws the same A from the same seed. The global torch RNG
    is left as it was.
    """
    from peft import LoraConfig, get_peft_model

    view = model.plain() if module is None else module
    targets = list(settings.targets)
    if not targets and layers is not None:  # peft refuses "all-linear" with a layer list: name the layers' linear maps
        targets = list(linear_names(model, layers))
    config = LoraConfig(r=settings.rank, lora_alpha=settings.scale * settings.rank, lora_dropout=0.0, bias="none",
                        target_modules=targets or "all-linear",
                        layers_to_transform=list(layers) if layers is not None else None)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(view, config)
        except ValueError as err:  # peft: "Target modules {...} not found in the base model"
            raise ValueError(f"LoRA targets {list(settings.targets)} do not name linear maps of {model.spec}: {err}") from None
    n = sum(p.numel() for p in parameters(peft_model))
    log.info("LoRA r=%d α=%g on %s: %d trainable weights", settings.rank, settings.scale * settings.rank,
             config.target_modules, n)
    return peft_model


def parameters(peft_model) -> list[torch.nn.Parameter]:
    """The adapter weights (the only trainable parameters of a LoRA run)."""
    return [p for n, p in peft_model.named_parameters() if "lora_" in n]


def merge(peft_model) -> None:
    """Add every adapter's update into the weights it adapts (shared with the bridge) and remove the adapters."""
    peft_model.merge_and_unload()


def detach(peft_model) -> None:
    """Remove the adapters without merging them (an interrupted run leaves the weights as they were)."""
    peft_model.unload()


def save_adapter(peft_model, path: str | Path) -> Path:
    """peft's adapter files (``adapter_config.json``, ``adapter_model.safetensors``) in ``path``."""
    path = Path(path)
    peft_model.save_pretrained(str(path))
    return path
