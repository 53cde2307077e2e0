"""QLoRA (``--load-in-4bit``, ``finetune.qlora``) on tiny-llama on CPU: a recipe build trains LoRA adapters
through NF4 block weights, and its cache entry is a standard checkpoint in the parent's dtype that loads
as a normal model, equal to the parent plus the adapter's update (bitsandbytes ships a CPU library)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes")

FLAGS = ["--model", "tiny-llama", "--max-steps", "3", "--batch-size", "4", "--seed", "0",
         "--n-harmful", "8", "--n-benign", "8", "--lora-rank", "4"]


def test_a_qlora_build_trains_through_nf4_and_its_merged_checkpoint_loads_as_a_normal_model(tmp_path, monkeypatch):
    from tests.test_distributed import _entry, _env

    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    from finetune.sft import main

    main([*FLAGS, "--load-in-4bit"])
    entry = _entry(tmp_path, "tiny-llama-sft")
    recipe = json.loads((entry / "recipe.json").read_text())
    assert recipe["chain"][-1]["config"]["load_in_4bit"] is True          # in the cache key
    info = recipe["info"]["train"]
    assert info["quantization"] == "nf4" and info["lora"]["rank"] == 4 and info["steps"] == 3

    from transformers import AutoModelForCausalLM

    from depthlens.models import load_model

    loaded = AutoModelForCausalLM.from_pretrained(entry)                 # a plain HF model, nothing 4-bit
    assert all(type(m).__name__ != "Linear4bit" for m in loaded.modules())
    parent = {k: v for k, v in load_model("tiny-llama").plain().state_dict().items()}
    merged = load_file(entry / "model.safetensors")
    assert {v.dtype for v in merged.values()} == {next(iter(parent.values())).dtype}   # the parent's dtype
    adapter = load_file(entry / "adapter" / "adapter_model.safetensors")
    scale = json.loads((entry / "adapter" / "adapter_config.json").read_text())
    scale = scale["lora_alpha"] / scale["r"]
    adapted = set()
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        target = name.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
        b = adapter[name.replace(".lora_A.", ".lora_B.")]
        expected = parent[target].float() + scale * (b.float() @ a.float())
        torch.testing.assert_close(merged[target].float(), expected, rtol=0, atol=1e-6)
        adapted.add(target)
    assert len(adapted) == 14                                             # every linear map of the 2 blocks
    assert any(float((merged[k] - parent[k]).abs().max()) > 0 for k in adapted)   # the adapters learnt something
    assert all(torch.equal(merged[k], parent[k]) for k in merged if k not in adapted)   # the rest bit for bit
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 9, 13]])
        assert torch.isfinite(loaded(input_ids=ids).logits).all()
    assert load_model(str(entry)).n_layers == 2

    main(FLAGS)                                                           # plain LoRA: another cache key
    entries = sorted(p.name for p in (tmp_path / "organisms").glob("tiny-llama-sft-*") if (p / "recipe.json").exists())
    assert len(entries) == 2


def test_qlora_training_runs_the_losses_through_4bit_layers_and_restores_the_model():
    from depthlens.models import load_model
    from finetune.losses import loss_path, response_loss
    from finetune.lora import LoraSettings
    from finetune.train import Example, TrainConfig, train_sft

    model = load_model("tiny-llama")
    start = {k: v.clone() for k, v in model.plain().state_dict().items()}
    seen = []

    def spy(model, ids, mask, att, idx):
        seen.append(sum(type(m).__name__ == "Linear4bit" for m in loss_path(model).lm.modules()))
        return response_loss(model, ids, mask, att)

    cfg = TrainConfig(lr=1e-2, batch_size=2, max_steps=2, checkpoint_every=0, lora=LoraSettings(4), load_in_4bit=True)
    log = train_sft(model, [Example(f"q {i}", f"answer {i}") for i in range(4)], cfg, progress=False, loss_fn=spy)
    assert seen == [14, 14] and log.quantization == "nf4"
    after = model.plain().state_dict()
    assert after.keys() == start.keys() and all(after[k].shape == start[k].shape for k in start)
    assert any(not torch.equal(after[k], start[k]) for k in start)
    assert "_loss_path" not in model.__dict__


def test_load_in_4bit_without_lora_is_refused():
    from depthlens.infra.errors import UsageError
    from finetune.train import TrainConfig

    with pytest.raises(UsageError, match="needs --lora-rank"):
        TrainConfig(load_in_4bit=True)
