"""Smoke test of benchmarks/bench_train_memory.py on tiny-llama (the organism's numbers are in docs/scaling.md)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train_memory.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_train_memory", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_prints_every_method_per_parameter_and_against_inference(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "mem.json"
    res = bench.main(["--model", "tiny-llama", "--batch-size", "4", "--seq-len", "64", "--response-len", "16",
                      "--micro-batch-size", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(inference|adamw-ckpt|adamw|lora8|lora16|qlora16|mezo)\s+([\d.]+)\s", printed, re.M)}
    assert set(rows) == set(bench.OPS) and all(v > 0 for v in rows.values())
    for op in ("mezo", "lora8", "lora16"):
        assert re.search(rf"^{op}_vs_inference: [\d.]+ +\(target <= 1\.[26]: (met|NOT met)\)", printed, re.M)
    assert re.search(r"^adamw_vs_inference: [\d.]+ +\(as measured\)", printed, re.M)
    runs = json.loads(out.read_text())["runs"]
    assert res["ratios"]["adamw"] == runs["adamw"]["total_bytes"] / runs["inference"]["total_bytes"]
    n = runs["inference"]["n_params"]
    assert all(r["n_params"] == n and abs(r["bytes_per_param"] * n - r["total_bytes"]) < 1 for r in runs.values())
    # what each step trains: LoRA r=16 twice r=8's adapters, far fewer than full fine-tuning's weights
    assert runs["lora16"]["trained_weights"] == 2 * runs["lora8"]["trained_weights"] > 0
    assert runs["adamw"]["trained_weights"] == runs["mezo"]["trained_weights"] > runs["lora16"]["trained_weights"]
    # an AdamW step holds gradients and two moments on top of a forward: it must cost more than inference
    assert runs["adamw"]["total_bytes"] > runs["inference"]["total_bytes"]
    assert runs["adamw-ckpt"]["trained_weights"] == runs["adamw"]["trained_weights"]
    assert runs["qlora16"]["trained_weights"] == runs["lora16"]["trained_weights"]
    assert re.search(r"^adamw-ckpt_vs_adamw: [\d.]+$", printed, re.M) and re.search(r"^qlora16_vs_lora16: [\d.]+$", printed, re.M)
