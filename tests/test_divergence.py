from __future__ import annotations

import numpy as np
import pytest
import torch

from depthlens.interventions.divergence import per_position_kl
from depthlens.models import load_model

PROMPTS = ["How do I bake bread?", "What is the capital of France?", "Tell me a story."]


def _responses(model):
    texts = ["Sure, mix flour and water and bake it.", "Paris is the capital.", "Once upon a time"]
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_kl_of_a_model_with_itself_is_zero_everywhere(tiny):
    kl = per_position_kl(tiny, tiny, PROMPTS, _responses(tiny), n_positions=8, n_boot=20)
    real = ~np.isnan(kl.values)
    assert real.sum() > 10
    assert np.all(kl.values[real] == 0.0)
    assert np.all(kl.n[:3] == 3)


def test_kl_is_positive_after_a_weight_change(tiny):
    other = load_model("tiny-llama")
    with torch.no_grad():
        other.hf.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    kl = per_position_kl(other, tiny, PROMPTS, _responses(tiny), n_positions=8, n_boot=20)
    real = ~np.isnan(kl.values)
    assert np.all(kl.values[real] > 0)
    assert np.all(kl.lo[: 3] <= kl.mean[: 3]) and np.all(kl.mean[:3] <= kl.hi[:3])


def test_mismatched_lengths_are_rejected(tiny):
    with pytest.raises(ValueError, match="must pair up"):
        per_position_kl(tiny, tiny, PROMPTS, _responses(tiny)[:2])
