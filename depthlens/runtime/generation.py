"""Batched generation with KV cache, left padding, seeds and TransformerLens hooks active.

Generation runs Hugging Face's ``generate`` with the KV cache on ``model.plain()``, the same
parameters without the bridge's hook-point wrappers (≈ 30 % faster on the 135M default, see
``benchmarks/bench_models.py``), with PyTorch's fused attention (``sdpa``) instead of the
eager attention the bridge needs for its attention-pattern hooks (≈ 8 % of a decoding step on
the default; the same tokens on the benchmark's prompts; ``_fused_attention``). Hooks given
here whose hook point has a module equivalent (``blocks.L.hook_resid_pre`` / ``hook_resid_post`` /
``hook_attn_out`` / ``hook_mlp_out``) run as PyTorch hooks on that view, with TransformerLens semantics (``fn(x, hook)`` returns the new
activation or None). Any other hook, and hooks the caller attached to the bridge itself (unless
attached through ``mirrored_hooks``, which also places them on the view), make generation fall
back to a cache-free greedy/sampling loop over full bridge forwards: slow, but exact.

Why not ``generate`` on the bridged model: on SmolLM2 (transformer-lens 4.3, transformers 5.x)
its KV-cache path is wrong whenever a hook point is active: an identity hook turns every
continuation into "To---------" after the first token (``tests/test_generate`` checks hooked
generation against the cache-free reference, and on the real model in a slow test). Prompts are user strings
(chat-formatted here) or ``ChatSequence``s from ``depthlens.data.chat`` (with prefill/insertions).
Prompts are batched by length to keep padding small, and results come back in input order.

    >>> import torch
    >>> from depthlens.models.hooked_model import hook_name
    >>> from depthlens.models.load import load_model
    >>> model = load_model("tiny-llama")
    >>> out = generate(model, ["How do I bake bread?"], max_new_tokens=8, progress=False)
    >>> len(out.texts), len(out.tokens[0]) <= 8
    (1, True)
    >>> zero_mlp = [(hook_name("mlp_out", 1), lambda x, hook: torch.zeros_like(x))]
    >>> hooked = generate(model, ["How do I bake bread?"], max_new_tokens=8, fwd_hooks=zero_mlp, progress=False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlens.data.chat import ChatSequence, build_chat, check_context, length_batches, pad_batch
from depthlens.infra.errors import UsageError
from depthlens.runtime.forward import blocks_from, expand_cache, common_prefix_len, kv_kwargs, layer_inputs, position_ids
from depthlens.runtime.hooks import PLAIN_POINT, Hook, plain_handles, unmirrored_bridge_hooks, hooks_active, plain_hooks
from depthlens.infra.validate import integer, positive_int, prompt_list

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """Generated continuations, in the order of the prompts.

    Attributes:
        texts: the new text of each prompt (special tokens removed).
        tokens: the new token ids of each prompt (EOS and padding removed).
        prompts: the ``ChatSequence`` each continuation follows.
        config: the generation settings (for results files and caches).
    """

    texts: list[str]
    tokens: list[list[int]]
    prompts: list[ChatSequence]
    config: dict


def eos_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn (EOS and the chat end-of-turn marker)."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def _reference_generate(model, input_ids, attention_mask, *, max_new_tokens: int, stop: Sequence[int], pad_id: int,
                        do_sample: bool, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """Cache-free decoding through full bridge forwards (every hook fires on every position): exact, O(T²)."""
    ids, mask = input_ids, attention_mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    stop_t = torch.tensor(list(stop), device=ids.device)
    for _ in range(max_new_tokens):
        logits = model.bridge(ids, attention_mask=mask)[:, -1].float()
        if do_sample:
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
            if top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < top_p
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
            nxt = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        done |= torch.isin(nxt, stop_t)
        if bool(done.all()):
            break
    return ids


MIN_SHARED_PREFIX = 8


@contextmanager
def _fused_attention(view):
    """Run the plain view's attention as ``sdpa`` within the block, where the model supports it.

    The bridge boots its model with eager attention (its attention-pattern hook points need
    the weights), and the plain view shares that config. Decoding needs no pattern, so
    ``generate`` switches the config to PyTorch's fused kernel while it decodes and back
    afterwards, errors included. Not where attention logits are soft-capped (Gemma 2), which
    ``sdpa`` would skip, nor where the class has no ``sdpa`` path.
    """
    cfg = view.config
    current = getattr(cfg, "_attn_implementation", None)
    if current != "eager" or not getattr(type(view), "_supports_sdpa", False) \
            or getattr(cfg, "attn_logit_softcapping", None):
        yield
        return
    cfg._attn_implementation = "sdpa"
    try:
        yield
    finally:
        cfg._attn_implementation = current


@torch.inference_mode()
def _shared_prefix_inputs(model, seqs: Sequence[Sequence[int]], pad_id: int):
    """``(input_ids, attention_mask, cache kwargs)`` for ``generate`` with the batch's common prefix
    prefilled once, or None when the prefix is short (under ``MIN_SHARED_PREFIX``), the batch is one
    row, or a hook sits on the plain view.

    Chat prompts share the system prompt and the user header (24 tokens on SmolLM2, about half
    of a short prompt). That prefix runs once at batch 1 into a KV cache expanded (not copied)
    over the rows; the rows are the prefix followed by their left-padded remainders, and the
    padding in the middle is masked and skipped by the positions ``generate`` derives from the
    attention mask, so every row sees the same tokens at the same positions as when left-padded.
    """
    from transformers import DynamicCache

    from depthlens.models.families import has_sliding_window

    p = common_prefix_len(seqs)
    if len(seqs) < 2 or p < MIN_SHARED_PREFIX or has_sliding_window(model.hf.config):
        return None  # a sliding window would count the padding between prefix and rows
    view, dev = model.plain(), model.device
    if any(m._forward_hooks or m._forward_pre_hooks for m in view.modules()):
        return None  # a caller's hooks on the plain view (mirrored_hooks, perturbations) see whole sequences
    prefix = torch.tensor([list(seqs[0][:p])], device=dev)
    cache = DynamicCache(config=view.config)
    view.model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, **kv_kwargs(view.model, cache))
    rest = pad_batch([list(s[p:]) for s in seqs], pad_id).to(dev)
    ids = torch.cat([prefix.expand(len(seqs), -1), rest.input_ids], 1)
    mask = torch.cat([torch.ones(len(seqs), p, dtype=rest.attention_mask.dtype, device=dev), rest.attention_mask], 1)
    return ids, mask, kv_kwargs(view, expand_cache(cache, len(seqs)))


def as_chats(model: HookedModel, prompts: Sequence[str | ChatSequence]) -> list[ChatSequence]:
    """Every prompt as a ``ChatSequence``: user strings are chat-formatted, sequences kept as they are."""
    return [p if isinstance(p, ChatSequence) else build_chat(model.tokenizer, p) for p in prompts]


def _check_sampling(do_sample, temperature, top_p, seed, top_k=0) -> None:
    if not isinstance(do_sample, bool):
        raise UsageError(f"do_sample must be True or False, got {do_sample!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise UsageError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UsageError(f"top_p must be a number in (0, 1], got {top_p!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UsageError(f"top_k must be an integer >= 0 (0: no top-k cut), got {top_k!r}.")
    integer("seed", seed)


@torch.inference_mode()
def generate(
    model: HookedModel,
    prompts: Sequence[str | ChatSequence],
    max_new_tokens: int = 64,
    *,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    fwd_hooks: Sequence[Hook] = (),
    progress: bool = True,
    desc: str = "generate",
) -> Generation:
    """Continue every prompt by up to ``max_new_tokens`` (greedy unless ``do_sample``).

    Sampling keeps the ``top_k`` most likely tokens (0: all) and the nucleus ``top_p``, at ``temperature``.

    Arguments are checked first (``UsageError``: a single prompt instead of a list,
    ``max_new_tokens`` not an integer >= 1, a prompt that with its new tokens exceeds the
    model's context …). Sampling is seeded per batch from ``seed``.

        >>> from depthlens.models.load import load_model
        >>> out = generate(load_model("tiny-llama"), ["Name a colour."], max_new_tokens=3, progress=False)
        >>> len(out.texts), len(out.tokens[0]) <= 3, out.config["max_new_tokens"]
        (1, True, 3)
    """
    prompts = prompt_list("prompts", prompts, ChatSequence)
    max_new_tokens, batch_size = positive_int("max_new_tokens", max_new_tokens), positive_int("batch_size", batch_size)
    _check_sampling(do_sample, temperature, top_p, seed, top_k)
    chats = as_chats(model, prompts)
    check_context(model, [len(c) for c in chats], max_new_tokens)
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = eos_ids(tok)
    texts: list[str] = [""] * len(chats)
    tokens: list[list[int]] = [[] for _ in chats]
    batches = length_batches([len(c) for c in chats], batch_size)
    handles = plain_handles(model, fwd_hooks) if fwd_hooks else []
    exact_loop = handles is None or unmirrored_bridge_hooks(model)
    if exact_loop:  # the plain copies, if any, are not needed: the finally below removes them
        log.info("generate: hooks without a plain-module equivalent are active; using the cache-free exact loop.")
    try:
        with hooks_active(model, fwd_hooks if exact_loop else ()), \
                (nullcontext() if exact_loop else _fused_attention(model.plain())):
            for b, idx in enumerate(tqdm(batches, desc=desc, disable=not progress or len(batches) < 2, leave=False)):
                batch = pad_batch([chats[i].ids for i in idx], pad_id).to(model.device)
                if do_sample:
                    torch.manual_seed(seed * 100_003 + b)
                width = batch.input_ids.shape[1]
                if exact_loop:
                    out = _reference_generate(model, batch.input_ids, batch.attention_mask, max_new_tokens=max_new_tokens,
                                              stop=stop, pad_id=pad_id, do_sample=do_sample, temperature=temperature,
                                              top_p=top_p, top_k=top_k)
                else:
                    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id)
                    if do_sample:
                        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
                    else:
                        kwargs.update(temperature=None, top_p=None, top_k=None)
                    # None while hooks sit on the plain view (``fwd_hooks`` run there): they see whole sequences
                    shared = _shared_prefix_inputs(model, [chats[i].ids for i in idx], pad_id)
                    if shared is None:
                        out = model.plain().generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
                    else:
                        ids, mask, cache_kwargs = shared
                        out = model.plain().generate(input_ids=ids, attention_mask=mask, **cache_kwargs, **kwargs)
                        width = ids.shape[1]
                new = out[:, width:].tolist()
                for row, i in zip(new, idx):
                    cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                    tokens[i] = row[:cut]
                    texts[i] = tok.decode(row[:cut], skip_special_tokens=True)
    finally:
        for h in handles or []:
            h.remove()
    config = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                  top_p=top_p, top_k=top_k, seed=seed if do_sample else None, n_hooks=len(fwd_hooks))
    return Generation(texts=texts, tokens=tokens, prompts=chats, config=config)


# ----------------------------------------------------------------------------- continuing from a layer


def _grouped_hooks(hook_sets: Sequence[Sequence[Hook]], rows: int) -> list[Hook]:
    """One hook per hook point that applies set g's functions to rows ``[g·rows, (g+1)·rows)`` only."""
    by_point: dict[str, list[tuple[int, Callable]]] = {}
    for g, hooks in enumerate(hook_sets):
        for name, fn in hooks:
            by_point.setdefault(name, []).append((g, fn))

    def combined(items):
        def fn(x, hook):
            parts = list(x.split(rows, dim=0))
            for g, f in items:
                out = f(parts[g], hook)
                if out is not None:
                    parts[g] = out
            return torch.cat(parts, dim=0)
        return fn

    return [(name, combined(items)) for name, items in by_point.items()]


class LayerwiseContinuer:
    """Greedy continuations of one fixed set of prompts under interventions that start at a block.

    Blocks below ``l`` see the same input whatever a hook at block ``l`` or above does, so their
    outputs and keys/values over the prompt are the clean ones. They are computed once, here;
    ``run(l, hook_sets)`` recomputes the prompt through blocks ``l…`` only (half the prefill on
    average over layers) and then decodes with the KV cache. Several hook sets run as row groups
    of one batch, set g's hooks seeing only its copy of the prompts: one decoding loop instead of
    one per set (on a CPU a step costs more with more rows, so the saving there is modest; the
    prefill from ``l`` is the larger one). Greedy tokens equal
    ``generate(model, prompts, fwd_hooks=hooks)``'s for each set (``tests/test_generate.py``).
    Hooks must sit on resid_pre / resid_post / attn_out / mlp_out points of blocks ≥ ``l``.

        >>> import torch
        >>> from depthlens.models.hooked_model import hook_name
        >>> from depthlens.models.load import load_model
        >>> model = load_model("tiny-llama")
        >>> zero_mlp = [(hook_name("mlp_out", 1), lambda x, hook: torch.zeros_like(x))]
        >>> cont = LayerwiseContinuer(model, ["How do I bake bread?"], max_new_tokens=4)
        >>> clean, zeroed = cont.run(1, [[], zero_mlp])            # one Generation per hook set
        >>> clean.tokens == generate(model, ["How do I bake bread?"], max_new_tokens=4, progress=False).tokens
        True
    """

    @torch.inference_mode()
    def __init__(self, model, prompts: Sequence[str | ChatSequence], max_new_tokens: int):
        from transformers import DynamicCache

        prompts = prompt_list("prompts", prompts, ChatSequence)
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        self.model, self.max_new_tokens = model, max_new_tokens
        self.chats = as_chats(model, prompts)
        check_context(model, [len(c) for c in self.chats], max_new_tokens)
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.stop = eos_ids(tok)
        batch = pad_batch([c.ids for c in self.chats], self.pad_id).to(model.device)
        self.input_ids, self.mask = batch.input_ids, batch.attention_mask
        cache = DynamicCache(config=model.plain().config)
        self.resid = layer_inputs(model, self.input_ids, self.mask, past_key_values=cache)
        self.kv = [(lay.keys.clone(), lay.values.clone()) for lay in cache.layers]

    def _check(self, layer: int, hook_sets: Sequence[Sequence[Hook]]) -> None:
        self.model.check_layer(layer)
        if not hook_sets:
            raise UsageError("run needs at least one hook set (an empty set is the clean model).")
        for hooks in hook_sets:
            for name, _ in hooks:
                m = PLAIN_POINT.match(name)
                if m is None:
                    raise UsageError(f"LayerwiseContinuer takes resid_pre/resid_post/attn_out/mlp_out hooks, got {name!r}.")
                if int(m.group(1)) < layer:
                    raise UsageError(f"Hook {name!r} sits below the start layer {layer}: it would miss the prompt.")

    @torch.inference_mode()
    def run(self, layer: int, hook_sets: Sequence[Sequence[Hook]]) -> list[Generation]:
        """One greedy ``Generation`` per hook set, all decoded together, the prompt recomputed from block ``layer``."""
        from transformers import DynamicCache

        self._check(layer, hook_sets)
        view, n, groups = self.model.plain(), len(self.chats), len(hook_sets)
        mask = self.mask.repeat(groups, 1)
        pos = position_ids(mask)
        cache = DynamicCache(config=view.config)
        stop = torch.tensor(self.stop, device=mask.device)
        new: list[torch.Tensor] = []
        with plain_hooks(self.model, _grouped_hooks(hook_sets, n)):
            with blocks_from(view, layer):
                out = view(inputs_embeds=self.resid[layer].repeat(groups, 1, 1), attention_mask=mask, position_ids=pos,
                           **kv_kwargs(view, cache), use_cache=True, logits_to_keep=1)
            for l in range(layer):  # filled after the run, or the cache would report the prompt as seen
                k, v = self.kv[l]
                cache.update(k.repeat(groups, 1, 1, 1), v.repeat(groups, 1, 1, 1), l)
            done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
            last = pos[:, -1:]
            for step in range(self.max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
                new.append(nxt)
                done |= torch.isin(nxt, stop)
                if step == self.max_new_tokens - 1 or bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                last = last + 1
                out = view(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, **kv_kwargs(view, cache),
                           use_cache=True)
        rows = torch.stack(new, dim=1).tolist()
        tok = self.model.tokenizer
        gens = []
        for g in range(groups):
            tokens, texts = [], []
            for row in rows[g * n:(g + 1) * n]:
                cut = next((j for j, t in enumerate(row) if t in self.stop), len(row))
                tokens.append(row[:cut])
                texts.append(tok.decode(row[:cut], skip_special_tokens=True))
            gens.append(Generation(texts=texts, tokens=tokens, prompts=self.chats,
                                   config=dict(max_new_tokens=self.max_new_tokens, do_sample=False, temperature=1.0,
                                               top_p=1.0, seed=None, n_hooks=len(hook_sets[g]), start_layer=layer)))
        return gens
