"""``HookedModel`` (a TransformerBridge with its tokenizer and provenance) and TransformerLens hook names.

Every analysis takes a ``HookedModel``: the bridge for hooks and ``run_with_cache``, the
tokenizer for chat formatting, and the spec and provenance that go into results files.
:func:`wrap` boots the bridge around an already-loaded HF model; which HF model to load for a
spec is :mod:`depthlens.models.base`, and :func:`depthlens.models.load.load_model` joins the two.
Hook names are TransformerLens's own (``blocks.{l}.hook_resid_pre`` …, see :func:`hook_name`).

    >>> hook_name("resid_post", 1)
    'blocks.1.hook_resid_post'
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from depthlens.models.checkpoint import clean_key, save_checkpoint
from depthlens.infra.errors import UsageError
from depthlens.models.families import bind_fused_qkv, llama_aliases
from depthlens.infra.paths import model_tag

HOOK_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def hook_name(kind: str, layer: int) -> str:
    """TransformerLens hook-point name, e.g. ``hook_name("resid_pre", 3) == "blocks.3.hook_resid_pre"``."""
    if kind not in HOOK_KINDS:
        raise UsageError(f"Unknown hook kind {kind!r}; use one of {', '.join(HOOK_KINDS)}.")
    return f"blocks.{layer}.hook_{kind}"


@dataclass
class HookedModel:
    """A TransformerBridge with its tokenizer and the facts results files need.

    Attributes:
        bridge: the TransformerLens ``TransformerBridge`` (hooks, ``run_with_cache`` …).
        tokenizer: the Hugging Face tokenizer, with a chat template.
        spec: the spec string it was loaded from.
        provenance: spec, source hash or revision, dtype, device (+ recipe chain).
    """

    bridge: Any
    tokenizer: Any
    spec: str
    provenance: dict = field(default_factory=dict)

    @property
    def hf(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (shares its parameters with the bridge)."""
        return self.bridge.original_model

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.bridge.cfg.d_model)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (fp32 on CPU, bf16 on CUDA unless overridden)."""
        return next(self.hf.parameters()).dtype

    @property
    def tag(self) -> str:
        """A filesystem-safe name for results directories (``depthlens.infra.paths.model_tag``)."""
        return model_tag(self.spec)

    @property
    def context_len(self) -> int:
        """The most tokens one sequence may hold: the position embeddings the model was built with.

        Prompts longer than this are refused (``depthlens.data.chat.check_context``) rather than run
        on positions the model never saw.
        """
        cfg = self.hf.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return int(self.bridge.cfg.n_ctx)

    def check_layer(self, layer: int) -> int:
        """``layer`` as an int, or one clear error when it is not an integer in ``0..n_layers-1``."""
        try:
            index = None if isinstance(layer, bool) else operator.index(layer)
        except TypeError:
            index = None
        if index is None or not 0 <= index < self.n_layers:
            raise UsageError(f"Layer {layer!r} is out of range: this model has layers 0..{self.n_layers - 1}.")
        return index

    def decoder_layer(self, layer: int) -> torch.nn.Module:
        """The transformer block ``layer`` of the underlying HF model (its parameters are live)."""
        self.check_layer(layer)
        return self.hf.base_model.layers[layer]

    def layer_parameters(self, layer: int) -> dict[str, torch.nn.Parameter]:
        """Named parameters of block ``layer`` with clean HF names (``self_attn.q_proj.weight`` …).

        Read from the plain view, so the bridge's own q/k/v (or gate/up) slices of a fused
        projection (Phi-3, GPT-NeoX) are not listed beside the fused matrix they come from.
        """
        self.check_layer(layer)
        return dict(self.plain().model.layers[layer].named_parameters())

    def plain(self) -> torch.nn.Module:
        """An unbridged Hugging Face module tree that shares this model's parameter tensors.

        The bridge wraps every module with hook points, which costs ≈ 30 % of a decoding step on
        a small model. Code that needs no hooks (plain generation, re-running a layer range)
        uses this view instead: it holds the *same* parameter objects, so in-place edits
        (perturbations, training steps) are seen at once; if a parameter object is replaced
        (e.g. untied by weight orthogonalization) the view is rebuilt on the next call.
        Hooks registered on the bridge do not fire here: use the bridge when they must.
        """
        params = [(n, p) for n, p in self.hf.named_parameters(remove_duplicate=False)]
        key = tuple((id(p), p.data_ptr()) for _, p in params)
        cached = self.__dict__.get("_plain_view")
        if cached is not None and cached[0] == key:
            return cached[1]
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            view = AutoModelForCausalLM.from_config(self.hf.config)
        live: dict[str, torch.Tensor] = {}
        for name, t in [*params, *self.hf.named_buffers(remove_duplicate=False)]:
            live.setdefault(clean_key(name), t)
        wanted = [n for n, _ in view.named_parameters(remove_duplicate=False)]
        wanted += [n for n, _ in view.named_buffers(remove_duplicate=False)]
        missing = [n for n in wanted if n not in live]
        if missing:
            raise RuntimeError(f"Cannot map the bridged model onto a plain Hugging Face model; missing {missing[:3]}.")
        for name in wanted:
            owner, _, leaf = name.rpartition(".")
            module = view.get_submodule(owner)
            if leaf in module._parameters:
                module._parameters[leaf] = live[name]
            else:
                module._buffers[leaf] = live[name]
        view.generation_config = self.hf.generation_config
        view.eval()
        llama_aliases(view)
        self.__dict__["_plain_view"] = (key, view)
        return view

    def has_hooks(self) -> bool:
        """Whether a TransformerLens hook is attached to any hook point of the bridge.

        (The bridge keeps private pre-hooks on its norm wrappers; those are not counted.)
        """
        from transformer_lens.hook_points import HookPoint

        return any(isinstance(m, HookPoint) and (m._forward_hooks or m._forward_pre_hooks)
                   for m in self.bridge.modules())

    def save(self, path: str | Path, extra: dict | None = None, files: dict[str, str] | None = None,
             overwrite: bool = False) -> Path:
        """Write an HF-format checkpoint (safetensors + tokenizer + provenance) atomically.

        ``path`` is replaced as a whole: a folder holding other files than a depthlens
        checkpoint is refused unless ``overwrite`` (see ``depthlens.models.checkpoint.check_save_target``).
        """
        return save_checkpoint(self.hf, self.tokenizer, path, {**self.provenance, **(extra or {})}, files,
                               overwrite=overwrite)


# ----------------------------------------------------------------------------- booting the bridge


def wrap(hf_model, tokenizer, spec: str, provenance: dict, device, dtype) -> HookedModel:
    """Boot a TransformerBridge around an HF causal LM (no hub call: ``hf_model`` is given)."""
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    bridge = TransformerBridge.boot_transformers(
        spec, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bind_fused_qkv(bridge)
    bridge.eval()
    prov = {"spec": spec, **provenance, "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
    return HookedModel(bridge=bridge, tokenizer=tokenizer, spec=spec, provenance=prov)
