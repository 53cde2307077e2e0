"""Batched generation with KV cache, left padding, seeds and TransformerLens hooks active.

Generation runs Hugging Face's ``generate`` with the KV cache on ``model.plain()``, the same
parameters without the bridge's hook-point wrappers (≈ 30 % faster on the 135M default, see
``benchmarks/bench_models.py``). Hooks given here whose hook point has a module equivalent
(``blocks.L.hook_resid_pre`` / ``hook_resid_post`` / ``hook_attn_out`` / ``hook_mlp_out``) run as
PyTorch hooks on that view, with TransformerLens semantics (``fn(x, hook)`` returns the new
activation or None). Any other hook, and hooks the caller attached to the bridge itself (unless
attached through ``mirrored_hooks``, which also places them on the view), make generation fall
back to a cache-free greedy/sampling loop over full bridge forwards: slow, but exact.

Why not ``generate`` on the bridged model: on SmolLM2 (transformer-lens 4.3, transformers 5.x)
its KV-cache path is wrong whenever a hook point is active: an identity hook turns every
continuation into "To---------" after the first token (found 2026-12-01; ``tests/test_generate``
checks hooked generation against the cache-free reference, and on the real model in a slow test). Prompts are user strings
(chat-formatted here) or ``ChatSequence``s from ``depthlens.chat`` (with prefill/insertions).
Prompts are batched by length to keep padding small, and results come back in input order.

    >>> out = generate(model, ["How do I bake bread?"], max_new_tokens=32)
    >>> out.texts[0]
    >>> generate(model, prompts, fwd_hooks=[("blocks.3.hook_resid_pre", ablate)])  # hooks active
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlens.chat import ChatSequence, build_chat, length_batches, pad_batch

log = logging.getLogger(__name__)

Hook = tuple[str, Callable]


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


@contextmanager
def hooks_active(model, fwd_hooks: Sequence[Hook] = ()):
    """Attach TransformerLens forward hooks for the duration of the block; always removed."""
    if not fwd_hooks:
        yield
        return
    with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
        yield


_PLAIN_POINT = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_in|hook_resid_post|hook_out|hook_attn_out|attn\.hook_out"
                          r"|hook_mlp_out|mlp\.hook_out)$")


class _PlainHookPoint:
    """What a TransformerLens hook function receives as ``hook`` when it runs on the plain view."""

    def __init__(self, name: str):
        self.name = name

    def layer(self) -> int:
        return int(self.name.split(".")[1])


def _plain_target(model, name: str):
    """(module, "pre" | "post") of ``model.plain()`` equivalent to hook point ``name``, or None."""
    m = _PLAIN_POINT.match(name)
    if m is None:
        return None
    layer, point = int(m.group(1)), m.group(2)
    blocks = model.plain().model.layers
    if not 0 <= layer < len(blocks):
        return None
    block = blocks[layer]
    if point in ("hook_resid_pre", "hook_in"):
        return block, "pre"
    if point in ("hook_resid_post", "hook_out"):
        return block, "post"
    if point in ("hook_attn_out", "attn.hook_out"):
        return getattr(block, "self_attn", None), "post"
    return getattr(block, "mlp", None), "post"


def _plain_handles(model, fwd_hooks: Sequence[Hook]) -> list | None:
    """Register ``fwd_hooks`` as PyTorch hooks on ``model.plain()``; None (nothing registered) if one cannot be."""
    targets = [_plain_target(model, name) for name, _ in fwd_hooks]
    if any(t is None or t[0] is None for t in targets):
        return None
    handles = []
    for (name, fn), (module, where) in zip(fwd_hooks, targets):
        point = _PlainHookPoint(name)
        if where == "pre":
            def pre(module, args, kwargs, fn=fn, point=point):
                x = args[0] if args else kwargs["hidden_states"]
                out = fn(x, point)
                out = x if out is None else out
                if args:
                    return (out, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": out}

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module, args, output, fn=fn, point=point):
                x = output[0] if isinstance(output, tuple) else output
                out = fn(x, point)
                out = x if out is None else out
                return (out, *output[1:]) if isinstance(output, tuple) else out

            handles.append(module.register_forward_hook(post))
    return handles


@contextmanager
def mirrored_hooks(model, fwd_hooks: Sequence[Hook]):
    """Attach hooks to the bridge *and* to ``model.plain()``, so bridge forwards and ``generate``
    both see them (``generate`` keeps its KV-cache fast path). Every hook must have a plain
    equivalent (see ``_PLAIN_POINT``)."""
    handles = _plain_handles(model, fwd_hooks)
    if handles is None:
        raise ValueError("mirrored_hooks takes only resid_pre/resid_post/attn_out/mlp_out hook points, got "
                         f"{[n for n, _ in fwd_hooks]}.")
    from transformer_lens.hook_points import HookPoint

    stack = model.__dict__.setdefault("_mirrored_points", [])
    before = {id(m) for m in model.bridge.modules() if isinstance(m, HookPoint) and m._forward_hooks}
    try:
        with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
            added = {id(m) for m in model.bridge.modules() if isinstance(m, HookPoint) and m._forward_hooks} - before
            stack.append(added)
            try:
                yield
            finally:
                stack.remove(added)
    finally:
        for h in handles:
            h.remove()


def _unmirrored_bridge_hooks(model) -> bool:
    """Whether a hook attached to the bridge is not also on ``model.plain()`` (then only the bridge sees it)."""
    from transformer_lens.hook_points import HookPoint

    mirrored = set().union(*model.__dict__.get("_mirrored_points", []))
    return any(isinstance(m, HookPoint) and (m._forward_hooks or m._forward_pre_hooks) and id(m) not in mirrored
               for m in model.bridge.modules())


@torch.inference_mode()
def _reference_generate(model, input_ids, attention_mask, *, max_new_tokens: int, stop: Sequence[int], pad_id: int,
                        do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
    """Cache-free decoding through full bridge forwards (every hook fires on every position): exact, O(T²)."""
    ids, mask = input_ids, attention_mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    stop_t = torch.tensor(list(stop), device=ids.device)
    for _ in range(max_new_tokens):
        logits = model.bridge(ids, attention_mask=mask)[:, -1].float()
        if do_sample:
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


def as_chats(model, prompts: Sequence[str | ChatSequence]) -> list[ChatSequence]:
    return [p if isinstance(p, ChatSequence) else build_chat(model.tokenizer, p) for p in prompts]


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[str | ChatSequence],
    max_new_tokens: int = 64,
    *,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    fwd_hooks: Sequence[Hook] = (),
    progress: bool = True,
    desc: str = "generate",
) -> Generation:
    """Continue every prompt by up to ``max_new_tokens`` (greedy unless ``do_sample``)."""
    if isinstance(prompts, (str, ChatSequence)):
        raise ValueError("generate expects a list of prompts, not a single prompt; wrap it in a list.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    chats = as_chats(model, prompts)
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = eos_ids(tok)
    texts: list[str] = [""] * len(chats)
    tokens: list[list[int]] = [[] for _ in chats]
    batches = length_batches([len(c) for c in chats], batch_size)
    handles = _plain_handles(model, fwd_hooks) if fwd_hooks else []
    exact_loop = handles is None or _unmirrored_bridge_hooks(model)
    if exact_loop:  # the plain copies, if any, are not needed: the finally below removes them
        log.info("generate: hooks without a plain-module equivalent are active; using the cache-free exact loop.")
    try:
        with hooks_active(model, fwd_hooks if exact_loop else ()):
            for b, idx in enumerate(tqdm(batches, desc=desc, disable=not progress or len(batches) < 2, leave=False)):
                batch = pad_batch([chats[i].ids for i in idx], pad_id).to(model.device)
                if do_sample:
                    torch.manual_seed(seed * 100_003 + b)
                if exact_loop:
                    out = _reference_generate(model, batch.input_ids, batch.attention_mask, max_new_tokens=max_new_tokens,
                                              stop=stop, pad_id=pad_id, do_sample=do_sample, temperature=temperature,
                                              top_p=top_p)
                else:
                    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id)
                    if do_sample:
                        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
                    else:
                        kwargs.update(temperature=None, top_p=None, top_k=None)
                    out = model.plain().generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
                new = out[:, batch.input_ids.shape[1]:].tolist()
                for row, i in zip(new, idx):
                    cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                    tokens[i] = row[:cut]
                    texts[i] = tok.decode(row[:cut], skip_special_tokens=True)
    finally:
        for h in handles or []:
            h.remove()
    config = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                  top_p=top_p, seed=seed if do_sample else None, n_hooks=len(fwd_hooks))
    return Generation(texts=texts, tokens=tokens, prompts=chats, config=config)
