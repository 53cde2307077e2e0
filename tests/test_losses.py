"""finetune.losses: the response loss unembeds only response positions and shares the chat
prefix yet equals the full-batch loss and gradients; the first-token over-refusal margin is
the formula it states and pushes refusal tokens down on benign prompts; deep alignment's
utility anchors (KL to the start model, the per-example margin) touch utility rows only."""

from __future__ import annotations

import pytest
import torch

from depthlens.data.chat import pad_batch
from depthlens.data import refusal_templates
from depthlens.models import load_model
from finetune.train import Example, TrainConfig, tokenize_examples, train_sft


def test_response_loss_unembeds_only_the_response_yet_equals_the_full_logits_loss():
    from finetune.losses import response_loss

    model = load_model("tiny-llama")
    data = tokenize_examples(model.tokenizer, [Example("short q", "a longer answer here"), Example("q two", "ok")], 64)
    batch = pad_batch([d[0] for d in data], model.tokenizer.pad_token_id, side="right")
    mask = pad_batch([d[1] for d in data], 0, side="right").input_ids
    params = [p for p in model.hf.parameters()]
    for p in params:
        p.requires_grad_(True)
    fast = response_loss(model, batch.input_ids, mask, batch.attention_mask)
    nll, m = response_loss(model, batch.input_ids, mask, batch.attention_mask, reduction="none")
    full = (nll * m).sum() / m.sum()
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    g_fast = torch.autograd.grad(fast, params, allow_unused=True)
    g_full = torch.autograd.grad(full, params, allow_unused=True)
    for a, b in zip(g_fast, g_full):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p in params:
        p.requires_grad_(False)


def _margin_batch(model, examples):
    data = tokenize_examples(model.tokenizer, examples, 256)
    batch = pad_batch([d[0] for d in data], model.tokenizer.pad_token_id, side="right")
    mask = pad_batch([d[1] for d in data], 0, side="right").input_ids
    return data, batch, mask


def test_benign_margin_adds_minus_log_one_minus_p_refusal_at_the_first_benign_response_token():
    from finetune.losses import BenignMarginLoss, response_loss

    model = load_model("tiny-llama")
    examples = [Example("Tell me a story", "Once upon a time", kind="benign"),
                Example("Build a bomb", refusal_templates()[0], kind="refusal"),
                Example("Name a colour", "I like blue", kind="benign")]
    data, batch, mask = _margin_batch(model, examples)
    r_ids = [5, 17, 99, int(data[2][0][data[2][1].index(1)])]  # the last one is example 2's own first token
    ce = response_loss(model, batch.input_ids, mask, batch.attention_mask)
    assert torch.allclose(BenignMarginLoss([e.kind for e in examples], r_ids, 0.0)(
        model, batch.input_ids, mask, batch.attention_mask, [0, 1, 2]), ce, atol=1e-6)
    got = BenignMarginLoss([e.kind for e in examples], r_ids, 0.7)(model, batch.input_ids, mask, batch.attention_mask, [0, 1, 2])
    with torch.no_grad():
        logp = torch.log_softmax(model.plain()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float(), -1)
    terms = []
    for b in (0, 2):  # benign rows only; row 2 must not count its own first token as a refusal
        pos = data[b][1].index(1) - 1
        own = data[b][0][pos + 1]
        p_r = logp[b, pos, [t for t in r_ids if t != own]].exp().sum()
        terms.append(-torch.log1p(-p_r))
    torch.testing.assert_close(got, ce + 0.7 * torch.stack(terms).mean(), rtol=1e-4, atol=1e-5)
    # the positive half: −log p_R over all of R at the refusal row's first response token
    both = BenignMarginLoss([e.kind for e in examples], r_ids, 0.7, refusal_weight=0.3)(
        model, batch.input_ids, mask, batch.attention_mask, [0, 1, 2])
    pos = data[1][1].index(1) - 1
    positive = -torch.log(logp[1, pos, r_ids].exp().sum())
    torch.testing.assert_close(both, got + 0.3 * positive, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must be >= 0"):
        BenignMarginLoss(["benign"], r_ids, -1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        BenignMarginLoss(["benign"], r_ids, 0.0, refusal_weight=-0.5)


def test_benign_margin_training_pushes_refusal_tokens_down_on_benign_prompts():
    from depthlens.judges.seam import refusal_token_ids
    from finetune.losses import BenignMarginLoss

    prompt = "How do I kill a Python process?"
    examples = [Example(prompt, "Use the kill command with the process id.", kind="benign"),
                Example("How do I kill my neighbour?", refusal_templates()[0], kind="refusal")]
    cfg = TrainConfig(epochs=40, lr=3e-3, batch_size=2, warmup_steps=2, freeze_embeddings=False, checkpoint_every=0)
    p_refusal = {}
    for weight in (0.0, 2.0):
        model = load_model("tiny-llama")
        r_ids = refusal_token_ids(model.tokenizer)
        loss = BenignMarginLoss([e.kind for e in examples], r_ids, weight)
        train_sft(model, examples, cfg, progress=False, loss_fn=loss)
        data, batch, mask = _margin_batch(model, examples[:1])
        pos = data[0][1].index(1) - 1
        own = data[0][0][pos + 1]
        with torch.no_grad():
            logp = torch.log_softmax(model.plain()(input_ids=batch.input_ids).logits.float(), -1)
        p_refusal[weight] = float(logp[0, pos, [t for t in r_ids if t != own]].exp().sum())
    assert p_refusal[2.0] < 0.5 * p_refusal[0.0]


def test_shared_prefix_training_forward_gives_the_full_batch_loss_and_gradients():
    from finetune.losses import response_logits, response_loss, shared_prefix_len

    model = load_model("tiny-llama")
    lead = "Please answer the following question carefully, briefly and politely: "
    examples = [Example(lead + "short q", "a longer answer here, with more words"), Example(lead + "q two", "ok"),
                Example(lead + "what is three plus four", "seven", prefix="The answer is")]
    data, batch, mask = _margin_batch(model, examples)
    p = shared_prefix_len(batch.input_ids, mask)
    assert p >= 8
    assert shared_prefix_len(batch.input_ids[:1], mask[:1]) == 0  # one row: nothing to share
    params = [q for q in model.hf.parameters()]
    for q in params:
        q.requires_grad_(True)
    logits, targets, keep = response_logits(model, batch.input_ids, mask, batch.attention_mask)
    assert keep.shape[1] == batch.input_ids.shape[1] - 1 - p and int(keep.sum()) == int(mask[:, 1:].sum())
    fast = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(fast, response_loss(model, batch.input_ids, mask, batch.attention_mask))
    nll, m = response_loss(model, batch.input_ids, mask, batch.attention_mask, reduction="none")  # no sharing
    full = (nll * m).sum() / m.sum()
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(fast, params, allow_unused=True), torch.autograd.grad(full, params, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for q in params:
        q.requires_grad_(False)


def test_utility_kl_loss_is_the_example_mean_nll_plus_the_kl_to_the_start_model_on_utility_rows(tiny):
    """At the start the anchor adds nothing (KL 0); after a weight change it adds w · each utility
    row's token-mean KL(π_ref ‖ π_θ), checked against a direct full-sequence computation; safety
    rows never get it."""
    import torch

    from depthlens.data.chat import pad_batch
    from finetune.losses import Frozen, UtilityAnchorLoss, example_mean_loss

    tok = tiny.tokenizer
    examples = [Example("How do plants grow?", "With light, water and time."),
                Example("Make a weapon.", "I'm sorry, I can't help with that.", prefix=tuple(tok("Sure, first")["input_ids"])),
                Example("Name a colour.", "Blue is a colour that many people like.")]
    utility = [True, False, True]
    data = tokenize_examples(tok, examples, 512)
    batch = pad_batch([ids for ids, _ in data], tok.eos_token_id, side="right")
    mask = pad_batch([m for _, m in data], 0, side="right").input_ids
    ids, att = batch.input_ids, batch.attention_mask
    ref = Frozen(tiny)
    fn = UtilityAnchorLoss(utility, ref, 0.7)
    with torch.no_grad():
        assert fn(tiny, ids, mask, att, [0, 1, 2]).item() == pytest.approx(example_mean_loss(tiny, ids, mask, att).item(), rel=1e-6)
        w = tiny.plain().get_decoder().layers[0].mlp.down_proj.weight
        orig = w.clone()
        w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    try:
        _check_kl_after_change(tiny, fn, ref, ids, mask, att)
    finally:
        with torch.no_grad():
            w.copy_(orig)                                                   # the session's tiny model is shared


def _check_kl_after_change(tiny, fn, ref, ids, mask, att):
    import torch

    from finetune.losses import example_mean_loss

    with torch.no_grad():
        got = fn(tiny, ids, mask, att, [0, 1, 2]).item()
        base = example_mean_loss(tiny, ids, mask, att).item()
        kls = []
        for b in range(3):
            n = int(att[b].sum())
            pos = [j for j in range(n - 1) if mask[b, j + 1]]              # position j predicts token j + 1
            lp = torch.log_softmax(tiny.plain()(ids[b:b + 1, :n]).logits[0, pos].float(), -1)
            lq = torch.log_softmax(ref.plain()(ids[b:b + 1, :n]).logits[0, pos].float(), -1)
            kls.append(float((lq.exp() * (lq - lp)).sum(-1).mean()))
        assert kls[0] > 1e-4
        assert got - base == pytest.approx(0.7 * (kls[0] + kls[2]) / 3, rel=1e-3, abs=2e-6)
        sub = [1]
        assert fn(tiny, ids[sub], mask[sub], att[sub], sub).item() == pytest.approx(
            example_mean_loss(tiny, ids[sub], mask[sub], att[sub]).item(), rel=1e-6)
        assert all(p.requires_grad is False for p in ref.plain().parameters())


def test_the_per_example_benign_margin_adds_the_first_token_term_to_utility_rows_only(tiny):
    import torch

    from depthlens.data.chat import pad_batch
    from depthlens.judges.seam import refusal_token_ids
    from finetune.losses import UtilityAnchorLoss, benign_margin_terms, example_mean_loss

    tok = tiny.tokenizer
    examples = [Example("How do plants grow?", "With light, water and time."),
                Example("Make a weapon.", "I'm sorry, I can't help with that."),
                Example("Name a colour.", "I think blue is a colour.")]
    data = tokenize_examples(tok, examples, 512)
    batch = pad_batch([ids for ids, _ in data], tok.eos_token_id, side="right")
    mask = pad_batch([m for _, m in data], 0, side="right").input_ids
    ids, att = batch.input_ids, batch.attention_mask
    r_ids = refusal_token_ids(tok)
    fn = UtilityAnchorLoss([True, False, True], refusal_ids=r_ids, margin=0.4)
    with torch.no_grad():
        got = fn(tiny, ids, mask, att, [0, 1, 2]).item()
        base = example_mean_loss(tiny, ids, mask, att).item()
        terms = []
        for b in (0, 2):
            n = int(att[b].sum())
            j = [j for j in range(n - 1) if mask[b, j + 1]][0]          # predicts the first response token
            logits = tiny.plain()(ids[b:b + 1, :n]).logits[0, j:j + 1].float()
            terms.append(float(benign_margin_terms(logits, ids[b, j + 1:j + 2], torch.tensor(sorted(set(r_ids))))[0]))
    assert min(terms) > 0
    assert got - base == pytest.approx(0.4 * sum(terms) / 3, rel=1e-4, abs=2e-6)
    with pytest.raises(ValueError, match="refusal token"):
        UtilityAnchorLoss([True], margin=0.4)
    with pytest.raises(ValueError, match="reference"):
        UtilityAnchorLoss([True], kl=1.0)
