"""Smoke test of benchmarks/bench_zo_memory.py on tiny-llama (the real default is the lead's run)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_zo_memory.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_zo_memory", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_prints_the_three_peaks_and_both_ratios(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "mem.json"
    res = bench.main(["--model", "tiny-llama", "--batch-size", "4", "--seq-len", "64", "--response-len", "16",
                      "--json", str(out)])
    printed = capsys.readouterr().out
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(inference|zo|adamw)\s+([\d.]+)\s", printed, re.M)}
    assert set(rows) == {"inference", "zo", "adamw"} and all(v > 0 for v in rows.values())
    assert re.search(r"^zo_vs_inference: [\d.]+ +\(target <= 1.2: (met|NOT met)\)", printed, re.M)
    assert re.search(r"^adamw_vs_inference: [\d.]+ +\(target >= 2.5: (met|NOT met)\)", printed, re.M)
    saved = json.loads(out.read_text())
    assert set(saved["runs"]) == {"inference", "zo", "adamw"} and saved["ratios"] == res["ratios"]
    runs = saved["runs"]
    assert runs["zo"]["n_params_family"] == runs["adamw"]["n_params_family"] == 73_728  # 2 blocks' matrices
    assert all(r["model"] == "tiny-llama" and r["increase_bytes"] >= 0 for r in runs.values())
    # an AdamW step holds gradients and two moments on top of a forward: it must cost more than a ZO step
    assert runs["adamw"]["total_bytes"] > runs["zo"]["total_bytes"]


def test_bench_measures_the_recipes_noise_suite_step_with_its_cached_residuals(tmp_path, capsys):
    bench = _load()
    res = bench.main(["--model", "tiny-llama", "--batch-size", "4", "--seq-len", "64", "--response-len", "16",
                      "--objective", "suite", "--params", "lora", "--layers", "1", "--utility-batches", "3"])
    printed = capsys.readouterr().out
    zo = res["runs"]["zo"]
    assert zo["objective"] == "suite" and res["runs"]["inference"]["cached_residual_bytes"] == 0
    # the residual entering block 1 (d_model 64, fp32) of the safety batch and of 3 utility batches of 4 x 64 tokens
    assert zo["cached_residual_bytes"] == (1 + 3) * 4 * 64 * 64 * 4
    # rank-8 adapters on block 1's seven maps: far fewer weights than the block's matrices
    assert 0 < zo["n_params_family"] < 73_728 // 2
    assert "cached residuals held" in printed and re.search(r"^zo_vs_inference: [\d.]+", printed, re.M)
    with __import__("pytest").raises(SystemExit):
        bench.main(["--model", "tiny-llama", "--objective", "suite", "--utility-batches", "0"])
