"""The accelerate plumbing of the training loops: the accelerator, the gradient all-reduce, checkpoints.

One process or ``accelerate launch --num_processes N`` (configs in ``configs/accelerate``):
``finetune.train.train_sft`` makes an ``Accelerator`` here, prepares its optimizer and
learning-rate schedule, backpropagates through ``accelerator.backward`` and checkpoints with
``save_state`` / ``load_state``.

**Why the gradients are all-reduced here and not by DistributedDataParallel.** DDP's reducer
averages gradients from autograd hooks that its wrapper's ``forward`` arms, and it keeps a
second, gradient-sized set of buckets. The recipes' losses never call the model's
``forward``: ``finetune.losses.response_logits`` runs the decoder of ``model.plain()`` directly
(with a shared-prefix KV cache) and unembeds only the response positions. So the model is not
wrapped; instead ``sync_gradients`` sums every trainable gradient over the ranks once per
optimizer step, in buckets of ``BUCKET_BYTES``, through ``accelerator.reduce``. This is exact,
not an approximation: each rank's loss is its shard's contribution to the *global* step loss
(every mean divided by the step's global token or example count, see
``finetune.train.accumulate_gradients``), so the sum of the ranks' gradients is the gradient of
the global step loss, which is what one process computes; after the all-reduce every rank
holds the same gradient and takes the same AdamW step. Gradient clipping then sees the global
gradient too.

FSDP. Sharded runs (``--fsdp``, or ``configs/accelerate/fsdp2.yaml``) do not go through
accelerate's own FSDP wrapping: ``finetune.sharding`` applies FSDP2 itself, to the losses'
``LossPath``, and uses the accelerator here only for the ranks and the process group
(an FSDP launch's variables are hidden from ``Accelerator`` so that it does not wrap or
cast anything). DeepSpeed and Megatron launches are refused in one sentence.

    >>> accelerator = accelerator_for(model)
    >>> value = sync_gradients(accelerator, params, value)     # after the step's backward passes
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUCKET_BYTES = 32 << 20


def accelerator_for(model):
    """An ``Accelerator`` for training ``model`` in place (the model stays where it is: no device placement).

    ``split_batches``: the recipes' ``batch_size`` is the global batch, so the prepared
    schedule steps once per optimizer step whatever the number of processes. Mixed precision
    is the loop's own (``finetune.precision``: fp32 masters and bf16 autocast on CUDA, fp32
    on CPU), not accelerate's (a launch's ``--mixed_precision`` is overridden).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    check_launch()
    hidden = {k: os.environ.pop(k) for k in ("ACCELERATE_USE_FSDP",) if k in os.environ}
    try:  # finetune.sharding shards the model itself: accelerate must not see the FSDP launch
        accelerator = Accelerator(cpu=model.device.type == "cpu", device_placement=False, mixed_precision="no",
                                  dataloader_config=DataLoaderConfiguration(split_batches=True),
                                  step_scheduler_with_optimizer=True)
    finally:
        os.environ.update(hidden)
    check_supported(accelerator, model)
    return accelerator


def check_launch() -> None:
    """Refuse, in one sentence, a launch engine this loop does not implement (DeepSpeed, Megatron-LM)."""
    for engine in ("DEEPSPEED", "MEGATRON_LM"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true"):
            raise NotImplementedError(
                f"The training loop shards with FSDP2 (configs/accelerate/fsdp2.yaml) or runs data-parallel "
                f"(configs/accelerate/ddp.yaml) and got a {engine} launch, which it does not implement.")


def check_supported(accelerator, model) -> None:
    """Refuse, in one sentence each, the launch set-ups this loop does not implement."""
    want, have = accelerator.device, model.device
    if accelerator.num_processes > 1 and (want.type != have.type or (want.type != "cpu" and want.index != have.index)):
        raise RuntimeError(f"Rank {accelerator.process_index} trains a model on {model.device} but accelerate gave it "
                           f"{want}; load the model on accelerator.device (build_or_load does under a launch).")


def sync_gradients(accelerator, params: Sequence[torch.Tensor], value: float) -> float:
    """Sum the ranks' ``.grad`` of ``params`` in place, bucket by bucket, and their loss parts; one process: no-op.

    Returns the summed loss value (the global step loss). A rank whose shard of the step was
    empty contributes zero gradients.
    """
    if accelerator.num_processes == 1:
        return value
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads, BUCKET_BYTES):
        flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in bucket]), reduction="sum")
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return sum_value(accelerator, value)


def sum_value(accelerator, value: float) -> float:
    """The sum over the ranks of each rank's part of a step's loss (one process: ``value``)."""
    if accelerator.num_processes == 1:
        return value
    total = accelerator.reduce(torch.tensor([value], dtype=torch.float64, device=accelerator.device), reduction="sum")
    return float(total[0])


def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each at most ``limit`` bytes (or one tensor)."""
    run: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if run and (size + nbytes > limit or t.dtype != run[0].dtype or t.device != run[0].device):
            yield run
            run, size = [], 0
        run.append(t)
        size += nbytes
    if run:
        yield run


class TrainState:
    """The loop's own checkpointed state (``accelerator.register_for_checkpointing``): trained weights, step, losses.

    Only the trainable tensors are saved (the adapters of a LoRA run), not the whole model;
    the optimizer and schedule are saved by accelerate itself.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict:
        return {"params": [p.detach().cpu() for p in self.params], "step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["params"]) != len(self.params):
            raise ValueError(f"The checkpoint holds {len(state['params'])} trained tensors, this run trains "
                             f"{len(self.params)}; delete it to start over.")
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        self.step, self.losses = int(state["step"]), list(state["losses"])


class Checkpoints:
    """Resumable training state under ``root``: ``accelerator.save_state`` into ``step-NNNNNN`` folders.

    A folder counts once rank 0 has written ``complete`` in it, after every rank has saved
    its part (accelerate writes the optimizer and registered state from rank 0 and one RNG
    file per rank); older folders are then removed, so an interruption at any moment leaves
    the last complete checkpoint.
    """

    def __init__(self, accelerator, root: Path):
        self.accelerator, self.root = accelerator, Path(root)

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / "complete").exists())

    def load(self) -> bool:
        """Restore the latest complete checkpoint, if any; whether one was found."""
        found = self._complete()
        if not found:
            return False
        self.accelerator.load_state(str(found[-1]))
        return True

    def save(self, step: int) -> None:
        acc = self.accelerator
        target = self.root / f"step-{step:06d}"
        acc.wait_for_everyone()
        acc.save_state(str(target))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (target / "complete").write_text(str(step))
            for old in self._complete()[:-1]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def clear(self) -> None:
        """Remove every checkpoint (the run completed)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
