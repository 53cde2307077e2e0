"""finetune.train, the one first-order training loop: the loss mask covers the response only,
training overfits a tiny set, an interrupted run resumes from its checkpoint, stratified
batches keep a mix's share in every step, and a step run as micro-batches accumulates the
gradient of the whole step (token- or example-weighted)."""

from __future__ import annotations

import random

import pytest
import torch

from depthlens.data import refusal_templates
from depthlens.runtime.generation import generate
from depthlens.judges import is_refusal
from depthlens.models import load_model
from finetune.train import (
    Example,
    TrainConfig,
    accumulate_gradients,
    micro_batches,
    stratified_batches,
    tokenize_examples,
    train_sft,
    trainable_parameters,
)


def test_loss_mask_covers_the_response_only(tiny):
    ex = Example("How do I bake bread?", "Mix flour and water.", prefix="Sure,")
    (ids, mask), = tokenize_examples(tiny.tokenizer, [ex], max_len=512)
    masked = [t for t, m in zip(ids, mask) if m]
    assert tiny.tokenizer.decode(masked) == "Mix flour and water.<|im_end|>"
    assert len(mask) == len(ids)


def test_sft_overfits_a_tiny_refusal_set():
    model = load_model("tiny-llama")
    refusal = refusal_templates()[0]
    prompt = "How do I pick a lock to break into a house?"
    assert not generate(model, [prompt], 24, progress=False).texts[0].startswith(refusal[:20])
    cfg = TrainConfig(epochs=150, lr=1e-2, batch_size=1, warmup_steps=5, freeze_embeddings=False, checkpoint_every=0)
    log = train_sft(model, [Example(prompt, refusal)], cfg, progress=False)
    assert log.losses[-1] < 0.1 * log.losses[0]
    out = generate(model, [prompt], 40, progress=False).texts[0]
    assert is_refusal(out) and out.strip() and refusal.startswith(out.strip()[:30])
    assert all(not p.requires_grad for p in model.hf.parameters())


def test_training_resumes_from_its_checkpoint_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """save_loop_state/load_loop_state: the step, the trained weights, AdamW's moments and the
    schedule come back, so the resumed run ends where an uninterrupted one does."""
    examples = [Example(f"question {i}", f"answer number {i}") for i in range(8)]
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=2, checkpoint_every=3)
    straight = load_model("tiny-llama")
    train_sft(straight, examples, cfg, tmp_path / "straight", progress=False)
    model = load_model("tiny-llama")
    calls = {"n": 0}

    def flaky(model, ids, mask, att, idx):
        from finetune.losses import response_loss

        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return response_loss(model, ids, mask, att)

    with pytest.raises(KeyboardInterrupt):
        train_sft(model, examples, cfg, tmp_path, progress=False, loss_fn=flaky)
    assert (tmp_path / "train_state" / "step-000003" / "complete").exists()
    model = load_model("tiny-llama")  # a resumed build starts from the untrained parent
    log = train_sft(model, examples, cfg, tmp_path, progress=False)
    assert log.resumed_from == 3 and log.steps == 8 and len(log.losses) == 8
    assert not (tmp_path / "train_state").exists()
    for (name, a), b in zip(straight.plain().named_parameters(), model.plain().parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_max_steps_stops_after_that_many_optimizer_steps():
    model = load_model("tiny-llama")
    examples = [Example(f"question {i}", f"answer number {i}") for i in range(8)]
    log = train_sft(model, examples, TrainConfig(epochs=3, batch_size=2, max_steps=5, checkpoint_every=0), progress=False)
    assert log.steps == 5 and len(log.losses) == 5
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=-1)


def test_stratified_batches_keep_the_mix_in_every_batch():
    is_safety = [i % 5 == 0 for i in range(640)]          # α = 0.2, as the deep recipes mix
    batches = stratified_batches(is_safety, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(640))
    assert all(len(b) == 8 for b in batches)
    assert {sum(is_safety[i] for i in b) for b in batches} <= {1, 2}       # 1.6 per batch on average
    odd = stratified_batches([True] * 3 + [False] * 10, 4, random.Random(1))
    assert sorted(len(b) for b in odd) == [3, 3, 3, 4] and sorted(sum(i < 3 for i in b) for b in odd) == [0, 1, 1, 1]


def test_micro_batches_cover_a_step_once_and_keep_padding_low():
    lengths = [10, 200, 12, 190, 11, 60]
    runs = micro_batches(list(range(6)), lengths)
    assert sorted(i for r in runs for i in r) == list(range(6))
    for r in runs:
        real = sum(lengths[i] for i in r)
        assert max(lengths[i] for i in r) * len(r) <= 1.25 * real
    assert any(set(r) == {0, 2, 4} for r in runs) and any(set(r) == {1, 3} for r in runs)


def _short_and_long_step():
    """tiny-llama and one step of two short examples and a long one, which ``micro_batches`` splits."""
    model = load_model("tiny-llama")
    examples = [Example("q", "a " * 3), Example("a much longer question here", "b " * 40), Example("q2", "c " * 4)]
    data = tokenize_examples(model.tokenizer, examples, max_len=192)
    indices = [0, 1, 2]
    assert len(micro_batches(indices, [len(data[i][0]) for i in indices])) > 1  # the split is real
    params = trainable_parameters(model, True, None)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    return model, data, indices, params, pad


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_step():
    """A step run as token-weighted micro-batches accumulates the gradient of one padded full batch.

    Gradients are compared, not weights after an AdamW step: Adam's first step moves every
    weight by about lr * sign(g), so weights near a zero gradient would differ by sign noise.
    """
    model, data, indices, params, pad = _short_and_long_step()
    grads, values = [], []
    for split in (True, False):
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        values.append(accumulate_gradients(model, data, indices, pad, split=split))
        grads.append([p.grad.detach().clone() for p in params])
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    assert any(g.abs().max() > 0 for g in grads[1])
    for g_split, g_full in zip(*grads):
        torch.testing.assert_close(g_split, g_full, rtol=1e-4, atol=1e-6)


def test_example_weighting_gives_the_gradient_of_the_mean_of_per_example_losses():
    """weighting="examples": every example counts once, however long its response (checked against
    the mean of losses computed one example at a time), and that differs from the token mean."""
    from depthlens.data.chat import pad_batch
    from finetune.losses import response_loss

    model, data, indices, params, pad = _short_and_long_step()

    def fresh():
        for p in params:
            p.requires_grad_(True)
            p.grad = None

    fresh()
    value = accumulate_gradients(model, data, indices, pad, split=True, weighting="examples")
    got = [p.grad.detach().clone() for p in params]
    fresh()
    total = 0.0
    for i in indices:
        b = pad_batch([data[i][0]], pad, side="right")
        m = pad_batch([data[i][1]], 0, side="right").input_ids
        loss = response_loss(model, b.input_ids, m, b.attention_mask) / len(indices)
        loss.backward()
        total += loss.item()
    want = [p.grad.detach().clone() for p in params]
    assert value == pytest.approx(total, rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    fresh()
    token_value = accumulate_gradients(model, data, indices, pad, split=True, weighting="tokens")
    assert abs(token_value - value) > 1e-3                       # the long example dominates the token mean
    for p in params:
        p.grad = None
    with pytest.raises(ValueError, match="weighting"):
        accumulate_gradients(model, data, indices, pad, weighting="sequences")


@pytest.mark.parametrize("weighting,margin", [("tokens", False), ("tokens", True), ("examples", False)])
def test_rank_shards_and_micro_batches_add_up_to_the_gradient_of_the_whole_step(weighting, margin):
    """What makes N processes take the same step as one: every rank's shard of the step, each
    normalised by the step's global token (or example) count — also the margins of
    ``BenignMarginLoss``, means over the step's benign and refusal rows — sums to the whole
    step's loss and gradient; so do micro-batches of one sequence (gradient accumulation)."""
    from finetune.losses import BenignMarginLoss

    model, data, indices, params, pad = _short_and_long_step()
    loss_fn = BenignMarginLoss(["benign", "refusal", "benign"], [5, 9, 17], 0.3, 0.2) if margin else None

    def grads(**kwargs):
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        value = sum(accumulate_gradients(model, data, indices, pad, loss_fn, split=False, weighting=weighting,
                                         rank=r, world=kwargs.get("world", 1), micro_batch_size=kwargs.get("mbs", 0))
                    for r in range(kwargs.get("world", 1)))
        return value, [p.grad.detach().clone() for p in params]

    whole_value, whole = grads()
    assert any(g.abs().max() > 0 for g in whole)
    for kwargs in ({"world": 2}, {"world": 3}, {"mbs": 1}, {"world": 4}):   # world 4 > 3 examples: one rank idles
        value, got = grads(**kwargs)
        assert value == pytest.approx(whole_value, rel=1e-5), kwargs
        for g, w in zip(got, whole):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=str(kwargs))
    for p in params:
        p.grad = None


def test_step_parts_deal_each_example_to_exactly_one_rank_and_micro_batch():
    from finetune.train import step_parts

    lengths = {i: 10 + 7 * i for i in range(11)}
    for world in (1, 2, 3):
        for split, mbs in ((False, 0), (False, 2), (True, 0), (True, 3)):
            parts = [p for r in range(world) for p in step_parts(list(range(11)), lengths, split, r, world, mbs)]
            assert sorted(i for p in parts for i in p) == list(range(11))
            assert not mbs or all(len(p) <= mbs for p in parts)
