"""Mixed precision and activation checkpointing of the training loop (``finetune.precision``), on tiny-llama."""

from __future__ import annotations

import torch

from depthlens.models import load_model
from finetune.losses import response_loss
from finetune.precision import MasterWeights, checkpoint_model, uncheckpoint_model
from finetune.train import Example, TrainConfig, accumulate_gradients, tokenize_examples, train_sft, trainable_parameters


def test_master_weights_keep_updates_below_half_a_bf16_ulp_and_restore_the_dtype():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    pure = w.detach().clone()
    masters = MasterWeights([w])
    assert w.dtype == torch.float32 and masters.compute_dtype == torch.bfloat16
    with torch.no_grad():
        for _ in range(10):            # 1e-3 is below half a bf16 ulp at 1.0 (2^-8 = 0.0039)
            w.add_(1e-3)
            pure.add_(1e-3)
    masters.restore()
    assert w.dtype == torch.bfloat16
    assert torch.equal(pure, torch.ones(4, dtype=torch.bfloat16))        # pure bf16 lost every update
    assert torch.all(w.float() > 1.0)                                      # the masters kept their sum (0.01)


def test_a_bf16_model_trains_fp32_masters_under_bf16_autocast_and_comes_back_in_bf16():
    model = load_model("tiny-llama", dtype="bfloat16")
    start = {k: v.clone() for k, v in model.plain().state_dict().items()}
    seen = []

    def spy(model, ids, mask, att, idx):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     {p.dtype for p in trainable_parameters(model)}))
        return response_loss(model, ids, mask, att)

    log = train_sft(model, [Example(f"q {i}", f"answer {i}") for i in range(4)],
                    TrainConfig(lr=1e-2, batch_size=2, max_steps=2, checkpoint_every=0), progress=False, loss_fn=spy)
    assert seen and all(s == (True, torch.bfloat16, {torch.float32}) for s in seen)
    assert log.precision == "bfloat16 weights, fp32 masters, bfloat16 compute"
    after = model.plain().state_dict()
    assert {v.dtype for v in after.values() if v.is_floating_point()} == {torch.bfloat16}
    assert any(not torch.equal(after[k], start[k]) for k in start)


def test_an_fp32_model_on_cpu_trains_in_fp32_without_autocast(tiny):
    model = load_model("tiny-llama")
    seen = []

    def spy(model, ids, mask, att, idx):
        seen.append(torch.is_autocast_enabled("cpu"))
        return response_loss(model, ids, mask, att)

    log = train_sft(model, [Example("q", "a")], TrainConfig(max_steps=1, checkpoint_every=0), progress=False,
                    loss_fn=spy)
    assert seen == [False] and log.precision == "fp32"


def _grads(model, checkpointed: bool) -> dict[str, torch.Tensor]:
    data = tokenize_examples(model.tokenizer, [Example(f"question number {i}", f"a longer answer {i} " * (i + 1))
                                               for i in range(4)], max_len=96)
    params = trainable_parameters(model)
    saved = []
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    model.plain().train()
    try:
        if checkpointed:
            checkpoint_model(model)
        pack = lambda t: (saved.append(t.numel() * t.element_size()), t)[1]  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):   # what autograd keeps for backward
            accumulate_gradients(model, data, list(range(4)), model.tokenizer.eos_token_id)
    finally:
        if checkpointed:
            uncheckpoint_model(model)
        model.plain().eval()
    out = {n: p.grad.clone() for n, p in model.plain().named_parameters() if p.grad is not None}
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return out, sum(saved)


def test_activation_checkpointing_per_block_gives_the_same_gradients():
    model = load_model("tiny-llama")
    plain, n_plain = _grads(model, checkpointed=False)
    ckpt, n_ckpt = _grads(model, checkpointed=True)
    assert 0 < n_ckpt < 0.5 * n_plain        # checkpointed blocks keep their inputs only (recomputed in backward)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6, msg=name)
    assert not model.plain().is_activation_checkpointing and "_loss_path" not in model.__dict__


def test_grad_checkpointing_in_train_sft_reaches_the_weights_of_the_unchecked_run():
    examples = [Example(f"q {i}", f"answer {i} " * (i + 2)) for i in range(6)]
    cfg = TrainConfig(lr=1e-3, batch_size=3, max_steps=2, checkpoint_every=0)
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    train_sft(a, examples, cfg, progress=False)
    log = train_sft(b, examples, TrainConfig(**{**cfg.__dict__, "grad_checkpointing": True}), progress=False)
    assert log.grad_checkpointing
    for (name, x), y in zip(a.plain().named_parameters(), b.plain().parameters()):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6, msg=name)
