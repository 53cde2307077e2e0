from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from depthlens.data import refusal_templates
from depthlens.generate import generate
from depthlens.judge import is_refusal
from depthlens.models import load_model
from depthlens.recipes import RECIPE_FILE, build_with
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
