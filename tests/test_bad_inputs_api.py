"""Table of bad inputs to the public API: each row must raise one ``UsageError`` naming the problem.

Rows are (kind, what, call, words): ``call(tiny, tmp_path)`` must raise ``UsageError`` (a
``ValueError``) whose message contains every one of ``words``. Kinds: ``spec`` (model specs),
``arg`` (API arguments), ``input`` (prompts that are not what they seem), ``cache`` (damaged
cache entries and checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from depthlens.infra.cache import MANIFEST, CacheEntryDamaged
from depthlens.data.chat import build_chat, length_batches
from depthlens.infra.errors import UsageError
from depthlens.runtime.forward import last_logprobs, residuals_at, token_logprobs
from depthlens.runtime.generation import LayerwiseContinuer, generate
from depthlens.models.hooked_model import hook_name
from depthlens.models import load_model
from depthlens.runtime.responses import response_set

LONG = "word " * 6000  # about 6,000 tokens: tiny-llama reads 1,024


def _seqs(tiny, n=2):
    return [build_chat(tiny.tokenizer, f"Prompt number {i}?") for i in range(n)]


def _damaged_checkpoint(tiny, tmp: Path, how: str):
    path = tiny.save(tmp / "ckpt")
    weights = path / "model.safetensors"
    if how == "overwrite":
        raw = bytearray(weights.read_bytes())
        raw[-64 * 1024:] = bytes(64 * 1024)  # 64 KiB of the weights zeroed
        weights.write_bytes(bytes(raw))
    elif how == "delete":
        (path / "tokenizer.json").unlink()
    elif how == "manifest":
        data = json.loads((path / MANIFEST).read_text())
        data["files"]["model.safetensors"]["sha256"] = "f" * 64
        (path / MANIFEST).write_text(json.dumps(data))
    return lambda: load_model(str(path))


class _Halve:
    name, version = "halve-bad-inputs", 1

    def config(self):
        return {}

    def build(self, model, workdir):
        with torch.no_grad():
            model.hf.model.norm.weight.mul_(0.5)


def _damaged_recipe_entry(tmp: Path, monkeypatch):
    from depthlens.models.recipes import build_with

    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp / "cache"))
    entry = Path(build_with("tiny-llama", _Halve()).provenance["source"])
    (entry / "recipe.json").write_text((entry / "recipe.json").read_text()[:-5])  # half-written
    return lambda: build_with("tiny-llama", _Halve())


ROWS = [
    # ------------------------------------------------------------------ specs
    ("spec", "trailing colon", lambda t, p: load_model("tiny-llama:"), ["'tiny-llama:'", "empty recipe suffix"]),
    ("spec", "double colon", lambda t, p: load_model("tiny-llama::sft"), ["empty recipe suffix"]),
    ("spec", "colon only", lambda t, p: load_model(":"), ["names no base model"]),
    ("spec", "suffix only", lambda t, p: load_model(":sft"), ["':sft'", "names no base model"]),
    ("spec", "hf: without a name", lambda t, p: load_model("hf:"), ["names no base model"]),
    ("spec", "unknown name", lambda t, p: load_model("gpt-17-ultra"), ["Unknown model spec 'gpt-17-ultra'", "tiny-llama"]),
    ("spec", "unknown suffix", lambda t, p: load_model("tiny-llama:no-such-recipe"),
     ["Unknown recipe suffix 'no-such-recipe'", "installed recipes"]),
    ("spec", "empty", lambda t, p: load_model(""), ["non-empty string"]),
    ("spec", "not a string", lambda t, p: load_model(None), ["non-empty string", "None"]),
    ("spec", "missing directory", lambda t, p: load_model("./no/such/dir"), ["'./no/such/dir'", "does not exist"]),
    ("spec", "a file, not a checkpoint", lambda t, p: load_model("weights.safetensors"), ["not a checkpoint directory"]),
    ("spec", "hub id not cached offline", lambda t, p: load_model("someorg/not-a-real-model-xyz"),
     ["not in the local cache"]),
    ("spec", "bad device", lambda t, p: load_model("tiny-llama", device="gpu"), ["Unknown device 'gpu'"]),
    ("spec", "integer dtype", lambda t, p: load_model("tiny-llama", dtype="int8"), ["Unknown dtype", "float32"]),
    # ------------------------------------------------------------------ API arguments
    ("arg", "max_new_tokens=2.5", lambda t, p: generate(t, ["Hi"], max_new_tokens=2.5, progress=False),
     ["max_new_tokens must be an integer >= 1", "2.5"]),
    ("arg", "max_new_tokens=0", lambda t, p: generate(t, ["Hi"], max_new_tokens=0, progress=False), ["max_new_tokens", ">= 1"]),
    ("arg", "max_new_tokens=True", lambda t, p: generate(t, ["Hi"], max_new_tokens=True, progress=False),
     ["max_new_tokens must be an integer"]),
    ("arg", "one prompt, not a list", lambda t, p: generate(t, "Hi", progress=False), ["list of prompts", "str"]),
    ("arg", "no prompts", lambda t, p: generate(t, [], progress=False), ["prompts is empty"]),
    ("arg", "batch_size=0", lambda t, p: generate(t, ["Hi"], batch_size=0, progress=False), ["batch_size", ">= 1"]),
    ("arg", "temperature=0", lambda t, p: generate(t, ["Hi"], do_sample=True, temperature=0, progress=False),
     ["temperature must be a finite number > 0"]),
    ("arg", "top_p=1.5", lambda t, p: generate(t, ["Hi"], do_sample=True, top_p=1.5, progress=False), ["top_p", "(0, 1]"]),
    ("arg", "do_sample='yes'", lambda t, p: generate(t, ["Hi"], do_sample="yes", progress=False), ["do_sample must be True or False"]),
    ("arg", "continuer max_new_tokens=0", lambda t, p: LayerwiseContinuer(t, ["Hi"], max_new_tokens=0), ["max_new_tokens"]),
    ("arg", "response_set max_new_tokens=2.5", lambda t, p: response_set(t, ["Hi"], max_new_tokens=2.5), ["max_new_tokens"]),
    ("arg", "response_set without prompts", lambda t, p: response_set(t, []), ["prompts is empty"]),
    ("arg", "reduce='none' with a list of positions", lambda t, p: residuals_at(t, _seqs(t), [[1, 2], -1], reduce="none"),
     ["positions[0]", "reduce='none' takes one index", "reduce='mean'"]),
    ("arg", "unknown reduce", lambda t, p: residuals_at(t, _seqs(t), [-1, -1], reduce="average"),
     ["reduce must be one of 'none', 'mean'", "'average'"]),
    ("arg", "float position", lambda t, p: residuals_at(t, _seqs(t), [1.5, -1]), ["positions[0] must be an integer", "1.5"]),
    ("arg", "positions of another length", lambda t, p: residuals_at(t, _seqs(t), [-1]), ["one entry per sequence (2)"]),
    ("arg", "position outside the sequence", lambda t, p: residuals_at(t, _seqs(t), [10_000, -1]), ["fall outside it"]),
    ("arg", "layer out of range", lambda t, p: residuals_at(t, _seqs(t), [-1, -1], layers=[5]), ["Layer 5 is out of range"]),
    ("arg", "layer as a string", lambda t, p: t.check_layer("1"), ["Layer '1' is out of range"]),
    ("arg", "unknown hook kind", lambda t, p: hook_name("resid", 0), ["Unknown hook kind 'resid'"]),
    ("arg", "float start", lambda t, p: token_logprobs(t, _seqs(t), start=[1.5, 1]), ["start must be an integer"]),
    ("arg", "start of another length", lambda t, p: token_logprobs(t, _seqs(t), start=[1]), ["one per sequence"]),
    ("arg", "batch_size=2.5", lambda t, p: last_logprobs(t, _seqs(t), batch_size=2.5), ["batch_size must be an integer"]),
    ("arg", "length_batches of 0", lambda t, p: length_batches([3, 1], 0), ["batch_size", ">= 1"]),
    ("arg", "segments as one string", lambda t, p: build_chat(t.tokenizer, "Hi", "Sure"), ["not one string"]),
    ("arg", "empty prompt", lambda t, p: build_chat(t.tokenizer, "   "), ["non-empty string"]),
    # ------------------------------------------------------------------ inputs that are not what they seem
    ("input", "prompt beyond the context (generate)", lambda t, p: generate(t, [LONG], max_new_tokens=4, progress=False),
     ["Sequence 0 has", "tiny-llama reads at most 1024 tokens"]),
    ("input", "prompt plus new tokens beyond the context",
     lambda t, p: generate(t, ["word " * 1000], max_new_tokens=100, progress=False), ["asks for 100 new ones", "lower max_new_tokens"]),
    ("input", "sequence beyond the context (forward)", lambda t, p: last_logprobs(t, [build_chat(t.tokenizer, LONG)]),
     ["reads at most 1024 tokens"]),
    ("input", "sequence beyond the context (residuals)",
     lambda t, p: residuals_at(t, [build_chat(t.tokenizer, LONG)], [-1], kind="resid_mid"), ["reads at most 1024 tokens"]),
    ("input", "continuer beyond the context", lambda t, p: LayerwiseContinuer(t, [LONG], max_new_tokens=4),
     ["reads at most 1024 tokens"]),
]


@pytest.mark.parametrize("kind, what, call, words", ROWS, ids=[f"{r[0]}: {r[1]}" for r in ROWS])
def test_bad_input_raises_one_usage_error(tiny, tmp_path, monkeypatch, kind, what, call, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative paths in the rows resolve to nothing here
    with pytest.raises(UsageError) as err:
        call(tiny, tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert all(w in msg for w in words), msg
    assert "\n" not in msg.strip()  # one line, as the CLIs print it


CACHE_ROWS = [
    ("cache", "weights overwritten (64 KiB zeroed)", "overwrite", ["is damaged (model.safetensors)", "save it again"]),
    ("cache", "a file deleted", "delete", ["is damaged (tokenizer.json)"]),
    ("cache", "a tampered manifest hash", "manifest", ["is damaged (model.safetensors)"]),
]


@pytest.mark.parametrize("kind, what, how, words", CACHE_ROWS, ids=[f"{r[0]}: {r[1]}" for r in CACHE_ROWS])
def test_damaged_checkpoint_is_refused_never_loaded(tiny, tmp_path, kind, what, how, words):
    call = _damaged_checkpoint(tiny, tmp_path, how)
    with pytest.raises(UsageError) as err:
        call()
    assert all(w in str(err.value) for w in words), str(err.value)


def test_half_written_recipe_entry_is_refused_with_the_rebuild_sentence(tmp_path, monkeypatch):
    call = _damaged_recipe_entry(tmp_path, monkeypatch)
    with pytest.raises(CacheEntryDamaged) as err:
        call()
    msg = str(err.value)
    assert msg.startswith("cache entry ") and "is damaged (recipe.json): delete it, or run " in msg
    assert msg.endswith(" to rebuild")
