"""FSDP2 for the training loop: ``fully_shard`` on every decoder block and at the root, DCP checkpoints, the gather back.

Under ``torchrun`` / ``accelerate launch`` with ``--fsdp`` (or ``configs/accelerate/fsdp2.yaml``,
which sets ``ACCELERATE_USE_FSDP`` with ``FSDP_VERSION=2``) ``finetune.train.train_sft`` shards
the model with PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``) instead of
all-reducing whole gradients: each rank keeps 1/N of every trained weight (a ``DTensor``
sharded along dim 0), of its gradient and of its AdamW moments; each decoder block's full
weights are all-gathered in the block's pre-forward hook and freed again after it (and
again in the backward pass), the gradients reduce-scattered in its post-backward hook.

The root of the sharding is the losses' ``finetune.losses.LossPath`` around ``model.plain()``:
the one module whose ``forward`` runs everything the losses use, so its pre-forward hook
gathers the embedding, the final norm and the unembedding (the losses used to call the
decoder and the unembedding directly, past any such hook). The reduce-scatter *sums* over
the ranks (``set_gradient_divide_factor(1)``): every rank's loss is its shard's part of the
global step loss (``finetune.train.accumulate_gradients``), so the sum is the one-process
gradient, and N ranks take the same step as one process (tested: max |Δw| ≤ 1e-5 on
tiny-llama). On CUDA the blocks compute in the model's load dtype (bf16) and reduce in fp32
(``MixedPrecisionPolicy``) over fp32 master weights (``finetune.precision``). The shared-prefix
KV cache of the losses is off under sharding (its two decoder calls would all-gather and
reduce each block twice a micro-batch).

Checkpoints go through ``torch.distributed.checkpoint`` (each rank writes its shards of the
weights and of the optimizer state; no rank gathers them), with the step, the losses and the
learning-rate schedule beside them in JSON; a resumed run continues to the same weights
(tested). At the end the full weights are gathered once into the model's own (bridged)
parameters on every rank, and rank 0 writes the standard checkpoint into the cache entry as
after any build. The model is still loaded whole on every rank before it is sharded, and that
copy stays where it was loaded during the run (the loop reads ``model.device`` from it): what
is sharded is the training state (fp32 masters, gradients, AdamW moments).

LoRA (and QLoRA) runs train a few million adapter weights and stay data-parallel
(``configs/accelerate/ddp.yaml``); under ``--fsdp`` they are refused in one sentence.

    >>> run = ShardedRun(model, accelerator, compute_dtype=None)  # a fragment of a torchrun-launched training loop  # doctest: +SKIP
    >>> params = run.shard(params)          # the sharded trainable parameters, for the optimizer  # a fragment of a torchrun-launched training loop  # doctest: +SKIP
    >>> run.finish()                        # full weights back in model.hf  # a fragment of a torchrun-launched training loop  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from depthlens.infra.errors import UsageError

log = logging.getLogger(__name__)


def fsdp_launch() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP``).

    Only FSDP2 is implemented: an FSDP1 config is refused in one sentence.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true"):
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UsageError(f"The launch asks for FSDP version {version}; the training loop implements FSDP2 only: "
                         "set fsdp_version: 2 (configs/accelerate/fsdp2.yaml).")
    return True


def _reshard_after_forward() -> bool:
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("0", "false")


class ShardedRun:
    """One training run's FSDP2 sharding of ``model.plain()`` under its ``LossPath``.

    Args:
        model: the ``HookedModel`` being trained in place.
        accelerator: the run's accelerate ``Accelerator`` (process group, ranks).
        compute_dtype: the dtype the blocks compute and all-gather in (bf16 on CUDA), with
            gradients reduced in fp32; None: the parameters' own dtype throughout.
        checkpointing: activation checkpointing per decoder block (``finetune.precision``).
    """

    def __init__(self, model, accelerator, compute_dtype: torch.dtype | None = None, checkpointing: bool = False):
        self.model, self.accelerator = model, accelerator
        self.compute_dtype, self.checkpointing = compute_dtype, checkpointing
        self.path = None
        self._originals: dict[str, torch.nn.Parameter] = {}

    def shard(self, params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Shard the model (``params`` already marked trainable); return the trainable sharded parameters."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from finetune.losses import LossPath

        trained = {id(p) for p in params}
        view = self.model.plain()
        view.train()
        self._originals = dict(view.named_parameters(remove_duplicate=False))
        if any(id(p) not in trained and p.requires_grad for p in self._originals.values()):
            raise RuntimeError("ShardedRun: a parameter outside the trained set requires gradients.")
        device = self.accelerator.device
        mesh = init_device_mesh(device.type, (self.accelerator.num_processes,))
        mp = (MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
              if self.compute_dtype is not None else MixedPrecisionPolicy())
        if self.checkpointing:
            from finetune.precision import checkpoint_blocks

            checkpoint_blocks(view)
        reshard = _reshard_after_forward()
        for block in view.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        path = LossPath(view, share_prefix=False)
        fully_shard(path, mesh=mesh, mp_policy=mp)
        for module in path.modules():
            if hasattr(module, "set_gradient_divide_factor"):
                module.set_gradient_divide_factor(1.0)   # sum: each rank's loss is its part of the global loss
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
        self.path = path
        self.model.__dict__["_loss_path"] = path
        sharded = [p for p in path.parameters() if p.requires_grad]
        log.info("FSDP2 over %d ranks: %d blocks + root sharded, %d trained tensors", self.accelerator.num_processes,
                 len(view.model.layers), len(sharded))
        return sharded

    def clip_grad_norm_(self, params: Sequence[torch.Tensor], max_norm: float) -> None:
        """Clip the global gradient norm of sharded gradients (a DTensor reduction over the ranks)."""
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The full (gathered) weights on every rank, under ``model.plain()``'s names (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.path, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        return {k.removeprefix("lm."): v for k, v in state.items()}

    def finish(self, done: bool) -> None:
        """Give the model back unsharded: the trained weights (``done``) or the loaded ones, on their device.

        ``done`` is a collective (the gather); after a failure nothing is gathered (a rank may
        be gone) and the model keeps the weights it was loaded with.
        """
        full = self.full_state() if done else {}
        with torch.no_grad():
            for name, p in self._originals.items():
                if name in full:
                    p.copy_(full[name].to(p.device, p.dtype))
                p.requires_grad_(False)
                p.grad = None
        self.model.__dict__.pop("_loss_path", None)
        self.model.__dict__.pop("_plain_view", None)  # the sharded view is spent; the next plain() is a fresh one
        self.path = None


class ShardedCheckpoints:
    """Resumable sharded training state under ``root``: ``step-NNNNNN/`` folders written by ``torch.distributed.checkpoint``.

    Each folder holds DCP's shards of the model and optimizer state (every rank writes its
    own), and ``loop.json`` (step, losses, learning-rate schedule) from rank 0; it counts once
    rank 0 has written ``complete`` after all ranks finished, and older folders are removed
    then, so an interruption at any moment leaves the last complete checkpoint.
    """

    def __init__(self, run: ShardedRun, root: Path, optimizer, scheduler, state):
        self.run, self.root = run, Path(root)
        self.optimizer, self.scheduler, self.state = optimizer, scheduler, state

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / "complete").exists())

    def _barrier(self) -> None:
        self.run.accelerator.wait_for_everyone()

    def _states(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.run.path),
                "optim": get_optimizer_state_dict(self.run.path, self.optimizer)}

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        target = self.root / f"step-{step:06d}"
        self._barrier()
        dcp.save(self._states(), checkpoint_id=str(target / "dcp"))
        if self.run.accelerator.is_main_process:
            loop = {"step": self.state.step, "losses": list(self.state.losses),
                    "scheduler": self.scheduler.state_dict()}
            (target / "loop.json").write_text(json.dumps(loop))
        self._barrier()
        if self.run.accelerator.is_main_process:
            (target / "complete").write_text(str(step))
            for old in self._complete()[:-1]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def load(self) -> bool:
        """Restore the latest complete checkpoint, if any; whether one was found."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        found = self._complete()
        self._barrier()
        if not found:
            return False
        states = self._states()
        load_sharded(states, found[-1] / "dcp")
        set_model_state_dict(self.run.path, states["model"])
        set_optimizer_state_dict(self.run.path, self.optimizer, states["optim"])
        loop = json.loads((found[-1] / "loop.json").read_text())
        self.scheduler.load_state_dict(loop["scheduler"])
        self.state.step, self.state.losses = int(loop["step"]), [float(v) for v in loop["losses"]]
        return True

    def clear(self) -> None:
        """Remove every checkpoint (the run completed)."""
        self._barrier()
        if self.run.accelerator.is_main_process and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        self._barrier()


# What DCP's ``.metadata`` pickle may name: its own metadata classes, torch sizes, dtypes and
# layouts, and paths. Anything else (``os.system``, ``builtins.eval`` …) is refused, because a
# checkpoint folder may sit in a cache other users can write.
_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UsageError(f"{self.path}: a sharded checkpoint's metadata names {module}.{name}, which depthlens never "
                         "writes there; refusing to unpickle it (delete the folder to train from the start).")


def load_sharded(states: dict, folder: Path) -> None:
    """``dcp.load(states, folder)`` without running code from the folder: the metadata is unpickled
    against an allow-list of DCP's own classes and non-tensor values load with ``weights_only=True``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import default_planner as dp
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    def read() -> object:
        path = Path(folder) / ".metadata"
        with open(path, "rb") as f:
            return _MetadataUnpickler(f, path).load()

    read()  # refused here, in one sentence, before DCP would wrap the error in its own

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(dp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                dp.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    dcp.load(states, storage_reader=Reader(str(folder)), planner=Planner())
