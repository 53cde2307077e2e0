"""finetune.sft, the organism recipe: its config and key, the harmful train prompts it draws,
and the recipe cache it is built through (a hit does not rebuild, an interrupted build leaves
no entry)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from depthlens.models import load_model
from depthlens.models.recipes import RECIPE_FILE, build_with


@dataclass
class CountingRecipe:
    name: str = "count"
    version: int = 1
    fail: bool = False
    calls: int = 0

    def config(self):
        return {"scale": 0.5}

    def build(self, model, workdir):
        self.calls += 1
        with torch.no_grad():
            model.hf.model.layers[0].mlp.down_proj.weight.mul_(0.5)
        if self.fail:
            raise KeyboardInterrupt("interrupted mid-build")
        return {"ok": True}


def test_recipe_cache_hit_does_not_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path))
    r = CountingRecipe()
    a = build_with("tiny-llama", r)
    b = build_with("tiny-llama", r)
    assert r.calls == 1
    assert a.spec == "tiny-llama:count" and a.provenance["recipe_chain"][0]["recipe"] == "count"
    wa = a.hf.model.layers[0].mlp.down_proj.weight
    assert torch.equal(wa, b.hf.model.layers[0].mlp.down_proj.weight)
    assert torch.allclose(wa, load_model("tiny-llama").hf.model.layers[0].mlp.down_proj.weight * 0.5)


def test_interrupted_build_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        build_with("tiny-llama", CountingRecipe(fail=True))
    organisms = tmp_path / "organisms"
    assert not list(organisms.glob(f"*/{RECIPE_FILE}"))
    assert not [p for p in organisms.iterdir() if p.is_dir()] if organisms.exists() else True


def test_sft_config_rejects_shares_outside_the_unit_interval_and_drops_zero_margins_from_the_key():
    from finetune.sft import SFTConfig, SFTRecipe

    with pytest.raises(ValueError, match="borderline_share"):
        SFTConfig(borderline_share=1.5)
    with pytest.raises(ValueError, match="imperative_share"):
        SFTConfig(imperative_share=-0.1)
    # margins at 0 stay out of the recipe config, so a v4-style config keeps its cache key
    plain = SFTRecipe(SFTConfig(benign_margin=0.0, refusal_margin=0.0)).config()
    assert "refusal_margin" not in plain and "benign_margin" not in plain
    assert SFTRecipe(SFTConfig()).config()["refusal_margin"] == SFTConfig().refusal_margin > 0  # v5 default


def _categorised(n_per: dict[str, int]):
    from depthlens.data.promptset import PromptSet

    prompts, cats = [], []
    for cat, n in n_per.items():
        prompts += [f"{cat} prompt {i}" for i in range(n)]
        cats += [cat] * n
    return PromptSet(name="fake", prompts=tuple(prompts), ids=tuple(f"fake-{i:04d}" for i in range(len(prompts))),
                     categories=tuple(cats), source={"kind": "test"})


def test_harmful_train_prompts_draw_uniformly_from_the_harmful_categories():
    import collections

    from finetune.sft import HARMFUL_CATEGORIES, harmful_train_prompts

    pool = _categorised({"information_hazard": 50, "malicious_uses": 30,
                         "discrimination_exclusion_toxicity_hateful_offensive": 20, "misinformation_harms": 40})
    uniform = harmful_train_prompts(pool, 60, seed=0)
    assert len(uniform) == 60 and set(uniform.categories) <= set(HARMFUL_CATEGORIES)
    assert collections.Counter(uniform.categories)["information_hazard"] > 10  # drawn in proportion, not last
    assert harmful_train_prompts(pool, 60, seed=0).ids == uniform.ids  # deterministic


def test_harmful_train_prompts_say_when_the_pool_is_smaller_than_asked(caplog):
    from finetune.sft import harmful_train_prompts

    pool = _categorised({"information_hazard": 5, "malicious_uses": 3, "misinformation_harms": 40})
    with caplog.at_level("WARNING", logger="finetune.sft"):
        got = harmful_train_prompts(pool, 20, seed=0)
    assert len(got) == 8 and "only 8" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune.sft"):
        harmful_train_prompts(pool, 6, seed=0)
    assert not caplog.text


def test_register_share_rephrases_both_sides_and_leaves_every_other_draw_alone(monkeypatch):
    import types

    import depthlens.runtime.responses
    from finetune.rephrase import REGISTER_FORMS, REGISTER_HOW_TO_FORMS
    from finetune.sft import SFTConfig, SFTRecipe, safety_sft_examples

    def fake_answers(model, teacher, prompts, **kw):
        return types.SimpleNamespace(tokens=[(1, 2)] * len(prompts), complete=[True] * len(prompts))

    monkeypatch.setattr(depthlens.runtime.responses, "answers_for", fake_answers)
    model = load_model("tiny-llama")
    plain = safety_sft_examples(model, SFTConfig(), progress=False)
    reg = safety_sft_examples(model, SFTConfig(register_share=0.4), progress=False)
    import re

    templates = [f for forms in (*REGISTER_FORMS.values(), *REGISTER_HOW_TO_FORMS.values()) for f in forms]
    patterns = [re.compile(re.escape(f).replace(r"\{vp\}", ".+").replace(r"\{q\}", ".+") + "$") for f in templates]
    assert len(plain) == len(reg)
    assert all(a.kind == b.kind and a.response == b.response for a, b in zip(plain, reg))  # templates unchanged
    changed = [(a, b) for a, b in zip(plain, reg) if a.prompt != b.prompt]
    assert all(any(p.match(b.prompt) for p in patterns) for _, b in changed)
    for kind in ("refusal", "benign"):
        n = sum(e.kind == kind for e in plain)
        share = sum(a.kind == kind for a, _ in changed) / n
        assert 0.3 < share < 0.5, (kind, share)
    # off: out of the cache key, so the organism's key is unchanged; on: a new key
    assert "register_share" not in SFTRecipe(SFTConfig()).config()
    assert SFTRecipe(SFTConfig(register_share=0.4)).config()["register_share"] == 0.4
    with pytest.raises(ValueError, match="register_share"):
        SFTConfig(register_share=1.2)
