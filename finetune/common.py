"""Plumbing shared by the fine-tuning recipes: build on any spec, cache keys, cached examples, CLI.

Every recipe runs on the model ``depthlens.models.recipes.build_or_load`` hands it: CUDA in bf16
when a GPU is present (``finetune.train.train_sft`` then trains fp32 master weights under bf16
autocast, ``finetune.precision``), CPU in fp32 otherwise;
seeded by its config; with a progress bar; cached by the hash of its parent and config; and
resumable (its training state and the examples it built are kept in the recipe's
``workdir`` until the step completes).

Scale. Every first-order recipe config inherits ``TrainScale``: ``--max-steps``,
``--lora-rank`` (with ``--lora-alpha``, ``--lora-targets``, ``--load-in-4bit`` for QLoRA),
``--micro-batch-size``, ``--fsdp`` (FSDP2, ``configs/accelerate/fsdp2.yaml``) and
``--grad-checkpointing`` on every recipe CLI, in the cache key only when set and only those
that change the update (``config_key``). The same command runs in one
process or under ``accelerate launch --num_processes N`` (DDP, ``configs/accelerate/ddp.yaml``):
``finetune.train`` shards each global batch over the ranks and sums their gradients, rank 0
makes the examples (``cached_examples``) and writes the cache entry while the other ranks wait
and then load it (``depthlens.models.recipes.build_or_load``). The ``zo`` recipe shards its batches
likewise and all-reduces only the two losses of each MeZO step (``depthlens.interventions.spsa``). Memory per
parameter and what fits where: docs/scaling.md.

    >>> model = build_on("smollm2-135m-instruct:sft", DeepRecipe(DeepConfig(alpha=0.3)))  # builds the real organism's deep recipe  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from depthlens.infra.results import atomic_write_json
from finetune.lora import LoraSettings
from finetune.train import Example

log = logging.getLogger(__name__)


def build_on(spec: str, recipe, device=None, dtype=None):
    """Apply ``recipe`` (an object) on top of ``spec`` (which may carry recipe suffixes), cached."""
    from depthlens.models.base import split_spec
    from depthlens.models.recipes import build_or_load

    base, names = split_spec(spec)
    return build_or_load(base, [*names, recipe], device=device, dtype=dtype)


@dataclass(frozen=True, kw_only=True)
class TrainScale:
    """Scale settings of every first-order recipe config (inherited; keyword-only).

    Args:
        max_steps: stop after this many optimizer steps (0: every step of the recipe).
        lora_rank: train LoRA adapters of this rank instead of the weights; the cache entry
            is the merged checkpoint, the adapter is kept beside it (0: full fine-tuning).
        lora_alpha: LoRA α, the update being (α/r)·B·A (default: 2·rank).
        lora_targets: linear maps to adapt, e.g. q_proj,v_proj (default: every linear map of the blocks).
        micro_batch_size: at most this many sequences per forward pass on a process (0: no
            cap). It changes memory, not the update, so it is not part of the cache key.
        fsdp: shard the weights, gradients and optimizer state over the processes of a
            launch with FSDP2 (``finetune.sharding``; an FSDP2 launch config sets it too). The
            same update: not part of the cache key.
        grad_checkpointing: recompute each decoder block's activations in the backward pass
            (memory for compute; the same gradients): not part of the cache key.
        load_in_4bit: QLoRA: train the LoRA adapters over an NF4 (bitsandbytes) copy of the
            blocks' linear maps; the cache entry is the merged checkpoint in the parent's dtype
            (needs lora_rank >= 1; part of the cache key when set).
    """

    max_steps: int = 0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ()
    micro_batch_size: int = 0
    fsdp: bool = False
    grad_checkpointing: bool = False
    load_in_4bit: bool = False

    def validate(self) -> None:
        """Check the settings together (the recipe command line calls this before any work)."""
        self.train_settings()

    def train_settings(self) -> dict:
        """The ``finetune.train.TrainConfig`` fields these settings stand for (checked)."""
        if self.load_in_4bit and not self.lora_rank:
            raise ValueError("load_in_4bit trains LoRA adapters over 4-bit weights: it needs lora_rank >= 1.")
        if not self.lora_rank and (self.lora_alpha is not None or self.lora_targets):
            raise ValueError(f"lora_alpha={self.lora_alpha!r} and lora_targets={self.lora_targets!r} need "
                             "lora_rank >= 1 (0 means full fine-tuning).")
        lora = LoraSettings(self.lora_rank, self.lora_alpha, tuple(self.lora_targets)) if self.lora_rank else None
        return {"max_steps": self.max_steps, "micro_batch_size": self.micro_batch_size, "lora": lora,
                "fsdp": self.fsdp, "grad_checkpointing": self.grad_checkpointing, "load_in_4bit": self.load_in_4bit}


#: TrainScale fields that enter a cache key when set; ``UPDATE_NEUTRAL_FIELDS`` never do.
SCALE_KEY_FIELDS = ("max_steps", "lora_rank", "lora_alpha", "lora_targets", "load_in_4bit")
#: TrainScale fields that change memory or the process layout, not the update.
UPDATE_NEUTRAL_FIELDS = ("micro_batch_size", "fsdp", "grad_checkpointing")


def config_key(cfg, added: Sequence[str]) -> dict:
    """``asdict(cfg)`` without the ``added`` fields that are 0: options added later keep old cache keys when off.

    The ``TrainScale`` settings of a first-order recipe count as added (the
    ``UPDATE_NEUTRAL_FIELDS`` never enter the key).
    """
    out = asdict(cfg)
    if isinstance(cfg, TrainScale):
        added = (*added, *SCALE_KEY_FIELDS)
        for name in UPDATE_NEUTRAL_FIELDS:
            del out[name]
    for name in added:
        if not out[name]:
            del out[name]
    return out


def scale_key(cfg) -> dict:
    """The ``TrainScale`` settings of ``cfg`` that are set, as ``config_key`` keys them (empty by default)."""
    if not isinstance(cfg, TrainScale):
        return {}
    return {name: getattr(cfg, name) for name in SCALE_KEY_FIELDS if getattr(cfg, name)}


def _to_json(ex: Example) -> dict:
    d = asdict(ex)
    for k in ("response", "prefix"):
        if isinstance(d[k], (tuple, list)):
            d[k] = {"ids": list(d[k])}
    return d


def _from_json(d: dict) -> Example:
    d = dict(d)
    for k in ("response", "prefix"):
        if isinstance(d[k], dict):
            d[k] = tuple(d[k]["ids"])
    return Example(**d)


def cached_examples(workdir: Path | None, name: str, make: Callable[[], tuple[list[Example], dict]]):
    """``make()`` once per build: (examples, info) are kept in ``workdir`` so a resumed build skips it.

    Under ``accelerate launch`` rank 0 makes them and the other ranks wait and read its file,
    so every rank trains on the same examples (and only rank 0 generates).
    """
    from depthlens.models.recipes import process_state

    path = Path(workdir) / f"{name}.json" if workdir is not None else None
    state = process_state() if path is not None else None
    if state is not None and not state.is_main_process:
        state.wait_for_everyone()  # rank 0 writes the file first
        return _read_examples(path)
    if path is not None and path.exists():
        log.info("Reusing the examples of an interrupted build (%s)", path)
        out = _read_examples(path)
    else:
        out = make()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"examples": [_to_json(e) for e in out[0]], "info": out[1]})
    if state is not None:
        state.wait_for_everyone()
    return out


def _read_examples(path: Path) -> tuple[list[Example], dict]:
    data = json.loads(path.read_text())
    return [_from_json(d) for d in data["examples"]], data["info"]


def kind_counts(examples) -> dict[str, int]:
    """How many examples of each kind (the part of ``kind`` before a colon)."""
    out: dict[str, int] = {}
    for e in examples:
        k = e.kind.split(":")[0]
        out[k] = out.get(k, 0) + 1
    return out
