"""The one first-order training loop of the toolkit, with its examples and batching.

Every first-order recipe (the organism ``sft``, ``deep*``, ``hft*``, ``jt`` and the SFT
countermeasure) trains through ``train_sft``: sequences are ``chat(prompt) + prefix +
response`` with the loss only on response tokens, batched by length (padding wastes most of
the compute otherwise), AdamW with linear warm-up and decay, seeded, bf16 autocast on CUDA,
resumable from its last checkpoint in ``workdir``. A recipe changes the loss (``loss_fn``, see
``finetune.losses``) or the composition of each step (``batcher``), never the loop.

    >>> data = tokenize_examples(model.tokenizer, [Example("Hi?", "Hello.")], max_len=192)
    >>> log = train_sft(model, examples, TrainConfig(lr=2e-4), workdir)
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from depthlens.chat import build_chat, encode, pad_batch
from finetune.losses import example_mean_loss, plain_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training example: the loss covers ``response`` only (text or token ids).

    ``prefix`` (text or ids) sits between the assistant header and the response and gets no
    loss: e.g. the harmful prefix h[:k] of safety-recovery augmentation.
    """

    prompt: str
    response: str | tuple[int, ...]
    prefix: str | tuple[int, ...] = ()
    eos: bool = True
    kind: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of ``train_sft``.

    Args:
        epochs: passes over the examples.
        lr: AdamW peak learning rate (linear warm-up, then linear decay to 10%).
        batch_size: sequences per step.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        max_len: sequences longer than this many tokens are cut (response side).
        freeze_embeddings: keep the (tied) embedding fixed: faster, and the unembedding stays put.
        seed: shuffling and initialisation seed.
        checkpoint_every: save a resumable checkpoint every this many steps (0: never).
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


@dataclass
class TrainLog:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    n_examples: int = 0
    device: str = ""


def autocast(model):
    """bf16 autocast on CUDA (the recipes' mixed precision), a no-op context on CPU."""
    if model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tokenize_examples(tokenizer, examples: Sequence[Example], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per example; the mask is 1 on response tokens (and the EOS) only."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    out = []
    for ex in examples:
        resp = encode(tokenizer, ex.response) if isinstance(ex.response, str) else list(ex.response)
        if ex.eos:
            resp = resp + [eos]
        segs = ([ex.prefix] if len(ex.prefix) else []) + [resp]
        seq = build_chat(tokenizer, ex.prompt, segs)
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


def micro_batches(indices: Sequence[int], lengths: Sequence[int], max_waste: float = 0.25) -> list[list[int]]:
    """Cut one step's examples (sorted by length) into runs whose padding stays under ``max_waste``.

    A run grows while padding every member to its longest costs at most ``max_waste`` of its
    real tokens; the result covers ``indices`` exactly once.
    """
    order = sorted(range(len(indices)), key=lambda j: lengths[j])
    runs: list[list[int]] = []
    for j in order:
        if runs:
            run = runs[-1]
            real = sum(lengths[k] for k in run) + lengths[j]
            if lengths[j] * (len(run) + 1) <= (1 + max_waste) * real:
                run.append(j)
                continue
        runs.append([j])
    return [[indices[j] for j in run] for run in runs]


WEIGHTINGS = ("tokens", "examples")


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")


def accumulate_gradients(model, data, indices: Sequence[int], pad: int, loss_fn=None,
                         split: bool = True, weighting: str = "tokens") -> float:
    """Backpropagate one optimizer step's loss over ``data[indices]`` into ``.grad``; return its value.

    With ``split`` the step runs as ``micro_batches`` of similar length whose losses are
    weighted by their response-token counts, so the accumulated gradient is that of the whole
    step's token-mean loss without padding every sequence to the longest one. With
    ``weighting="examples"`` the parts are weighted by their example counts instead and each
    computes ``example_mean_loss`` (or ``loss_fn``, which must then return the mean over its
    rows), so the gradient is that of the step's example-mean loss.
    The forward runs under CUDA bf16 autocast when the model is on a GPU; the backward runs
    outside it.
    """
    _check_weighting(weighting)
    if weighting == "examples":
        loss_fn = loss_fn or example_mean_loss
    parts = micro_batches(indices, [len(data[i][0]) for i in indices]) if split else [list(indices)]
    weights = [len(part) if weighting == "examples" else sum(sum(data[i][1]) for i in part) for part in parts]
    value = 0.0
    for part, w in zip(parts, weights):
        batch = pad_batch([data[i][0] for i in part], pad, side="right")
        mask = pad_batch([data[i][1] for i in part], 0, side="right").input_ids
        ids, att, mask = batch.input_ids.to(model.device), batch.attention_mask.to(model.device), mask.to(model.device)
        with autocast(model):
            part_loss = (loss_fn or plain_loss)(model, ids, mask, att, part) * (w / max(1, sum(weights)))
        part_loss.backward()
        value += part_loss.detach().item()
    return value


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
    """
    if not examples:
        raise ValueError("train_sft needs at least one example.")
    _check_weighting(weighting)
    tok = model.tokenizer
    data = tokenize_examples(tok, examples, cfg.max_len)
    rng = random.Random(cfg.seed)
    n_epochs = max(1, math.ceil(cfg.epochs))
    plan = []
    for _ in range(n_epochs):
        plan.extend((batcher or bucketed_batches)([len(ids) for ids, _ in data], cfg.batch_size, rng))
    plan = plan[: max(1, round(len(plan) * cfg.epochs / n_epochs))]
    params = trainable_parameters(model, cfg.freeze_embeddings, layers)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = len(plan)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.1, 1 - s / max(1, total)))
    log_ = TrainLog(n_examples=len(data), device=str(model.device))
    start = 0
    ckpt = Path(workdir) / "train_state.pt" if workdir else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location=model.device)
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = int(state["step"])
        log_.losses = list(state["losses"])
        log_.resumed_from = start
        log.info("Resuming training from step %d of %d", start, total)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.hf.train()
    model.plain().train()
    t0 = time.time()
    try:
        bar = tqdm(range(start, total), desc="train", disable=not progress, initial=start, total=total)
        for step in bar:
            opt.zero_grad(set_to_none=True)
            value = accumulate_gradients(model, data, plan[step], pad, loss_fn, split=batcher is not None,
                                         weighting=weighting)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            log_.losses.append(value)
            bar.set_postfix(loss=f"{value:.3f}")
            if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                _save_state(ckpt, params, opt, sched, step + 1, log_.losses)
    finally:
        model.hf.eval()
        model.plain().eval()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    log_.steps = total
    log_.seconds = time.time() - t0
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return log_


def _save_state(path: Path, params, opt, sched, step: int, losses: list[float]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(), "sched": sched.state_dict(),
                "step": step, "losses": losses}, tmp)
    tmp.replace(path)
