"""The one first-order training loop of the toolkit, on Hugging Face accelerate, with its examples and batching.

Every first-order recipe (the organism ``sft``, ``deep*``, ``hft*``, ``jt`` and the SFT
countermeasure) trains through ``train_sft``: sequences are ``chat(prompt) + prefix +
response`` with the loss only on response tokens, batched by length (padding wastes most of
the compute otherwise), AdamW with linear warm-up and decay, seeded, resumable from its last
checkpoint in ``workdir``. On CUDA it trains fp32 master weights (and fp32 AdamW state) with
bf16 compute (``finetune.precision``); on CPU in fp32. A recipe changes the loss (``loss_fn``, see
``finetune.losses``) or the composition of each step (``batcher``), never the loop.

The loop runs on ``accelerate`` (``Accelerator``, ``prepare``, ``backward``; checkpoints through
``finetune.distributed.save_loop_state`` / ``load_loop_state``, JSON and safetensors only), in
one process or under ``accelerate launch --num_processes N`` (DDP, see
``finetune.distributed``): ``batch_size`` is the *global* batch; every rank takes a fixed shard
of each step's examples and every loss is normalised by the step's global token (or example)
count, so N processes make the same update as one (equal to 1e-6 on tiny-llama, tested).
Within a rank a step runs as micro-batches whose gradients accumulate (gradient
accumulation: ``micro_batch_size`` caps their size). ``max_steps`` stops early; ``lora``
trains peft adapters instead of the weights and merges them at the end (``finetune.lora``).
``fsdp`` (or an FSDP2 launch config) shards the weights, gradients and optimizer state over
the ranks with FSDP2 instead (``finetune.sharding``); ``grad_checkpointing`` recomputes each
decoder block's activations in the backward pass (``finetune.precision``).

    >>> data = tokenize_examples(model.tokenizer, [Example("Hi?", "Hello.")], max_len=192)  # a fragment: model, examples and workdir come from the recipe  # doctest: +SKIP
    >>> log = train_sft(model, examples, TrainConfig(lr=2e-4), workdir)  # doctest: +SKIP
    >>> log = train_sft(model, examples, TrainConfig(lr=2e-4, max_steps=20, lora=LoraSettings(rank=16)), workdir)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from depthlens.data.chat import build_chat, encode, pad_batch
from finetune import distributed, lora, precision, qlora, sharding
from finetune.lora import LoraSettings
from depthlens.infra.errors import UsageError
from finetune.losses import LossPath, example_mean_loss, plain_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training example: the loss covers ``response`` only (text or token ids).

    ``prefix`` (text or ids) sits between the assistant header and the response and gets no
    loss: e.g. the harmful prefix h[:k] of safety-recovery augmentation. ``system`` is a system
    prompt for the chat (None: the template's default).
    """

    prompt: str
    response: str | tuple[int, ...]
    prefix: str | tuple[int, ...] = ()
    eos: bool = True
    kind: str = ""
    system: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of ``train_sft``.

    Args:
        epochs: passes over the examples.
        lr: AdamW peak learning rate (linear warm-up, then linear decay to 10%).
        batch_size: sequences per optimizer step, over all processes (the global batch).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        max_len: sequences longer than this many tokens are cut (response side).
        freeze_embeddings: keep the (tied) embedding fixed: faster, and the unembedding stays put.
        seed: shuffling and initialisation seed.
        checkpoint_every: save a resumable checkpoint every this many steps (0: never).
        max_steps: stop after this many optimizer steps (0: every step of ``epochs``); the
            learning-rate schedule spans the steps that run.
        micro_batch_size: at most this many sequences per forward pass on a rank (0: no cap);
            gradients accumulate over a step's micro-batches, so it changes the memory, not
            the update (up to floating-point summation order).
        lora: train LoRA adapters of these settings instead of the weights, merged at the end
            (None: full fine-tuning).
        fsdp: shard the trained weights, their gradients and optimizer state over the ranks
            with FSDP2 (``finetune.sharding``; also on under an FSDP2 launch config). The same
            update as data-parallel: not part of any cache key.
        grad_checkpointing: activation checkpointing per decoder block: memory for one more
            forward pass, the same gradients (not part of any cache key). The losses' shared-
            prefix KV cache is off under it.
        load_in_4bit: QLoRA: train the ``lora`` adapters over an NF4 copy of the blocks' linear
            maps (``finetune.qlora``); the merge goes into the full-precision weights.
    """

    epochs: float = 1.0
    lr: float = 3e-5
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_len: int = 192
    freeze_embeddings: bool = True
    seed: int = 0
    checkpoint_every: int = 25
    max_steps: int = 0
    micro_batch_size: int = 0
    lora: LoraSettings | None = None
    fsdp: bool = False
    grad_checkpointing: bool = False
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"{name} must be a non-negative integer (0: off), got {value!r}.")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}.")
        if self.load_in_4bit and self.lora is None:
            raise UsageError("--load-in-4bit trains LoRA adapters over 4-bit weights: it needs --lora-rank >= 1.")


@dataclass
class TrainLog:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    n_examples: int = 0
    device: str = ""
    processes: int = 1
    trainable_weights: int = 0
    lora: dict | None = None
    sharding: str = ""
    quantization: str = ""
    local_trainable_weights: int = 0
    precision: str = ""
    grad_checkpointing: bool = False


def autocast(model, dtype: torch.dtype | None | str = "auto"):
    """Autocast for ``model``'s forward: ``"auto"`` is bf16 on CUDA and none on CPU; a dtype autocasts to it
    on the model's device; None is a no-op context."""
    if dtype == "auto":
        dtype = torch.bfloat16 if model.device.type == "cuda" else None
    return precision.compute_context(dtype, model.device)


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the chat format (ChatML's, Llama 3's, Gemma's), else EOS."""
    vocab = tokenizer.get_vocab()
    return next((vocab[t] for t in END_OF_TURN if t in vocab), tokenizer.eos_token_id)


def tokenize_examples(tokenizer, examples: Sequence[Example], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per example; the mask is 1 on response tokens (and the EOS) only."""
    eos = end_of_turn_id(tokenizer)
    out = []
    for ex in examples:
        resp = encode(tokenizer, ex.response) if isinstance(ex.response, str) else list(ex.response)
        if ex.eos:
            resp = resp + [eos]
        segs = ([ex.prefix] if len(ex.prefix) else []) + [resp]
        seq = build_chat(tokenizer, ex.prompt, segs, system=ex.system)
        a, b = seq.segments[-1]
        ids = list(seq.ids)[:max_len]
        mask = [0] * a + [1] * (b - a)
        out.append((ids, mask[:max_len]))
    return out


def trainable_parameters(model, freeze_embeddings: bool = True, layers: Sequence[int] | None = None):
    """Parameters to train: every block (or only ``layers``), the final norm, and optionally the embedding."""
    params = []
    for name, p in model.hf.named_parameters():
        clean = name.replace("._original_component", "")
        if layers is not None:
            keep = any(f"layers.{l}." in clean for l in layers)
        else:
            keep = not (freeze_embeddings and ("embed_tokens" in clean or "lm_head" in clean))
        if keep:
            params.append(p)
    return params


def bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches in random order (similar lengths together, little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    return chunks


def stratified_batches(is_safety: Sequence[bool], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches that each carry the mix's safety share (±1 example), as deep alignment's 16 + 64 a step.

    ``bucketed_batches`` sorts by length, which segregates a mix: safety sequences (a harmful
    prefix + a refusal) are longer than utility ones, so most batches would hold no safety
    example and a few nothing else. Here both strata are shuffled separately and dealt evenly:
    batch j gets ``round((j+1)·S/B) − round(j·S/B)`` of the S safety examples (likewise for
    utility), B = ⌈n / batch_size⌉. Pass it to ``train_sft`` as ``batcher`` with ``is_safety``
    bound (``lambda lengths, bs, rng: stratified_batches(is_safety, bs, rng)``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    strata = [[i for i, s in enumerate(is_safety) if s], [i for i, s in enumerate(is_safety) if not s]]
    for part in strata:
        rng.shuffle(part)
    n_b = max(1, -(-len(is_safety) // batch_size))
    out: list[list[int]] = [[] for _ in range(n_b)]
    for part in strata:
        for j in range(n_b):
            out[j] += part[round(j * len(part) / n_b):round((j + 1) * len(part) / n_b)]
    for b in out:
        rng.shuffle(b)
    return [b for b in out if b]


def micro_batches(indices: Sequence[int], lengths: Sequence[int], max_waste: float = 0.25,
                  max_size: int = 0) -> list[list[int]]:
    """Cut one step's examples (sorted by length) into runs whose padding stays under ``max_waste``.

    A run grows while padding every member to its longest costs at most ``max_waste`` of its
    real tokens (and, with ``max_size``, while it holds fewer than ``max_size`` sequences); the
    result covers ``indices`` exactly once.
    """
    order = sorted(range(len(indices)), key=lambda j: lengths[j])
    runs: list[list[int]] = []
    for j in order:
        if runs:
            run = runs[-1]
            real = sum(lengths[k] for k in run) + lengths[j]
            if lengths[j] * (len(run) + 1) <= (1 + max_waste) * real and not (max_size and len(run) >= max_size):
                run.append(j)
                continue
        runs.append([j])
    return [[indices[j] for j in run] for run in runs]


WEIGHTINGS = ("tokens", "examples")


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")


@dataclass(frozen=True)
class StepTotals:
    """The whole optimizer step a micro-batch belongs to, over every rank: what a step-wide mean divides by.

    ``indices`` are the step's examples and ``targets`` their response-token counts (the
    positions that get loss), in the same order.
    """

    indices: tuple[int, ...]
    targets: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return sum(self.targets)

    @property
    def n_examples(self) -> int:
        return len(self.indices)


def step_parts(indices: Sequence[int], lengths: Sequence[int], split: bool, rank: int = 0, world: int = 1,
               micro_batch_size: int = 0) -> list[list[int]]:
    """The micro-batches that rank ``rank`` of ``world`` runs for one step's examples ``indices``.

    The rank's shard is ``indices[rank::world]`` (every rank derives the same plan from the
    seed, so the shards partition the step). With ``split`` the shard is cut by length
    (``micro_batches``), otherwise it is one batch, or chunks of ``micro_batch_size`` in
    length order.
    """
    mine = list(indices)[rank::world]
    if not mine:
        return []
    if split:
        return micro_batches(mine, [lengths[i] for i in mine], max_size=micro_batch_size)
    if not micro_batch_size or len(mine) <= micro_batch_size:
        return [mine]
    mine = sorted(mine, key=lambda i: lengths[i])
    return [mine[j:j + micro_batch_size] for j in range(0, len(mine), micro_batch_size)]


def accumulate_gradients(model, data, indices: Sequence[int], pad: int, loss_fn=None, split: bool = True,
                         weighting: str = "tokens", rank: int = 0, world: int = 1, micro_batch_size: int = 0,
                         backward=None, compute_dtype: torch.dtype | None | str = "auto") -> float:
    """Backpropagate this rank's part of one optimizer step's loss over ``data[indices]`` into ``.grad``.

    Returns this rank's part of the step's loss value (the parts of all ranks sum to it).
    The step runs as the micro-batches of ``step_parts`` (with ``split``: runs of similar
    length, so the step is not padded to its longest sequence). Each part's loss is weighted
    by its share of the *whole step's* response tokens (``weighting="tokens"``: the step's
    token-mean loss) or examples (``"examples"``: the mean over the step's examples of
    ``example_mean_loss``, or of ``loss_fn``, which must then return the mean over its rows),
    so the accumulated gradient, summed over ranks, is that of the whole step's loss. A
    ``loss_fn`` whose value is not such a mean (a mean over a subset of rows, as
    ``BenignMarginLoss``'s margins) sets ``step_normalised = True``: it is called with
    ``step=StepTotals(...)`` and returns its part's contribution to the step's loss itself.
    The forward runs under autocast to ``compute_dtype`` (``autocast``: "auto" is bf16 on a
    GPU); the backward (``backward``, e.g. ``accelerator.backward``; default
    ``Tensor.backward``) outside it.
    """
    _check_weighting(weighting)
    if weighting == "examples":
        loss_fn = loss_fn or example_mean_loss
    loss_fn = loss_fn or plain_loss
    backward = backward or torch.Tensor.backward
    lengths = {i: len(data[i][0]) for i in indices}
    step = StepTotals(tuple(indices), tuple(sum(data[i][1][1:]) for i in indices))
    total = max(1, step.n_examples if weighting == "examples" else step.n_tokens)
    value = 0.0
    for part in step_parts(indices, lengths, split, rank, world, micro_batch_size):
        batch = pad_batch([data[i][0] for i in part], pad, side="right")
        mask = pad_batch([data[i][1] for i in part], 0, side="right").input_ids
        ids, att, mask = batch.input_ids.to(model.device), batch.attention_mask.to(model.device), mask.to(model.device)
        with autocast(model, compute_dtype):
            if getattr(loss_fn, "step_normalised", False):
                part_loss = loss_fn(model, ids, mask, att, part, step=step)
            else:
                w = len(part) if weighting == "examples" else sum(sum(data[i][1]) for i in part)
                part_loss = loss_fn(model, ids, mask, att, part) * (w / total)
        backward(part_loss)
        value += part_loss.detach().item()
    return value


def _plan(data, cfg: TrainConfig, batcher) -> list[list[int]]:
    """The optimizer steps (lists of example indices) of the whole run, the same on every rank."""
    rng = random.Random(cfg.seed)
    n_epochs = max(1, math.ceil(cfg.epochs))
    plan = []
    for _ in range(n_epochs):
        plan.extend((batcher or bucketed_batches)([len(ids) for ids, _ in data], cfg.batch_size, rng))
    plan = plan[: max(1, round(len(plan) * cfg.epochs / n_epochs))]
    return plan[: cfg.max_steps] if cfg.max_steps else plan


def train_sft(model, examples: Sequence[Example], cfg: TrainConfig, workdir: Path | None = None,
              progress: bool = True, loss_fn=None, layers: Sequence[int] | None = None,
              batcher=None, weighting: str = "tokens") -> TrainLog:
    """Fine-tune ``model`` in place on ``examples`` (loss on responses only); resumable from ``workdir``.

    ``loss_fn(model, ids, mask, attention_mask, index_list)`` replaces the plain response loss
    (the constrained objective uses it). ``batcher(lengths, batch_size, rng)`` replaces the
    length-bucketed batches of one epoch; each batch it returns is one optimizer step and is
    run as micro-batches of similar length (``micro_batches``) whose gradients accumulate,
    weighted by their response-token counts, so a step that mixes short and long sequences
    (deep alignment's safety + utility mix) is not padded to its longest member.

    ``weighting="tokens"`` (default) makes each step's loss the mean over its response tokens;
    ``"examples"`` makes it the mean over its examples of each example's own token-mean NLL,
    so every example carries the same weight whatever its length (``example_mean_loss``, or
    a ``loss_fn`` that likewise returns the mean over its batch's rows).

    Under ``accelerate launch`` every rank calls this with the same arguments (see the module
    docstring); logs and the progress bar come from rank 0. With ``cfg.lora`` the adapters
    are merged into the weights at the end and saved to ``workdir/adapter`` (by rank 0).
    With ``cfg.fsdp`` (or an FSDP2 launch) the run is sharded (``finetune.sharding``); the
    model comes back unsharded with the trained weights on every rank.
    """
    if not examples:
        raise ValueError("train_sft needs at least one example.")
    _check_weighting(weighting)
    accelerator = distributed.accelerator_for(model)
    sharded = cfg.fsdp or sharding.fsdp_launch()
    if sharded and cfg.lora:
        raise UsageError("LoRA runs data-parallel, not under FSDP: its adapters are a few million weights; drop --fsdp "
                         "(or use configs/accelerate/ddp.yaml).")
    main = accelerator.is_main_process
    tok = model.tokenizer
    data = tokenize_examples(tok, examples, cfg.max_len)
    plan = _plan(data, cfg, batcher)
    quantized = qlora.QuantizedBase(model, model.dtype, workdir) if cfg.load_in_4bit else None
    try:
        peft_model = lora.attach(model, cfg.lora, cfg.seed, layers,
                                 module=quantized.module if quantized else None) if cfg.lora else None
    except BaseException:
        if quantized is not None:
            quantized.finish(None, done=False)
        raise
    if quantized is not None:
        model.__dict__["_loss_path"] = LossPath(quantized.module)
    params = lora.parameters(peft_model) if peft_model is not None else trainable_parameters(
        model, cfg.freeze_embeddings, layers)
    total = len(plan)
    log_ = TrainLog(n_examples=len(data), device=str(model.device), processes=accelerator.num_processes,
                    trainable_weights=sum(p.numel() for p in params),
                    lora=asdict(cfg.lora) if cfg.lora else None, sharding="fsdp2" if sharded else "",
                    quantization=qlora.QUANT_TYPE if quantized else "",
                    grad_checkpointing=cfg.grad_checkpointing)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    done, masters, run = False, None, None
    try:  # from here on the model is restored however the run ends (adapters merged only when it completes)
        for p in params:
            p.requires_grad_(True)
        masters = precision.MasterWeights(params)
        compute = masters.compute_dtype or (torch.bfloat16 if model.device.type == "cuda" else None)
        log_.precision = f"{masters.compute_dtype or params[0].dtype} weights, fp32 masters, {compute} compute" \
            if compute else "fp32"
        log_.precision = log_.precision.replace("torch.", "")
        model.hf.train()
        model.plain().train()
        if quantized is not None:
            quantized.module.train()
        if sharded:
            run = sharding.ShardedRun(model, accelerator, compute_dtype=compute, checkpointing=cfg.grad_checkpointing)
            opt_params = run.shard(params)
            log_.local_trainable_weights = sum(p.to_local().numel() for p in opt_params)
        else:
            log_.local_trainable_weights = log_.trainable_weights
            opt_params = params
            if cfg.grad_checkpointing:
                precision.checkpoint_model(model)
        opt = torch.optim.AdamW(opt_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.1, 1 - s / max(1, total)))
        state = distributed.TrainState(params)
        if sharded:
            ckpt = sharding.ShardedCheckpoints(run, Path(workdir) / "train_state", opt, sched, state) if workdir else None
        else:
            opt, sched = accelerator.prepare(opt, sched)
            ckpt = distributed.Checkpoints(accelerator, Path(workdir) / "train_state", opt, sched, state) if workdir else None
        if ckpt is not None and ckpt.load():
            log_.losses, log_.resumed_from = list(state.losses), state.step
            if main:
                log.info("Resuming training from step %d of %d", state.step, total)
        t0 = time.time()
        bar = tqdm(range(state.step, total), desc="train", disable=not (progress and main), initial=state.step,
                   total=total)
        for step in bar:
            opt.zero_grad(set_to_none=True)
            value = accumulate_gradients(model, data, plan[step], pad, loss_fn, split=batcher is not None,
                                         weighting=weighting, rank=accelerator.process_index,
                                         world=accelerator.num_processes, micro_batch_size=cfg.micro_batch_size,
                                         backward=accelerator.backward, compute_dtype=compute)
            if sharded:  # the gradients were reduce-scattered in the backward pass
                value = distributed.sum_value(accelerator, value)
                run.clip_grad_norm_(opt_params, 1.0)
            else:
                value = distributed.sync_gradients(accelerator, params, value)
                accelerator.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            log_.losses.append(value)
            state.step, state.losses = step + 1, log_.losses
            bar.set_postfix(loss=f"{value:.3f}")
            if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                ckpt.save(step + 1)
        log_.seconds = time.time() - t0
        done = True
    finally:
        model.hf.eval()
        if run is not None:
            run.finish(done)
        else:
            precision.uncheckpoint_model(model)
        model.plain().eval()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        if masters is not None:
            masters.restore()
        if peft_model is not None:
            if done and workdir is not None and main:
                lora.save_adapter(peft_model, Path(workdir) / lora.ADAPTER_DIR)
            if quantized is not None:  # the 4-bit tree is dropped; the update goes into the full weights
                model.__dict__.pop("_loss_path", None)
                quantized.finish(peft_model, done)
            else:
                (lora.merge if done else lora.detach)(peft_model)
        accelerator.free_memory()
    log_.steps = total
    if ckpt is not None:
        ckpt.clear()
    return log_
