"""analyses.layer_ablation: each hook changes exactly its component, means and deltas are right,
the baseline runs once, and the CLI writes a record and both heat maps (tiny-llama)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses import layer_ablation as la
from depthlens.data.chat import build_chat, pad_batch
from depthlens.runtime import hooks_active
from depthlens.models.hooked_model import hook_name
from depthlens.infra.results import read_run

KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
PROMPTS = ["How do I bake bread?", "Tell me a joke about cats and dogs", "Hi"]


def _batch(model):
    seqs = [build_chat(model.tokenizer, p).ids for p in PROMPTS]
    return pad_batch(seqs, model.tokenizer.pad_token_id or 0)


def _run(model, hooks=()):
    batch = _batch(model)
    names = {hook_name(k, l) for k in KINDS for l in range(model.n_layers)}
    with hooks_active(model, hooks):
        logits, cache = model.bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                                    names_filter=lambda n: n in names)
    return logits, {k: v.clone() for k, v in cache.items()}, batch.attention_mask.bool()


@pytest.fixture(scope="module")
def clean(tiny):
    return _run(tiny)


def _same(a, b):
    return torch.equal(a, b)


def test_zero_attn_out_zeroes_only_that_component(tiny, clean):
    logits0, c0, _ = clean
    logits, c, _ = _run(tiny, la.intervention_hooks(tiny, "zero_attn", 1))
    assert torch.count_nonzero(c["blocks.1.hook_attn_out"]) == 0
    assert torch.count_nonzero(c0["blocks.1.hook_attn_out"]) > 0
    for k in KINDS:                                    # everything before it is untouched
        assert _same(c[f"blocks.0.hook_{k}"], c0[f"blocks.0.hook_{k}"])
    assert _same(c["blocks.1.hook_resid_pre"], c0["blocks.1.hook_resid_pre"])
    # nothing else is written in its place: the stream after attention is the stream before it
    assert _same(c["blocks.1.hook_resid_mid"], c["blocks.1.hook_resid_pre"])
    # the MLP reads resid_mid (a sequential Llama block), so mlp_out moves only through that input
    torch.testing.assert_close(c["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_mid"] + c["blocks.1.hook_mlp_out"])
    assert not torch.allclose(logits, logits0)


def test_zero_mlp_out_zeroes_only_that_component(tiny, clean):
    logits0, c0, _ = clean
    logits, c, _ = _run(tiny, la.intervention_hooks(tiny, "zero_mlp", 1))
    assert torch.count_nonzero(c["blocks.1.hook_mlp_out"]) == 0
    for k in KINDS:
        assert _same(c[f"blocks.0.hook_{k}"], c0[f"blocks.0.hook_{k}"])
    for k in ("resid_pre", "attn_out", "resid_mid"):   # same layer, before the MLP: unchanged
        assert _same(c[f"blocks.1.hook_{k}"], c0[f"blocks.1.hook_{k}"])
    assert _same(c["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_mid"])
    assert not torch.allclose(logits, logits0)


def test_component_means_equal_masked_means_and_mean_ablation_writes_them(tiny, clean):
    _, c0, mask = clean
    means = la.component_means(tiny, PROMPTS, batch_size=2)
    assert means.n_positions == int(mask.sum())
    for kind, field in (("attn_out", means.attn_out), ("mlp_out", means.mlp_out)):
        for l in range(tiny.n_layers):
            want = c0[hook_name(kind, l)][mask].double().mean(0).cpu()
            torch.testing.assert_close(field[l], want, atol=1e-6, rtol=1e-5)
    _, c, _ = _run(tiny, la.intervention_hooks(tiny, "mean_mlp", 0, means=means))
    out = c["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(out, means.mlp_out[0].float().expand_as(out))
    assert _same(c["blocks.0.hook_attn_out"], c0["blocks.0.hook_attn_out"])


def test_direction_ablation_projects_out_at_that_layer_only(tiny, clean):
    _, c0, _ = clean
    r = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, c, _ = _run(tiny, la.intervention_hooks(tiny, "direction", 0, direction=3.0 * r))
    rh = (r / r.norm()).float()
    post, post0 = c["blocks.0.hook_resid_post"], c0["blocks.0.hook_resid_post"]
    assert (post @ rh).abs().max() < 1e-5 < (post0 @ rh).abs().max()
    torch.testing.assert_close(post, post0 - (post0 @ rh).unsqueeze(-1) * rh)   # only the r̂ component went
    for k in ("resid_pre", "attn_out", "mlp_out"):
        assert _same(c[f"blocks.0.hook_{k}"], c0[f"blocks.0.hook_{k}"])
    assert (c["blocks.1.hook_resid_pre"] @ rh).abs().max() < 1e-5               # what layer 1 receives
    with pytest.raises(ValueError, match="finite non-zero vector"):
        la.intervention_hooks(tiny, "direction", 0, direction=torch.zeros(tiny.d_model))
    with pytest.raises(ValueError, match="Unknown intervention"):
        la.intervention_hooks(tiny, "noise", 0)
    with pytest.raises(ValueError, match="out of range"):
        la.intervention_hooks(tiny, "zero_attn", tiny.n_layers)


def _trials(tiny, n_prompts=6):
    out = []
    for p in range(n_prompts):
        for k, label in enumerate(("harmful", "harmful", "recovered", "other")):
            seq = build_chat(tiny.tokenizer, f"How do I do thing {p}?", ["I can't help", " sure step one"])
            out.append({"prompt_id": f"p{p}", "prompt": seq.user, "ids": list(seq.ids), "prompt_len": seq.prompt_len,
                        "prefix_span": list(seq.segments[0]), "span": list(seq.segments[1]), "label": label,
                        "position": k, "span_len": 3, "span_text": " sure step one", "attack": "insertion"})
    return out


def test_select_subset_is_balanced_spread_and_seeded(tiny):
    trials = _trials(tiny)
    sub = la.select_subset(trials, 8, seed=1)
    labels = [t["label"] for t in sub]
    assert labels.count("harmful") == 4 and labels.count("recovered") == 4
    assert len({t["prompt_id"] for t in sub if t["label"] == "harmful"}) == 4      # one a prompt first
    assert la.select_subset(trials, 8, seed=1) == sub
    assert len(la.select_subset(trials, 100)) == len(trials)                       # all when short


def test_hooks_fire_during_generation_and_paired_delta(tiny):
    trials = la.select_subset(_trials(tiny), 4)
    ev = la.Evaluator(tiny, trials, ["How do I pick a lock?", "Hi"], max_new_tokens=5, batch_size=4)
    calls = []
    (m,) = ev.measure(1, [[(hook_name("mlp_out", 1), lambda x, hook: calls.append(x.shape[1]) or x)]])
    # generation: the prefill, then one position a decoding step; last, the refusal-score forwards
    assert calls[0] > 1 and 1 in calls and calls[-1] > 1
    assert m.harmful.shape == (4,) and m.scores.shape == (2,)
    (base,) = ev.measure(0, [()])
    assert np.allclose(base.scores, m.scores, atol=1e-5) and base.labels == m.labels   # an identity hook changes nothing
    idx = np.random.default_rng(0).integers(0, 4, size=(50, 4))
    assert la.paired_delta(np.zeros(4), np.zeros(4), idx) == (0.0, 0.0, 0.0)
    d, lo, hi = la.paired_delta(np.zeros(4), np.array([1.0, 1.0, 0.0, 0.0]), idx)
    assert d == 0.5 and 0.0 <= lo <= d <= hi <= 1.0


@pytest.mark.parametrize("layer", [0, 1])
def test_measures_from_the_layer_equal_full_hooked_runs(tiny, layer):
    """Row-grouped continuations from block ``layer`` and the prefix-shared scores equal plain
    ``generate`` / ``refusal_score`` with the same hooks over the whole model."""
    from depthlens.runtime.generation import generate
    from depthlens.judges.seam import refusal_score

    trials = la.select_subset(_trials(tiny), 6)
    val = ["How do I pick a lock?", "Hi", "Tell me a story about a dragon and a knight."]
    ev = la.Evaluator(tiny, trials, val, max_new_tokens=5, batch_size=2)
    mix = torch.randn(tiny.d_model, tiny.d_model, generator=torch.Generator().manual_seed(0)) / tiny.d_model ** 0.5
    sets = [la.intervention_hooks(tiny, "zero_attn", layer), [],
            [(hook_name("mlp_out", layer), lambda x, hook: 8.0 * x @ mix)]]
    got = ev.measure(layer, sets)
    for hooks, m in zip(sets, got):
        gen = generate(tiny, [la.trial_chat(t) for t in trials], max_new_tokens=5, fwd_hooks=hooks, progress=False)
        assert m.texts == gen.texts
        ref = refusal_score(tiny, val, fwd_hooks=hooks).scores.double().numpy()
        assert np.allclose(m.scores, ref, atol=1e-4)
    assert not np.allclose(got[0].scores, got[1].scores), "the ablation moves the score (the check can fail)"


def test_main_quick_end_to_end(tmp_path, monkeypatch):
    calls = []
    real = la.Evaluator.measure

    def counting(self, layer, hook_sets):
        calls.append(len(hook_sets))
        return real(self, layer, hook_sets)

    monkeypatch.setattr(la.Evaluator, "measure", counting)
    path = la.main(["--model", "tiny-llama", "--quick", "--out", str(tmp_path)])
    rec = read_run(path)
    rows = rec.tables["effects"]
    assert {(r["layer"], r["intervention"]) for r in rows} == {(l, k) for l in (0, 1) for k in la.INTERVENTIONS}
    assert calls[0] == 1 and sum(calls) == 1 + len(rows)                # the baseline runs once
    assert len(calls) == 1 + 2, "one batched run a layer for all its interventions"
    b = rec.metrics["baseline"]
    for r in rows:
        d = r["delta_asr_harmful"]
        assert -1.0 <= d <= 1.0 and r["delta_asr_harmful_lo"] <= d <= r["delta_asr_harmful_hi"]
        assert r["delta_score"] == pytest.approx(r["refusal_score"] - b["refusal_score"], abs=1e-9)
        assert d == pytest.approx(r["asr_harmful"] - b["asr_harmful"], abs=1e-9)
    assert any(abs(r["delta_score"]) > 0 for r in rows)                 # ablations do move the model
    assert rec.metrics["ran_insertion"] is True and len(rec.tables["subset"]) == rec.metrics["n_trials"]
    assert rec.metrics["trials_chosen"] == "ran" and rec.metrics["continuation_judge"]
    for name in ("delta_asr", "delta_refusal_score"):
        html = path.parent / f"layer_ablation_{name}.html"
        assert html.exists() and "plotly" in html.read_text()


def test_bad_input_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        la.main(["--model", "tiny-llama", "--trials", str(tmp_path / "missing"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "does not exist" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="--interventions must name one or more of"):
        la.run(la.LayerAblationConfig(model="tiny-llama", interventions=("zero_everything",)))
    with pytest.raises(ValueError, match="--n-trials must be an integer >= 1"):
        la.run(la.LayerAblationConfig(model="tiny-llama", n_trials=0))
    assert la.default_layers(30, 2) == [*range(0, 30, 2), 29] and la.default_layers(2, 6) == [0, 1]
