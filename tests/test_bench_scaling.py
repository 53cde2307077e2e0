"""benchmarks/bench_scaling.py on two small shapes (the real-shape table is in docs/scaling.md)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scaling.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_scaling", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_fit_recovers_a_planted_power_law_and_projects_along_it():
    bench = _load()
    pts = [(p, 3.0 * p ** 0.7) for p in (1e8, 3e8, 5e8, 1.2e9)]
    assert bench.fit_exponent(pts) == pytest.approx(0.7, abs=1e-9)
    assert bench.project(pts, 8e9) == pytest.approx(3.0 * 8e9 ** 0.7, rel=1e-9)
    assert bench.fit_exponent(pts[:1]) is None


def test_the_real_shapes_have_their_published_parameter_counts():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    bench = _load()
    published = {"smollm2-135m": 134.5e6, "smollm2-360m": 361.8e6, "qwen2.5-0.5b": 494.0e6, "llama-3.2-1b": 1235.8e6}
    for name, n in published.items():
        cfg = dict(bench.SHAPES[name])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        assert count == pytest.approx(n, rel=0.01), name


def test_each_cell_runs_in_its_own_process_and_a_failing_cell_is_reported(tmp_path, capsys):
    bench = _load()
    res = bench.main(["--shapes", "tiny,tiny2", "--workloads", "forward,mezo", "--json", str(tmp_path / "r.json")])
    cells = res["cells"]
    assert set(cells) == {"tiny:forward", "tiny:mezo", "tiny2:forward", "tiny2:mezo"}
    assert all(c["seconds"] > 0 and c["peak_bytes"] > 0 for c in cells.values())
    assert cells["tiny2:forward"]["n_params"] > cells["tiny:forward"]["n_params"]
    for w in ("forward", "mezo"):
        pts = [(cells[f"{s}:{w}"]["n_params"], cells[f"{s}:{w}"]["seconds"]) for s in ("tiny", "tiny2")]
        slope = math.log(pts[1][1] / pts[0][1]) / math.log(pts[1][0] / pts[0][0])
        assert res["fits"][w]["time_exponent"] == pytest.approx(slope)
    assert "| time exponent |" in capsys.readouterr().out
    failed = bench.main(["--shapes", "tiny", "--workloads", "forward", "--timeout", "0.01"])
    assert failed["cells"]["tiny:forward"]["failed"].startswith("over the")
    assert failed["fits"]["forward"]["time_exponent"] is None
