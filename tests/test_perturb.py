from __future__ import annotations

import pytest
import torch

from depthlens.data.chat import build_chat, pad_batch
from depthlens.runtime.generation import generate
from depthlens.models import load_model
from depthlens.interventions.perturbation import KINDS, PERTURBATIONS, perturb, quantize, rtn_quantize


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared 2-core machine: one thread is far faster than two contending ones.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def fresh():
    return load_model("tiny-llama")


def _snapshot(model):
    return {k: v.clone() for k, v in model.hf.state_dict().items()}


def _logits(model):
    b = pad_batch([build_chat(model.tokenizer, t).ids for t in ["hello there", "the quick fox"]], model.tokenizer.pad_token_id)
    with torch.inference_mode():
        return model.bridge(b.input_ids, attention_mask=b.attention_mask)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", [0, None])
def test_every_perturbation_changes_then_restores_bit_for_bit(fresh, kind, layer):
    before, clean = _snapshot(fresh), _logits(fresh)
    with perturb(fresh, kind, layer, sigma=0.3, seed=1):
        assert not torch.equal(_logits(fresh), clean)
    after = _snapshot(fresh)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(fresh), clean), "no hook is left behind either"


@pytest.mark.parametrize("kind", KINDS)
def test_restores_on_exception(fresh, kind):
    before, clean = _snapshot(fresh), _logits(fresh)
    with pytest.raises(RuntimeError):
        with perturb(fresh, kind, None, sigma=0.5, seed=0):
            raise RuntimeError("boom")
    assert all(torch.equal(v, fresh.hf.state_dict()[k]) for k, v in before.items())
    assert torch.equal(_logits(fresh), clean)


def test_param_noise_touches_only_its_layer_with_relative_size_sigma(fresh):
    before = {n: p.clone() for n, p in fresh.layer_parameters(0).items()}
    other = {n: p.clone() for n, p in fresh.layer_parameters(1).items()}
    with perturb(fresh, "param_noise", 0, sigma=0.2, seed=3):
        for n, p in fresh.layer_parameters(0).items():
            if p.ndim == 2:
                rel = (p - before[n]).norm() / before[n].norm()
                assert 0.18 < rel < 0.22, (n, float(rel))  # within 10% of sigma
            else:
                assert torch.equal(p, before[n]), "norm weights are left alone"
        assert all(torch.equal(p, other[n]) for n, p in fresh.layer_parameters(1).items())


def test_noise_is_seeded(fresh):
    def perturbed(seed):
        with perturb(fresh, "param_noise", 1, sigma=0.2, seed=seed):
            return {n: p.clone() for n, p in fresh.layer_parameters(1).items()}

    a, b, c = perturbed(5), perturbed(5), perturbed(6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    with perturb(fresh, "act_noise", 0, sigma=0.3, seed=2):
        x = _logits(fresh)
    with perturb(fresh, "act_noise", 0, sigma=0.3, seed=2):
        y = _logits(fresh)
    assert torch.equal(x, y)


def test_rtn_error_is_at_most_half_a_step():
    w = torch.randn(16, 64)
    for bits in (8, 4):
        q = rtn_quantize(w, bits)
        step = w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert torch.all((q - w).abs() <= step / 2 + 1e-6)
    assert (rtn_quantize(w, 4) - w).abs().mean() > (rtn_quantize(w, 8) - w).abs().mean()


def test_activation_noise_is_active_during_generation(fresh):
    prompts = ["How do I bake bread?", "What is the capital of France?"]
    clean = generate(fresh, prompts, 8, progress=False).tokens
    with perturb(fresh, "act_noise", 0, sigma=2.0, seed=0):
        noisy = generate(fresh, prompts, 8, progress=False).tokens
    assert noisy != clean
    assert generate(fresh, prompts, 8, progress=False).tokens == clean


@pytest.mark.parametrize("kind, layer, sigma, match", [
    ("blur", 0, 0.1, "Unknown perturbation kind 'blur'"),
    ("param_noise", 7, 0.1, "Layer 7 is out of range"),
    ("param_noise", 0, -1.0, "sigma must be >= 0"),
    ("int8", 0, float("nan"), "sigma must be >= 0"),
    ("act_noise", -1, 0.1, "Layer -1 is out of range"),
])
def test_bad_arguments(fresh, kind, layer, sigma, match):
    with pytest.raises(ValueError, match=match):
        with perturb(fresh, kind, layer, sigma):
            pass


def test_bad_bits_and_shapes(fresh):
    with pytest.raises(ValueError, match="4 or 8 bits"):
        with quantize(fresh, 0, bits=3):
            pass
    with pytest.raises(ValueError, match="4 or 8 bits"):
        rtn_quantize(torch.randn(4, 4), 16)
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize(torch.randn(4), 8)


def test_registry_describes_every_kind():
    assert set(PERTURBATIONS) == set(KINDS) == {"param_noise", "act_noise", "act_noise_rms", "int8", "int4"}
    assert [k for k, v in PERTURBATIONS.items() if v.stochastic] == ["param_noise", "act_noise", "act_noise_rms"]
    assert PERTURBATIONS["act_noise"].target == PERTURBATIONS["act_noise_rms"].target == "activations"


def test_quantization_is_deterministic_and_rounds_rows_to_the_grid(fresh):
    with perturb(fresh, "int4", 1, seed=0):
        a = {n: p.clone() for n, p in fresh.layer_parameters(1).items()}
    with perturb(fresh, "int4", 1, seed=9):
        b = {n: p.clone() for n, p in fresh.layer_parameters(1).items()}
    assert all(torch.equal(a[n], b[n]) for n in a)
    w = a["mlp.down_proj.weight"]
    steps = w / (w.abs().amax(1, keepdim=True) / 7)
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert all(len(row.unique()) <= 15 for row in w)


def test_the_robust_activation_scale_ignores_massive_channels_and_equals_the_rms_of_a_gaussian_stream():
    from depthlens.interventions.perturbation import activation_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=g) * 3.0                    # an ordinary stream, sd 3
    assert activation_scale(x, "robust").mean().item() == pytest.approx(3.0, rel=0.05)
    assert activation_scale(x, "rms").mean().item() == pytest.approx(3.0, rel=0.05)
    massive = x.clone()
    massive[:, :2] = 400.0                                          # two massive-activation channels
    assert activation_scale(massive, "robust").mean().item() == pytest.approx(3.0, rel=0.06)
    assert activation_scale(massive, "rms").mean().item() > 7 * 3.0  # the RMS is inflated by them


def test_the_same_sigma_is_the_same_disturbance_with_or_without_massive_channels(fresh):
    """Activation noise on the ordinary channels: σ × their scale (robust), or inflated by two massive ones (rms)."""
    from depthlens.interventions.perturbation import activation_noise_hooks

    x = torch.randn(1, 32, fresh.d_model, generator=torch.Generator().manual_seed(1))
    massive = x.clone()
    massive[..., :2] = 100.0

    def noise_sd(scale, inp):
        (_, add), = activation_noise_hooks(fresh, 0, 0.5, seed=0, scale=scale)
        return (add(inp, None) - inp)[..., 2:].std().item()

    assert noise_sd("robust", massive) == pytest.approx(noise_sd("robust", x), rel=0.1)
    assert noise_sd("robust", x) == pytest.approx(0.5, rel=0.1)
    assert noise_sd("rms", massive) > 5 * noise_sd("rms", x)
    with pytest.raises(Exception, match="Unknown activation-noise scale"):
        activation_noise_hooks(fresh, 0, 0.5, scale="max")
