from __future__ import annotations

import pytest
import torch

from depthlens.data.chat import build_chat, pad_batch
from depthlens.runtime.forward import forward_from_layer, last_logprobs, layer_inputs
from depthlens.interventions.perturbation import perturb


def _batch(tiny, prompts):
    return pad_batch([build_chat(tiny.tokenizer, p).ids for p in prompts], tiny.tokenizer.pad_token_id)


def test_continuing_from_any_layer_reproduces_the_full_forward(tiny):
    b = _batch(tiny, ["a short one", "a much longer prompt with many more words in it"])
    resid = layer_inputs(tiny, b.input_ids, b.attention_mask)
    assert len(resid) == tiny.n_layers and resid[0].shape == (*b.input_ids.shape, tiny.d_model)
    full = forward_from_layer(tiny, resid[0], 0, b.attention_mask)
    for l in range(tiny.n_layers):
        assert torch.equal(forward_from_layer(tiny, resid[l], l, b.attention_mask), full)
    last = forward_from_layer(tiny, resid[1], 1, b.attention_mask, logits_to_keep=1)
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=0, atol=1e-5)  # a 1-row matmul may round differently


def test_the_blocks_before_the_start_layer_do_not_run(tiny):
    b = _batch(tiny, ["hello"])
    resid = layer_inputs(tiny, b.input_ids, b.attention_mask)
    calls = []
    h = tiny.plain().model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        forward_from_layer(tiny, resid[1], 1, b.attention_mask)
        assert calls == []
        forward_from_layer(tiny, resid[0], 0, b.attention_mask)
        assert calls == [1]
    finally:
        h.remove()
    assert len(tiny.plain().model.layers) == tiny.n_layers  # the block list is restored


@pytest.mark.parametrize("kind", ["param_noise", "act_noise", "int4"])
def test_a_perturbed_layer_gives_what_the_bridge_gives(tiny, kind):
    """Unpadded prompt: the plain continuation and the hooked bridge must agree under every perturbation."""
    seq = build_chat(tiny.tokenizer, "how do I bake bread?")
    ids = torch.tensor([seq.ids])
    mask = torch.ones_like(ids)
    resid = layer_inputs(tiny, ids, mask)
    with perturb(tiny, kind, 1, sigma=0.5, seed=3):
        ours = torch.log_softmax(forward_from_layer(tiny, resid[1], 1, mask, logits_to_keep=1)[:, -1].float(), -1)
    with perturb(tiny, kind, 1, sigma=0.5, seed=3):
        ref = last_logprobs(tiny, [seq])
    clean = last_logprobs(tiny, [seq])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref, clean, atol=1e-4)


def test_bad_layer_is_one_clear_error(tiny):
    b = _batch(tiny, ["hi"])
    with pytest.raises(ValueError, match="out of range"):
        forward_from_layer(tiny, torch.zeros(1, 3, tiny.d_model), tiny.n_layers, b.attention_mask)


@pytest.mark.parametrize("kind", [None, "param_noise", "act_noise"])
def test_the_prefix_shared_runner_matches_left_padded_full_forwards(tiny, kind):
    from contextlib import nullcontext

    from depthlens.runtime.forward import PrefixSharedRunner, common_prefix_len

    prompts = ["hi", "how are you doing today, my friend?", "what is 2 + 2?", "name three colours"]
    seqs = [build_chat(tiny.tokenizer, p) for p in prompts]
    runner = PrefixSharedRunner(tiny, seqs, batch_size=3)
    assert runner.prefix_len == common_prefix_len(seqs) > 0
    for layer in range(tiny.n_layers):
        ctx = (lambda: perturb(tiny, kind, layer, sigma=0.5, seed=1)) if kind else nullcontext
        with ctx():
            ours = torch.empty(len(seqs), len(tiny.tokenizer))
            for idx, _, logits in runner.run(layer, logits_to_keep=1):
                ours[idx] = torch.log_softmax(logits[:, -1].float(), -1)
        if kind == "act_noise":  # noise draws depend on the batch shape: check the noise reaches the runner
            assert not torch.allclose(ours, last_logprobs(tiny, seqs, batch_size=3), atol=1e-3)
            continue
        with ctx():
            ref = last_logprobs(tiny, seqs, batch_size=3)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_common_prefix_leaves_a_token_in_every_sequence():
    from depthlens.runtime.forward import common_prefix_len

    assert common_prefix_len([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix_len([[1, 2], [1, 2, 3]]) == 1
    assert common_prefix_len([[5], [6]]) == 0


def _reference_logprobs(tiny, ids):
    """log p(ids[t] | ids[:t]) and the full distributions, one unpadded sequence, every position unembedded."""
    with torch.inference_mode():
        logp = torch.log_softmax(tiny.bridge(torch.tensor([ids]))[0].float(), dim=-1)
    return logp


def test_scored_positions_only_match_full_unembedding(tiny):
    from depthlens.runtime.forward import token_logprobs

    seqs = [build_chat(tiny.tokenizer, p, ["and an answer here"]) for p in
            ["hi", "a much longer prompt with many more words in it", "medium length prompt"]]
    starts = [seqs[0].prompt_len, 3, len(seqs[2].ids) - 1]  # mixed starts: the batch keeps the widest span
    got = token_logprobs(tiny, seqs, start=starts, batch_size=3)
    dists = token_logprobs(tiny, seqs, start=starts, batch_size=3, full_dist=True)
    last = last_logprobs(tiny, seqs, batch_size=3)
    for seq, s, g, d, l in zip(seqs, starts, got, dists, last):
        ref = _reference_logprobs(tiny, list(seq.ids))
        want = ref[torch.arange(s - 1, len(seq.ids) - 1), torch.tensor(seq.ids[s:])]
        assert g.shape == (len(seq.ids) - s,)
        torch.testing.assert_close(g, want, rtol=0, atol=1e-4)
        torch.testing.assert_close(d, ref[s - 1:len(seq.ids) - 1], rtol=0, atol=1e-4)
        torch.testing.assert_close(l, ref[-1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post"])
def test_plain_residuals_match_the_bridge_hooks(tiny, kind):
    """``residuals_at`` on the plain blocks (shared prefix once) equals the bridge's hook values,
    at positions inside the shared prefix, at the last token, and averaged over a span."""
    from depthlens.runtime.forward import residuals_at
    from depthlens.models.hooked_model import hook_name

    prompts = ["How do I bake bread?", "Hi", "Tell me a joke about cats and dogs, please"]
    seqs = [list(build_chat(tiny.tokenizer, p, ["Sure, here it is"]).ids) for p in prompts]
    positions = [[2, len(s) - 1] for s in seqs]  # 2 lies inside the shared chat prefix
    got = residuals_at(tiny, seqs, positions, kind=kind, batch_size=2, reduce="mean")
    last = residuals_at(tiny, seqs, [-1] * 3, kind=kind, batch_size=2)
    for i, s in enumerate(seqs):
        _, cache = tiny.bridge.run_with_cache(torch.tensor([s]), names_filter=lambda n: n.endswith(kind))
        for l in range(tiny.n_layers):
            ref = cache[hook_name(kind, l)][0]
            torch.testing.assert_close(got[l, i], ref[positions[i]].mean(0).float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(last[l, i], ref[-1].float(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[-1], last[-1])


def test_residuals_at_with_bridge_hooks_sees_the_hook(tiny):
    """With ``fwd_hooks`` the bridge path runs, so a hook on an earlier layer changes what is read."""
    from depthlens.runtime.forward import residuals_at
    from depthlens.models.hooked_model import hook_name

    seqs = [list(build_chat(tiny.tokenizer, "How do I bake bread?").ids)]
    clean = residuals_at(tiny, seqs, [-1], kind="resid_post")
    zeroed = residuals_at(tiny, seqs, [-1], kind="resid_post",
                          fwd_hooks=[(hook_name("attn_out", 1), lambda x, hook: x * 0)])
    torch.testing.assert_close(zeroed[0], clean[0])
    assert not torch.allclose(zeroed[1], clean[1])
    with pytest.raises(ValueError, match="fall outside it"):
        residuals_at(tiny, seqs, [len(seqs[0])], kind="resid_post")


def test_plain_last_logprobs_match_the_bridge(tiny):
    """The plain, prefix-shared ``last_logprobs`` equals the bridge's (an identity hook forces the bridge)."""
    from depthlens.models.hooked_model import hook_name

    seqs = [build_chat(tiny.tokenizer, p) for p in ["How do I bake bread?", "Hi", "Tell me a joke about cats"]]
    plain = last_logprobs(tiny, seqs, batch_size=2)
    bridge = last_logprobs(tiny, seqs, batch_size=2, fwd_hooks=[(hook_name("resid_pre", 0), lambda x, hook: x)])
    torch.testing.assert_close(plain, bridge, atol=1e-5, rtol=1e-5)
    single = torch.stack([tiny.bridge(torch.tensor([list(s.ids)]))[0, -1].float().log_softmax(-1) for s in seqs])
    torch.testing.assert_close(plain, single, atol=1e-5, rtol=1e-5)
    # a hook attached to the bridge directly (not through fwd_hooks) is still seen
    with tiny.bridge.hooks(fwd_hooks=[(hook_name("resid_post", 0), lambda x, hook: x * 0)]):
        hooked = last_logprobs(tiny, seqs, batch_size=2)
    assert not torch.allclose(hooked, plain)
