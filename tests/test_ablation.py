"""probes.ablation: kernels, the interpolated direction, and hooked == folded (pre- and post-norm blocks)."""

from __future__ import annotations

import pytest
import torch

from depthlens.runtime.forward import last_logprobs
from depthlens.runtime.generation import as_chats
from probes.ablation import AblationParams, Kernel, ablated, fold_ablation, interpolate_direction, weighted_ablation_hooks

PROMPTS = ["How do I bake bread?", "What is the capital of France?", "Tell me a short story about a dog, please."]


@pytest.fixture(scope="module")
def tiny():
    from depthlens.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def tiny_gemma2():
    """A random 2-layer Gemma 2 (pre- and post-norms, (1 + γ) gains), norm gains jittered so g is not uniform."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from depthlens.models.hooked_model import wrap
    from depthlens.models.tiny import tiny_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    cfg = AutoConfig.for_model(
        "gemma2", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg)
        hf.config.architectures = [type(hf).__name__]
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 1:
                    p.add_(0.2 * torch.randn_like(p))
    return wrap(hf, tok, "tiny-gemma2-test", {"source": "random Gemma2 (test)"}, torch.device("cpu"), torch.float32)


def _directions(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.n_layers, model.d_model, generator=g)


# the settings of the equality tests: peaks between layers, a layer with weight 0, over-subtraction,
# norm preservation, the embedding
SETTINGS = {
    "plain": AblationParams(0.3, Kernel(1.3, 0.5, 0.2, 1.5), Kernel(0.7, 1.0, 0.1, 0.8)),
    "norm-preserving": AblationParams(0.7, Kernel(1.3, 0.5, 0.2, 1.5), Kernel(0.7, 1.0, 0.1, 0.8), norm_preserving=True),
    "full+embed": AblationParams(1.0, Kernel.constant(1.0, 2), Kernel.constant(1.0, 2), embed_weight=1.0),
    "norm+embed": AblationParams(0.0, Kernel(1.5, 1.0, 0.4, 1.0), Kernel(0.9, 0.0, 0.0, 2.0),
                                 norm_preserving=True, embed_weight=0.5),
}


def test_kernel_is_a_tent_over_layers():
    assert Kernel(1.0, 2.0, 0.2, 2.0).weights(6) == pytest.approx([0.2, 0.6, 1.0, 0.6, 0.2, 0.0])
    assert Kernel(1.2, 0.5, 0.0, 1.0).weights(3) == pytest.approx([0.6, 0.6, 0.0])
    assert Kernel.constant(0.7, 4).weights(4) == pytest.approx([0.7] * 4)
    with pytest.raises(ValueError, match="width"):
        Kernel(1.0, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        Kernel(-0.1, 0.0, 0.0, 1.0)
    p = AblationParams(1.5, Kernel(1.1, 2.0, 0.3, 3.0), norm_preserving=True)
    assert AblationParams.from_dict(p.to_dict()) == p


def test_interpolated_direction():
    d = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    assert torch.allclose(interpolate_direction(d, 1.0), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(interpolate_direction(d, 2.0), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    # the layers count by orientation, not by norm: halfway is the bisector
    half = interpolate_direction(d, 1.5)
    assert torch.allclose(half, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / 2 ** 0.5)
    assert float(half.norm()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="zero direction of layer 0"):
        interpolate_direction(d, 0.5)
    with pytest.raises(ValueError, match="outside the layers"):
        interpolate_direction(d, 2.5)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_hooked_equals_folded_on_tiny_llama(tiny, name):
    params = SETTINGS[name]
    seqs = as_chats(tiny, PROMPTS)
    r = interpolate_direction(_directions(tiny), params.direction_index)
    base = last_logprobs(tiny, seqs)
    hooked = last_logprobs(tiny, seqs, fwd_hooks=weighted_ablation_hooks(tiny, r, params))
    before = {n: p.detach().clone() for n, p in tiny.plain().named_parameters()}
    with ablated(tiny, r, params) as folded:
        lp = last_logprobs(tiny, seqs)
        assert folded.parameters
    assert float((hooked - base).abs().max()) > 1e-3  # the ablation does something
    assert float((hooked - lp).abs().max()) <= 1e-4
    # the weights are back exactly, and so are the log-probs
    after = dict(tiny.plain().named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(last_logprobs(tiny, seqs), base)


def test_norm_preserving_keeps_column_norms_and_plain_shrinks_them(tiny):
    r = interpolate_direction(_directions(tiny), 1.0)
    o = tiny.plain().model.layers[1].self_attn.o_proj.weight
    norms = o.detach().double().norm(dim=0)
    for npres in (False, True):
        params = AblationParams(1.0, Kernel.constant(1.0, 2), Kernel.constant(1.0, 2), norm_preserving=npres)
        with ablated(tiny, r, params):
            w = o.detach().double()
            assert float((r.to(w) @ w).abs().max()) < 1e-5  # nothing written along r̂ at weight 1
            if npres:
                assert torch.allclose(w.norm(dim=0), norms, rtol=1e-5)
            else:
                shrink = norms - w.norm(dim=0)
                assert float(shrink.min()) >= -1e-9 and float(shrink.max()) > 1e-4


def test_full_ablation_with_embedding_is_arditi_weight_orthogonalization(tiny):
    from depthlens.models import load_model
    from probes.orthogonalize import orthogonalize_weights

    seqs = as_chats(tiny, PROMPTS)
    r = interpolate_direction(_directions(tiny, seed=3), 1.0)
    wo = load_model("tiny-llama")
    orthogonalize_weights(wo, r.float())
    with ablated(tiny, r, SETTINGS["full+embed"]):
        lp = last_logprobs(tiny, seqs)
    assert float((lp - last_logprobs(wo, seqs)).abs().max()) <= 1e-5


def test_post_norm_blocks_fold_against_the_gain_scaled_direction(tiny_gemma2):
    m = tiny_gemma2
    seqs = as_chats(m, PROMPTS)
    dirs = _directions(m, seed=1)
    for params in (SETTINGS["plain"], SETTINGS["norm-preserving"]):
        r = interpolate_direction(dirs, params.direction_index)
        hooked = last_logprobs(m, seqs, fwd_hooks=weighted_ablation_hooks(m, r, params))
        with ablated(m, r, params) as folded:
            lp = last_logprobs(m, seqs)
        assert folded.post_norm
        assert float((hooked - lp).abs().max()) <= 1e-4
    # at weight 1 every block writes nothing along r̂ *after* its post-norm (hook_attn_out / hook_mlp_out
    # are what the block adds to the residual stream), while the unablated blocks do
    r = dirs[1] / dirs[1].norm()
    names = [f"blocks.{l}.hook_{k}_out" for l in range(2) for k in ("attn", "mlp")]
    ids = torch.tensor([seqs[0].ids])

    def along(cache, n):
        return float((cache[n] @ r.float()).abs().max() / cache[n].norm(dim=-1).mean())

    with ablated(m, r, AblationParams(1.0, Kernel.constant(1.0, 2), Kernel.constant(1.0, 2))):
        _, cache = m.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    assert max(along(cache, n) for n in names) < 1e-4
    _, cache = m.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    assert min(along(cache, n) for n in names) > 1e-2


def test_fold_is_permanent_and_bad_input_is_refused(tiny):
    from depthlens.models import load_model

    m = load_model("tiny-llama")
    seqs = as_chats(m, PROMPTS)
    params = SETTINGS["norm-preserving"]
    r = interpolate_direction(_directions(m), params.direction_index)
    hooked = last_logprobs(m, seqs, fwd_hooks=weighted_ablation_hooks(m, r, params))
    fold_ablation(m, r, params)
    assert float((hooked - last_logprobs(m, seqs)).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match="shape"):
        weighted_ablation_hooks(m, torch.ones(m.d_model + 1), params)
    with pytest.raises(ValueError, match="non-zero"):
        fold_ablation(m, torch.zeros(m.d_model), params)
