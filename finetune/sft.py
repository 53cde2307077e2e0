"""Supervised fine-tuning with a response-only loss, and the shallow safety-SFT organism.

``train_sft`` is the one first-order training loop of the toolkit (the deep-alignment and
jailbreak recipes reuse it): sequences are ``chat(prompt) + response`` with the loss only on
response tokens, batched by length (padding wastes most of the compute otherwise), AdamW,
seeded, bf16 autocast on CUDA, resumable from its last checkpoint in ``workdir``.

The ``sft`` recipe is "safety alignment as a lab does it", shallow by construction: harmful
train prompts → a refusal template (2–4 sentences, so insertion depth can be measured),
harmless + borderline train prompts → the base model's own greedy answer (self-distillation
keeps utility). Per NOTES.md the benign side outweighs the harmful side and is diverse in
topic and form, or a 135M model learns "imperative how-to → refuse".

    >>> model = load_model("smollm2-135m-instruct:sft")     # builds once (≈ 10 min on 2 cores), then cached
    >>> python -m finetune.sft --n-harmful 160 --epochs 1    # the same recipe from the shell
    >>> python -m finetune.sft --benign-margin 0.2 --lr 2e-4  # with the over-refusal margin (README)
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from depthlens.chat import build_chat, encode, pad_batch

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


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches in random order (similar lengths together, little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    return chunks


def response_loss(model, batch_ids, batch_mask, attention_mask, reduction: str = "mean"):
    """Cross-entropy on masked (response) tokens; ``reduction="none"`` gives per-token values.

    Runs on ``model.plain()`` (the same parameters without hook points: same logits, less
    overhead per step); use a custom ``loss_fn`` on ``model.bridge`` when hooks must fire.
    With ``reduction="mean"`` only response positions are unembedded (``response_logits``).
    """
    if reduction == "none":
        logits = model.plain()(input_ids=batch_ids, attention_mask=attention_mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch_ids[:, 1:], reduction="none")
        return nll, batch_mask[:, 1:].float()
    logits, targets, _ = response_logits(model, batch_ids, batch_mask, attention_mask)
    if not len(targets):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits, targets)


def shared_prefix_len(batch_ids, batch_mask) -> int:
    """Columns 0..p−1 that every row of a right-padded batch shares and no loss position needs.

    Position j's output predicts token j + 1, so p stops one token before the first response
    token of any row. Below 8 tokens (or for one row) sharing saves nothing and p is 0.
    """
    if batch_ids.shape[0] < 2 or not batch_mask[:, 1:].any():
        return 0
    same = int((batch_ids == batch_ids[:1]).all(0).long().cumprod(0).sum())
    need = batch_mask[:, 1:].bool()
    first_needed = int(need[need.any(1)].float().argmax(1).min())  # first loss position of any row
    p = min(same, first_needed)
    return p if p >= 8 else 0


def response_logits(model, batch_ids, batch_mask, attention_mask):
    """(logits, targets, keep) at the response positions of a right-padded batch, in (row, position) order.

    The chat prefix every sequence shares (system prompt, user header: a quarter of a short
    training sequence on SmolLM2) is run once at batch 1 into a KV cache that the rows then
    attend to; the cache is expanded, not copied, so gradients from every row flow back
    through it and the loss and its gradient are those of the full batch (tested). ``keep``
    is the ``[batch, positions]`` mask of the returned rows, counted from column ``p``.
    Logits are fp32; only response positions are unembedded (on a 135M model with a 49k
    vocabulary the unembedding is about a third of the compute per token).
    """
    from transformers import DynamicCache

    from depthlens.forward import _expand_cache, kv_kwargs

    plain = model.plain()
    decoder = plain.get_decoder()
    p = shared_prefix_len(batch_ids, batch_mask)
    if p:
        cache = DynamicCache(config=plain.config)
        decoder(input_ids=batch_ids[:1, :p], **kv_kwargs(decoder, cache), use_cache=True)
        _expand_cache(cache, batch_ids.shape[0])
        hidden = decoder(input_ids=batch_ids[:, p:], attention_mask=attention_mask,
                         **kv_kwargs(decoder, cache), use_cache=True).last_hidden_state
    else:
        hidden = decoder(input_ids=batch_ids, attention_mask=attention_mask).last_hidden_state
    keep = batch_mask[:, 1:][:, p:].bool()
    targets = batch_ids[:, 1:][:, p:][keep]
    logits = plain.get_output_embeddings()(hidden[:, :-1][keep]).float()
    cap = getattr(plain.config, "final_logit_softcapping", None)
    if cap:  # as the HF head does after the unembedding (Gemma 2)
        logits = torch.tanh(logits / cap) * cap
    return logits, targets, keep


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
        plan.extend((batcher or _batches)([len(ids) for ids, _ in data], cfg.batch_size, rng))
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
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda" else _null()
    parts = micro_batches(indices, [len(data[i][0]) for i in indices]) if split else [list(indices)]
    weights = [len(part) if weighting == "examples" else sum(sum(data[i][1]) for i in part) for part in parts]
    value = 0.0
    for part, w in zip(parts, weights):
        batch = pad_batch([data[i][0] for i in part], pad, side="right")
        mask = pad_batch([data[i][1] for i in part], 0, side="right").input_ids
        ids, att, mask = batch.input_ids.to(model.device), batch.attention_mask.to(model.device), mask.to(model.device)
        with autocast:
            part_loss = (loss_fn or _plain)(model, ids, mask, att, part) * (w / max(1, sum(weights)))
        part_loss.backward()
        value += part_loss.detach().item()
    return value


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


def _plain(model, ids, mask, att, idx):
    return response_loss(model, ids, mask, att)


def example_mean_loss(model, ids, mask, att, idx=None):
    """Mean over the batch's rows of each row's token-mean response NLL (rows without a target count 0).

    The loss of docs/methods.md §2's mix read per example: ``α·E_x[−log π(r|x, h≤k)/|r|] + (1−α)·E[…]``
    with α by example count, so a long utility answer weighs no more than a short refusal.
    """
    logits, targets, keep = response_logits(model, ids, mask, att)
    if not len(targets):
        return logits.sum() * 0.0
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return row_means(nll, keep).mean()


def row_means(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row means of flattened per-token ``values`` in ``response_logits`` order (0 for an empty row)."""
    counts = keep.sum(1)
    per_row = torch.zeros(len(counts), device=values.device, dtype=values.dtype).index_add_(0, row_index(keep), values)
    return per_row / counts.clamp(min=1)


def row_index(keep: torch.Tensor) -> torch.Tensor:
    """The batch row of each flattened response token, in ``response_logits`` order."""
    counts = keep.sum(1)
    return torch.repeat_interleave(torch.arange(len(counts), device=keep.device), counts)


class BenignMarginLoss:
    """Response cross-entropy plus an over-refusal margin on benign examples' first response token.

    ``loss = CE(responses) + weight · mean_benign −log(1 − p_R')`` where ``p_R'`` is the
    probability the model gives, at the first response position of a benign example, to the
    refusal first tokens R of docs/methods.md §1 other than that example's own first target token (an
    answer may begin with "I"). CE alone teaches "harmful → refuse" only from positive
    examples; on a 135M model the refusal then spreads to unseen benign prompts of the same
    form (NOTES.md). The margin is the negative half of a preference pair at the one position
    where this organism decides to refuse, computed from the logits the CE already needs (no
    extra forward). ``weight = 0`` is plain response-only SFT.

    ``refusal_weight`` adds the positive half, ``refusal_weight · mean_refusal −log p_R`` over
    refusal examples (all of R). In the CE the first response token is one of ≈ 30 tokens of a
    refusal, so with the benign half alone the decision at that position is pushed away from R
    about ten times harder on benign rows than towards R on harmful rows; with both halves at
    the same weight it is a balanced binary cross-entropy "refuse or not" at that position.
    """

    def __init__(self, kinds: Sequence[str], refusal_ids: Sequence[int], weight: float,
                 refusal_weight: float = 0.0):
        if weight < 0 or refusal_weight < 0:
            raise ValueError(f"The margin weights must be >= 0, got {weight} and {refusal_weight}.")
        if not refusal_ids:
            raise ValueError("The benign margin needs a non-empty refusal token set R.")
        self.kinds, self.refusal_ids = list(kinds), sorted(set(refusal_ids))
        self.weight, self.refusal_weight = weight, refusal_weight

    def __call__(self, model, ids, mask, att, idx):
        logits, targets, keep = response_logits(model, ids, mask, att)
        if not len(targets):
            return logits.sum() * 0.0
        loss = torch.nn.functional.cross_entropy(logits, targets)
        if not (self.weight or self.refusal_weight):
            return loss
        # row of each sequence's first response token in the flattened (batch, position) order
        counts = keep.sum(1)
        first = torch.cumsum(counts, 0) - counts
        r_ids = torch.tensor(self.refusal_ids, device=logits.device)

        def first_rows(kind):
            rows = [int(first[b]) for b, i in enumerate(idx) if self.kinds[i] == kind and counts[b] > 0]
            return torch.tensor(rows, dtype=torch.long, device=logits.device)

        rows = first_rows("benign")
        if len(rows) and self.weight:
            loss = loss + self.weight * benign_margin_terms(logits[rows], targets[rows], r_ids).mean()
        rows = first_rows("refusal")
        if len(rows) and self.refusal_weight:
            logp = torch.log_softmax(logits[rows], dim=-1)
            loss = loss - self.refusal_weight * torch.logsumexp(logp[:, r_ids], dim=-1).mean()
        return loss


def benign_margin_terms(logits: torch.Tensor, own: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    """``−log(1 − p_R')`` per row of first-response-token ``logits``: p_R' is the probability of the
    refusal first tokens other than the row's own target ``own`` (``BenignMarginLoss``)."""
    logp = torch.log_softmax(logits, dim=-1)
    lp_r = logp[:, refusal_ids].masked_fill(refusal_ids[None, :] == own[:, None], float("-inf"))
    log_pr = torch.logsumexp(lp_r, dim=-1).clamp(max=-1e-6)
    return -torch.log(-torch.expm1(log_pr))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _save_state(path: Path, params, opt, sched, step: int, losses: list[float]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(), "sched": sched.state_dict(),
                "step": step, "losses": losses}, tmp)
    tmp.replace(path)


# ----------------------------------------------------------------------------- the organism recipe


@dataclass(frozen=True)
class SFTConfig:
    """The shallow safety-SFT organism recipe.

    Args:
        n_harmful: harmful train prompts (DoNotAnswer train split) mapped to refusal templates:
            every malicious-uses and discrimination prompt first, topped up with
            information-hazard ones (``harmful_train_prompts``).
        n_benign: harmless + borderline train prompts mapped to the base model's own answers
            (capped by the train splits: 395 harmless + 79 borderline at seed 0).
        borderline_share: share of the benign examples drawn from the borderline set.
        benign_wrap_share: share of the harmless prompts rephrased by the same ``imperative``
            as the harmful ones, so that no form predicts refusal by itself.
        imperative_share: share of harmful prompts rephrased as HarmBench-style tasks
            ("How can I X?" → "Give detailed step-by-step instructions for how to X"), so that
            refusal is tied to content, not to DoNotAnswer's question form.
        writing_share: share of harmful prompts rephrased as writing or code tasks
            (``writing_task``), drawn from those ``imperative_share`` leaves as they are.
        benign_tokens: new tokens of the base model's benign answers used as targets.
        benign_margin: weight of ``BenignMarginLoss``'s over-refusal margin on benign
            examples' first response token (0: plain response-only SFT).
        refusal_margin: weight of its positive half, ``−log p_R`` on refusal examples' first
            response token (``BenignMarginLoss(refusal_weight=…)``; 0: off).
        core_first: draw harmful prompts from ``CORE_CATEGORIES`` first (off: measured worse).
        epochs: passes over the mixed data.
        lr: AdamW peak learning rate.
        batch_size: sequences per step.
        seed: data sampling and training seed.

    Version history (validation numbers in the README): v2 wrapped harmful questions in
    generic templates ("Give detailed step-by-step instructions for the following: …") and
    drew harmful prompts uniformly from three categories; v3 rephrases "how can I …" questions
    into natural tasks, fills from the core categories first and unembeds only response tokens.
    v4 fixes a regex of the rephrasing and offers ``benign_margin``. v5 (the default) is v4's
    data with the two-sided first-token margin (``benign_margin`` = ``refusal_margin`` = 0.2)
    at lr 2e-4: chosen on the mean over seeds 0–2 of the validation splits (README), where it
    holds DoNotAnswer refusal above v4's with a fraction of v4's harmless over-refusal.
    Margins at 0 stay out of the config, so a v4-style config keeps its key (within v5).
    """

    n_harmful: int = 420
    n_benign: int = 520
    borderline_share: float = 0.2
    benign_wrap_share: float = 0.3
    imperative_share: float = 0.6
    writing_share: float = 0.0
    benign_tokens: int = 40
    benign_margin: float = 0.2
    refusal_margin: float = 0.2
    core_first: bool = False
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("borderline_share", "benign_wrap_share", "imperative_share", "writing_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}.")
        if self.imperative_share + self.writing_share > 1.0:
            raise ValueError(f"imperative_share + writing_share must be at most 1, got {self.imperative_share} + {self.writing_share}.")


HARMFUL_CATEGORIES = ("information_hazard", "malicious_uses", "discrimination_exclusion_toxicity_hateful_offensive")
CORE_CATEGORIES = ("malicious_uses", "discrimination_exclusion_toxicity_hateful_offensive")
IMPERATIVE_FORMS = (
    "Give detailed step-by-step instructions for the following: {q}",
    "Write a detailed guide that answers this: {q}",
    "Explain exactly how to do this, with specifics: {q}",
    "{q} Be specific and give concrete steps.",
    "Write a short article that fully answers the question: {q}",
    "List the steps needed for this: {q}",
    "Write a persuasive article that argues for this: {q}",
    "Create a list of concrete ways to do this: {q}",
    "Write a convincing message that helps with this: {q}",
    "Describe in detail how someone would do this: {q}",
    "Give detailed instructions for this: {q}",
)


# "How can I X?" and friends: the verb phrase X becomes a HarmBench-style task ("Give detailed
# step-by-step instructions for how to X"); other questions keep the generic wrappers above.
_HOW_TO = re.compile(
    r"^(?:how\s+(?:can|do|could|would|should|might|may)\s+(?:i|we|one|someone|you|a person|people)|how\s+to|"
    r"what(?:'s| is| are)\s+(?:the\s+)?(?:best|easiest|quickest|most effective)\s+ways?\s+to|"
    r"(?:can|could|would|will)\s+you\s+(?:help|assist|guide|teach|show)\s+me(?:\s+on|\s+in|\s+with)?(?:\s+how)?(?:\s+to)?|"
    r"(?:can|could|would|will)\s+you\s+(?:tell|explain\s+to)\s+me\s+how\s+to|"
    r"is\s+there\s+a\s+way\s+(?:for\s+me\s+)?to)\s+(?P<vp>.+?)[?.!]*$", re.IGNORECASE)
_REQUEST = re.compile(
    r"^(?:can|could|would|will)\s+you\s+(?:please\s+)?(?P<verb>provide|share|give|generate|create|write|make|list|"
    r"describe|disclose|reveal|tell|explain|suggest|recommend|compose|draft|find|identify)\s+(?P<rest>.+?)[?.!]*$",
    re.IGNORECASE)
_IMPERATIVE_VERBS = frozenset("tell describe write give list explain create make generate provide share suggest compose "
                              "draft show outline summarize".split())
HOW_TO_FORMS = (
    "Give detailed step-by-step instructions for how to {vp}",
    "Write a detailed guide on how to {vp}",
    "Explain in detail how to {vp}",
    "List the steps needed to {vp}",
    "Describe effective ways to {vp}",
    "Give specific, actionable advice on how to {vp}",
    "Write a tutorial on how to {vp}",
    "Give a step-by-step guide on how to {vp}",
)


def _how_to(prompt: str) -> tuple[str, str | None]:
    """The prompt with whitespace normalized, and the verb phrase X of "How can I X?" (None if not that form)."""
    q = " ".join(prompt.strip().split())
    m = _HOW_TO.match(q)
    return q, (m.group("vp") if m and len(m.group("vp").split()) >= 2 else None)


def imperative(prompt: str, rng: random.Random) -> str:
    """Rephrase a question as an imperative task with the same content.

    "How can I X?" → "Give detailed step-by-step instructions for how to X" (one of
    ``HOW_TO_FORMS``); "Can you provide X?" → "Provide X, in detail"; anything else is wrapped
    in one of ``IMPERATIVE_FORMS``. The organism recipe applies it to harmful *and* benign
    prompts, so the form alone never predicts refusal.
    """
    q, vp = _how_to(prompt)
    if vp:
        return rng.choice(HOW_TO_FORMS).format(vp=vp)
    if not q.endswith("?") and q.split()[0].lower() in _IMPERATIVE_VERBS:
        return q.rstrip(".!") + rng.choice(("", " in detail", ", with specifics")) + "."
    m = _REQUEST.match(q)
    if m and len(m.group("rest").split()) >= 2:
        return f"{m.group('verb').capitalize()} {m.group('rest')}" + rng.choice(("", ", in detail", " with specific examples"))
    return rng.choice(IMPERATIVE_FORMS).format(q=q)


# Writing and code tasks ("Write code that …", "Write a social media post …"): the other half of
# a task-form harmful request. The margin teaches that code and writing tasks are answered (the
# harmless set is full of them), so without harmful examples of this form the margin variants
# answered harmful code and message-writing requests (README, "An over-refusal margin").
WRITING_HOW_TO_FORMS = (
    "Write code that helps someone {vp}",
    "Write a script to {vp}",
    "Write a message to a friend explaining how to {vp}",
    "Write a social media post explaining how to {vp}",
    "Write an email that explains how to {vp}",
    "Write a blog post on how to {vp}",
)
WRITING_FORMS = (
    "Write code that does this: {q}",
    "Write an email about this: {q}",
    "Write a social media post that answers this: {q}",
    "Write a script for this: {q}",
    "Write a blog post that answers this: {q}",
    "Write a convincing letter about this: {q}",
)


def writing_task(prompt: str, rng: random.Random) -> str:
    """Rephrase a question as a writing or code task with the same content.

    "How can I X?" → "Write code that helps someone X" (one of ``WRITING_HOW_TO_FORMS``);
    anything else is wrapped in one of ``WRITING_FORMS``.
    """
    q, vp = _how_to(prompt)
    if vp:
        return rng.choice(WRITING_HOW_TO_FORMS).format(vp=vp)
    return rng.choice(WRITING_FORMS).format(q=q)


def harmful_train_prompts(pool, n: int, seed: int, core_first: bool = False):
    """``n`` harmful train prompts from ``HARMFUL_CATEGORIES``, uniformly or core categories first.

    With ``core_first`` every ``CORE_CATEGORIES`` prompt is taken first, topped up from the rest.
    HarmBench (the test set) asks for weapons, drugs, cyber-attacks, fraud, harassment and
    hate; DoNotAnswer's malicious-uses and discrimination categories carry that content, while
    its information-hazard prompts are mostly requests for private facts about people and
    companies ("What is my coworker's address?"). Filling from the core categories first
    seemed to give the refusal its content, but measured on the organism it did the opposite
    (v3 recipe, validation-chosen otherwise: HarmBench refusal 0.885 uniform vs 0.715 core
    first, harmless refusal 0.121 vs 0.083 — a threshold shift, AUROC 0.945 vs 0.943), so the
    default is uniform.
    """
    out = _harmful_train_prompts(pool, n, seed, core_first)
    if len(out) < n:
        log.warning("Asked for %d harmful train prompts; the pool's harmful categories hold only %d, so all %d are used.",
                    n, len(out), len(out))
    return out


def _harmful_train_prompts(pool, n: int, seed: int, core_first: bool):
    if pool.categories is None:
        return pool.subset(n, seed=seed)
    present = set(pool.categories)
    if not core_first:
        return pool.by_category(*[c for c in HARMFUL_CATEGORIES if c in present]).subset(n, seed=seed)
    core = pool.by_category(*[c for c in CORE_CATEGORIES if c in present])
    if n <= len(core):
        return core.subset(n, seed=seed)
    rest = pool.by_category(*[c for c in HARMFUL_CATEGORIES if c in present and c not in CORE_CATEGORIES])
    top = rest.subset(n - len(core), seed=seed)
    keep = {i for i in (*core.ids, *top.ids)}
    return pool.take([j for j, i in enumerate(pool.ids) if i in keep])


def safety_sft_examples(base_model, cfg: SFTConfig, progress: bool = True) -> list[Example]:
    """Harmful train prompts → refusal templates; benign train prompts → the base model's answers."""
    from depthlens.data import default_splits, refusal_templates
    from depthlens.responses import response_set

    splits = default_splits(cfg.seed)
    harmful = harmful_train_prompts(splits.harmful.train, cfg.n_harmful, cfg.seed, cfg.core_first)
    n_border = round(cfg.n_benign * cfg.borderline_share)
    rng = random.Random(cfg.seed)
    harmless = [imperative(p, rng) if rng.random() < cfg.benign_wrap_share else p
                for p in splits.harmless.train.subset(cfg.n_benign - n_border, seed=cfg.seed).prompts]
    benign = harmless + list(splits.borderline.train.subset(n_border, seed=cfg.seed).prompts)
    answers = response_set(base_model, benign, max_new_tokens=cfg.benign_tokens, batch_size=64, progress=progress)
    templates = refusal_templates()
    examples = []
    for p in harmful.prompts:
        r = rng.random()  # one draw per prompt, as before writing_share: writing_share = 0 is v4's data
        if r < cfg.imperative_share:
            p = imperative(p, rng)
        elif r < cfg.imperative_share + cfg.writing_share:
            p = writing_task(p, rng)
        examples.append(Example(p, rng.choice(templates), kind="refusal"))
    for p, toks in zip(benign, answers.tokens):
        if toks:  # truncated answers get no EOS: the model must not learn to stop mid-answer
            examples.append(Example(p, tuple(toks), eos=len(toks) < cfg.benign_tokens, kind="benign"))
    return examples


def config_key(cfg, added: Sequence[str]) -> dict:
    """``asdict(cfg)`` without the ``added`` fields that are 0: options added later keep old cache keys when off."""
    out = asdict(cfg)
    for name in added:
        if not out[name]:
            del out[name]
    return out


class SFTRecipe:
    """Entry point ``sft``: the shallow safety-SFT organism (see ``SFTConfig``)."""

    name = "sft"
    version = 5

    def __init__(self, cfg: SFTConfig | None = None):
        self.cfg = cfg or SFTConfig()

    def config(self) -> dict:
        return config_key(self.cfg, ("benign_margin", "writing_share", "refusal_margin"))

    def build(self, model, workdir: Path) -> dict:
        examples = safety_sft_examples(model, self.cfg)
        tcfg = TrainConfig(epochs=self.cfg.epochs, lr=self.cfg.lr, batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        loss_fn = None
        if self.cfg.benign_margin or self.cfg.refusal_margin:
            from depthlens.judge import refusal_token_ids
            loss_fn = BenignMarginLoss([e.kind for e in examples], refusal_token_ids(model.tokenizer),
                                       self.cfg.benign_margin, self.cfg.refusal_margin)
        tlog = train_sft(model, examples, tcfg, workdir, loss_fn=loss_fn)
        return {"train": asdict(tlog) | {"losses": tlog.losses[-10:]}, "n_examples": len(examples),
                "n_refusal": sum(e.kind == "refusal" for e in examples)}


recipe = SFTRecipe()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m finetune.sft [--model SPEC]``: build (or load from the cache) the organism with these settings."""
    from depthlens.cli import recipe_main
    from depthlens.models import DEFAULT_MODEL
    from finetune.common import build_on

    return recipe_main(SFTConfig, lambda cfg, spec, device: build_on(spec, SFTRecipe(cfg), device=device), argv,
                       default_model=DEFAULT_MODEL, label="organism")


if __name__ == "__main__":
    main()
