"""Batched forward passes over chat sequences: next-token log-probs, per-token log-probs,
and streamed residual activations at chosen positions.

Analyses never loop over prompts around a forward pass: they hand a list of sequences to
these helpers, which bucket by length, left-pad, run only what is needed (the bridge with a
``names_filter`` and ``stop_at_layer``, or the plain HF blocks up to the last layer asked
for, with the prefix all sequences share computed once), and gather just the positions
asked for, so a 30-layer cache is never materialized.

    >>> from depthlens.data.chat import build_chat
    >>> from depthlens.models.load import load_model
    >>> model = load_model("tiny-llama")
    >>> seqs = [build_chat(model.tokenizer, p) for p in ("How do I bake bread?", "Name a colour.")]
    >>> tuple(last_logprobs(model, seqs).shape)                              # [n, vocab]
    (2, 512)
    >>> [len(t) for t in token_logprobs(model, seqs)] == [len(s) - 1 for s in seqs]
    True
    >>> tuple(residuals_at(model, seqs, [-1, -1], kind="resid_pre").shape)   # [n_layers, n, d_model]
    (2, 2, 64)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import functools
import inspect
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from depthlens.data.chat import ChatSequence, check_context, length_batches, pad_batch
from depthlens.infra.errors import UsageError
from depthlens.models.families import has_sliding_window
from depthlens.models.hooked_model import hook_name
from depthlens.runtime.hooks import Hook, unmirrored_bridge_hooks, hooks_active
from depthlens.infra.validate import integer, one_of, positive_int

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

SeqLike = ChatSequence | Sequence[int]


def kv_kwargs(module, cache) -> dict:
    """``{name: cache}`` for an HF forward, under this transformers version's keyword.

    transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns and goes
    in 5.40); the range in ``pyproject.toml`` spans both, so the name is read from the
    module's signature (once per class).
    """
    return {_kv_name(type(module)): cache}  # type: ignore[arg-type]  # a class is hashable


@functools.cache
def _kv_name(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _ids(s: SeqLike) -> tuple[int, ...]:
    return s.ids if isinstance(s, ChatSequence) else tuple(s)


def _checked_ids(model, seqs) -> list[tuple[int, ...]]:
    ids = [_ids(s) for s in seqs]
    check_token_ids(model, ids)
    return ids


def check_token_ids(model, ids: Sequence[Sequence[int]]) -> None:
    """Every id an integer in ``0..d_vocab-1`` (a float id would be truncated, a large one index past the
    embedding); else one ``UsageError`` naming the sequence and position."""
    import operator

    vocab = int(model.bridge.cfg.d_vocab)
    for i, seq in enumerate(ids):
        if not all(type(t) is int for t in seq):
            for j, t in enumerate(seq):
                try:
                    ok = not isinstance(t, (bool, float)) and operator.index(t) is not None
                except TypeError:
                    ok = False
                if not ok:
                    raise UsageError(f"Token id {t!r} (sequence {i}, position {j}) is not an integer; pass integer ids.")
            seq = [operator.index(t) for t in seq]
        lo, hi = min(seq), max(seq)
        if lo < 0 or hi >= vocab:
            j, t = next((j, t) for j, t in enumerate(seq) if not 0 <= t < vocab)
            raise UsageError(f"Token id {t} (sequence {i}, position {j}) is outside the vocabulary 0..{vocab - 1}.")


def _pad_id(model) -> int:
    tok = model.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def iter_batches(model: HookedModel, seqs: Sequence[SeqLike], batch_size: int, progress: bool = False, desc: str = "forward"):
    """Yield ``(indices, Batch)`` over length-bucketed, left-padded batches on the model's device.

    Sequences longer than the model's context are refused (``depthlens.data.chat.check_context``).
    """
    ids = _checked_ids(model, seqs)
    if any(len(s) == 0 for s in ids):
        raise UsageError("Cannot run a forward pass on an empty sequence.")
    check_context(model, [len(s) for s in ids])
    batches = length_batches([len(s) for s in ids], batch_size)
    for idx in tqdm(batches, desc=desc, disable=not progress or len(batches) < 2, leave=False):
        yield idx, pad_batch([ids[i] for i in idx], _pad_id(model)).to(model.device)


@torch.inference_mode()
def last_logprobs(model: HookedModel, seqs: Sequence[SeqLike], *, batch_size: int = 16, fwd_hooks: Sequence[Hook] = (),
                  progress: bool = False) -> Float[Tensor, "n vocab"]:
    """Log-softmax of the next-token logits after the last token of each sequence (float32, CPU).

    Without hooks that only the bridge would see, this runs the plain HF model with the prefix
    every sequence shares computed once and only the last position unembedded
    (``stream_boundaries(final=True)``; tested equal to the bridge); ``fwd_hooks``, or hooks
    attached to bridge hook points, take the bridge path.
    """
    out = torch.empty(len(seqs), model.bridge.cfg.d_vocab)
    if plain_ok(model, fwd_hooks):
        head = model.plain().get_output_embeddings()
        for idx, _, states in stream_boundaries(model, seqs, [], batch_size=batch_size, final=True,
                                                progress=progress, desc="last log-probs"):
            out[idx] = torch.log_softmax(head(states[-1][:, -1]).float(), dim=-1).cpu()
        return out
    with hooks_active(model, fwd_hooks):
        for idx, batch in iter_batches(model, seqs, batch_size, progress):
            # only the last position is unembedded (the bridge passes logits_to_keep to the HF model)
            logits = model.bridge(batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1)
            out[idx] = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()
    return out


@torch.inference_mode()
def token_logprobs(model: HookedModel, seqs: Sequence[SeqLike], *, start: Sequence[int] | None = None, batch_size: int = 16,
                   fwd_hooks: Sequence[Hook] = (), full_dist: bool = False, progress: bool = False) -> list[Tensor]:
    """Per-token log-probs of each sequence's own tokens from position ``start[i]`` on.

    Returns for sequence i a tensor of length ``len_i - start_i`` (log p(token_t | tokens<t) for
    t = start_i … len_i−1), or with ``full_dist`` the full ``[len_i - start_i, vocab]`` log-softmax.
    """
    ids = _checked_ids(model, seqs)
    starts = [integer("start", s) for s in start] if start is not None else [1] * len(ids)
    if len(starts) != len(ids):
        raise UsageError(f"start has {len(starts)} entries for {len(ids)} sequences; give one per sequence.")
    if any(not 1 <= s <= len(i) for s, i in zip(starts, ids)):
        raise UsageError("Each start position must lie in 1..len(sequence).")
    out: list[Tensor] = [torch.empty(0)] * len(ids)
    with hooks_active(model, fwd_hooks):
        for idx, batch in iter_batches(model, seqs, batch_size, progress):
            width = batch.input_ids.shape[1]
            # unembed only the positions scored in this batch: the last `keep` (left padding)
            keep = max(len(ids[i]) - starts[i] for i in idx) + 1
            logits = model.bridge(batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep)
            logp = torch.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(idx):
                off = width - len(ids[i])
                pos = torch.arange(off + starts[i], width, device=logp.device)
                dist = logp[row, pos - 1 - (width - keep)]
                if full_dist:
                    out[i] = dist.cpu()
                else:
                    out[i] = dist.gather(-1, batch.input_ids[row, pos].unsqueeze(-1)).squeeze(-1).cpu()
    return out


@torch.inference_mode()
def residuals_at(model: HookedModel, seqs: Sequence[SeqLike], positions: Sequence[int | Sequence[int]], *,
                 kind: str = "resid_post", layers: Sequence[int] | None = None, batch_size: int = 16,
                 reduce: str = "none", fwd_hooks: Sequence[Hook] = (), progress: bool = False,
                 ) -> Float[Tensor, "layer n d_model"]:
    """Residual activations ``kind`` at given positions (indices into each unpadded sequence).

    ``positions[i]`` is one integer index (negative counts from the end) or, with
    ``reduce="mean"``, a list of indices averaged over; ``reduce="none"`` takes one index per
    sequence and refuses a list, so no average is ever taken unasked. Streams batch by batch and stops at the last layer needed;
    returns float32 on CPU, shape ``[len(layers), n, d_model]``. ``resid_pre``/``resid_post``
    without hooks only the bridge sees (``plain_ok``) come from the plain blocks with the shared prefix computed once
    (``stream_boundaries``); other kinds, or bridge hooks, run the bridge with a ``names_filter``.
    """
    one_of("reduce", reduce, REDUCTIONS)
    positive_int("batch_size", batch_size)
    layers = list(range(model.n_layers)) if layers is None else [model.check_layer(l) for l in layers]
    ids = _checked_ids(model, seqs)
    if isinstance(positions, (str, bytes)) or len(positions) != len(ids):
        raise UsageError(f"positions must hold one entry per sequence ({len(ids)}), got {positions!r:.80}.")
    abs_pos = []
    for i, p in enumerate(positions):
        single = not hasattr(p, "__iter__") or getattr(p, "ndim", 1) == 0  # int, NumPy or 0-d tensor index
        if not single and reduce == "none":
            raise UsageError(f"positions[{i}] is a list {p!r:.60}, but reduce='none' takes one index per sequence; "
                             "pass reduce='mean' to average over several positions.")
        plist = [integer(f"positions[{i}]", v) for v in ([p] if single else list(p))]  # type: ignore[arg-type]
        q = [v if v >= 0 else len(ids[i]) + v for v in plist]
        if not q or min(q) < 0 or max(q) >= len(ids[i]):
            raise UsageError(f"Sequence {i} has {len(ids[i])} tokens; positions {plist} fall outside it.")
        abs_pos.append(q)
    out = torch.empty(len(layers), len(ids), model.d_model)

    def gather(idx, width, states):
        for row, i in enumerate(idx):
            cols = [width - len(ids[i]) + q for q in abs_pos[i]]
            for j, st in enumerate(states):
                vals = st[row, cols].float()
                out[j, i] = vals.mean(0)  # one position (reduce="none"), or the mean over several

    first = min(min(q) for q in abs_pos) if abs_pos else 0
    stream_residuals(model, ids, layers, gather, kind=kind, first=first, batch_size=batch_size, fwd_hooks=fwd_hooks,
                     progress=progress)
    return out


@torch.inference_mode()
def stream_residuals(model: HookedModel, seqs: Sequence[SeqLike], layers: Sequence[int],
                     on_batch: Callable[[list[int], int, list[Tensor]], None], *, kind: str = "resid_post",
                     first: int = 0, batch_size: int = 16, fwd_hooks: Sequence[Hook] = (), progress: bool = False,
                     desc: str | None = None) -> None:
    """The one streaming pass behind ``residuals_at`` and reductions over several sites at once.

    Calls ``on_batch(indices, width, states)`` per batch, ``states[j]`` the left-padded
    ``[batch, width, d_model]`` residual ``kind`` at ``layers[j]`` (token q of sequence i at
    column ``width − len(seq_i) + q``; only columns ≥ ``first``, the earliest position the
    caller reads, are guaranteed). ``resid_pre``/``resid_post`` without hooks only the bridge
    sees come from the plain blocks with the shared prefix computed once (``stream_boundaries``);
    other kinds, or bridge hooks, run the bridge with a ``names_filter``. Either stops after
    the last layer needed.
    """
    if kind in BOUNDARY_KINDS and plain_ok(model, fwd_hooks):
        for idx, width, states in stream_boundaries(model, seqs, [boundary_index(kind, l) for l in layers],
                                                    batch_size=batch_size, max_prefix=first, progress=progress,
                                                    desc=desc or f"{kind}"):
            on_batch(idx, width, states)
        return
    names = [hook_name(kind, l) for l in layers]
    wanted = set(names)
    stop = max(layers) + 1
    with hooks_active(model, fwd_hooks):
        for idx, batch in iter_batches(model, seqs, batch_size, progress, desc=desc or f"cache {kind}"):
            _, cache = model.bridge.run_with_cache(
                batch.input_ids, attention_mask=batch.attention_mask,
                names_filter=lambda n: n in wanted, stop_at_layer=stop if stop < model.n_layers else None,
            )
            on_batch(idx, batch.input_ids.shape[1], [cache[n] for n in names])


BOUNDARY_KINDS = ("resid_pre", "resid_post")
REDUCTIONS = ("none", "mean")


def boundary_index(kind: str, layer: int) -> int:
    """Index of a block boundary: ``resid_pre`` of l is boundary l, ``resid_post`` of l is l + 1."""
    if kind not in BOUNDARY_KINDS:
        raise UsageError(f"Block-boundary residuals are {BOUNDARY_KINDS}, got {kind!r}.")
    return layer + (kind == "resid_post")


@torch.inference_mode()
def stream_boundaries(model: HookedModel, seqs: Sequence[SeqLike], boundaries: Sequence[int], *, batch_size: int = 16,
                      max_prefix: int | None = None, final: bool = False, progress: bool = False,
                      desc: str = "residuals"):
    """Yield ``(indices, width, states)`` per batch: the residual stream at block boundaries.

    ``states[j]`` is ``[batch, width, d_model]`` at boundary ``boundaries[j]`` (0: the
    embeddings entering block 0; b: the output of block b − 1) for the *suffix* tokens of
    the batch: the prefix every sequence shares (at most ``max_prefix`` tokens) is computed
    once per batch into a KV cache (batch 1), as in ``PrefixSharedRunner``. Suffixes are
    left-padded, so token q (≥ the prefix length) of sequence i sits at column
    ``width − len(seq_i) + q``, as in a left-padded batch of the full sequences. Runs the
    plain HF blocks (``model.plain()``) up to the last boundary asked for, never the
    unembedding; the same numbers as the bridge's ``hook_resid_pre``/``hook_resid_post``
    (``tests`` check it), at less cost. With ``final`` every block runs and ``states`` ends
    with one more entry: the decoder's output after its final norm (what the unembedding reads).
    """
    from transformers import DynamicCache

    if not boundaries and not final:
        raise UsageError("stream_boundaries needs at least one boundary (or final=True).")
    bad = [b for b in boundaries if not 0 <= b <= model.n_layers]
    if bad:
        raise UsageError(f"Block boundaries run from 0 to {model.n_layers}; got {bad}.")
    ids = _checked_ids(model, seqs)
    check_context(model, [len(s) for s in ids])  # the batches below hold suffixes only
    p = 0 if has_sliding_window(model.hf.config) else common_prefix_len(ids)  # see has_sliding_window
    if max_prefix is not None:
        p = max(0, min(p, max_prefix))
    stop = model.n_layers if final else max(1, max(boundaries))  # blocks 0..stop-1 run
    view = model.plain()
    dev = model.device
    blocks = list(view.model.layers)
    for idx, batch in iter_batches(model, [s[p:] for s in ids], batch_size, progress, desc=desc):
        got: dict[int, Tensor] = {}
        handles = []
        for b in set(boundaries):
            if b == 0:
                def pre(module, args, kwargs):
                    got[0] = args[0] if args else kwargs["hidden_states"]
                handles.append(blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(module, args, out, b=b):
                    got[b] = out[0] if isinstance(out, tuple) else out
                handles.append(blocks[b - 1].register_forward_hook(post))
        cache = None
        try:
            with blocks_until(view, stop):
                if p:
                    cache = DynamicCache(config=view.config)
                    view.model(input_ids=torch.tensor([ids[idx[0]][:p]], device=dev), **kv_kwargs(view.model, cache),
                               use_cache=True)
                    expand_cache(cache, len(idx))
                mask = batch.attention_mask
                full = torch.cat([torch.ones(mask.shape[0], p, dtype=mask.dtype, device=dev), mask], 1)
                out = view.model(input_ids=batch.input_ids, attention_mask=full, position_ids=p + position_ids(mask),
                                 **kv_kwargs(view.model, cache), use_cache=cache is not None)
        finally:
            for h in handles:
                h.remove()
        yield idx, batch.input_ids.shape[1], [got[b] for b in boundaries] + ([out.last_hidden_state] if final else [])


@contextmanager
def blocks_until(view, stop: int):
    blocks = view.model.layers
    view.model.layers = torch.nn.ModuleList(list(blocks)[:stop])
    try:
        yield
    finally:
        view.model.layers = blocks


def plain_ok(model: HookedModel, fwd_hooks: Sequence[Hook]) -> bool:
    """Whether the plain HF model computes what the bridge would: no hooks it cannot see, no soft-capping."""
    if fwd_hooks or getattr(model.plain().config, "final_logit_softcapping", None):
        return False
    return not unmirrored_bridge_hooks(model)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding (as ``generate`` assigns them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def layer_inputs(model: HookedModel, input_ids: Tensor, attention_mask: Tensor, past_key_values=None) -> list[Tensor]:
    """The residual stream entering every block (``hook_resid_pre``), from one plain forward.

    With ``past_key_values`` (an empty ``DynamicCache``) the same pass also fills the cache.
    """
    view = model.plain()
    with _block_inputs(view) as inputs:
        view.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   **kv_kwargs(view.model, past_key_values), use_cache=past_key_values is not None)
    return inputs


@contextmanager
def _block_inputs(view):
    """A list that the forward passes inside the block fill with each plain block's input (cloned)."""
    inputs: list[Tensor | None] = [None] * len(view.model.layers)
    handles = []
    for l, block in enumerate(view.model.layers):
        def grab(module, args, kwargs, l=l):
            inputs[l] = (args[0] if args else kwargs["hidden_states"]).clone()

        handles.append(block.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def forward_from_layer(model: HookedModel, resid: Tensor, layer: int, attention_mask: Tensor, logits_to_keep: int = 0) -> Tensor:
    """Logits of the model continued from ``resid`` entering block ``layer``; blocks before it never run.

    This is what ``start_at_layer`` promises; transformer-lens 4.3's bridge still runs blocks
    0..layer−1 and discards them, so this drives the plain HF blocks (``model.plain()``, same
    weights) directly: rotary embeddings and the causal mask are rebuilt by the HF model from
    ``inputs_embeds``. ``logits_to_keep`` > 0 unembeds only the last that many positions.
    Forward hooks on the plain blocks (e.g. ``depthlens.interventions.perturbation`` activation noise) fire.
    """
    model.check_layer(layer)
    view = model.plain()
    with blocks_from(view, layer):
        out = view(inputs_embeds=resid, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   use_cache=False, logits_to_keep=logits_to_keep)
    return out.logits


def common_prefix_len(seqs: Sequence[SeqLike]) -> int:
    """Length of the token prefix every sequence shares, leaving at least one token in each."""
    ids = [_ids(s) for s in seqs]
    if not ids:
        return 0
    n = min(len(s) for s in ids) - 1
    first = ids[0]
    for i in range(max(0, n)):
        if any(s[i] != first[i] for s in ids[1:]):
            return i
    return max(0, n)


@contextmanager
def blocks_from(view, layer: int):
    blocks = view.model.layers
    # Gemma, Qwen: the decoder picks block i's mask (sliding or full) as layer_types[i]
    types = getattr(view.config, "layer_types", None)
    view.model.layers = torch.nn.ModuleList(list(blocks)[layer:])
    if types is not None:
        view.config.layer_types = types[layer:]
    try:
        yield
    finally:
        view.model.layers = blocks
        if types is not None:
            view.config.layer_types = types


def expand_cache(cache, batch: int):
    for lay in cache.layers:
        if lay.keys is None:  # a block that did not run (``blocks_until``)
            continue
        lay.keys = lay.keys.expand(batch, -1, -1, -1)
        lay.values = lay.values.expand(batch, -1, -1, -1)
    return cache


class PrefixSharedRunner:
    """Re-run a fixed set of sequences from any block, computing their shared prefix once.

    Chat prompts share a long prefix (the system prompt and the user header: about half the
    tokens of a short prompt on SmolLM2). Causal attention makes that prefix's states the same
    in every sequence, so each run from block l computes it once (batch 1) into a KV cache and
    runs only the suffixes, left-padded *after* the prefix with positions that skip the
    padding — the same logits as the left-padded full sequences (``tests`` check this).
    Weight edits and forward hooks on ``model.plain()`` blocks apply to both parts.

        >>> from depthlens.data.chat import build_chat
        >>> from depthlens.models.load import load_model
        >>> model = load_model("tiny-llama")
        >>> seqs = [build_chat(model.tokenizer, p) for p in ("How do I bake bread?", "Name a colour.")]
        >>> runner = PrefixSharedRunner(model, seqs, batch_size=32)
        >>> bool(torch.allclose(runner.last_logprobs(layer=1), last_logprobs(model, seqs), atol=1e-4))
        True
    """

    def __init__(self, model, seqs: Sequence[SeqLike], batch_size: int = 32):
        from transformers import DynamicCache

        if not seqs:
            raise UsageError("PrefixSharedRunner needs at least one sequence.")
        self.model = model
        self._cache_cls = DynamicCache
        ids = _checked_ids(model, seqs)
        check_context(model, [len(s) for s in ids])  # the batches below hold suffixes only
        self.prefix_len = p = 0 if has_sliding_window(model.hf.config) else common_prefix_len(ids)
        view = model.plain()
        dev = model.device
        self.prefix_resid = (layer_inputs(model, torch.tensor([ids[0][:p]], device=dev),
                                          torch.ones(1, p, dtype=torch.long, device=dev)) if p else None)
        self.parts = []  # (indices, suffix Batch, residual entering each block for the suffix tokens)
        for idx, batch in iter_batches(model, [s[p:] for s in ids], batch_size):
            with _block_inputs(view) as inputs, torch.inference_mode():
                cache = self._prefix_cache(0, len(idx))
                view.model(input_ids=batch.input_ids, **self._suffix_kwargs(batch, cache))
            self.parts.append((idx, batch, inputs))

    def _prefix_cache(self, layer: int, batch: int):
        if not self.prefix_len:
            return None
        view, p = self.model.plain(), self.prefix_len
        cache = self._cache_cls(config=view.config)
        dev = self.model.device
        with blocks_from(view, layer):
            view.model(inputs_embeds=self.prefix_resid[layer], attention_mask=torch.ones(1, p, dtype=torch.long, device=dev),  # type: ignore[index]
                       position_ids=torch.arange(p, device=dev)[None], **kv_kwargs(view.model, cache), use_cache=True)
        # blocks below ``layer`` did not run; their (never read) cache slots only carry the length
        ref = cache.layers[layer]
        for l in range(layer):
            cache.update(torch.zeros_like(ref.keys), torch.zeros_like(ref.values), l)
        return expand_cache(cache, batch)

    def _suffix_kwargs(self, batch, cache) -> dict:
        p = self.prefix_len
        mask = batch.attention_mask
        full = torch.cat([torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device), mask], 1)
        return dict(attention_mask=full, position_ids=p + position_ids(mask), **kv_kwargs(self.model.plain().model, cache),
                    use_cache=cache is not None)

    @torch.inference_mode()
    def last_logprobs(self, layer: int = 0) -> Float[Tensor, "n vocab"]:
        """Float32 next-token log-probs at the last position of every sequence (CPU, input order)."""
        out: Tensor | None = None
        for idx, _, logits in self.run(layer, logits_to_keep=1):
            lp = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()
            if out is None:
                out = torch.empty(sum(len(i) for i, _, _ in self.parts), lp.shape[-1])
            out[torch.as_tensor(idx)] = lp
        return out

    @torch.inference_mode()
    def run(self, layer: int = 0, logits_to_keep: int = 0):
        """Yield ``(indices, suffix batch, logits)`` of every batch, continued from block ``layer``."""
        self.model.check_layer(layer)
        view = self.model.plain()
        for idx, batch, inputs in self.parts:
            cache = self._prefix_cache(layer, len(idx))
            with blocks_from(view, layer):
                out = view(inputs_embeds=inputs[layer], logits_to_keep=logits_to_keep, **self._suffix_kwargs(batch, cache))
            yield idx, batch, out.logits
