"""TransformerLens hooks on the bridge and on the plain Hugging Face view of the same model.

Interventions are TransformerLens hook functions ``fn(x, hook)`` at named hook points
(``blocks.L.hook_resid_pre`` …). ``hooks_active`` attaches them to the bridge for a block.
Fast paths run ``model.plain()`` (the HF modules without hook-point wrappers, same
parameters), where the bridge's hook points do not exist: ``plain_hooks`` attaches the same
functions as PyTorch hooks on the equivalent plain modules (resid_pre / resid_post /
attn_out / mlp_out), and ``mirrored_hooks`` attaches them to both, so bridge forwards and
plain-view generation see them. Every hook is removed when its block ends, errors included.

    >>> import torch
    >>> from depthlens.models.load import load_model
    >>> model = load_model("tiny-llama")
    >>> ids = torch.tensor([[1, 5, 9]])
    >>> zero = [("blocks.1.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]
    >>> with hooks_active(model, zero):
    ...     hooked = model.bridge(ids)
    >>> with plain_hooks(model, zero):
    ...     plain = model.plain()(ids).logits
    >>> bool(torch.allclose(hooked, plain, atol=1e-4)), model.has_hooks()
    (True, False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager

from depthlens.infra.errors import UsageError

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

Hook = tuple[str, Callable]
"""A TransformerLens forward hook: (hook-point name, ``fn(activation, hook) -> new activation or None``)."""


@contextmanager
def hooks_active(model: HookedModel, fwd_hooks: Sequence[Hook] = ()):
    """Attach TransformerLens forward hooks for the duration of the block; always removed."""
    if not fwd_hooks:
        yield
        return
    with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
        yield


PLAIN_POINT = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_in|hook_resid_post|hook_out|hook_attn_out|attn\.hook_out"
                          r"|hook_mlp_out|mlp\.hook_out)$")


class _PlainHookPoint:
    """What a TransformerLens hook function receives as ``hook`` when it runs on the plain view."""

    def __init__(self, name: str):
        self.name = name

    def layer(self) -> int:
        return int(self.name.split(".")[1])


def _plain_target(model, name: str):
    """(module, "pre" | "post") of ``model.plain()`` equivalent to hook point ``name``, or None."""
    m = PLAIN_POINT.match(name)
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
    from depthlens.models.families import sublayer_module, written_output

    if point in ("hook_attn_out", "hook_mlp_out"):  # what the sublayer adds: after Gemma's post-norm
        return written_output(block, "attn" if point == "hook_attn_out" else "mlp"), "post"
    return sublayer_module(block, "attn" if point == "attn.hook_out" else "mlp"), "post"


def plain_handles(model: HookedModel, fwd_hooks: Sequence[Hook]) -> list | None:
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
def plain_hooks(model: HookedModel, fwd_hooks: Sequence[Hook]):
    """Attach TransformerLens-style hooks as PyTorch hooks on ``model.plain()`` only, for the block.

    For code that drives the plain HF modules itself (``depthlens.runtime.forward.PrefixSharedRunner``,
    ``LayerwiseContinuer``); every hook needs a plain equivalent (see ``PLAIN_POINT``).
    """
    handles = plain_handles(model, fwd_hooks) if fwd_hooks else []
    if handles is None:
        raise UsageError("plain_hooks takes only resid_pre/resid_post/attn_out/mlp_out hook points, got "
                         f"{[n for n, _ in fwd_hooks]}.")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def mirrored_hooks(model: HookedModel, fwd_hooks: Sequence[Hook]):
    """Attach hooks to the bridge *and* to ``model.plain()``, so bridge forwards and ``generate``
    both see them (``generate`` keeps its KV-cache fast path). Every hook must have a plain
    equivalent (see ``PLAIN_POINT``)."""
    handles = plain_handles(model, fwd_hooks)
    if handles is None:
        raise UsageError("mirrored_hooks takes only resid_pre/resid_post/attn_out/mlp_out hook points, got "
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


def unmirrored_bridge_hooks(model: HookedModel) -> bool:
    """Whether a hook attached to the bridge is not also on ``model.plain()`` (then only the bridge sees it)."""
    from transformer_lens.hook_points import HookPoint

    mirrored = set().union(*model.__dict__.get("_mirrored_points", []))
    return any(isinstance(m, HookPoint) and (m._forward_hooks or m._forward_pre_hooks) and id(m) not in mirrored
               for m in model.bridge.modules())
