"""Chat formatting with exact token bookkeeping.

Every analysis needs to know *which tokens* are the prompt, the prefilled harmful prefix, the
inserted span and the continuation. ``build_chat`` renders the user message with the model's
own chat template (assistant header included), then appends response segments tokenized one
by one (or given as token ids), so the span of every part is known exactly and decoding a
span gives back its text. ``pad_batch`` left-pads sequences for batched forwards and
generation.

    >>> seq = build_chat(model.tokenizer, "How do I bake bread?", ["Sure, first", " mix flour"])
    >>> seq.spans["segment_1"]                  # (start, end) token indices of " mix flour"
    >>> batch = pad_batch([seq.ids, other.ids], pad_id=model.tokenizer.pad_token_id)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

Segment = str | Sequence[int]


@dataclass(frozen=True)
class ChatSequence:
    """Token ids of one chat with the exact ``[start, end)`` span of every part.

    Attributes:
        ids: all token ids (prompt with assistant header, then the segments).
        prompt_len: number of tokens up to and including the assistant header.
        segments: ``[start, end)`` of each response segment, in order.
        user: the user message it was built from.
    """

    ids: tuple[int, ...]
    prompt_len: int
    segments: tuple[tuple[int, int], ...] = ()
    user: str = ""

    @property
    def spans(self) -> dict[str, tuple[int, int]]:
        out = {"prompt": (0, self.prompt_len)}
        out.update({f"segment_{i}": s for i, s in enumerate(self.segments)})
        return out

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.prompt_len

    def __len__(self) -> int:
        return len(self.ids)


def render_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """The chat-template text of one user turn, ending with the assistant header."""
    if not isinstance(user, str) or not user.strip():
        raise ValueError(f"A chat prompt must be a non-empty string, got {user!r}.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("This tokenizer has no chat template; pass a chat model or set tokenizer.chat_template.")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_chat(tokenizer, user: str, segments: Sequence[Segment] = (), system: str | None = None) -> ChatSequence:
    """Chat-format ``user`` and append response ``segments`` (texts or token-id lists)."""
    ids = encode(tokenizer, render_prompt(tokenizer, user, system))
    prompt_len = len(ids)
    spans = []
    for seg in segments:
        seg_ids = encode(tokenizer, seg) if isinstance(seg, str) else [int(t) for t in seg]
        spans.append((len(ids), len(ids) + len(seg_ids)))
        ids.extend(seg_ids)
    return ChatSequence(ids=tuple(ids), prompt_len=prompt_len, segments=tuple(spans), user=user)


@dataclass(frozen=True)
class Batch:
    """Left-padded token batch. ``offsets[i]`` is how many pads precede sequence i."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    offsets: tuple[int, ...] = field(default=())

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.offsets)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> Batch:
    """Pad token-id lists into one batch (left padding keeps the last position aligned)."""
    if not seqs:
        raise ValueError("Cannot pad an empty list of sequences.")
    if side not in ("left", "right"):
        raise ValueError(f"Padding side must be 'left' or 'right', got {side!r}.")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for i, s in enumerate(seqs):
        n = len(s)
        start = width - n if side == "left" else 0
        ids[i, start:start + n] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, start:start + n] = 1
        offsets.append(start)
    return Batch(ids, mask, tuple(offsets))


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted), so padding stays small."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
