"""Each analysis runs end to end with --quick on tiny-llama and writes a readable record."""

from __future__ import annotations

import pytest

from depthlens.results import read_run


def test_evaluate_quick(tmp_path, capsys):
    from analyses.evaluate import auroc, main

    path = main(["--model", "tiny-llama", "--quick", "--out", str(tmp_path)])
    rec = read_run(path)
    m = rec.metrics
    for key in ("harmful_refusal", "harmless_refusal", "borderline_refusal", "asr", "refusal_score_auroc", "harmless_ce"):
        assert key in m
    assert 0.0 <= m["harmful_refusal"] <= 1.0 and m["harmless_ce"] > 0
    assert m["judge"] == "substring-v1"
    assert {r["set"] for r in rec.tables["by_set"]} == {"harmful", "harmless", "borderline"}
    assert "results:" in capsys.readouterr().out
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0], [1]) == 0.0 and auroc([1], [1]) == 0.5


def test_cli_help_lists_every_default(capsys):
    from analyses.evaluate import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--max-new-tokens" in out and "(default: 64)" in out and "--quick" in out
