"""tiny-llama: a random 2-layer Llama and the small ChatML tokenizer every tiny model shares.

Tests, doctests and CI need a model that loads in a second on a CPU and exercises the real
code paths (chat template, bridge, hooks), not one that answers well. The tokenizer is a
512-token byte-level BPE trained in code on a fixed corpus and cached once
(``models/tiny-llama-tokenizer-v1``); :mod:`depthlens.models.families` builds its other tiny
architectures on the same tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from depthlens.infra import cache
from depthlens.infra.paths import cache_dir


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


def tiny_tokenizer_dir() -> Path:
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


def tiny_llama(seed: int = 0):
    """(HF model, tokenizer, provenance) of tiny-llama: 2 layers, d_model 64, random weights from ``seed``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
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
