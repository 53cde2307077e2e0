from __future__ import annotations

import pytest
import torch

from depthlens.data.chat import build_chat
from depthlens.runtime.generation import generate
from depthlens.models.hooked_model import hook_name

PROMPTS = ["How do I bake bread?", "What is the capital of France?", "hi"]


def test_greedy_is_deterministic_and_batch_independent(tiny):
    a = generate(tiny, PROMPTS, max_new_tokens=8, progress=False)
    b = generate(tiny, PROMPTS, max_new_tokens=8, progress=False, batch_size=1)
    assert a.tokens == b.tokens and a.texts == b.texts
    assert all(len(t) > 0 for t in a.tokens)


def test_seeded_sampling_is_reproducible(tiny):
    a = generate(tiny, PROMPTS, max_new_tokens=8, do_sample=True, seed=3, progress=False)
    b = generate(tiny, PROMPTS, max_new_tokens=8, do_sample=True, seed=3, progress=False)
    c = generate(tiny, PROMPTS, max_new_tokens=8, do_sample=True, seed=4, progress=False)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_a_hook_that_changes_activations_changes_generations(tiny):
    calls = []

    def scramble(x, hook):
        calls.append(hook.name)
        return x.flip(-1) * 3.0

    base = generate(tiny, PROMPTS, max_new_tokens=8, progress=False)
    hooked = generate(tiny, PROMPTS, max_new_tokens=8, progress=False,
                      fwd_hooks=[(hook_name("resid_post", 0), scramble)])
    assert calls, "the hook fired during generation"
    assert hooked.tokens != base.tokens
    again = generate(tiny, PROMPTS, max_new_tokens=8, progress=False)
    assert again.tokens == base.tokens, "hooks are removed after generation"


@pytest.mark.parametrize("do_sample", [False, True])
def test_the_shared_prefix_prefilled_once_gives_the_same_continuations(tiny, monkeypatch, do_sample):
    import depthlens.runtime.generation as g

    prompts = [*PROMPTS, build_chat(tiny.tokenizer, "How do I bake bread?", ["Sure, here is how"]), "Name three colours."]
    seqs = [c.ids for c in g.as_chats(tiny, prompts)]
    monkeypatch.setattr(g, "MIN_SHARED_PREFIX", 1)        # tiny-llama's chat prefix is 5 tokens
    shared = g._shared_prefix_inputs(tiny, seqs, 0)
    assert shared is not None and shared[0].shape[0] == len(prompts)
    fast = generate(tiny, prompts, max_new_tokens=10, do_sample=do_sample, seed=1, progress=False)
    monkeypatch.setattr(g, "MIN_SHARED_PREFIX", 10**9)    # sharing off: the plain left-padded batch
    assert g._shared_prefix_inputs(tiny, seqs, 0) is None
    plain = generate(tiny, prompts, max_new_tokens=10, do_sample=do_sample, seed=1, progress=False)
    assert fast.tokens == plain.tokens and fast.texts == plain.texts


def test_the_shared_prefix_is_not_used_when_hooks_sit_on_the_plain_view(tiny, monkeypatch):
    import depthlens.runtime.generation as g

    monkeypatch.setattr(g, "MIN_SHARED_PREFIX", 1)
    seqs = [c.ids for c in g.as_chats(tiny, PROMPTS)]
    handle = tiny.plain().model.layers[0].register_forward_hook(lambda *a: None)
    try:
        assert g._shared_prefix_inputs(tiny, seqs, 0) is None
    finally:
        handle.remove()
    assert g._shared_prefix_inputs(tiny, seqs, 0) is not None


def test_prefilled_chat_sequences_continue_after_the_prefill(tiny):
    seq = build_chat(tiny.tokenizer, "How do I bake bread?", ["Sure, here is how"])
    out = generate(tiny, [seq], max_new_tokens=4, progress=False)
    assert out.prompts[0] is seq and len(out.tokens[0]) <= 4


def test_stops_at_eos(tiny):
    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    original = tiny.hf.lm_head.weight.data.clone()
    bias = torch.zeros(tiny.tokenizer.vocab_size + 8)

    def force_eos(x, hook):  # make the last layer output point at the EOS embedding
        return x * 0 + tiny.hf.model.embed_tokens.weight[eos] * 50

    out = generate(tiny, PROMPTS[:1], max_new_tokens=8, progress=False,
                   fwd_hooks=[(hook_name("resid_post", tiny.n_layers - 1), force_eos)])
    assert out.tokens == [[]] and out.texts == [""]
    assert torch.equal(tiny.hf.lm_head.weight.data, original)
    del bias


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="list of prompts"):
        generate(tiny, "hello")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny, ["hello"], max_new_tokens=0)


def _mixing(tiny, scale: float = 8.0, seed: int = 0):
    """x ↦ scale · x M with a fixed random M: makes the random tiny-llama say varied tokens."""
    m = torch.randn(tiny.d_model, tiny.d_model, generator=torch.Generator().manual_seed(seed)) / tiny.d_model ** 0.5
    return lambda x, hook: scale * x @ m.to(x.dtype)


def _exact(tiny, prompts, hooks, n):
    """Reference continuation: full bridge forwards with the hooks, no KV cache."""
    from depthlens.runtime.generation import _reference_generate, eos_ids
    from depthlens.runtime.hooks import hooks_active

    chats = [build_chat(tiny.tokenizer, p) for p in prompts]
    out = []
    with hooks_active(tiny, hooks):
        for c in chats:  # one at a time: no padding in the reference
            ids = torch.tensor([c.ids])
            full = _reference_generate(tiny, ids, torch.ones_like(ids), max_new_tokens=n, stop=eos_ids(tiny.tokenizer),
                                       pad_id=tiny.tokenizer.pad_token_id, do_sample=False, temperature=1.0, top_p=1.0)
            row = full[0, ids.shape[1]:].tolist()
            stop = set(eos_ids(tiny.tokenizer))
            out.append(row[:next((j for j, t in enumerate(row) if t in stop), len(row))])
    return out


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "attn_out", "mlp_out"])
def test_hooked_generation_matches_the_cache_free_reference(tiny, kind):
    prompts = ["hello there", "write a poem about the sea", "what is 2 + 2?"]
    varied = [(hook_name("resid_pre", 0), _mixing(tiny))]  # tiny-llama alone repeats one token
    tested = (hook_name(kind, 1), _mixing(tiny, 3.0, seed=1) if kind.startswith("resid") else (lambda x, hook: -2 * x))
    hooks = [*varied, tested]
    fast = generate(tiny, prompts, max_new_tokens=10, fwd_hooks=hooks, progress=False, batch_size=3)
    without = generate(tiny, prompts, max_new_tokens=10, fwd_hooks=varied, progress=False, batch_size=3)
    assert fast.tokens != without.tokens, "the tested hook must change the continuation for this test to mean anything"
    assert all(len(set(row)) > 2 for row in fast.tokens), "a constant continuation would hide a cache bug"
    assert fast.tokens == _exact(tiny, prompts, hooks, 10)
    assert not tiny.has_hooks()


def test_hooks_without_a_plain_equivalent_use_the_exact_loop(tiny):
    prompts = ["hello there", "what is 2 + 2?"]
    calls = []

    def identity(x, hook):
        calls.append(1)
        return x

    name = "blocks.0.ln1.hook_normalized"
    assert name in tiny.bridge.hook_dict
    exact = generate(tiny, prompts, max_new_tokens=6, fwd_hooks=[(name, identity)], progress=False)
    assert calls and exact.tokens == generate(tiny, prompts, max_new_tokens=6, progress=False).tokens
    assert not tiny.has_hooks()


def test_mirrored_hooks_reach_bridge_forwards_and_generation(tiny):
    from depthlens.runtime.forward import last_logprobs
    from depthlens.runtime import mirrored_hooks

    prompts = ["hello there", "write a poem about the sea"]
    hooks = [(hook_name("resid_post", 0), _mixing(tiny, seed=2))]
    seqs = [build_chat(tiny.tokenizer, p) for p in prompts]
    clean_lp = last_logprobs(tiny, seqs)
    with mirrored_hooks(tiny, hooks):
        lp = last_logprobs(tiny, seqs)
        gen = generate(tiny, prompts, max_new_tokens=8, progress=False)
    assert not torch.allclose(lp, clean_lp)
    assert gen.tokens == _exact(tiny, prompts, hooks, 8)
    assert not tiny.has_hooks()
    with pytest.raises(ValueError, match="mirrored_hooks"):
        with mirrored_hooks(tiny, [("blocks.0.ln1.hook_normalized", lambda x, hook: x)]):
            pass


@pytest.mark.slow
def test_an_identity_hook_leaves_the_real_models_generation_unchanged(smol):
    """The bug this guards: bridged HF generate with an active hook point decoded garbage on SmolLM2."""
    prompts = ["How do I bake bread?", "Write a poem about the sea."]
    clean = generate(smol, prompts, max_new_tokens=16, progress=False)
    for kind in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
        hooked = generate(smol, prompts, max_new_tokens=16, progress=False,
                          fwd_hooks=[(hook_name(kind, 3), lambda x, hook: x)])
        assert hooked.tokens == clean.tokens, kind
    exact = generate(smol, prompts[:1], max_new_tokens=8, progress=False,
                     fwd_hooks=[("blocks.3.ln1.hook_normalized", lambda x, hook: x)])
    assert exact.tokens == [clean.tokens[0][:8]]


def test_hooks_attached_by_the_caller_are_honoured(tiny):
    prompts = ["hello there", "tell me a story"]
    clean = generate(tiny, prompts, max_new_tokens=8, progress=False)
    with tiny.bridge.hooks(fwd_hooks=[(hook_name("resid_post", 0), lambda x, hook: x * 0)]):
        assert tiny.has_hooks()
        broken = generate(tiny, prompts, max_new_tokens=8, progress=False)
    assert broken.tokens != clean.tokens


def test_the_plain_view_shares_parameters_and_follows_in_place_edits(tiny):
    view = tiny.plain()
    assert view is tiny.plain()  # cached while no parameter object changes
    p = tiny.layer_parameters(0)["mlp.down_proj.weight"]
    shared = {id(q) for q in view.parameters()}
    assert id(p) in shared
    ids = torch.tensor([build_chat(tiny.tokenizer, "hi").ids])
    with torch.inference_mode():
        before = view(input_ids=ids).logits
        saved = p.detach().clone()
        p.mul_(0)
        after = view(input_ids=ids).logits
        bridged = tiny.bridge(ids)
        p.copy_(saved)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, bridged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_layerwise_continuer_matches_generate_for_every_hook_set(tiny, layer):
    from depthlens.runtime.generation import LayerwiseContinuer

    prompts = PROMPTS + ["Write a haiku about the sea, please, in English."]
    sets = [
        [],
        [(hook_name("attn_out", layer), _mixing(tiny, seed=1))],
        [(hook_name("mlp_out", layer), _mixing(tiny, scale=6.0, seed=2)),
         (hook_name("resid_post", 1), _mixing(tiny, scale=4.0, seed=3))],
        [(hook_name("resid_pre", layer), _mixing(tiny, seed=4))],
    ]
    cont = LayerwiseContinuer(tiny, prompts, max_new_tokens=6)
    gens = cont.run(layer, sets)
    assert len(gens) == len(sets)
    varied = set()
    for hooks, gen in zip(sets, gens):
        want = generate(tiny, prompts, max_new_tokens=6, progress=False, fwd_hooks=hooks)
        assert gen.tokens == want.tokens and gen.texts == want.texts
        varied |= {tuple(t) for t in gen.tokens}
    assert len(varied) > 2, "the hook sets lead to different continuations (the check can fail)"
    again = generate(tiny, prompts, max_new_tokens=6, progress=False)
    assert again.tokens == gens[0].tokens, "hooks are removed after the run"


def test_layerwise_continuer_rejects_hooks_it_cannot_honour(tiny):
    from depthlens.runtime.generation import LayerwiseContinuer

    cont = LayerwiseContinuer(tiny, PROMPTS, max_new_tokens=2)
    with pytest.raises(ValueError, match="below the start layer"):
        cont.run(1, [[(hook_name("attn_out", 0), _mixing(tiny))]])
    with pytest.raises(ValueError, match="resid_pre/resid_post"):
        cont.run(0, [[("blocks.0.attn.hook_pattern", lambda x, hook: x)]])
    with pytest.raises(ValueError, match="at least one hook set"):
        cont.run(0, [])
    with pytest.raises(ValueError, match="prompts is empty"):
        LayerwiseContinuer(tiny, [], max_new_tokens=2)
