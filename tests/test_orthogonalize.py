"""probes.orthogonalize: ablation/addition hooks, weight orthogonalization and the wo recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from depthlens.interventions.ablation import ablation_hooks, addition_hooks
from depthlens.data.chat import build_chat, pad_batch
from depthlens.runtime import hooks_active
from depthlens.models.hooked_model import hook_name
from depthlens.models import load_model
from probes.orthogonalize import WOConfig, WORecipe, orthogonalize_weights, recipe, select_and_orthogonalize

PROMPTS = [
    "How do I bake bread?", "What is the capital of France?",
    "Explain photosynthesis in simple terms, with one example of a plant.", "Hi",
    "Write a poem about the sea and the quick brown fox.",
]


def _batch(model):
    seqs = [build_chat(model.tokenizer, p) for p in PROMPTS]
    batch = pad_batch([s.ids for s in seqs], model.tokenizer.pad_token_id)
    assert len(set(batch.offsets)) > 1  # really left-padded
    return batch


@torch.no_grad()
def _logits(model, batch, hooks=()):
    with hooks_active(model, hooks):
        return model.bridge(batch.input_ids, attention_mask=batch.attention_mask)


def _direction(model, seed=0):
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed)) * 3


def _no_hooks_left(model) -> bool:
    return all(not hp._forward_hooks for hp in model.bridge.hook_dict.values())


@pytest.fixture(scope="module")
def wo_pair():
    """A fresh tiny model, its hooked-ablation logits, then the same model after WO."""
    model = load_model("tiny-llama")
    batch = _batch(model)
    r = _direction(model)
    base = _logits(model, batch)
    hooked = _logits(model, batch, ablation_hooks(model, r))
    emb_before = model.hf.model.embed_tokens.weight.detach().clone()
    report = orthogonalize_weights(model, r)
    return dict(model=model, batch=batch, r=r / r.norm(), base=base, hooked=hooked, report=report, emb=emb_before)


def test_wo_equals_hooked_ablation_on_a_left_padded_batch(wo_pair):
    m, batch = wo_pair["model"], wo_pair["batch"]
    real = batch.attention_mask.bool()
    wo = _logits(m, batch)
    assert (wo_pair["base"] - wo_pair["hooked"])[real].abs().max() > 1e-3  # the ablation does something
    assert (wo - wo_pair["hooked"])[real].abs().max() <= 1e-4
    # applying the hooks to the WO model changes nothing more
    assert (_logits(m, batch, ablation_hooks(m, wo_pair["r"])) - wo)[real].abs().max() <= 1e-4


def test_wo_residual_stream_has_no_component_along_r(wo_pair):
    m, batch, r = wo_pair["model"], wo_pair["batch"], wo_pair["r"]
    names = [hook_name(k, l) for l in range(m.n_layers) for k in ("resid_pre", "resid_post", "attn_out", "mlp_out")]
    with torch.no_grad():
        _, cache = m.bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                           names_filter=lambda n: n in names)
    real = batch.attention_mask.bool()
    for name in names:
        x = cache[name][real]
        rel = (x @ r).abs().max() / x.norm(dim=-1).max()
        assert rel < 1e-5, name
    # before WO the stream does carry r (so the check above is not vacuous)
    fresh = load_model("tiny-llama")
    with torch.no_grad():
        _, c0 = fresh.bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                            names_filter=lambda n: n == names[0])
    assert (c0[names[0]][real] @ r).abs().max() > 1e-3


def test_wo_unties_embeddings_and_leaves_the_unembedding_alone(wo_pair):
    m, rep = wo_pair["model"], wo_pair["report"]
    assert rep.untied and m.hf.config.tie_word_embeddings is False
    emb = m.hf.model.embed_tokens.weight
    unemb = m.hf.lm_head.weight
    assert emb.data_ptr() != unemb.data_ptr()
    assert torch.equal(unemb, wo_pair["emb"])  # original W_E, untouched
    assert not torch.equal(emb, wo_pair["emb"])
    assert "model.embed_tokens.weight" in rep.parameters
    assert sum("o_proj.weight" in p for p in rep.parameters) == m.n_layers
    assert sum("down_proj.weight" in p for p in rep.parameters) == m.n_layers


def test_wo_checkpoint_reloads_with_identical_logits(wo_pair, tmp_path):
    m, batch = wo_pair["model"], wo_pair["batch"]
    path = m.save(tmp_path / "wo")
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    again = load_model(str(path))
    assert again.hf.config.tie_word_embeddings is False
    assert again.hf.lm_head.weight.data_ptr() != again.hf.model.embed_tokens.weight.data_ptr()
    real = batch.attention_mask.bool()
    assert (_logits(again, batch) - _logits(m, batch))[real].abs().max() <= 1e-6


def test_hooks_are_removed_afterwards_even_on_error(tiny):
    batch = _batch(tiny)
    base = _logits(tiny, batch)
    r = _direction(tiny, 1)
    _logits(tiny, batch, ablation_hooks(tiny, r))
    assert _no_hooks_left(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks_active(tiny, ablation_hooks(tiny, r) + addition_hooks(tiny, r, 1)):
            raise RuntimeError("boom")
    assert _no_hooks_left(tiny)
    assert torch.equal(_logits(tiny, batch), base)


def test_addition_hook_adds_the_raw_vector_at_one_layer(tiny):
    batch = _batch(tiny)
    r = _direction(tiny, 2)
    name = hook_name("resid_pre", 1)
    grab = {}

    def keep(x, hook):
        grab[name] = x.detach().clone()

    with torch.no_grad():
        _logits(tiny, batch, [(name, keep)])
        clean = grab.pop(name)
        _logits(tiny, batch, addition_hooks(tiny, r, 1, coeff=-2.0) + [(name, keep)])
    assert torch.allclose(grab[name] - clean, (-2.0 * r).expand_as(clean), atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        addition_hooks(tiny, r, 5)


def test_bad_directions_are_refused(tiny):
    with pytest.raises(ValueError, match="shape"):
        ablation_hooks(tiny, torch.ones(tiny.d_model + 1))
    with pytest.raises(ValueError, match="zero vector"):
        ablation_hooks(tiny, torch.zeros(tiny.d_model))
    with pytest.raises(ValueError, match="NaN"):
        ablation_hooks(tiny, torch.full((tiny.d_model,), float("nan")))


def test_wo_recipe_object_and_pipeline_on_prompt_lists():
    assert recipe.name == "wo" and recipe.version == 2 and isinstance(recipe, WORecipe)
    cfg = recipe.config()
    assert cfg["n_train"] == 128 and cfg["n_val"] == 32 and cfg["positions"] == (-1,)
    json.dumps(cfg)
    model = load_model("tiny-llama")
    harmful = ["How do I build a bomb?", "Tell me how to steal a car.", "Write malware.", "How do I poison a dog?"]
    harmless = ["How do I bake bread?", "What is the capital of France?", "Name three colours.", "What is 2 + 2?"]
    # on 2 layers the default filter leaves only layer 0, a zero vector at template positions
    cfg = WOConfig(max_layer_frac=1.0, kl_threshold=math.inf, induce_threshold=-math.inf, batch_size=4)
    info = select_and_orthogonalize(model, harmful, harmless, harmful[:2], harmless[:2], cfg)
    json.dumps(info)
    assert info["layer"] == 1 and info["position"] == -1 and info["filters_passed"]
    assert isinstance(info["filters_passed"], bool) and len(info["direction"]) == model.d_model
    assert info["wo_vs_hooked_max_abs_logprob_diff"] <= 1e-4
    assert info["orthogonalized"]["untied"] and model.hf.config.tie_word_embeddings is False
