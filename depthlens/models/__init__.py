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

from typing import TYPE_CHECKING

from depthlens.infra.exports import lazy_exports

# every public name of the room, and the module that defines it (imported on first use)
_EXPORTS = {
    "PROVENANCE_FILE": "checkpoint", "hf_state_dict": "checkpoint", "clean_key": "checkpoint",
    "save_checkpoint": "checkpoint", "write_checkpoint": "checkpoint",
    "TINY_CHAT_TEMPLATE": "tiny", "tiny_tokenizer_dir": "tiny", "tiny_llama": "tiny",
    "TINY_FAMILY_VERSION": "families", "TinyFamily": "families", "TINY_FAMILIES": "families",
    "tiny_family": "families", "GEMMA3_270M": "families", "GEMMA_WHEEL": "families",
    "GEMMA_CHAT_TEMPLATE": "families", "FAMILY_SPECS": "families", "PRETRAINED_ONLY": "families",
    "load_family": "families", "llama_aliases": "families", "sublayer_module": "families", "is_post_norm": "families",
    "written_output": "families", "output_projection": "families", "rms_gain": "families",
    "bind_fused_qkv": "families", "has_sliding_window": "families",
    "DEFAULT_MODEL": "base", "TINY_MODEL": "base", "BUILTIN_MODELS": "base", "SMOLLM2_WHEEL": "base",
    "SMOLLM2_GGUF": "base", "default_device": "base", "resolve_device_dtype": "base", "split_spec": "base",
    "load_base": "base", "load_dir": "base", "smollm2_gguf_path": "base",
    "HOOK_KINDS": "hooked_model", "hook_name": "hooked_model", "HookedModel": "hooked_model", "wrap": "hooked_model",
    "GROUP": "recipes", "RECIPE_FILE": "recipes", "Recipe": "recipes", "available_recipes": "recipes",
    "get_recipe": "recipes", "bind": "recipes", "recipe_key": "recipes", "base_key": "recipes",
    "entry_dir": "recipes", "rebuild_command": "recipes", "process_state": "recipes", "build_with": "recipes",
    "build_or_load": "recipes",
    "load_model": "load",
    "ORGANISM": "specs", "base_spec": "specs", "reference_spec": "specs",
    "load_reference": "specs", "parent_spec": "specs",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, spelled out for type checkers and editors
    from depthlens.models.checkpoint import PROVENANCE_FILE, hf_state_dict, clean_key, save_checkpoint, write_checkpoint
    from depthlens.models.tiny import TINY_CHAT_TEMPLATE, tiny_tokenizer_dir, tiny_llama
    from depthlens.models.families import (
        TINY_FAMILY_VERSION, TinyFamily, TINY_FAMILIES, tiny_family, GEMMA3_270M, GEMMA_WHEEL,
        GEMMA_CHAT_TEMPLATE, FAMILY_SPECS, PRETRAINED_ONLY, load_family, llama_aliases, sublayer_module,
        is_post_norm, written_output, output_projection, rms_gain, bind_fused_qkv, has_sliding_window,
    )
    from depthlens.models.base import (
        DEFAULT_MODEL, TINY_MODEL, BUILTIN_MODELS, SMOLLM2_WHEEL, SMOLLM2_GGUF, default_device,
        resolve_device_dtype, split_spec, load_base, load_dir, smollm2_gguf_path,
    )
    from depthlens.models.hooked_model import HOOK_KINDS, hook_name, HookedModel, wrap
    from depthlens.models.recipes import (
        GROUP, RECIPE_FILE, Recipe, available_recipes, get_recipe, bind, recipe_key, base_key, entry_dir,
        rebuild_command, process_state, build_with, build_or_load,
    )
    from depthlens.models.load import load_model
    from depthlens.models.specs import ORGANISM, base_spec, reference_spec, load_reference, parent_spec
