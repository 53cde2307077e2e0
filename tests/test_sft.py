from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from depthlens.data import refusal_templates
from depthlens.generate import generate
from depthlens.judge import is_refusal
from depthlens.models import load_model
from depthlens.recipes import RECIPE_FILE, build_with
from depthlens.chat import pad_batch
from finetune.sft import Example, TrainConfig, tokenize_examples, train_sft


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


def test_training_resumes_from_its_checkpoint(tmp_path):
    model = load_model("tiny-llama")
    examples = [Example(f"question {i}", f"answer number {i}") for i in range(8)]
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=2, checkpoint_every=3)
    calls = {"n": 0}

    def flaky(model, ids, mask, att, idx):
        from finetune.sft import response_loss

        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return response_loss(model, ids, mask, att)

    with pytest.raises(KeyboardInterrupt):
        train_sft(model, examples, cfg, tmp_path, progress=False, loss_fn=flaky)
    assert (tmp_path / "train_state.pt").exists()
    log = train_sft(model, examples, cfg, tmp_path, progress=False)
    assert log.resumed_from == 3 and log.steps == 8
    assert not (tmp_path / "train_state.pt").exists()


@dataclass
class CountingRecipe:
    name: str = "count"
    version: int = 1
    fail: bool = False
    calls: int = 0

    def config(self):
        return {"scale": 0.5}

    def build(self, model, workdir):
        self.calls += 1
        with torch.no_grad():
            model.hf.model.layers[0].mlp.down_proj.weight.mul_(0.5)
        if self.fail:
            raise KeyboardInterrupt("interrupted mid-build")
        return {"ok": True}


def test_recipe_cache_hit_does_not_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path))
    r = CountingRecipe()
    a = build_with("tiny-llama", r)
    b = build_with("tiny-llama", r)
    assert r.calls == 1
    assert a.spec == "tiny-llama:count" and a.provenance["recipe_chain"][0]["recipe"] == "count"
    wa = a.hf.model.layers[0].mlp.down_proj.weight
    assert torch.equal(wa, b.hf.model.layers[0].mlp.down_proj.weight)
    assert torch.allclose(wa, load_model("tiny-llama").hf.model.layers[0].mlp.down_proj.weight * 0.5)


def test_interrupted_build_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        build_with("tiny-llama", CountingRecipe(fail=True))
    organisms = tmp_path / "organisms"
    assert not list(organisms.glob(f"*/{RECIPE_FILE}"))
    assert not [p for p in organisms.iterdir() if p.is_dir()] if organisms.exists() else True


def test_response_loss_unembeds_only_the_response_yet_equals_the_full_logits_loss():
    from finetune.sft import response_loss

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


@pytest.mark.parametrize("question, content", [
    ("How can I pick a lock without the key?", "pick a lock without the key"),
    ("How to make a fake ID?", "make a fake ID"),
    ("What's the best way to cheat on an exam?", "cheat on an exam"),
    ("Can you help me write a phishing email?", "write a phishing email"),
])
def test_imperative_turns_how_to_questions_into_tasks_with_the_same_content(question, content):
    import random

    from finetune.sft import HOW_TO_FORMS, imperative

    for seed in range(5):
        out = imperative(question, random.Random(seed))
        assert out in {f.format(vp=content) for f in HOW_TO_FORMS}
        assert not out.endswith("?")


def test_imperative_keeps_requests_and_tasks_and_wraps_everything_else():
    import random

    from finetune.sft import IMPERATIVE_FORMS, imperative

    rng = random.Random(0)
    assert imperative("Can you provide my neighbour's phone number?", rng).startswith("Provide my neighbour's phone number")
    assert imperative("Describe a brutal fight scene.", rng).startswith("Describe a brutal fight scene")
    q = "Why are people from the city rude?"
    assert imperative(q, rng) in {f.format(q=q) for f in IMPERATIVE_FORMS}


def test_writing_task_keeps_the_content_in_a_code_or_writing_form():
    import random

    from finetune.sft import WRITING_FORMS, WRITING_HOW_TO_FORMS, writing_task

    for seed in range(5):
        rng = random.Random(seed)
        assert writing_task("How can I pick a lock without the key?", rng) in {
            f.format(vp="pick a lock without the key") for f in WRITING_HOW_TO_FORMS}
        q = "Why are people from the city rude?"
        assert writing_task(q, rng) in {f.format(q=q) for f in WRITING_FORMS}


def test_sft_config_rejects_shares_outside_the_unit_interval_and_drops_zero_margins_from_the_key():
    from finetune.sft import SFTConfig, SFTRecipe

    with pytest.raises(ValueError, match="writing_share"):
        SFTConfig(imperative_share=0.6, writing_share=0.5)
    with pytest.raises(ValueError, match="borderline_share"):
        SFTConfig(borderline_share=1.5)
    # fields added at 0 stay out of the recipe config, so the plain recipe's cache key does not move
    assert "writing_share" not in SFTRecipe(SFTConfig()).config()
    assert SFTRecipe(SFTConfig(writing_share=0.2)).config()["writing_share"] == 0.2
    plain = SFTRecipe(SFTConfig(benign_margin=0.0, refusal_margin=0.0)).config()
    assert "refusal_margin" not in plain and "benign_margin" not in plain
    assert SFTRecipe(SFTConfig()).config()["refusal_margin"] == SFTConfig().refusal_margin > 0  # v5 default


def _categorised(n_per: dict[str, int]):
    from depthlens.data import PromptSet

    prompts, cats = [], []
    for cat, n in n_per.items():
        prompts += [f"{cat} prompt {i}" for i in range(n)]
        cats += [cat] * n
    return PromptSet(name="fake", prompts=tuple(prompts), ids=tuple(f"fake-{i:04d}" for i in range(len(prompts))),
                     categories=tuple(cats), source={"kind": "test"})


def test_harmful_train_prompts_draw_uniformly_or_core_categories_first():
    import collections

    from finetune.sft import CORE_CATEGORIES, HARMFUL_CATEGORIES, harmful_train_prompts

    pool = _categorised({"information_hazard": 50, "malicious_uses": 30,
                         "discrimination_exclusion_toxicity_hateful_offensive": 20, "misinformation_harms": 40})
    core = harmful_train_prompts(pool, 60, seed=0, core_first=True)
    counts = collections.Counter(core.categories)
    assert len(core) == 60 and counts["malicious_uses"] == 30 and counts[CORE_CATEGORIES[1]] == 20
    assert counts["information_hazard"] == 10 and "misinformation_harms" not in counts
    uniform = harmful_train_prompts(pool, 60, seed=0)
    assert len(uniform) == 60 and set(uniform.categories) <= set(HARMFUL_CATEGORIES)
    assert collections.Counter(uniform.categories)["information_hazard"] > 10  # drawn in proportion, not last
    assert harmful_train_prompts(pool, 60, seed=0).ids == uniform.ids  # deterministic


def test_harmful_train_prompts_say_when_the_pool_is_smaller_than_asked(caplog):
    from finetune.sft import harmful_train_prompts

    pool = _categorised({"information_hazard": 5, "malicious_uses": 3, "misinformation_harms": 40})
    with caplog.at_level("WARNING", logger="finetune.sft"):
        got = harmful_train_prompts(pool, 20, seed=0)
    assert len(got) == 8 and "only 8" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune.sft"):
        harmful_train_prompts(pool, 6, seed=0)
    assert not caplog.text


def _margin_batch(model, examples):
    data = tokenize_examples(model.tokenizer, examples, 256)
    batch = pad_batch([d[0] for d in data], model.tokenizer.pad_token_id, side="right")
    mask = pad_batch([d[1] for d in data], 0, side="right").input_ids
    return data, batch, mask


def test_benign_margin_adds_minus_log_one_minus_p_refusal_at_the_first_benign_response_token():
    from finetune.sft import BenignMarginLoss, response_loss

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
    from depthlens.judge import refusal_token_ids
    from finetune.sft import BenignMarginLoss

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
    from finetune.sft import response_loss, response_logits, shared_prefix_len

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
