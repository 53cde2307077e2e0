"""Running a model: batched forward passes, generation, hooks, cached response sets.

- ``hooks``: TransformerLens hooks on the bridge and on the plain Hugging Face view (`Hook`, `hooks_active`)
- ``forward``: next-token log-probs, per-token log-probs, residual capture, running from a layer on
- ``generation``: batched generation with KV cache, left padding, seeds and hooks active
- ``responses``: a model's own greedy answers to a prompt set, cached with the recipe that made them
- ``lm_eval_model``: `DepthlensLM`, an lm-evaluation-harness model over a depthlens model (imports lm-eval)

It imports `depthlens.infra`, `depthlens.data` and `depthlens.models`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depthlens.infra.exports import lazy_exports

# every public name of the room, and the module that defines it (imported on first use)
_EXPORTS = {
    "Hook": "hooks", "hooks_active": "hooks", "PLAIN_POINT": "hooks", "plain_handles": "hooks",
    "plain_hooks": "hooks", "mirrored_hooks": "hooks", "unmirrored_bridge_hooks": "hooks",
    "kv_kwargs": "forward", "iter_batches": "forward", "last_logprobs": "forward", "token_logprobs": "forward",
    "residuals_at": "forward", "stream_residuals": "forward", "BOUNDARY_KINDS": "forward", "REDUCTIONS": "forward",
    "boundary_index": "forward", "stream_boundaries": "forward", "blocks_until": "forward", "plain_ok": "forward",
    "position_ids": "forward", "layer_inputs": "forward", "forward_from_layer": "forward",
    "common_prefix_len": "forward", "blocks_from": "forward", "expand_cache": "forward",
    "PrefixSharedRunner": "forward",
    "Generation": "generation", "eos_ids": "generation", "MIN_SHARED_PREFIX": "generation", "as_chats": "generation",
    "generate": "generation", "LayerwiseContinuer": "generation",
    "ResponseSet": "responses", "RESPONSES_FILE": "responses", "response_set": "responses", "Answers": "responses",
    "same_tokenizer": "responses", "answers_for": "responses",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, spelled out for type checkers and editors
    from depthlens.runtime.hooks import (
        Hook, hooks_active, PLAIN_POINT, plain_handles, plain_hooks, mirrored_hooks, unmirrored_bridge_hooks,
    )
    from depthlens.runtime.forward import (
        kv_kwargs, iter_batches, last_logprobs, token_logprobs, residuals_at, stream_residuals, BOUNDARY_KINDS,
        REDUCTIONS, boundary_index, stream_boundaries, blocks_until, plain_ok, position_ids, layer_inputs,
        forward_from_layer, common_prefix_len, blocks_from, expand_cache, PrefixSharedRunner,
    )
    from depthlens.runtime.generation import (
        Generation, eos_ids, MIN_SHARED_PREFIX, as_chats, generate, LayerwiseContinuer,
    )
    from depthlens.runtime.responses import (
        ResponseSet, RESPONSES_FILE, response_set, Answers, same_tokenizer, answers_for,
    )
