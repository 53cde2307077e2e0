"""QLoRA: LoRA adapters trained over a 4-bit NF4 copy of the decoder blocks' linear maps (bitsandbytes).

``--load-in-4bit`` (with ``--lora-rank``) on a first-order recipe: for the run, ``QuantizedBase``
builds a second module tree beside ``model.plain()`` that shares the embedding, the norms and
the unembedding with it but holds every linear map of the blocks as a bitsandbytes
``Linear4bit`` (NF4, double quantization off, computing in the model's dtype); the
full-precision block weights wait on disk in the run's work folder (safetensors, read back
memory-mapped), so the run holds about half a byte per block weight instead of 2 or 4. peft's
adapters go on the 4-bit tree, the losses run through it (``finetune.losses.LossPath``), and
the gradients reach only the fp32 adapters (Dettmers et al. 2023, "QLoRA").

At the end the full-precision weights come back and each adapter's update ``(α/r)·B·A`` is
added to them in fp32 and stored in the parent's dtype: the cache entry is the merged
standard checkpoint in the parent's dtype (every weight that was not adapted equal to the
parent's bit for bit), with peft's adapter files beside it, as after a LoRA build. The
adapter was trained against the NF4 weights, so the merged model differs from the 4-bit model
the adapter saw by the quantization error of the base (the same convention as merging a
QLoRA adapter into its bf16 base). It runs on CPU (bitsandbytes ships a CPU library) and CUDA.

    >>> base = QuantizedBase(model, torch.float32, workdir)   # model.plain()'s block linears in NF4  # a fragment of the LoRA path of the training loop  # doctest: +SKIP
    >>> peft_model = lora.attach(model, settings, seed, module=base.module)  # a fragment of the LoRA path of the training loop  # doctest: +SKIP
    >>> base.finish(peft_model, done=True)                    # originals back + the merged update  # a fragment of the LoRA path of the training loop  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from depthlens.infra.errors import UsageError

log = logging.getLogger(__name__)

QUANT_TYPE = "nf4"
OFFLOAD_FILE = "qlora_block_weights.safetensors"


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError("--load-in-4bit needs bitsandbytes (pip install bitsandbytes; depthlens's dependencies "
                         "include it).") from None
    return bitsandbytes


def _shared_tree(view: torch.nn.Module) -> torch.nn.Module:
    """A new module tree of ``view``'s class holding ``view``'s own parameter and buffer tensors."""
    from transformers import AutoModelForCausalLM

    from depthlens.models.families import llama_aliases

    with torch.device("meta"):
        tree = AutoModelForCausalLM.from_config(view.config)
    live = dict(view.named_parameters(remove_duplicate=False))
    live.update(dict(view.named_buffers(remove_duplicate=False)))
    for name in [n for n, _ in tree.named_parameters(remove_duplicate=False)] + \
            [n for n, _ in tree.named_buffers(remove_duplicate=False)]:
        owner, _, leaf = name.rpartition(".")
        module = tree.get_submodule(owner)
        (module._parameters if leaf in module._parameters else module._buffers)[leaf] = live[name]
    tree.generation_config = view.generation_config
    llama_aliases(tree)
    return tree


class QuantizedBase:
    """For one run: ``module``, ``model.plain()``'s tree with the blocks' linear maps in NF4.

    Args:
        model: the ``HookedModel`` being trained (its weights are the merge target).
        compute_dtype: the dtype the 4-bit layers compute in (the model's dtype).
        workdir: where the full-precision block weights wait during the run (None: a temporary folder).
    """

    def __init__(self, model, compute_dtype: torch.dtype, workdir: Path | None = None):
        bnb = _bnb()
        from safetensors.torch import save_file

        self.model = model
        view = model.plain()
        self.view = view
        self.module = _shared_tree(view)
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="depthlens-qlora-")
        folder = Path(workdir) if workdir is not None else Path(self._tmp.name)
        folder.mkdir(parents=True, exist_ok=True)
        self.offload = folder / OFFLOAD_FILE
        self.originals: dict[str, torch.nn.Parameter] = {}
        for name, lin in list(self.module.model.layers.named_modules()):
            if not isinstance(lin, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=QUANT_TYPE, device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type=QUANT_TYPE)
            if lin.bias is not None:
                q.bias = lin.bias  # shared, frozen
            q = q.to(lin.weight.device)  # quantizes
            owner, _, leaf = name.rpartition(".")
            setattr(self.module.model.layers.get_submodule(owner) if owner else self.module.model.layers, leaf, q)
            self.originals[f"model.layers.{name}.weight"] = lin.weight
        save_file({k: p.detach().cpu().contiguous() for k, p in self.originals.items()}, str(self.offload))
        self._shapes = {k: (p.dtype, p.device) for k, p in self.originals.items()}
        for p in self.originals.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)   # on disk until finish
        log.info("QLoRA: %d block linear maps in NF4; their %s weights wait in %s", len(self.originals),
                 str(compute_dtype).removeprefix("torch."), self.offload)

    def finish(self, peft_model, done: bool) -> None:
        """Bring the full-precision block weights back; with ``done`` add each adapter's update into them."""
        from safetensors import safe_open

        with torch.no_grad(), safe_open(str(self.offload), framework="pt") as f:
            for name, p in self.originals.items():
                dtype, device = self._shapes[name]
                p.data = f.get_tensor(name).to(device=device, dtype=dtype)
        if done and peft_model is not None:
            self._merge(peft_model)
        self.offload.unlink(missing_ok=True)
        if self._tmp is not None:
            self._tmp.cleanup()

    def _merge(self, peft_model) -> None:
        from peft.tuners.lora import LoraLayer

        merged = 0
        with torch.no_grad():
            for name, module in peft_model.named_modules():
                if not isinstance(module, LoraLayer):
                    continue
                target = self.originals[f"model.layers.{name.rsplit('layers.', 1)[1]}.weight"]
                for adapter in module.active_adapters:
                    if adapter not in module.lora_A:
                        continue
                    a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
                    delta = (b @ a) * module.scaling[adapter]
                    target.copy_((target.float() + delta.to(target.device)).to(target.dtype))
                    merged += 1
        log.info("QLoRA: merged %d adapters into the full-precision weights", merged)
