"""depthlens.interventions.spsa, the MeZO/SPSA engine: the ±εz probe restores θ bit for bit (fp32, bf16, when
the loss raises), the estimate points along the gradient, MeZO descends and is seeded, and the
per-layer ZO probes see only the layers that matter."""

from __future__ import annotations

import math

import pytest
import torch

from depthlens.models.hooked_model import hook_name
from depthlens.models import load_model
from depthlens.interventions.spsa import (
    SymmetricPerturbation,
    ZOConfig,
    mezo_step,
    mezo_train,
    spsa_grad_scalar,
    symmetric_perturbation,
    zo_layer_probes,
)
from depthlens.interventions.spsa import _increment, _z


def perturbation_direction(params, seed):
    """The directions z (float32, one per tensor) that ``seed`` stands for in the engine."""
    return [_z(p, seed, i) for i, p in enumerate(params)]


def perturb_inplace(params, seed, scale):
    """Plain arithmetic θ += scale·z with the engine's rounded increments (what the engine must NOT do)."""
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(_increment(p, seed, i, scale))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared 2-core machine: one thread is ~40x faster than two contending ones.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bits(ts):
    return [t.view(torch.int32 if t.element_size() == 4 else torch.int16).clone() for t in ts]


def _same_bits(a, b):
    return all(torch.equal(x, y) for x, y in zip(_bits(a), _bits(b)))


def _hard_params(dtype=torch.float32):
    """Weights spanning many magnitudes, with zeros, −0.0 and values far below eps (the hard cases)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=gen) * 0.02
    w[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -3e-8])
    return [t.to(dtype) for t in (w, torch.randn(32, generator=gen) * 1e-6, torch.randn(16, 16, generator=gen) * 3.0,
                                  torch.ones(48))]


def _sq_loss(params):
    return lambda: float(sum((p.double() ** 2).sum() for p in params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_and_restore_is_bit_identical_over_many_steps(dtype):
    params = _hard_params(dtype)
    before = [p.clone() for p in params]
    seen = []
    for s in range(25):
        est = spsa_grad_scalar(params, _sq_loss(params), 1e-3, seed=s)
        seen.append(est.loss_plus != est.loss_minus)
    assert _same_bits(params, before)
    assert all(seen), "the loss saw the perturbation"


def test_plain_arithmetic_would_not_restore_and_the_stash_stays_small():
    params = _hard_params()
    before = [p.clone() for p in params]
    perturb_inplace(params, 7, 1e-3)
    perturb_inplace(params, 7, -2e-3)
    perturb_inplace(params, 7, 1e-3)
    assert not _same_bits(params, before), "the test case must be one where θ+εz−2εz+εz ≠ θ"
    params = [p.clone() for p in before]
    sp = SymmetricPerturbation(params, 7, 1e-3)
    sp.plus()
    sp.minus()
    sp.restore()
    assert _same_bits(params, before)
    assert 0 < sp.stashed < 0.2, f"fp32 restore stash should be a small fraction of θ, got {sp.stashed:.3f}"


@pytest.mark.parametrize("fail_on", [1, 2])
def test_restore_is_exact_when_the_loss_raises(fail_on):
    params = _hard_params()
    before = [p.clone() for p in params]
    calls = []

    def loss():
        calls.append(1)
        if len(calls) == fail_on:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        spsa_grad_scalar(params, loss, 1e-3, seed=3)
    assert _same_bits(params, before)


def test_non_finite_loss_raises_after_restoring():
    params = _hard_params()
    before = [p.clone() for p in params]
    with pytest.raises(FloatingPointError, match="not finite"):
        mezo_step(params, lambda: math.nan, ZOConfig(lr=1.0), step_seed=0)
    assert _same_bits(params, before)


def test_the_realized_perturbation_is_eps_z():
    params = _hard_params()
    before = [p.clone() for p in params]
    with symmetric_perturbation(params, seed=11, eps=1e-3) as sp:
        z = perturbation_direction(params, 11)
        for p, b, zz in zip(params, before, z):
            big = b.abs() > 0.1  # far from the rounding of tiny weights
            assert torch.allclose((p - b)[big], 1e-3 * zz[big], rtol=2 ** -8, atol=1e-6)
        sp.minus()
        for p, b, zz in zip(params, before, z):
            big = b.abs() > 0.1
            assert torch.allclose((p - b)[big], -1e-3 * zz[big], rtol=2 ** -8, atol=1e-6)
    assert _same_bits(params, before)


def test_spsa_points_along_the_true_gradient_on_a_quadratic():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(50, 50, generator=gen)
    H = A @ A.T / 50 + torch.eye(50)
    theta = torch.randn(50, generator=gen)
    true_grad = H @ theta
    loss = lambda: float(0.5 * theta.double() @ H.double() @ theta.double())  # noqa: E731
    est = [float(spsa_grad_scalar([theta], loss, 1e-3, seed=s)) * perturbation_direction([theta], s)[0]
           for s in range(200)]
    single = torch.stack([torch.cosine_similarity(e, true_grad, dim=0) for e in est])
    assert single.mean() > 0.05  # one direction: |cos| ≈ 1/√d, but positive on average
    assert torch.cosine_similarity(torch.stack(est).mean(0), true_grad, dim=0) > 0.5


def _regression():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 10, generator=gen)
    y = X @ torch.randn(10, generator=gen)
    w = torch.zeros(10)
    return w, (lambda step=0: float(((X @ w - y) ** 2).mean()))


def test_mezo_lowers_the_loss_of_a_tiny_task():
    w, loss = _regression()
    start = loss()
    steps = mezo_train([w], loss, ZOConfig(steps=400, eps=1e-3, lr=2e-2, seed=0), progress=False)
    assert loss() < 0.2 * start
    assert len(steps) == 400 and steps[0].loss_plus != steps[0].loss_minus


def test_mezo_is_seeded():
    runs = []
    for seed in (0, 0, 1):
        w, loss = _regression()
        mezo_train([w], loss, ZOConfig(steps=20, lr=2e-2, seed=seed), progress=False)
        runs.append(w)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_mezo_n_averages_its_estimates_and_applies_weight_decay():
    w, loss = _regression()
    w += 0.5
    start = w.clone()
    cfg = ZOConfig(lr=1e-2, weight_decay=0.1, n_spsa=3)
    res = mezo_step([w], loss, cfg, step_seed=5)
    assert len(res.seeds) == 3 and len(set(res.seeds)) == 3
    assert res.projected_grad == pytest.approx(sum(res.projected_grads) / 3)
    expected = start * (1 - cfg.lr * cfg.weight_decay)
    for s, g in zip(res.seeds, res.projected_grads):
        expected = expected - cfg.lr * g / 3 * perturbation_direction([w], s)[0]
    assert torch.allclose(w, expected, atol=1e-6)


def test_mezo_moves_a_tiny_llama_layer_downhill_and_touches_nothing_else():
    model = load_model("tiny-llama")
    ids = torch.tensor([model.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]])
    params = [p for p in model.layer_parameters(1).values() if p.ndim == 2]
    frozen = {k: v.clone() for k, v in model.hf.state_dict().items() if ".layers.1." not in k}

    def loss(step=0):
        with torch.inference_mode():
            return float(model.hf(input_ids=ids, labels=ids).loss)

    start = loss()
    before = [p.clone() for p in params]
    for s in range(3):  # lr = 0: a pure probe through the real model restores it bit for bit
        mezo_step(params, loss, ZOConfig(lr=0.0), step_seed=s)
    assert _same_bits(params, before)
    mezo_train(params, loss, ZOConfig(steps=60, eps=1e-3, lr=3e-2, seed=0), progress=False)
    assert loss() < start - 0.1  # 6.19 → 6.03 (a random 2-layer model sits near ln 512 = 6.24)
    after = model.hf.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())


def test_zo_layer_probes_see_only_layers_that_matter():
    model = load_model("tiny-llama")
    state = {k: v.clone() for k, v in model.hf.state_dict().items()}
    ids = torch.tensor([model.tokenizer("Step 1: gather the materials.")["input_ids"]])
    name = hook_name("resid_post", 0)

    def loss(layer):  # depends on block 0 only
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(ids, names_filter=name, stop_at_layer=1)
        return float(cache[name].double().pow(2).mean())

    c = zo_layer_probes(model, None, loss, eps=1e-3, seed=0, n_samples=2)
    assert set(c) == {0, 1}
    assert c[0] > 1e-5 and c[1] == 0.0  # c_0 ≈ 9e-4 here
    after = model.hf.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="Layer 5 is out of range"):
        zo_layer_probes(model, [5], loss)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), "eps must be a positive"),
    (dict(lr=-1.0), "lr must be a non-negative"),
    (dict(n_spsa=0), "n_spsa must be an integer >= 1"),
    (dict(steps=-1), "steps must be a non-negative integer"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZOConfig(**kwargs)


def test_bad_params():
    w = torch.zeros(3)
    with pytest.raises(ValueError, match="appears twice"):
        spsa_grad_scalar([w, w], lambda: 0.0, 1e-3, 0)
    with pytest.raises(ValueError, match="at least one parameter"):
        spsa_grad_scalar([], lambda: 0.0, 1e-3, 0)
    with pytest.raises(ValueError, match="not a floating-point tensor"):
        spsa_grad_scalar([torch.zeros(3, dtype=torch.long)], lambda: 0.0, 1e-3, 0)


@pytest.mark.slow
def test_exact_restore_on_the_default_model(smol):
    params = [p for p in smol.layer_parameters(3).values() if p.ndim == 2]
    before = _bits(params)
    sp = SymmetricPerturbation(params, 0, 1e-3)
    try:
        sp.plus()
        sp.minus()
    finally:
        sp.restore()
    assert all(torch.equal(a, b) for a, b in zip(_bits(params), before))
    assert sp.stashed < 0.1
