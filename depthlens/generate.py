"""Batched generation with KV cache, left padding, seeds and TransformerLens hooks active.

Generation runs Hugging Face's ``generate`` with the KV cache. When a hook is active (given
here or attached to the bridge by the caller) it runs on the model under the bridge, which
wraps its modules in place so the hook points fire at every step; with no hook it runs on
``model.plain()``, the same parameters without the hook-point wrappers (≈ 30 % faster on the
135M default, see ``benchmarks/bench_models.py``); both give the same tokens. Prompts are user strings
(chat-formatted here) or ``ChatSequence``s from ``depthlens.chat`` (with prefill/insertions).
Prompts are batched by length to keep padding small, and results come back in input order.

    >>> out = generate(model, ["How do I bake bread?"], max_new_tokens=32)
    >>> out.texts[0]
    >>> generate(model, prompts, fwd_hooks=[("blocks.3.hook_resid_pre", ablate)])  # hooks active
"""

from __future__ import annotations

import logging
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
    with hooks_active(model, fwd_hooks):
        runner = model.hf if fwd_hooks or model.has_hooks() else model.plain()
        for b, idx in enumerate(tqdm(batches, desc=desc, disable=not progress or len(batches) < 2, leave=False)):
            batch = pad_batch([chats[i].ids for i in idx], pad_id).to(model.device)
            kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id)
            if do_sample:
                torch.manual_seed(seed * 100_003 + b)
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            out = runner.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
            new = out[:, batch.input_ids.shape[1]:].tolist()
            for row, i in zip(new, idx):
                cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                tokens[i] = row[:cut]
                texts[i] = tok.decode(row[:cut], skip_special_tokens=True)
    config = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                  top_p=top_p, seed=seed if do_sample else None, n_hooks=len(fwd_hooks))
    return Generation(texts=texts, tokens=tokens, prompts=chats, config=config)
