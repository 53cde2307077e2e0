"""Batched forward passes over chat sequences: next-token log-probs, per-token log-probs,
and streamed residual activations at chosen positions.

Analyses never loop over prompts around a forward pass: they hand a list of sequences to
these helpers, which bucket by length, left-pad, run the bridge with only the hooks they
need (``names_filter``; optionally ``stop_at_layer``), and gather just the positions asked
for, so a 30-layer cache is never materialized.

    >>> lp = last_logprobs(model, seqs)                           # [n, vocab]
    >>> tok_lp = token_logprobs(model, seqs)                      # list of [len-1] tensors
    >>> acts = residuals_at(model, seqs, positions, kind="resid_pre")  # [n_layers, n, d_model]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from depthlens.chat import ChatSequence, length_batches, pad_batch
from depthlens.generate import Hook, hooks_active
from depthlens.models import hook_name

SeqLike = ChatSequence | Sequence[int]


def _ids(s: SeqLike) -> tuple[int, ...]:
    return s.ids if isinstance(s, ChatSequence) else tuple(s)


def _pad_id(model) -> int:
    tok = model.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def iter_batches(model, seqs: Sequence[SeqLike], batch_size: int, progress: bool = False, desc: str = "forward"):
    """Yield ``(indices, Batch)`` over length-bucketed, left-padded batches on the model's device."""
    ids = [_ids(s) for s in seqs]
    if any(len(s) == 0 for s in ids):
        raise ValueError("Cannot run a forward pass on an empty sequence.")
    batches = length_batches([len(s) for s in ids], batch_size)
    for idx in tqdm(batches, desc=desc, disable=not progress or len(batches) < 2, leave=False):
        yield idx, pad_batch([ids[i] for i in idx], _pad_id(model)).to(model.device)


@torch.inference_mode()
def last_logprobs(model, seqs: Sequence[SeqLike], *, batch_size: int = 16, fwd_hooks: Sequence[Hook] = (),
                  progress: bool = False) -> Float[Tensor, "n vocab"]:
    """Log-softmax of the next-token logits after the last token of each sequence (float32, CPU)."""
    out = torch.empty(len(seqs), model.bridge.cfg.d_vocab)
    with hooks_active(model, fwd_hooks):
        for idx, batch in iter_batches(model, seqs, batch_size, progress):
            logits = model.bridge(batch.input_ids, attention_mask=batch.attention_mask)
            out[idx] = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()
    return out


@torch.inference_mode()
def token_logprobs(model, seqs: Sequence[SeqLike], *, start: Sequence[int] | None = None, batch_size: int = 16,
                   fwd_hooks: Sequence[Hook] = (), full_dist: bool = False, progress: bool = False) -> list[Tensor]:
    """Per-token log-probs of each sequence's own tokens from position ``start[i]`` on.

    Returns for sequence i a tensor of length ``len_i - start_i`` (log p(token_t | tokens<t) for
    t = start_i … len_i−1), or with ``full_dist`` the full ``[len_i - start_i, vocab]`` log-softmax.
    """
    ids = [_ids(s) for s in seqs]
    starts = list(start) if start is not None else [1] * len(ids)
    if any(not 1 <= s <= len(i) for s, i in zip(starts, ids)):
        raise ValueError("Each start position must lie in 1..len(sequence).")
    out: list[Tensor] = [torch.empty(0)] * len(ids)
    with hooks_active(model, fwd_hooks):
        for idx, batch in iter_batches(model, seqs, batch_size, progress):
            logits = model.bridge(batch.input_ids, attention_mask=batch.attention_mask)
            logp = torch.log_softmax(logits.float(), dim=-1)
            width = batch.input_ids.shape[1]
            for row, i in enumerate(idx):
                off = width - len(ids[i])
                pos = torch.arange(off + starts[i], width, device=logp.device)
                dist = logp[row, pos - 1]
                if full_dist:
                    out[i] = dist.cpu()
                else:
                    out[i] = dist.gather(-1, batch.input_ids[row, pos].unsqueeze(-1)).squeeze(-1).cpu()
    return out


@torch.inference_mode()
def residuals_at(model, seqs: Sequence[SeqLike], positions: Sequence[int | Sequence[int]], *,
                 kind: str = "resid_post", layers: Sequence[int] | None = None, batch_size: int = 16,
                 reduce: str = "none", fwd_hooks: Sequence[Hook] = (), progress: bool = False,
                 ) -> Float[Tensor, "layer n d_model"]:
    """Residual activations ``kind`` at given positions (indices into each unpadded sequence).

    ``positions[i]`` is one index (negative counts from the end) or, with ``reduce="mean"``, a
    list of indices averaged over. Streams batch by batch with a ``names_filter`` and stops at
    the last layer needed; returns float32 on CPU, shape ``[len(layers), n, d_model]``.
    """
    layers = list(range(model.n_layers)) if layers is None else [model.check_layer(l) for l in layers]
    names = [hook_name(kind, l) for l in layers]
    wanted = set(names)
    stop = max(layers) + 1
    ids = [_ids(s) for s in seqs]
    out = torch.empty(len(layers), len(ids), model.d_model)
    with hooks_active(model, fwd_hooks):
        for idx, batch in iter_batches(model, seqs, batch_size, progress, desc=f"cache {kind}"):
            _, cache = model.bridge.run_with_cache(
                batch.input_ids, attention_mask=batch.attention_mask,
                names_filter=lambda n: n in wanted, stop_at_layer=stop if stop < model.n_layers else None,
            )
            width = batch.input_ids.shape[1]
            for row, i in enumerate(idx):
                off = width - len(ids[i])
                p = positions[i]
                plist = [p] if isinstance(p, int) else list(p)
                abs_pos = [off + (q if q >= 0 else len(ids[i]) + q) for q in plist]
                for j, name in enumerate(names):
                    vals = cache[name][row, abs_pos].float()
                    out[j, i] = vals.mean(0) if (reduce == "mean" or len(abs_pos) > 1) else vals[0]
    return out

