"""Models: `load_model(spec) -> HookedModel` and everything a spec resolves through.

- ``load``: `load_model`, the one door (base spec + recipe suffixes)
- ``base``: base specs (the embedded default, tiny models, local directories, Hub ids), device and dtype
- ``families``: the architecture families beyond Llama (tiny test models of each, Gemma 3 270M)
- ``tiny``: tiny-llama, a random 2-layer Llama with a tokenizer built in code
- ``checkpoint``: Hugging Face checkpoints on disk, written whole with their provenance
- ``hooked_model``: `HookedModel` (a TransformerBridge with its tokenizer and provenance) and `hook_name`
- ``recipes``: spec suffixes (`:sft`, `:deep`, `:wo` ...) resolved through the `depthlens.recipes` entry points
- ``specs``: spec-string helpers (`ORGANISM`, `base_spec`, `parent_spec`, `reference_spec`, `load_reference`)

It imports `depthlens.infra` and nothing above it.
"""

from __future__ import annotations

from depthlens.models.checkpoint import PROVENANCE_FILE, hf_state_dict, clean_key, save_checkpoint, write_checkpoint
from depthlens.models.tiny import TINY_CHAT_TEMPLATE, tiny_tokenizer_dir, tiny_llama
from depthlens.models.families import (
    TINY_FAMILY_VERSION, TinyFamily, TINY_FAMILIES, tiny_family, GEMMA3_270M, GEMMA_WHEEL, GEMMA_CHAT_TEMPLATE,
    FAMILY_SPECS, PRETRAINED_ONLY, load_family, llama_aliases, sublayer_module, is_post_norm, written_output,
    output_projection, rms_gain, bind_fused_qkv, has_sliding_window,
)
from depthlens.models.base import (
    DEFAULT_MODEL, TINY_MODEL, BUILTIN_MODELS, SMOLLM2_WHEEL, SMOLLM2_GGUF, default_device, resolve_device_dtype,
    split_spec, load_base, load_dir, smollm2_gguf_path,
)
from depthlens.models.hooked_model import HOOK_KINDS, hook_name, HookedModel, wrap
from depthlens.models.recipes import (
    GROUP, RECIPE_FILE, Recipe, available_recipes, get_recipe, bind, recipe_key, base_key, entry_dir,
    rebuild_command, process_state, build_with, build_or_load,
)
from depthlens.models.load import load_model
from depthlens.models.specs import ORGANISM, load_organism, base_spec, reference_spec, load_reference, parent_spec

__all__ = [
    "PROVENANCE_FILE",
    "hf_state_dict",
    "clean_key",
    "save_checkpoint",
    "write_checkpoint",
    "TINY_CHAT_TEMPLATE",
    "tiny_tokenizer_dir",
    "tiny_llama",
    "TINY_FAMILY_VERSION",
    "TinyFamily",
    "TINY_FAMILIES",
    "tiny_family",
    "GEMMA3_270M",
    "GEMMA_WHEEL",
    "GEMMA_CHAT_TEMPLATE",
    "FAMILY_SPECS",
    "PRETRAINED_ONLY",
    "load_family",
    "llama_aliases",
    "sublayer_module",
    "is_post_norm",
    "written_output",
    "output_projection",
    "rms_gain",
    "bind_fused_qkv",
    "has_sliding_window",
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "BUILTIN_MODELS",
    "SMOLLM2_WHEEL",
    "SMOLLM2_GGUF",
    "default_device",
    "resolve_device_dtype",
    "split_spec",
    "load_base",
    "load_dir",
    "smollm2_gguf_path",
    "HOOK_KINDS",
    "hook_name",
    "HookedModel",
    "wrap",
    "GROUP",
    "RECIPE_FILE",
    "Recipe",
    "available_recipes",
    "get_recipe",
    "bind",
    "recipe_key",
    "base_key",
    "entry_dir",
    "rebuild_command",
    "process_state",
    "build_with",
    "build_or_load",
    "load_model",
    "ORGANISM",
    "load_organism",
    "base_spec",
    "reference_spec",
    "load_reference",
    "parent_spec",
]
