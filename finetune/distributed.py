"""The accelerate plumbing of the training loops: the accelerator, the gradient all-reduce, checkpoints.

One process or ``accelerate launch --num_processes N`` (configs in ``configs/accelerate``):
``finetune.train.train_sft`` makes an ``Accelerator`` here, prepares its optimizer and
learning-rate schedule, backpropagates through ``accelerator.backward`` and checkpoints with
``save_loop_state`` / ``load_loop_state`` (JSON and safetensors: nothing is unpickled).

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

    >>> accelerator = accelerator_for(model)  # a fragment of a training loop under accelerate  # doctest: +SKIP
    >>> value = sync_gradients(accelerator, params, value)     # after the step's backward passes  # doctest: +SKIP
"""

from __future__ import annotations

import json
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
    """The loop's own checkpointed state: trained weights, step, losses (saved by ``save_loop_state``).

    Only the trainable tensors are saved (the adapters of a LoRA run), not the whole model.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.step = 0
        self.losses: list[float] = []



class Checkpoints:
    """Resumable training state under ``root``: ``save_loop_state`` into ``step-NNNNNN`` folders.

    A folder counts once rank 0 has written ``complete`` in it, after every rank has saved
    its part (rank 0 the weights, optimizer and schedule, every rank its own RNG state);
    older folders are then removed, so an interruption at any moment leaves the last complete
    checkpoint. Nothing in a folder is unpickled (see ``save_loop_state``): the work folder may
    sit in a cache that other users can write.
    """

    def __init__(self, accelerator, root: Path, optimizer=None, scheduler=None, state: TrainState | None = None):
        self.accelerator, self.root = accelerator, Path(root)
        self.optimizer, self.scheduler, self.state = optimizer, scheduler, state

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / "complete").exists())

    def load(self) -> bool:
        """Restore the latest complete checkpoint, if any; whether one was found and restored."""
        found = self._complete()
        if not found:
            return False
        return load_loop_state(found[-1], self.accelerator, self.optimizer, self.scheduler, self.state)

    def save(self, step: int) -> None:
        acc = self.accelerator
        target = self.root / f"step-{step:06d}"
        acc.wait_for_everyone()
        save_loop_state(target, acc, self.optimizer, self.scheduler, self.state)
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


# ----------------------------------------------------------------------------- the loop's state on disk

LOOP_STATE_FORMAT = 1
_LOOP_JSON, _LOOP_TENSORS = "loop.json", "loop.safetensors"


def save_loop_state(directory: Path, accelerator, optimizer, scheduler, state: TrainState) -> None:
    """Write the loop's resumable state into ``directory`` as JSON and safetensors only (no pickle).

    Rank 0 writes ``loop.safetensors`` (the trained tensors and the optimizer's per-parameter
    tensors) and ``loop.json`` (step, losses, the optimizer's hyper-parameters, the schedule's
    counters, the names of the tensors, a sha256 of the tensor file); every rank writes
    ``rng-<rank>.safetensors`` / ``rng-<rank>.json``. ``load_loop_state`` reads them back.
    """
    import hashlib

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank = accelerator.process_index
    rng_tensors, rng_json = _rng_state()
    save_file(rng_tensors, directory / f"rng-{rank}.safetensors")
    (directory / f"rng-{rank}.json").write_text(json.dumps(rng_json))
    if not accelerator.is_main_process:
        return
    tensors = {f"param.{i}": p.detach().to("cpu").contiguous().clone() for i, p in enumerate(state.params)}
    opt = optimizer.state_dict()
    opt_state: dict[str, dict] = {}
    for index, values in opt["state"].items():
        plain = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"opt.{index}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                plain[name] = value
        opt_state[str(index)] = plain
    save_file(tensors, directory / _LOOP_TENSORS)
    meta = {"format": LOOP_STATE_FORMAT, "step": int(state.step), "losses": [float(x) for x in state.losses],
            "n_params": len(state.params), "tensors": sorted(tensors),
            "tensors_sha256": hashlib.sha256((directory / _LOOP_TENSORS).read_bytes()).hexdigest(),
            "optimizer": {"param_groups": opt["param_groups"], "state": opt_state},
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}}
    (directory / _LOOP_JSON).write_text(json.dumps(meta))


def load_loop_state(directory: Path, accelerator, optimizer, scheduler, state: TrainState) -> bool:
    """Restore what ``save_loop_state`` wrote; False (with a warning) for a folder it cannot trust.

    Only ``loop.json``, ``loop.safetensors`` and ``rng-<rank>.*`` are read, with ``json`` and
    ``safetensors``: a pickle file in the folder (``*.pkl``, ``*.bin``: what ``accelerate
    save_state`` writes, or what someone else put there) is never opened. A folder without
    ``loop.json``, of another format, whose tensor file does not match the sha256 recorded
    beside it, or that holds another number of trained tensors is not loaded, and the
    training starts over from step 0.
    """
    import hashlib

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)

    def refuse(why: str) -> bool:
        log.warning("Not resuming from %s: %s; training starts from step 0.", directory, why)
        return False

    try:
        meta = json.loads((directory / _LOOP_JSON).read_text())
    except FileNotFoundError:
        return refuse(f"it holds no {_LOOP_JSON} (a checkpoint of an older depthlens, written with pickle, "
                      "which is never loaded)")
    except (OSError, ValueError) as err:
        return refuse(f"{_LOOP_JSON} cannot be read ({err})")
    if not isinstance(meta, dict) or meta.get("format") != LOOP_STATE_FORMAT:
        return refuse(f"{_LOOP_JSON} is not format {LOOP_STATE_FORMAT}")
    if meta.get("n_params") != len(state.params):
        return refuse(f"it holds {meta.get('n_params')} trained tensors and this run trains {len(state.params)}")
    path = directory / _LOOP_TENSORS
    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() != meta.get("tensors_sha256"):
            return refuse(f"{_LOOP_TENSORS} does not match the sha256 in {_LOOP_JSON}")
        tensors = load_file(path)
        rank = accelerator.process_index
        rng_tensors = load_file(directory / f"rng-{rank}.safetensors")
        rng_json = json.loads((directory / f"rng-{rank}.json").read_text())
    except (OSError, ValueError, SafetensorError) as err:
        return refuse(f"a state file cannot be read ({err})")
    try:
        opt_meta = meta["optimizer"]
        opt_state: dict[int, dict] = {int(i): dict(v) for i, v in opt_meta["state"].items()}
        for key, value in tensors.items():
            kind, index, *name = key.split(".", 2)
            if kind == "opt":
                opt_state.setdefault(int(index), {})[name[0]] = value
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in opt_meta["param_groups"]]
        params = [tensors[f"param.{i}"] for i in range(len(state.params))]
        if any(s.shape != p.shape for s, p in zip(params, state.params)):
            return refuse("its trained tensors have other shapes than this run's")
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(groups)})
        _set_rng_state(rng_tensors, rng_json)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        return refuse(f"its state does not fit this run ({type(err).__name__}: {err})")
    with torch.no_grad():
        for p, saved in zip(state.params, params):
            p.copy_(saved)
    state.step, state.losses = int(meta["step"]), [float(x) for x in meta["losses"]]
    return True


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    import random

    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, t in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = t
    version, ints, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(ints), gauss],
                     "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict[str, torch.Tensor], values: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, ints, gauss = values["python"]
    random.setstate((int(version), tuple(int(i) for i in ints), gauss))
    name, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
