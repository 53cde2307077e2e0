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
    state: dict = {}
    for k, v in hf_model.state_dict().items():
        state.setdefault(clean_key(k), v)
    missing = [k for k in keys if k not in state]
    if missing:
        raise RuntimeError(f"Cannot map the bridged weights back to Hugging Face names; missing {missing[:3]}.")
    return {k: state[k].detach().to("cpu", torch.float32).clone() for k in keys}


def clean_key(key: str) -> str:
    return key.replace("._original_component", "").replace("_original_component.", "")


def save_checkpoint(hf_model, tokenizer, path: str | Path, provenance: dict, files: dict[str, str] | None = None,
                    overwrite: bool = False) -> Path:
    """Save an HF checkpoint to ``path``: whole or not at all, with a manifest, one writer at a time.

    The files are written into a sibling temporary directory (``write_checkpoint``), a
    ``manifest.json`` of their sizes and hashes is added last, and the directory takes
    ``path``'s place in one atomic step (``depthlens.infra.cache.publish``): a reader sees the old
    checkpoint or the new one, never none, and concurrent writers queue on a file lock (kept
    in the cache, not beside ``path``). ``files`` are extra text files written into the checkpoint.

    Replacing ``path`` deletes what was in it, so ``check_save_target`` refuses a folder that
    holds files but is not a depthlens checkpoint (unless ``overwrite``), the working
    directory or one of its parents, and a file. The new folder keeps the old one's mode.
    """
    path = check_save_target(path, overwrite)
    mode = path.stat().st_mode & 0o7777 if path.is_dir() else None
    with cache.lock(path, beside=False):
        check_free_space(path.parent, _checkpoint_bytes(hf_model), f"the checkpoint folder {str(path)!r}")
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            write_checkpoint(hf_model, tokenizer, tmp, provenance, files)
            tmp.chmod(mode if mode is not None else 0o777 & ~cache.umask())
            cache.publish(tmp, path)
        finally:
            cache.remove(tmp)
    return path


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a folder that depthlens wrote (``save_checkpoint`` or a cache build)."""
    return path.is_dir() and (path / PROVENANCE_FILE).is_file() and (path / cache.MANIFEST).is_file()


def check_save_target(path: str | Path, overwrite: bool = False) -> Path:
    """``path`` as an absolute path where ``save_checkpoint`` may replace what is there, else one ``UsageError``."""
    from depthlens.infra.errors import UsageError

    if not str(path).strip():
        raise UsageError("A checkpoint path must be a non-empty folder name.")
    path = Path(path).expanduser().absolute()
    try:
        resolved, cwd = path.resolve(), Path.cwd().resolve()
    except OSError as err:
        raise UsageError(f"Cannot save a checkpoint to {str(path)!r}: {err.strerror or err}.") from None
    if resolved == cwd or resolved in cwd.parents or resolved.parent == resolved:
        raise UsageError(f"Refusing to save a checkpoint to {str(path)!r}: it is the working directory (or holds it), "
                         "whose files saving would replace; name a new folder, e.g. ./checkpoint.")
    if path.exists() and not path.is_dir():
        raise UsageError(f"Cannot save a checkpoint to {str(path)!r}: it is a file; name a folder.")
    if path.is_dir() and not overwrite and not is_checkpoint(path) and any(path.iterdir()):
        raise UsageError(f"Refusing to save a checkpoint to {str(path)!r}: the folder holds files and is not a "
                         "depthlens checkpoint, and saving replaces the whole folder; name a new or empty folder "
                         "(or pass overwrite=True to delete its contents).")
    if not path.parent.is_dir():
        raise UsageError(f"Cannot save a checkpoint to {str(path)!r}: its parent folder does not exist.")
    return path


def check_free_space(folder: Path, need: int, what: str) -> None:
    """A ``UsageError`` before any work when ``folder``'s file system has less than ``need`` bytes free."""
    import shutil

    from depthlens.infra.errors import UsageError

    free = shutil.disk_usage(folder).free
    if free < need:
        raise UsageError(f"Not enough free space for {what}: it needs about {need / 2**20:.0f} MiB and "
                         f"{str(folder)!r} has {free / 2**20:.0f} MiB free; free some space or write elsewhere.")


def _checkpoint_bytes(hf_model) -> int:
    """What ``write_checkpoint`` writes, about: fp32 weights (tied ones once), plus room for the tokenizer."""
    seen = {p.data_ptr(): p.numel() for p in hf_model.parameters()}
    return 4 * sum(seen.values()) + (32 << 20)


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
