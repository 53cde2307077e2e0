"""Mixed precision and activation checkpointing of the training loop: fp32 master weights, bf16 compute.

The toolkit loads models in bf16 on CUDA (fp32 on CPU). Training a bf16 weight in bf16 loses
every update below half a bf16 ulp (2⁻⁹ of the weight: most of them at lr 1e-5), so the
loop trains as the field does: ``MasterWeights`` upcasts the trained parameters to fp32 for
the run (AdamW's moments follow the parameter's dtype, so they are fp32 too, and so are the
gradients, which DDP therefore sums in fp32), the forward runs under bf16 autocast
(``compute_context``), and at the end the trained weights are cast back to the dtype the
model was loaded in, once, for the cache entry. Under FSDP2 the same fp32 parameters are
sharded and FSDP's ``MixedPrecisionPolicy`` gathers them in bf16 and reduce-scatters the
gradients in fp32 (``finetune.sharding``). A model in fp32 (CPU) trains in fp32 throughout.
LoRA adapters are fp32 already (peft); only the full-fine-tuning weights are upcast.

``checkpoint_blocks`` turns on activation checkpointing per decoder block (transformers'
non-reentrant ``torch.utils.checkpoint`` around each block's ``forward``, inside the module
hooks, so FSDP2's all-gather hooks run once): a block keeps only its input for the backward
pass and recomputes the rest, the same gradients (tested to 1e-6) for about one more forward.

    >>> masters = MasterWeights(params)        # fp32 copies in place of bf16 weights  # a fragment of the training loop  # doctest: +SKIP
    >>> with compute_context(masters.compute_dtype, model.device): loss = ...  # a fragment of the training loop  # doctest: +SKIP
    >>> masters.restore()                      # trained weights back in bf16  # a fragment of the training loop  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

HALF = (torch.bfloat16, torch.float16)


class MasterWeights:
    """fp32 master copies of ``params`` for one run, in place (the parameter objects stay the same).

    ``compute_dtype`` is the half dtype they were loaded in (the forward's autocast dtype),
    or None when every trained parameter was fp32 already (nothing changes then).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.dtypes = [p.dtype for p in self.params]
        halves = {d for d in self.dtypes if d in HALF}
        if len(halves) > 1:
            raise ValueError(f"The trained parameters mix half dtypes {sorted(map(str, halves))}; load the model in one.")
        self.compute_dtype = halves.pop() if halves else None
        with torch.no_grad():
            for p in self.params:
                if p.dtype in HALF:
                    p.data = p.data.float()

    def restore(self) -> None:
        """Cast the (trained) fp32 masters back to the dtype each was loaded in."""
        with torch.no_grad():
            for p, dtype in zip(self.params, self.dtypes):
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)


def compute_context(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` on ``device`` (bf16 compute over fp32 masters); a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def checkpoint_blocks(lm: torch.nn.Module) -> None:
    """Activation checkpointing on every decoder block of the HF causal LM ``lm`` (non-reentrant)."""
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(lm).__name__} does not support activation checkpointing.")
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def uncheckpoint_blocks(lm: torch.nn.Module) -> None:
    """Undo ``checkpoint_blocks``."""
    if hasattr(type(lm), "is_activation_checkpointing"):
        if lm.is_activation_checkpointing:
            lm.activation_checkpointing_disable()
    elif getattr(lm, "is_gradient_checkpointing", False):
        lm.gradient_checkpointing_disable()


def checkpoint_model(model) -> None:
    """Activation checkpointing for one training run of ``model`` (a ``HookedModel``): every block of
    ``model.plain()`` checkpointed and the losses' ``LossPath`` installed without the shared-prefix cache."""
    from finetune.losses import LossPath

    installed = model.__dict__.get("_loss_path")
    view = installed.lm if installed is not None else model.plain()
    checkpoint_blocks(view)
    model.__dict__["_loss_path"] = LossPath(view, share_prefix=False)


def uncheckpoint_model(model) -> None:
    """Undo ``checkpoint_model`` (and remove any installed ``LossPath``)."""
    path = model.__dict__.pop("_loss_path", None)
    uncheckpoint_blocks(path.lm if path is not None else model.plain())
