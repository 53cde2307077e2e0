"""The loss functions of the first-order recipes, as functions of a model and one padded batch.

Each is a ``loss_fn(model, ids, mask, attention_mask, index_list)`` for ``finetune.train``'s
loop (or a plain function of logits under it): the response-only cross-entropy, its
example-mean form, the organism's first-token over-refusal margin, and deep alignment's
utility anchors. Every one reads the logits of ``response_logits``, which unembeds only the
response positions and runs the chat prefix a batch shares once.

    >>> loss = response_loss(model, ids, mask, att)  # a fragment: model, ids, mask and examples come from the recipe  # doctest: +SKIP
    >>> train_sft(model, examples, TrainConfig(), loss_fn=BenignMarginLoss(kinds, refusal_ids, 0.2, 0.2))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import copy
from collections.abc import Sequence

import torch

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel


def response_loss(model: HookedModel, batch_ids, batch_mask, attention_mask, reduction: str = "mean"):
    """Cross-entropy on masked (response) tokens; ``reduction="none"`` gives per-token values.

    Runs on ``model.plain()`` (the same parameters without hook points: same logits, less
    overhead per step); use a custom ``loss_fn`` on ``model.bridge`` when hooks must fire.
    With ``reduction="mean"`` only response positions are unembedded (``response_logits``).
    """
    if reduction == "none":
        logits = loss_path(model)(batch_ids, attention_mask)[:, :-1].float()
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


def response_logits(model: HookedModel, batch_ids, batch_mask, attention_mask):
    """(logits, targets, keep) at the response positions of a right-padded batch, in (row, position) order.

    The chat prefix every sequence shares (system prompt, user header: a quarter of a short
    training sequence on SmolLM2) is run once at batch 1 into a KV cache that the rows then
    attend to; the cache is expanded, not copied, so gradients from every row flow back
    through it and the loss and its gradient are those of the full batch (tested). ``keep``
    is the ``[batch, positions]`` mask of the returned rows, counted from column ``p``.
    Logits are fp32; only response positions are unembedded (on a 135M model with a 49k
    vocabulary the unembedding is about a third of the compute per token). Runs as one
    forward of ``loss_path(model)``.
    """
    return loss_path(model)(batch_ids, attention_mask, batch_mask)


class LossPath(torch.nn.Module):
    """The losses' view of a causal LM as one module whose ``forward`` runs everything they use.

    ``forward(ids, att)`` gives the full logits (``lm(input_ids, attention_mask).logits``);
    ``forward(ids, att, mask)`` gives ``response_logits``'s (logits, targets, keep): the
    decoder, with the shared chat prefix run once when ``share_prefix``, and the unembedding
    at the response positions only. Because every parameter the losses touch is reached
    inside this one ``forward``, a wrapper that acts in forward hooks sees all of it: FSDP2
    (``finetune.sharding``) makes this module its root and gathers the embedding, final
    norm and unembedding in its pre-forward hook, each decoder block in the block's own.
    ``share_prefix`` is off under activation checkpointing (a checkpointed block recomputes
    its forward in the backward pass, and the prefix's KV cache would be extended twice).
    """

    def __init__(self, lm: torch.nn.Module, share_prefix: bool = True):
        super().__init__()
        self.lm = lm
        self.share_prefix = share_prefix

    def forward(self, batch_ids, attention_mask, batch_mask=None):
        if batch_mask is None:
            return self.lm(input_ids=batch_ids, attention_mask=attention_mask).logits
        from transformers import DynamicCache

        from depthlens.runtime.forward import expand_cache, kv_kwargs

        lm = self.lm
        decoder = lm.get_decoder()
        p = shared_prefix_len(batch_ids, batch_mask) if self.share_prefix else 0
        if p:
            cache = DynamicCache(config=lm.config)
            decoder(input_ids=batch_ids[:1, :p], **kv_kwargs(decoder, cache), use_cache=True)
            expand_cache(cache, batch_ids.shape[0])
            hidden = decoder(input_ids=batch_ids[:, p:], attention_mask=attention_mask,
                             **kv_kwargs(decoder, cache), use_cache=True).last_hidden_state
        else:
            hidden = decoder(input_ids=batch_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        keep = batch_mask[:, 1:][:, p:].bool()
        targets = batch_ids[:, 1:][:, p:][keep]
        logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        cap = getattr(lm.config, "final_logit_softcapping", None)
        if cap:  # as the HF head does after the unembedding (Gemma 2)
            logits = torch.tanh(logits / cap) * cap
        return logits, targets, keep


def loss_path(model) -> LossPath:
    """The ``LossPath`` the losses run ``model`` through: the one the training loop installed
    for its run (sharded, checkpointed: ``finetune.train``), else one around ``model.plain()``."""
    installed = model.__dict__.get("_loss_path") if hasattr(model, "__dict__") else None
    return installed if installed is not None else LossPath(model.plain())


def plain_loss(model, ids, mask, att, idx):
    """``response_loss`` with the loop's ``loss_fn`` signature (the default loss)."""
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
    form (measured on the organism). The margin is the negative half of a preference pair at the one position
    where this organism decides to refuse, computed from the logits the CE already needs (no
    extra forward). ``weight = 0`` is plain response-only SFT.

    ``refusal_weight`` adds the positive half, ``refusal_weight · mean_refusal −log p_R`` over
    refusal examples (all of R). In the CE the first response token is one of ≈ 30 tokens of a
    refusal, so with the benign half alone the decision at that position is pushed away from R
    about ten times harder on benign rows than towards R on harmful rows; with both halves at
    the same weight it is a balanced binary cross-entropy "refuse or not" at that position.

    Its margins are means over a subset of rows, so the loss is ``step_normalised``: called
    by the training loop with ``step`` (``finetune.train.StepTotals``), it returns its
    micro-batch's contribution to the step's loss, each mean taken over the whole step (its
    response tokens, its benign and refusal rows), which makes micro-batches and processes
    add up to the step's loss. Without ``step`` the batch is the step (the value as before).
    """

    step_normalised = True

    def __init__(self, kinds: Sequence[str], refusal_ids: Sequence[int], weight: float,
                 refusal_weight: float = 0.0):
        if weight < 0 or refusal_weight < 0:
            raise ValueError(f"The margin weights must be >= 0, got {weight} and {refusal_weight}.")
        if not refusal_ids:
            raise ValueError("The benign margin needs a non-empty refusal token set R.")
        self.kinds, self.refusal_ids = list(kinds), sorted(set(refusal_ids))
        self.weight, self.refusal_weight = weight, refusal_weight

    def __call__(self, model, ids, mask, att, idx, step=None):
        logits, targets, keep = response_logits(model, ids, mask, att)
        if not len(targets):
            return logits.sum() * 0.0
        counts = keep.sum(1)
        # (example, response tokens) of every row of the step: the denominators of its means
        step_rows = list(zip(step.indices, step.targets)) if step is not None else list(zip(idx, counts.tolist()))
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / max(1, sum(c for _, c in step_rows))
        if not (self.weight or self.refusal_weight):
            return loss
        # row of each sequence's first response token in the flattened (batch, position) order
        first = torch.cumsum(counts, 0) - counts
        r_ids = torch.tensor(self.refusal_ids, device=logits.device)

        def first_rows(kind):
            rows = [int(first[b]) for b, i in enumerate(idx) if self.kinds[i] == kind and counts[b] > 0]
            n_step = sum(1 for i, c in step_rows if self.kinds[i] == kind and c > 0)
            return torch.tensor(rows, dtype=torch.long, device=logits.device), max(1, n_step)

        rows, n = first_rows("benign")
        if len(rows) and self.weight:
            loss = loss + self.weight * benign_margin_terms(logits[rows], targets[rows], r_ids).sum() / n
        rows, n = first_rows("refusal")
        if len(rows) and self.refusal_weight:
            logp = torch.log_softmax(logits[rows], dim=-1)
            loss = loss - self.refusal_weight * torch.logsumexp(logp[:, r_ids], dim=-1).sum() / n
        return loss


def benign_margin_terms(logits: torch.Tensor, own: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    """``−log(1 − p_R')`` per row of first-response-token ``logits``: p_R' is the probability of the
    refusal first tokens other than the row's own target ``own`` (``BenignMarginLoss``)."""
    logp = torch.log_softmax(logits, dim=-1)
    lp_r = logp[:, refusal_ids].masked_fill(refusal_ids[None, :] == own[:, None], float("-inf"))
    log_pr = torch.logsumexp(lp_r, dim=-1).clamp(max=-1e-6)
    return -torch.log(-torch.expm1(log_pr))


class Frozen:
    """A no-grad copy of a model's plain module, usable wherever ``response_logits`` takes a model."""

    def __init__(self, model):
        self._module = copy.deepcopy(model.plain()).eval().requires_grad_(False)

    def plain(self):
        return self._module


class UtilityAnchorLoss:
    """Example-mean response NLL, plus two optional anchors on the utility rows.

    For a utility example with response positions t = 1..T the loss is
    ``(1/T) Σ_t [−log π_θ(y_t | ·) + kl · KL(π_ref(· | y_<t) ‖ π_θ(· | y_<t))] + margin · −log(1 − p_R')``,
    p_R' the probability of the refusal first tokens R (other than y_1) at t = 1, the organism
    recipe's benign margin (``BenignMarginLoss``); safety examples keep their plain token-mean
    NLL. The call returns the mean over its rows, as ``train_sft(weighting="examples")``
    expects. The reference logits come from one no-grad forward of ``reference``
    (``Frozen``) over the micro-batch's utility rows only.
    """

    def __init__(self, utility: Sequence[bool], reference=None, kl: float = 0.0,
                 refusal_ids: Sequence[int] = (), margin: float = 0.0):
        if kl < 0 or margin < 0:
            raise ValueError(f"The anchor weights must be >= 0, got kl={kl} and margin={margin}.")
        if kl and reference is None:
            raise ValueError("The KL anchor needs a reference model.")
        if margin and not refusal_ids:
            raise ValueError("The benign margin needs a non-empty refusal token set R.")
        self.utility, self.reference, self.kl = list(utility), reference, kl
        self.refusal_ids, self.margin = sorted(set(refusal_ids)), margin

    def __call__(self, model, ids, mask, att, idx):
        logits, targets, keep = response_logits(model, ids, mask, att)
        if not len(targets):
            return logits.sum() * 0.0
        per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        counts = keep.sum(1)
        rows = [b for b, i in enumerate(idx) if self.utility[i] and counts[b] > 0]
        if not rows:
            return row_means(per_token, keep).mean()
        sel = torch.tensor(rows, device=ids.device)
        if self.kl:
            with torch.no_grad():
                ref, _, _ = response_logits(self.reference, ids[sel], mask[sel], att[sel])
            tok = torch.isin(row_index(keep), sel)
            if ref.shape[0] != int(tok.sum()):
                raise RuntimeError("UtilityAnchorLoss: reference and model response positions disagree.")
            ref_logp = torch.log_softmax(ref.float(), dim=-1)
            kl = (ref_logp.exp() * (ref_logp - torch.log_softmax(logits[tok], dim=-1))).sum(-1)
            per_token = per_token.index_add(0, torch.nonzero(tok).squeeze(1), self.kl * kl)
        per_row = row_means(per_token, keep)
        if self.margin:
            first = (torch.cumsum(counts, 0) - counts)[sel]
            r_ids = torch.tensor(self.refusal_ids, device=logits.device)
            per_row = per_row.index_add(0, sel, self.margin * benign_margin_terms(logits[first], targets[first], r_ids))
        return per_row.mean()
