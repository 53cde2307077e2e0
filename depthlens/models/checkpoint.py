"""Hugging Face checkpoints on disk: written whole or not at all, with a manifest, one writer at a time.

A checkpoint is what ``save_pretrained`` writes (fp32 safetensors, config, tokenizer) plus
``depthlens.json`` (the provenance: spec, hashes, recipe chain) and ``manifest.json`` (every
file's size and sha256, see ``depthlens.infra.cache``). ``write_checkpoint`` writes the files into a
directory; ``save_checkpoint`` does so in a temporary sibling and swaps it into place
atomically under a file lock, so readers never see half a checkpoint or none, and concurrent
writers queue instead of failing. Bridged models are unwrapped to plain HF names first
(``hf_state_dict``).

    >>> import tempfile
    >>> from depthlens.models.load import load_model
    >>> model = load_model("tiny-llama")
    >>> path = save_checkpoint(model.hf, model.tokenizer, tempfile.mkdtemp() + "/ckpt", {"spec": "tiny-llama"})
    >>> sorted(p.name for p in path.iterdir())[:4]
    ['chat_template.jinja', 'config.json', 'depthlens.json', 'generation_config.json']
    >>> from depthlens.infra.cache import check; check(path) is None
    True
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from depthlens.infra import cache

PROVENANCE_FILE = "depthlens.json"


def hf_state_dict(hf_model, keys) -> dict[str, torch.Tensor]:
    """The plain HF state dict (fp32, CPU) of a bridged model, restricted to ``keys``.

    The bridge wraps modules in place, so the raw state dict also carries wrapper names and
    aliases of the same tensors; every expected key must be found.
    """
    state = {}
    for k, v in hf_model.state_dict().items():
        state.setdefault(clean_key(k), v)
    missing = [k for k in keys if k not in state]
    if missing:
        raise RuntimeError(f"Cannot map the bridged weights back to Hugging Face names; missing {missing[:3]}.")
    return {k: state[k].detach().to("cpu", torch.float32).clone() for k in keys}


def clean_key(key: str) -> str:
    return key.replace("._original_component", "").replace("_original_component.", "")


def save_checkpoint(hf_model, tokenizer, path: str | Path, provenance: dict, files: dict[str, str] | None = None) -> Path:
    """Save an HF checkpoint to ``path``: whole or not at all, with a manifest, one writer at a time.

    The files are written into a sibling temporary directory (``write_checkpoint``), a
    ``manifest.json`` of their sizes and hashes is added last, and the directory takes
    ``path``'s place in one atomic step (``depthlens.infra.cache.publish``): a reader sees the old
    checkpoint or the new one, never none, and concurrent writers queue on a file lock.
    ``files`` are extra text files written into the checkpoint.
    """
    path = Path(path).expanduser()
    with cache.lock(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            write_checkpoint(hf_model, tokenizer, tmp, provenance, files)
            cache.publish(tmp, path)
        finally:
            cache.remove(tmp)
    return path


def write_checkpoint(hf_model, tokenizer, directory: str | Path, provenance: dict,
                     files: dict[str, str] | None = None) -> None:
    """Write an HF checkpoint (fp32 safetensors, tokenizer, ``depthlens.json`` provenance) into ``directory``.

    Plain files, no manifest and no lock: ``save_checkpoint`` and cache builders call it on a
    temporary directory that they then publish.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    fresh = AutoModelForCausalLM.from_config(hf_model.config)
    fresh.load_state_dict(hf_state_dict(hf_model, fresh.state_dict().keys()))
    fresh.config.dtype = torch.float32
    fresh.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str))
    for name, text in (files or {}).items():
        (directory / name).write_text(text)
