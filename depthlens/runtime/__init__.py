"""Running a model: batched forward passes, generation, hooks, cached response sets.

- ``hooks``: TransformerLens hooks on the bridge and on the plain Hugging Face view (`Hook`, `hooks_active`)
- ``forward``: next-token log-probs, per-token log-probs, residual capture, running from a layer on
- ``generation``: batched generation with KV cache, left padding, seeds and hooks active
- ``responses``: a model's own greedy answers to a prompt set, cached with the recipe that made them

It imports `depthlens.infra`, `depthlens.data` and `depthlens.models`.
"""

from __future__ import annotations

from depthlens.runtime.hooks import (
    Hook, hooks_active, PLAIN_POINT, plain_handles, plain_hooks, mirrored_hooks, unmirrored_bridge_hooks,
)
from depthlens.runtime.forward import (
    kv_kwargs, iter_batches, last_logprobs, token_logprobs, residuals_at, stream_residuals, BOUNDARY_KINDS,
    REDUCTIONS, boundary_index, stream_boundaries, blocks_until, plain_ok, position_ids, layer_inputs,
    forward_from_layer, common_prefix_len, blocks_from, expand_cache, PrefixSharedRunner,
)
from depthlens.runtime.generation import Generation, eos_ids, MIN_SHARED_PREFIX, as_chats, generate, LayerwiseContinuer
from depthlens.runtime.responses import ResponseSet, RESPONSES_FILE, response_set, Answers, same_tokenizer, answers_for

__all__ = [
    "Hook",
    "hooks_active",
    "PLAIN_POINT",
    "plain_handles",
    "plain_hooks",
    "mirrored_hooks",
    "unmirrored_bridge_hooks",
    "kv_kwargs",
    "iter_batches",
    "last_logprobs",
    "token_logprobs",
    "residuals_at",
    "stream_residuals",
    "BOUNDARY_KINDS",
    "REDUCTIONS",
    "boundary_index",
    "stream_boundaries",
    "blocks_until",
    "plain_ok",
    "position_ids",
    "layer_inputs",
    "forward_from_layer",
    "common_prefix_len",
    "blocks_from",
    "expand_cache",
    "PrefixSharedRunner",
    "Generation",
    "eos_ids",
    "MIN_SHARED_PREFIX",
    "as_chats",
    "generate",
    "LayerwiseContinuer",
    "ResponseSet",
    "RESPONSES_FILE",
    "response_set",
    "Answers",
    "same_tokenizer",
    "answers_for",
]
