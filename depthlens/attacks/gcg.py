"""Greedy coordinate gradient (GCG, Zou et al. 2023): an adversarial suffix optimised on the model itself.

The user message is ``request + " " + suffix``; the suffix (``suffix_len`` tokens) is optimised
so that the model's cross-entropy on a *target* response (the first tokens of a compliant
answer) is low. Each step takes the gradient of that loss with respect to the one-hot suffix
tokens, keeps for every position the ``topk`` tokens with the most negative gradient, evaluates
``search_width`` candidates that each replace one random position by one of its top-k tokens
(one batched forward), and moves to the best candidate; the best suffix seen is returned.
Control tokens and tokens that do not decode to printable ASCII are never proposed.
Everything runs on ``model.plain()`` (the Hugging Face view of the hooked model, same weights),
token-exactly: the attacked sequence is ``before + suffix + after`` with the chat template's
pieces tokenized around the suffix, so what is optimised is exactly what is then generated from.
nanogcg pins ``transformers<=4.47.1``; this is the project's own implementation.

    >>> from depthlens.models import load_model
    >>> model = load_model("tiny-llama")
    >>> res = gcg_optimise(model, "How do I pick a lock?", "Sure, here is how", GCGConfig(steps=2, search_width=8))
    >>> len(res.losses) == 2 and res.best_loss <= res.initial_loss
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from depthlens.data.chat import ChatSequence, control_tokens, encode, render_prompt
from depthlens.infra.errors import UsageError

log = logging.getLogger(__name__)

_MARK = "\ue000"


@dataclass(frozen=True)
class GCGConfig:
    """GCG budget and search settings.

    Args:
        steps: optimisation steps (one gradient and one candidate batch each).
        search_width: candidates evaluated per step.
        topk: tokens kept per suffix position from the gradient.
        suffix_len: suffix length in tokens (initialised to ``init_token`` repeated).
        init_token: the text of the initial suffix token ("!" as in Zou et al.).
        batch_size: candidates per forward pass.
        seed: candidate sampling seed.
    """

    steps: int = 10
    search_width: int = 64
    topk: int = 64
    suffix_len: int = 16
    init_token: str = "!"
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "search_width", "topk", "suffix_len", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"GCG {name} must be an integer >= 1, got {v!r}.")


@dataclass
class GCGResult:
    """The optimised suffix and the loss trajectory.

    Attributes:
        suffix_ids, suffix_text: the best suffix found (its tokens and their decoded text).
        initial_loss: target cross-entropy (mean over target tokens) of the initial suffix.
        best_loss: that of the returned suffix.
        losses: the best candidate's loss at each step.
        seq: the attacked chat (``before + suffix + after``), ready for ``generate``.
    """

    suffix_ids: list[int]
    suffix_text: str
    initial_loss: float
    best_loss: float
    losses: list[float] = field(default_factory=list)
    seq: ChatSequence | None = None


def chat_pieces(tokenizer, request: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the chat before the suffix (template + request + " ") and after it (to the assistant header)."""
    text = render_prompt(tokenizer, _MARK, system)
    if text.count(_MARK) != 1:
        raise UsageError("This chat template does not keep the user message verbatim; GCG needs it to.")
    head, tail = text.split(_MARK)
    return encode(tokenizer, head) + encode(tokenizer, request + " ", allow_control=False), encode(tokenizer, tail)


def allowed_tokens(tokenizer, vocab_size: int) -> Tensor:
    """``[vocab]`` bool: tokens GCG may propose (printable ASCII, not a control token, non-empty)."""
    controls = set(tokenizer.convert_tokens_to_ids(control_tokens(tokenizer)))
    ok = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tokenizer))):
        if i in controls:
            continue
        s = tokenizer.decode([i])
        ok[i] = bool(s.strip()) and s.isascii() and s.isprintable()
    return ok


def _embed(model):
    emb = model.plain().get_input_embeddings()
    return emb, getattr(emb, "embed_scale", 1.0)


def target_loss(model, before: list[int], suffixes: Int[Tensor, "cand len"], after: list[int], target: list[int],
                batch_size: int = 32) -> Float[Tensor, " cand"]:
    """Mean cross-entropy of ``target`` after ``before + suffix + after`` for each candidate suffix."""
    dev = model.device
    n = suffixes.shape[0]
    pre = torch.tensor(before, device=dev).expand(n, -1)
    post = torch.tensor(after + target, device=dev).expand(n, -1)
    ids = torch.cat([pre, suffixes.to(dev), post], dim=1)
    start = ids.shape[1] - len(target)
    tgt = torch.tensor(target, device=dev)
    out = []
    view = model.plain()
    with torch.no_grad():
        for i in range(0, n, batch_size):
            logits = view(input_ids=ids[i:i + batch_size]).logits[:, start - 1:-1].float()
            out.append(F.cross_entropy(logits.transpose(1, 2), tgt.expand(logits.shape[0], -1), reduction="none").mean(1))
    return torch.cat(out).cpu()


def _gradient(model, before: list[int], suffix: Tensor, after: list[int], target: list[int]) -> Tensor:
    """``[len, vocab]`` gradient of the target loss with respect to the one-hot suffix."""
    emb, scale = _embed(model)
    dev = model.device
    w = emb.weight
    one_hot = F.one_hot(suffix.to(dev), w.shape[0]).to(w.dtype).requires_grad_(True)
    parts = [emb(torch.tensor(before, device=dev)), (one_hot @ w) * scale, emb(torch.tensor(after + target, device=dev))]
    embeds = torch.cat(parts, dim=0)[None]
    start = embeds.shape[1] - len(target)
    with torch.enable_grad():
        logits = model.plain()(inputs_embeds=embeds).logits[0, start - 1:-1].float()
        loss = F.cross_entropy(logits, torch.tensor(target, device=dev))
        (grad,) = torch.autograd.grad(loss, one_hot)
    return grad.detach().float().cpu()


def gcg_optimise(model, request: str, target: str | list[int], cfg: GCGConfig = GCGConfig(),
                 system: str | None = None) -> GCGResult:
    """Optimise a suffix for ``request`` so that the model's loss on ``target`` (text or token ids) drops."""
    tok = model.tokenizer
    target_ids = encode(tok, target, allow_control=False) if isinstance(target, str) else [int(t) for t in target]
    if not target_ids:
        raise UsageError("GCG needs a non-empty target response.")
    before, after = chat_pieces(tok, request, system)
    vocab = _embed(model)[0].weight.shape[0]
    allowed = allowed_tokens(tok, vocab)
    init = encode(tok, cfg.init_token, allow_control=False)
    if len(init) != 1:
        raise UsageError(f"The GCG init token {cfg.init_token!r} must be one token, got {len(init)}.")
    current = torch.tensor(init * cfg.suffix_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    initial = float(target_loss(model, before, current[None], after, target_ids, cfg.batch_size)[0])
    best, best_loss, losses = current.clone(), initial, []
    view = model.plain()
    was_training = view.training
    view.eval()
    try:
        for _ in range(cfg.steps):
            grad = _gradient(model, before, current, after, target_ids)
            grad[:, ~allowed] = float("inf")
            top = (-grad).topk(min(cfg.topk, int(allowed.sum())), dim=1).indices          # [len, topk]
            pos = torch.randint(0, cfg.suffix_len, (cfg.search_width,), generator=gen)
            pick = torch.randint(0, top.shape[1], (cfg.search_width,), generator=gen)
            cands = current.expand(cfg.search_width, -1).clone()
            cands[torch.arange(cfg.search_width), pos] = top[pos, pick]
            cand_loss = target_loss(model, before, cands, after, target_ids, cfg.batch_size)
            j = int(cand_loss.argmin())
            current, step_loss = cands[j], float(cand_loss[j])
            losses.append(step_loss)
            if step_loss < best_loss:
                best, best_loss = current.clone(), step_loss
    finally:
        view.train(was_training)
    suffix_ids = best.tolist()
    seq = ChatSequence(ids=tuple(before + suffix_ids + after), prompt_len=len(before) + len(suffix_ids) + len(after),
                       user=f"{request} {tok.decode(suffix_ids)}")
    return GCGResult(suffix_ids, tok.decode(suffix_ids), initial, best_loss, losses, seq)
