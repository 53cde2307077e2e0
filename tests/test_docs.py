"""The docs' code runs: the analysis skeleton of docs/extending.md works as written on tiny-llama."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _snippet(doc: str, section: str) -> str:
    text = (ROOT / doc).read_text()
    m = re.search(rf"## {re.escape(section)}.*?```python\n(.*?)```", text, re.S)
    assert m, f"no python block under '## {section}' in {doc}"
    return m.group(1)


@pytest.fixture
def my_analysis(tmp_path):
    path = tmp_path / "my_analysis.py"
    path.write_text(_snippet("docs/extending.md", "Adding an analysis"))
    spec = importlib.util.spec_from_file_location("my_analysis", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_analysis_skeleton_of_extending_md_runs_and_writes_its_record(my_analysis, tmp_path):
    out = my_analysis.main(["--model", "tiny-llama", "--quick", "--out", str(tmp_path / "res")])
    rec = json.loads(Path(out).read_text())
    assert rec["analysis"] == "my_analysis" and rec["model"] == "tiny-llama"
    assert rec["config"]["n_prompts"] == 8                      # --quick applied
    assert len(rec["tables"]["scores"]) == 8
    assert rec["metrics"]["mean_score"] == pytest.approx(
        sum(r["refusal_score"] for r in rec["tables"]["scores"]) / 8, abs=1e-5)


def test_the_analysis_skeleton_refuses_a_bad_flag_with_one_line(my_analysis, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        my_analysis.main(["--model", "tiny-llama", "--n-prompts", "0", "--out", str(tmp_path / "res")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: --n-prompts must be an integer >= 1" in err and "Traceback" not in err
