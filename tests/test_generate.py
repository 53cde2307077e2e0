from __future__ import annotations

import pytest
import torch

from depthlens.chat import build_chat
from depthlens.generate import generate
from depthlens.models import hook_name

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


def test_hook_free_fast_path_gives_the_same_tokens_as_the_bridged_path(tiny):
    prompts = ["hello there", "write a poem about the sea", "what is 2 + 2?"]
    fast = generate(tiny, prompts, max_new_tokens=12, progress=False)
    assert not tiny.has_hooks()
    identity = [(hook_name("resid_post", 0), lambda x, hook: x)]  # forces the bridged path
    slow = generate(tiny, prompts, max_new_tokens=12, fwd_hooks=identity, progress=False)
    assert fast.tokens == slow.tokens and any(fast.tokens)
    assert not tiny.has_hooks()


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
