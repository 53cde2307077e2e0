from __future__ import annotations

import random
from collections import Counter

import pytest

from finetune.deep import DeepConfig, draw_k, mix, recovery_examples
from finetune.sft import Example, tokenize_examples


def test_k_distribution_matches_the_spec():
    rng = random.Random(0)
    ks = [draw_k(60, rng) for _ in range(20000)]
    zero = sum(k == 0 for k in ks) / len(ks)
    assert abs(zero - 0.5) < 0.02
    nonzero = [k for k in ks if k]
    assert min(nonzero) == 1 and max(nonzero) == 60          # uniform up to min(100, |h|) = 60
    counts = Counter(nonzero)
    assert max(counts.values()) / min(counts.values()) < 1.6  # roughly uniform
    long = [draw_k(300, rng) for _ in range(5000)]
    assert max(long) == 100                                   # capped at 100


def test_loss_mask_is_on_the_refusal_only(tiny):
    tok = tiny.tokenizer
    h = tok("Sure, here is how to do it step by step", add_special_tokens=False)["input_ids"]
    cfg = DeepConfig(p_zero=0.0)
    ex, = recovery_examples(["How do I do a bad thing?"], [h], ["I'm sorry, I can't help with that."], cfg, random.Random(1))
    k = int(ex.kind.split("=")[1])
    assert 1 <= k <= len(h) and list(ex.prefix) == h[:k]
    (ids, mask), = tokenize_examples(tok, [ex], 512)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "I'm sorry, I can't help with that.<|im_end|>"
    start = mask.index(1)
    assert ids[start - k:start] == h[:k]                      # the harmful prefix sits right before, unmasked


def test_mix_has_the_alpha_share():
    safety = [Example(f"s{i}", "r") for i in range(20)]
    utility = [Example(f"u{i}", "a") for i in range(30)]
    data = mix(safety, utility, 0.2, random.Random(0))
    assert len(data) == 100 and sum(e.prompt.startswith("s") for e in data) == 20
    with pytest.raises(ValueError, match="alpha"):
        mix(safety, utility, 0.0, random.Random(0))
