"""Cache integrity (depthlens.infra.cache): entries are whole or absent, checked on load, built once.

Every test runs in its own ``$DEPTHLENS_CACHE``. The concurrency tests start real processes
(4 builders of one recipe entry; 4 writers of one checkpoint with a reader watching).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from depthlens.infra import cache
from depthlens.infra.cache import MANIFEST, MISSING, CacheEntryDamaged, check, ensure
from depthlens.infra.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DEPTHLENS_CACHE", str(root))
    return root


class HalveRecipe:
    """A cheap recipe: halves the final norm's weight (a real, checkable change of the model)."""

    name = "halve"
    version = 1

    def config(self) -> dict:
        return {"factor": 0.5}

    def build(self, model, workdir: Path) -> dict:
        with torch.no_grad():
            model.hf.model.norm.weight.mul_(0.5)
        return {"halved": "model.norm.weight"}


def _write(tmp: Path, text: str = "1 2 3") -> None:
    (tmp / "numbers.txt").write_text(text)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "more.bin").write_bytes(b"\x00\x01" * 100)


def _flip(path: Path, at: int = 50, n: int = 8) -> None:
    """Overwrite ``n`` bytes of ``path`` in place (same size, other bytes)."""
    raw = bytearray(path.read_bytes())
    raw[at:at + n] = bytes((b + 1) % 256 for b in raw[at:at + n])
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- entries


def test_an_entry_is_built_once_with_a_manifest_of_every_file(tmp_path):
    calls = []
    entry = ensure(tmp_path / "e", lambda tmp: (calls.append(tmp), _write(tmp)))
    again = ensure(tmp_path / "e", lambda tmp: calls.append(tmp))
    assert again == entry and len(calls) == 1
    files = json.loads((entry / MANIFEST).read_text())["files"]
    assert set(files) == {"numbers.txt", "sub/more.bin"}
    assert files["sub/more.bin"] == {"size": 200, "sha256": hashlib.sha256(b"\x00\x01" * 100).hexdigest()}
    assert check(entry) is None and check(tmp_path / "nope") == MISSING
    assert not list(tmp_path.glob(".e.tmp-*"))  # nothing half-written left beside it


@pytest.mark.parametrize("damage, named", [
    (lambda e: _flip(e / "sub" / "more.bin"), "sub/more.bin"),                 # same size, other bytes
    (lambda e: (e / "numbers.txt").write_text("1 2"), "numbers.txt"),          # truncated
    (lambda e: (e / "numbers.txt").unlink(), "numbers.txt"),                   # half-written / deleted
    (lambda e: (e / "extra.safetensors").write_bytes(b"x"), "extra.safetensors"),  # a file slipped in
    (lambda e: (e / MANIFEST).unlink(), MANIFEST),
    (lambda e: (e / MANIFEST).write_text("{not json"), MANIFEST),
])
def test_check_names_the_damaged_file(tmp_path, damage, named):
    entry = ensure(tmp_path / "e", _write)
    assert check(entry) is None
    damage(entry)
    assert check(entry) == named


def test_a_tampered_manifest_is_caught(tmp_path):
    entry = ensure(tmp_path / "e", _write)
    data = json.loads((entry / MANIFEST).read_text())
    data["files"]["numbers.txt"]["sha256"] = "0" * 64
    (entry / MANIFEST).write_text(json.dumps(data))
    assert check(entry) == "numbers.txt"


def test_a_cheap_damaged_entry_is_rebuilt_and_an_expensive_one_refused(tmp_path):
    entry = ensure(tmp_path / "cheap", _write)
    _flip(entry / "sub" / "more.bin")
    ensure(entry, _write)  # command=None: cheap, rebuilt
    assert check(entry) is None and (entry / "sub" / "more.bin").read_bytes() == b"\x00\x01" * 100

    dear = ensure(tmp_path / "dear", _write, command="`make dear`")
    _flip(dear / "numbers.txt", at=0, n=1)
    with pytest.raises(CacheEntryDamaged) as err:
        ensure(dear, _write, command="`make dear`")
    assert isinstance(err.value, UsageError)
    assert str(err.value) == f"cache entry {dear} is damaged (numbers.txt): delete it, or run `make dear` to rebuild"


def test_an_entry_from_before_manifests_is_adopted_only_if_whole(tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    built = []
    ensure(legacy, built.append, adopt=cache.looks_complete)
    assert not built and check(legacy) is None  # adopted: manifest written, nothing rebuilt

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{trunc")
    ensure(broken, lambda tmp: (tmp / "config.json").write_text("{}"), adopt=cache.looks_complete)
    assert json.loads((broken / "config.json").read_text()) == {}  # not adopted: rebuilt


def test_a_truncated_safetensors_file_is_not_whole(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(64)}, path)
    assert cache.safetensors_complete(path)
    path.write_bytes(path.read_bytes()[:-10])
    assert not cache.safetensors_complete(path)


def test_a_builder_that_fails_leaves_nothing_and_stale_temps_are_cleared(tmp_path):
    (tmp_path / ".e.tmp-killed").mkdir()  # what a builder killed mid-way leaves
    with pytest.raises(RuntimeError, match="boom"):
        ensure(tmp_path / "e", lambda tmp: (_write(tmp), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.tmp-*"))


def test_publish_swaps_an_existing_entry_in_one_step(tmp_path):
    entry = ensure(tmp_path / "e", _write)
    new = tmp_path / "new"
    new.mkdir()
    (new / "numbers.txt").write_text("4 5 6")
    with cache.lock(entry):
        cache.publish(new, entry)
    assert (entry / "numbers.txt").read_text() == "4 5 6" and check(entry) is None
    assert (new / "numbers.txt").read_text() == "1 2 3"  # the old entry, now the caller's to remove


def test_file_hashes_are_never_memoised_on_disk(fresh_cache, tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(b"abc" * 1000)
    assert cache.file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert not (fresh_cache / "hashes").exists()


# ----------------------------------------------------------------------------- models and recipes


def test_a_saved_checkpoint_with_overwritten_weights_is_refused(tiny, tmp_path):
    from depthlens.models import load_model

    path = tiny.save(tmp_path / "ckpt")
    assert check(path) is None
    weights = path / "model.safetensors"
    assert load_model(str(path)).provenance["weights_sha256"] == hashlib.sha256(
        hashlib.sha256(weights.read_bytes()).hexdigest().encode()).hexdigest()
    _flip(weights, at=weights.stat().st_size - 4096, n=64)
    with pytest.raises(UsageError, match=r"is damaged \(model.safetensors\)"):
        load_model(str(path))


def test_a_damaged_recipe_entry_is_refused_with_the_rebuild_command_then_rebuilt(fresh_cache):
    from depthlens.runtime.forward import last_logprobs
    from depthlens.models.recipes import build_with, entry_dir

    built = build_with("tiny-llama", HalveRecipe())
    entry = Path(built.provenance["source"])
    key = built.provenance["recipe_chain"][-1]["key"]
    assert entry == entry_dir("tiny-llama:halve", key) and check(entry) is None
    clean = last_logprobs(built, [[1, 5, 9, 13]])
    weights = entry / "model.safetensors"
    _flip(weights, at=weights.stat().st_size - 64 * 1024, n=64 * 1024 // 2)  # 32 KiB of weights
    with pytest.raises(CacheEntryDamaged) as err:
        build_with("tiny-llama", HalveRecipe())
    msg = str(err.value)
    assert msg.startswith(f"cache entry {entry} is damaged (model.safetensors): delete it, or run ")
    assert "rebuild_damaged=True" in msg  # a recipe object that is not an installed suffix
    rebuilt = build_with("tiny-llama", HalveRecipe(), rebuild_damaged=True)
    assert check(entry) is None
    torch.testing.assert_close(last_logprobs(rebuilt, [[1, 5, 9, 13]]), clean, rtol=0, atol=0)


def test_the_rebuild_command_of_an_installed_suffix_names_the_spec():
    from depthlens.models.recipes import get_recipe, rebuild_command

    assert rebuild_command("tiny-llama:sft", get_recipe("sft")) == "`python -m depthlens.models.recipes --rebuild 'tiny-llama:sft'`"


def test_the_recipes_command_prints_one_error_line_for_a_bad_spec(capsys):
    from depthlens.models.recipes import main

    assert main(["tiny-llama:"]) == 2 and main(["tiny-llama:no-such-recipe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "empty recipe suffix" in err[0] and "Unknown recipe suffix 'no-such-recipe'" in err[1]


def test_the_cache_command_lists_damaged_entries(fresh_cache, capsys):
    entry = ensure(fresh_cache / "responses" / "x-0123456789abcdef0123", _write)
    assert cache.main([str(fresh_cache)]) == 0
    _flip(entry / "sub" / "more.bin")
    assert cache.main([str(fresh_cache)]) == 1
    assert f"{entry}: damaged (sub/more.bin)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- concurrency (real processes)

_BUILDER = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    import torch
    from depthlens.models.recipes import build_with

    class HalveRecipe:
        name, version = "halve", 1
        def config(self):
            return {"factor": 0.5}
        def build(self, model, workdir):
            with open(sys.argv[1] + "/builds.log", "a") as fh:
                fh.write(f"{os.getpid()}\\n")
            time.sleep(1.0)  # a slow build: the others must wait for it, not start their own
            with torch.no_grad():
                model.hf.model.norm.weight.mul_(0.5)
            return {}

    run = Path(sys.argv[1])
    (run / f"ready-{sys.argv[2]}").touch()
    while len(list(run.glob("ready-*"))) < int(sys.argv[3]):  # start together
        time.sleep(0.02)
    model = build_with("tiny-llama", HalveRecipe())
    print(json.dumps({"weights": model.provenance["weights_sha256"], "source": model.provenance["source"]}))
''')


def _spawn(script: str, *args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_four_concurrent_builders_give_one_build_and_three_reuses(fresh_cache, tmp_path):
    env = {**os.environ, "DEPTHLENS_CACHE": str(fresh_cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [_spawn(_BUILDER, tmp_path, i, 4, env=env) for i in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # one build ...
    assert len({r["weights"] for r in results}) == 1                # ... and the same model everywhere
    assert check(Path(results[0]["source"])) is None


_WRITER = textwrap.dedent('''
    import sys
    import torch
    from depthlens.models.checkpoint import save_checkpoint
    from depthlens.models.tiny import tiny_llama

    model, tok, prov = tiny_llama()
    for step in range(2):
        with torch.no_grad():
            model.model.norm.weight.fill_(float(sys.argv[2]) + step)
        save_checkpoint(model, tok, sys.argv[1], {"writer": sys.argv[2], "step": step})
''')

_READER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from depthlens.infra.cache import check
    from depthlens.infra.cache import MANIFEST, MISSING
    path, stop, seen, missing = Path(sys.argv[1]), Path(sys.argv[2]), 0, 0
    while not stop.exists():
        try:
            problem = check(path, deep=False)
        except OSError:  # a file vanished under the check: the entry was not there whole
            problem = MISSING
        seen += 1
        missing += problem in (MISSING, MANIFEST)
        time.sleep(0.001)  # look often, but leave the writers a CPU
    print(seen, missing)
''')


def test_concurrent_checkpoint_writers_never_leave_readers_without_an_entry(tiny, tmp_path):
    target = tiny.save(tmp_path / "ckpt")  # readers start from an existing checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    reader = _spawn(_READER, target, tmp_path / "stop", env=env)
    writers = [_spawn(_WRITER, target, i, env=env) for i in range(4)]
    outs = [w.communicate(timeout=600) for w in writers]
    (tmp_path / "stop").touch()
    seen, missing = map(int, reader.communicate(timeout=60)[0].split())
    for w, (_, err) in zip(writers, outs):
        assert w.returncode == 0, err[-2000:]  # no ENOTEMPTY, no error of any kind
    assert seen > 0 and missing == 0
    assert check(target, deep=True) is None
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    saved = json.loads((target / "depthlens.json").read_text())
    assert saved["step"] == 1  # the last save of one of the writers, whole


@pytest.mark.slow
def test_the_default_model_with_zeroed_weights_is_rebuilt_never_loaded(fresh_cache, caplog):
    """Issue: 64 KiB of the de-quantized default zeroed used to load and move every log-prob."""
    from depthlens.runtime.forward import last_logprobs
    from depthlens.models import load_model

    first = load_model("smollm2-135m-instruct", device="cpu")
    seqs = [[1, 504, 3458, 314, 260, 3575, 282, 4649, 47]]
    clean = last_logprobs(first, seqs)
    (entry,) = (fresh_cache / "models").glob("smollm2-135m-instruct-*")
    weights = entry / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-64 * 1024:] = bytes(64 * 1024)
    weights.write_bytes(bytes(raw))
    assert check(entry) == "model.safetensors"
    with caplog.at_level("WARNING", logger="depthlens.infra.cache"):
        again = load_model("smollm2-135m-instruct", device="cpu")
    assert "is damaged (model.safetensors); rebuilding it" in caplog.text
    assert check(entry) is None
    torch.testing.assert_close(last_logprobs(again, seqs), clean, rtol=0, atol=0)
