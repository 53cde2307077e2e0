"""figures: plot builders, saving (HTML/JSON always, static where Chromium exists), registry, CLI."""

from __future__ import annotations

import json
import re
import logging
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

import figures.save as save_mod
from figures import plots, theme
from figures.registry import build_figures, load_builders, load_record, register
from figures.save import save_figure, static_export_unavailable

HAS_STATIC = static_export_unavailable() is None


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch):
    """Each test sees a process that has not warned yet (the warning is once per process)."""
    monkeypatch.setattr(save_mod, "_warned", False)
    monkeypatch.setattr(save_mod, "_browser_missing", None)


@pytest.fixture
def registry(monkeypatch):
    """An isolated registry: toy builders registered in a test do not leak.

    The real builder modules are imported first, so they register into the real registry
    (a module imported while the temporary one is in place would never register again).
    """
    import figures.registry as reg

    load_builders()
    monkeypatch.setattr(reg, "_REGISTRY", {})
    return reg._REGISTRY


# --- Theme -------------------------------------------------------------------------------
def test_theme_sizes_and_fonts():
    assert theme.PNG_SCALE * theme.PX_PER_IN >= 300
    fig = theme.apply_theme(go.Figure(), width="single")
    assert fig.layout.width == round(3.3 * theme.PX_PER_IN)
    assert theme.apply_theme(go.Figure(), width="double").layout.width == round(6.9 * theme.PX_PER_IN)
    tpl = theme.pio.templates["depthlens"].layout
    assert "serif" in tpl.font.family
    # No text below 8 pt at print size.
    for size in (tpl.font.size, tpl.xaxis.tickfont.size, tpl.legend.font.size):
        assert size * 72 / theme.PX_PER_IN >= 8 - 1e-9
    assert tpl.colorway[0] == "#0072B2"  # Okabe–Ito
    with pytest.raises(ValueError, match="column width"):
        theme.figure_size("triple")


# --- Plot builders -----------------------------------------------------------------------
def test_line_with_band_has_bands_and_means():
    x = [0, 1, 2]
    fig = plots.line_with_band(x, {"a": ([1, 2, 3], [0.5, 1.5, 2.5], [1.5, 2.5, 3.5]),
                                   "b": (np.array([3.0, 2, 1]), None, None)}, "pos", "KL")
    assert isinstance(fig, go.Figure)
    filled = [t for t in fig.data if t.fill == "tonexty"]
    assert len(filled) == 1 and list(filled[0].y) == [0.5, 1.5, 2.5]
    means = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in means] == ["a", "b"] and list(means[1].y) == [3.0, 2.0, 1.0]
    assert fig.layout.template.layout.font.family == theme.FONT_FAMILY
    with pytest.raises(ValueError, match="x has 3"):
        plots.line_with_band(x, {"bad": ([1, 2], None, None)}, "pos", "KL")


def test_lines_one_trace_per_series():
    fig = plots.lines([1, 2, 4], {"m1": [0.1, 0.2, 0.3], "m2": [0.0, 0.1, 0.4]}, "k", "ASR", log_x=True)
    assert [t.name for t in fig.data] == ["m1", "m2"]
    assert fig.data[0].line.color != fig.data[1].line.color
    assert fig.layout.xaxis.type == "log"


def test_heatmap_z_and_diverging_scale():
    z = [[1.0, -2.0, 0.5], [0.0, float("nan"), 3.0]]
    fig = plots.heatmap(z, ["a", "b", "c"], ["r0", "r1"], "col", "row", "Δ", zmid=0)
    hm = fig.data[0]
    assert [list(r) for r in hm.z] == [[1.0, -2.0, 0.5], [0.0, None, 3.0]]
    assert hm.zmid == 0 and hm.zmin == -3.0 and hm.zmax == 3.0
    assert hm.texttemplate == "%{z:.2f}"
    seq = plots.heatmap(np.ones((2, 3)), [1, 2, 3], [1, 2], "c", "r", "v", text_fmt=None)
    assert seq.data[0].zmid is None and seq.data[0].texttemplate is None
    with pytest.raises(ValueError, match="len\\(y_labels\\)"):
        plots.heatmap(z, ["a", "b"], ["r0", "r1"], "col", "row", "Δ")


def test_ranked_bars_sorted_descending_with_errors():
    fig = plots.ranked_bars(["a", "b", "c", "d"], [0.2, 0.9, 0.5, 0.1], lo=[0.1, 0.8, 0.4, 0.0],
                            hi=[0.3, 1.0, 0.7, 0.2], xlabel="score", top_k=3)
    bar = fig.data[0]
    assert list(bar.y) == ["b", "c", "a"] and list(bar.x) == [0.9, 0.5, 0.2]
    assert np.allclose(bar.error_x.array, [0.1, 0.2, 0.1]) and np.allclose(bar.error_x.arrayminus, [0.1, 0.1, 0.1])
    assert bar.orientation == "h" and fig.layout.yaxis.autorange == "reversed"


def test_grouped_bars_and_small_multiples():
    fig = plots.grouped_bars(["harmful", "harmless"], {"before": [0.8, 0.1], "after": [0.3, 0.1]},
                             errors={"before": ([0.7, 0.05], [0.9, 0.15])})
    assert [t.name for t in fig.data] == ["before", "after"] and fig.layout.barmode == "group"
    assert fig.data[0].error_y.array is not None and fig.data[1].error_y.array is None

    x = list(range(4))
    panels = {"KL": {"pos 0": ([1, 2, 3, 4], [0, 1, 2, 3], [2, 3, 4, 5]), "pos 1": [1, 1, 1, 1]},
              "probe": {"pos 0": [0.5, 0.6, 0.7, 0.8], "pos 1": [0.5, 0.5, 0.6, 0.6]},
              "proj": {"pos 0": [0, 1, 0, 1], "pos 1": [1, 0, 1, 0]}}
    sm = plots.small_multiples(x, panels, "layer", "score")
    assert [a.text for a in sm.layout.annotations] == ["KL", "probe", "proj"]
    legend = [t.name for t in sm.data if t.showlegend is not False]
    assert legend == ["pos 0", "pos 1"]  # each series once in the legend
    pos0 = {t.line.color for t in sm.data if t.name == "pos 0"}
    assert len(pos0) == 1  # one colour across panels
    assert sum(t.fill == "tonexty" for t in sm.data) == 1


# --- Saving ------------------------------------------------------------------------------
def _small_fig() -> go.Figure:
    return plots.lines([1, 2, 3], {"a": [0.1, 0.5, float("nan")]}, "k", "ASR")


def test_save_html_and_data_json(tmp_path):
    saved = save_figure(_small_fig(), tmp_path / "sub" / "asr", formats=())
    html = (tmp_path / "sub" / "asr.html").read_text()
    assert 'class="plotly-graph-div"' in html
    assert not re.search(r'<script[^>]*src="https?://', html)  # plotly.js embedded: works offline
    data = json.loads((tmp_path / "sub" / "asr.json").read_text())
    assert data["traces"][0]["x"] == [1, 2, 3] and data["traces"][0]["y"] == [0.1, 0.5, None]
    assert saved.files == [tmp_path / "sub" / "asr.html", tmp_path / "sub" / "asr.json"]
    assert not list((tmp_path / "sub").glob(".*tmp"))  # no temp files left behind

    save_figure(_small_fig(), tmp_path / "given", data={"k": np.arange(3), "v": np.float32(0.5)}, formats=())
    assert json.loads((tmp_path / "given.json").read_text()) == {"k": [0, 1, 2], "v": 0.5}
    with pytest.raises(ValueError, match="Unknown figure format"):
        save_figure(_small_fig(), tmp_path / "x", formats=("gif",))


@pytest.mark.skipif(not HAS_STATIC, reason=f"static export unavailable: {static_export_unavailable()}")
def test_save_static_formats(tmp_path):
    saved = save_figure(_small_fig(), tmp_path / "asr")
    assert saved.warning is None and saved.formats == ["html", "json", "png", "pdf", "svg"]
    png = (tmp_path / "asr.png").read_bytes()
    assert png.startswith(b"\x89PNG") and b"pHYs" in png[:64]  # 300 dpi recorded
    assert (tmp_path / "asr.pdf").read_bytes().startswith(b"%PDF")
    assert "<svg" in (tmp_path / "asr.svg").read_text()


def test_failed_static_export_warns_once_and_keeps_html(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(save_mod, "static_export_unavailable", lambda: None)

    def boom(jobs):
        raise RuntimeError("browser exploded")

    monkeypatch.setattr(save_mod, "_render_static", boom)
    with caplog.at_level(logging.DEBUG, logger="figures.save"):
        first = save_figure(_small_fig(), tmp_path / "a")
        second = save_figure(_small_fig(), tmp_path / "b")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "apt-get install -y chromium" in warnings[0].getMessage()
    for s, stem in ((first, "a"), (second, "b")):
        assert s.formats == ["html", "json"] and s.skipped_formats == ["png", "pdf", "svg"]
        assert "browser exploded" in s.warning
        assert (tmp_path / f"{stem}.html").exists() and (tmp_path / f"{stem}.json").exists()
        assert not (tmp_path / f"{stem}.png").exists()


def test_missing_browser_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(save_mod, "find_browser", lambda: None)
    with caplog.at_level(logging.WARNING, logger="figures.save"):
        for stem in ("a", "b", "c"):
            assert save_figure(_small_fig(), tmp_path / stem).formats == ["html", "json"]
    assert len(caplog.records) == 1 and "no Chromium found" in caplog.records[0].getMessage()


# --- Registry and CLI --------------------------------------------------------------------
def _record(analysis: str, run_id: str, model: str = "tiny-llama", **extra) -> dict:
    rec = dict(schema_version=1, analysis=analysis, run_id=run_id, model=model, provenance={}, config={},
               seed=0, timings={}, versions={}, git_commit=None, created="2026-01-01T00:00:00",
               metrics={"asr": 0.5}, tables={"curve": [{"k": 1, "asr": 0.1}, {"k": 2, "asr": 0.4}]})
    rec.update(extra)
    return rec


def _write(root: Path, rec: dict) -> Path:
    path = root / rec["analysis"] / rec["model"] / rec["run_id"] / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    return path


def _toy_builder(record: dict) -> dict[str, go.Figure]:
    rows = record["tables"]["curve"]
    return {"curve": plots.lines([r["k"] for r in rows], {record["run_id"]: [r["asr"] for r in rows]}, "k", "ASR")}


def test_build_figures_and_unknown_analysis(tmp_path, registry):
    register("toy")(_toy_builder)
    saved = build_figures(_record("toy", "r1"), tmp_path, formats=())
    assert [s.stem for s in saved] == [tmp_path / "toy_curve"]
    assert (tmp_path / "toy_curve.html").exists()
    assert build_figures(_record("nobody_draws_this", "r1"), tmp_path) == []


def test_cli_builds_newest_run_and_reports_skips(tmp_path, registry, capsys):
    register("toy")(_toy_builder)
    seen_combined = []

    @register("toy", combine=True)
    def _all_models(records):
        seen_combined.extend(r["model"] for r in records)
        return {"all": plots.lines([1], {r["model"]: [r["metrics"]["asr"]] for r in records}, "k", "ASR")}

    res, out = tmp_path / "results", tmp_path / "out"
    _write(res, _record("toy", "20260101-000000-aaaa"))
    _write(res, _record("toy", "20260102-000000-bbbb"))
    _write(res, _record("toy", "20260101-000000-cccc", model="other-model"))
    _write(res, _record("mystery", "20260101-000000-dddd"))

    from figures.__main__ import main

    assert main(["--results", str(res), "--out", str(out), "--formats", "none"]) == 0
    text = capsys.readouterr().out
    data = json.loads((out / "tiny-llama" / "toy_curve.json").read_text())
    assert data["traces"][0]["name"] == "20260102-000000-bbbb"  # the newest run only
    assert (out / "other-model" / "toy_curve.html").exists()
    assert sorted(seen_combined) == ["other-model", "tiny-llama"] and (out / "toy_all.html").exists()
    assert "toy_curve" in text and "'mystery'" in text and "no figure builder registered" in text

    assert main(["--results", str(res), "--out", str(out / "every"), "--formats", "none", "--all"]) == 0
    assert len(list((out / "every" / "tiny-llama").glob("*/toy_curve.html"))) == 2


def test_other_schema_version_is_refused(tmp_path, registry, capsys):
    path = _write(tmp_path / "results", _record("toy", "r1", schema_version=2))
    with pytest.raises(ValueError, match="schema_version 2.*reads only schema_version 1"):
        load_record(path)
    bad_json = tmp_path / "broken" / "results.json"
    bad_json.parent.mkdir()
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_record(bad_json)

    from figures.__main__ import main

    register("toy")(_toy_builder)
    assert main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out"), "--formats", "none"]) == 1
    assert "reads only schema_version 1" in capsys.readouterr().out


# --- Builders of the analyses: scales, intervals, judges and splits ------------------------
def test_heatmap_rows_gives_each_row_its_own_colour_scale():
    rows = {"small": [0.1, -0.4, 0.2], "large": [12.0, 3.0, -1.0], "tiny": [0.01, None, 0.03]}
    fig = plots.heatmap_rows(rows, [0, 1, 2], "layer", "S", zmid=0.0,
                             intervals={"small": ([0.0, -0.6, 0.1], [0.2, -0.2, 0.3])})
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heat) == 3 and [t.coloraxis for t in heat] == ["coloraxis", "coloraxis2", "coloraxis3"]
    axes = [fig.layout.coloraxis, fig.layout.coloraxis2, fig.layout.coloraxis3]
    # each scale spans its own row symmetrically about 0: the small rows are not a blank band
    assert [(a.cmin, a.cmax) for a in axes] == [(-0.4, 0.4), (-12.0, 12.0), (-0.03, 0.03)]
    assert all(a.cmid == 0.0 for a in axes)
    assert [a.text for a in fig.layout.annotations] == ["small", "large", "tiny"]
    # one colour bar beside each panel, inside that panel's vertical extent
    for i, a in enumerate(axes):
        y0, y1 = fig.layout[f"yaxis{i + 1 if i else ''}"].domain
        assert y0 < a.colorbar.y < y1
    assert len({a.colorbar.y for a in axes}) == 3
    assert list(heat[1].z[0]) == [12.0, 3.0, -1.0] and heat[2].z[0][1] is None
    assert [list(c) for c in heat[0].customdata[0]] == [[0.0, 0.2], [-0.6, -0.2], [0.1, 0.3]]
    assert heat[1].customdata is None
    with pytest.raises(ValueError, match="3 x labels"):
        plots.heatmap_rows({"bad": [1.0, 2.0]}, [0, 1, 2], "layer", "S")


def _sensitivity_record(n_layers: int = 30) -> dict:
    """A layer_sensitivity record whose kinds differ in scale as on the organism (act ≫ param, int4)."""
    scale = {"param_noise": (0.3, 0.9), "act_noise": (0.5, 14.0), "int4": (0.0, 1.1)}
    rows = []
    for kind, (sigma, top) in scale.items():
        for layer in range(n_layers):
            s = top * ((layer * 7 + len(kind)) % n_layers) / (n_layers - 1)
            rows.append(dict(layer=layer, kind=kind, sigma=sigma, sensitivity=s, lo=s - 0.1 * top, hi=s + 0.1 * top))
    whole = [dict(layer="all", kind=k, sigma=sig, sensitivity=10 * top, lo=0.0, hi=0.0) for k, (sig, top) in scale.items()]
    from analyses.layer_sensitivity import rank_layers

    return _record("layer_sensitivity", "r1", tables={"sensitivity": rows, "whole_model": whole,
                                                      "ranking": rank_layers(rows, list(range(n_layers)))},
                   metrics={"n_harmful": 16, "critical_layers": []})


def test_layer_sensitivity_heatmap_one_panel_and_scale_per_kind():
    from figures.builders.core import layer_sensitivity_figures

    figs = layer_sensitivity_figures(_sensitivity_record())
    heat = figs["heatmap"]
    strips = [t for t in heat.data if isinstance(t, go.Heatmap)]
    assert len(strips) == 3 and len({t.coloraxis for t in strips}) == 3
    for trace in strips:
        axis = heat.layout[trace.coloraxis]
        top = max(abs(v) for v in trace.z[0])
        assert axis.cmax == pytest.approx(top)  # the row's largest cell reaches the end of its own scale
        assert len(trace.z[0]) == 30 and trace.customdata is not None  # intervals in the hover text
    titles = [a.text for a in heat.layout.annotations]
    assert titles[0].startswith("parameter noise") and "σ = 0.3" in titles[0]
    assert titles[1].startswith("activation noise") and "σ = 0.5" in titles[1]
    assert titles[2].startswith("int4") and "whole model: 11.00" in titles[2]
    assert "docs/methods.md §5" in heat.layout.title.text and "16 harmful val prompts" in heat.layout.title.text
    # a ranked bar chart with 95% intervals for every kind, not only the first
    for kind in ("param_noise", "act_noise", "int4"):
        bar = figs[f"ranked_{kind}"].data[0]
        assert bar.error_x.array is not None and len(bar.y) == 15
        assert list(bar.x) == sorted(bar.x, reverse=True)
    assert figs["ranking"].data[0].error_x.array is None  # a record without the ranking bootstrap: no invented bars


def test_layer_sensitivity_ranking_shows_score_intervals_and_top_k_probability():
    from figures.builders.core import layer_sensitivity_figures

    rec = _sensitivity_record(6)
    rec["config"]["top_k"] = 2
    for i, r in enumerate(rec["tables"]["ranking"]):
        r.update(score_lo=r["score"] - 0.1, score_hi=r["score"] + 0.05, p_top_k=[0.97, 0.6, 0.3, 0.1, 0.03, 0.0][i])
    bar = layer_sensitivity_figures(rec)["ranking"].data[0]
    top = rec["tables"]["ranking"][0]
    assert bar.y[0] == f"layer {top['layer']} · P(top 2) 0.97"
    assert list(bar.error_x.array)[0] == pytest.approx(0.05) and list(bar.error_x.arrayminus)[0] == pytest.approx(0.1)


def _rate_row(key: dict, n: int, **rates: int) -> dict:
    from depthlens.stats import wilson_interval

    row = dict(key, n=n)
    for name, k in rates.items():
        lo, hi = wilson_interval(k, n)
        row.update({name: k / n, f"{name}_lo": lo, f"{name}_hi": hi})
    return row


def test_token_depth_prefill_curves_carry_intervals_and_name_judges_and_split():
    from figures.builders.core import token_depth_figures

    prefill = [_rate_row({"k": k}, 48, asr=a, harmful=h, recovered=48 - h - 2)
               for k, a, h in ((0, 5, 3), (5, 39, 30), (10, 43, 35))]
    kl = [{"set": s, "position": p, "kl": 1.0 / p, "lo": 0.5 / p, "hi": 1.5 / p, "n": 8}
          for s in ("harmful", "harmless") for p in (1, 2, 3)]
    trials = [{"judge": "substring-v1", "continuation_judge": "substring+topic-overlap-v1"}]
    rec = _record("token_depth", "r1", config={"split": "test"}, tables={"prefill": prefill, "kl": kl, "trials": trials})
    figs = token_depth_figures(rec)
    pre = figs["prefill"]
    bands = [t for t in pre.data if t.fill == "tonexty"]
    assert len(bands) == 3
    assert list(bands[0].y) == [r["asr_lo"] for r in prefill]  # the record's own intervals, not recomputed
    names = [t.name for t in pre.data if t.showlegend is not False]
    assert "substring-v1" in names[0] and names[0].startswith("ASR")
    assert all("substring+topic-overlap-v1" in n for n in names[1:])
    assert "HarmBench test" in pre.layout.yaxis.title.text
    assert sum(t.fill == "tonexty" for t in figs["kl"].data) == 2
    assert "HarmBench test" in " ".join(t.name for t in figs["kl"].data)

    val = token_depth_figures(_record("token_depth", "r2", config={"split": "val"},
                                      tables={"prefill": prefill, "kl": kl, "trials": trials}))
    assert "DoNotAnswer val" in val["prefill"].layout.yaxis.title.text


def test_insertion_figures_depth_curves_with_intervals_and_judge():
    from figures.builders.core import insertion_figures

    cells = [_rate_row({"depth": d, "span_len": m}, 16, harmful=h, recovered=16 - h)
             for m in (2, 8) for d, h in ((0.0, 13), (0.5, 6), (1.0, 10))]
    trials = [{"judge": "substring-v1", "continuation_judge": "substring+topic-overlap-v1"}]
    figs = insertion_figures(_record("insertion_robustness", "r1", tables={"by_depth_and_length": cells,
                                                                           "trials": trials}))
    depth = figs["depth"]
    assert [a.text for a in depth.layout.annotations] == ["span length m = 2", "span length m = 8"]
    bands = [t for t in depth.data if t.fill == "tonexty"]
    assert len(bands) == 2 and list(bands[0].y) == [c["harmful_lo"] for c in cells[:3]]
    assert "harmful continuation" in depth.layout.yaxis.title.text
    heat = figs["heatmap"]
    assert "substring+topic-overlap-v1" in heat.data[0].colorbar.title.text
    assert "HarmBench test" in heat.layout.title.text and "harmful-continuation" in heat.layout.title.text


def test_compare_labels_name_the_judge_of_every_rate():
    from figures.builders.compare import compare_figures

    measures = [("harmful_refusal", "refusal, harmful test", "higher"), ("asr", "ASR (no prefill)", "lower"),
                ("refusal_score_auroc", "refusal-score AUROC", "higher"), ("prefill_asr_10", "prefill ASR k=10", "lower"),
                ("random_insertion_asr", "random-insertion ASR", "lower"), ("score_int4", "refusal score under int4", "higher")]
    rows = [{"measure": m, "label": l, "better": b, "a": 0.5, "b": 0.2} for m, l, b in measures]
    figs = compare_figures(_record("compare", "r1", tables={"table": rows}, metrics={"models": ["a", "b"]}))
    cats = list(figs["rates"].data[0].x)
    assert cats[0] == "refusal, harmful test (↑)"  # refusal rates: the y-axis names their judge once
    assert "substring judge" in figs["rates"].layout.yaxis.title.text
    assert cats[1] == "ASR (no prefill) [substring judge] (↓)"
    assert cats[2] == "refusal-score AUROC (↑)"  # a score, not a judged rate
    assert cats[3] == "prefill ASR k=10 [substring judge] (↓)"
    assert cats[4] == "random-insertion ASR [harmful-continuation judge] (↓)"
    assert list(figs["scores"].data[0].x) == ["refusal score under int4 (↑)"]
    assert "test" in figs["rates"].layout.title.text


def test_compare_rates_grow_with_the_longest_measure_name():
    from figures.builders.compare import compare_figures

    def height(label):
        rows = [{"measure": "harmful_refusal", "label": label, "better": "higher", "a": 0.5, "b": 0.2}]
        return compare_figures(_record("compare", "r1", tables={"table": rows}, metrics={"models": ["a", "b"]})
                               )["rates"].layout.height

    short, long = height("refusal"), height("random-insertion ASR, harmful continuation, judge-corrected")
    assert long > short  # the upright names get the room they need instead of running off the image


def test_fit_title_breaks_a_long_title_into_lines_that_fit_and_keeps_every_word():
    from figures.theme import TITLE_EM_PER_CHAR, TITLE_PT, fit_title, pt

    long = "Sensitivity to parameter noise, σ·rms(W) with σ = 0.05 (whole model: 0.31)"
    single = fit_title(long, 317)
    lines = single.split("<br>")
    assert len(lines) >= 2
    assert all(len(line) * TITLE_EM_PER_CHAR * pt(TITLE_PT) <= 317 - 8 for line in lines)
    assert " ".join(lines) == long
    assert fit_title("Critical layers", 317) == "Critical layers"
    assert fit_title(long, 662) == long  # a double-column figure holds it on one line
    assert fit_title("a<br>b", 100) == "a<br>b" and fit_title(None, 317) is None


def test_a_ranked_bar_chart_with_a_long_title_puts_it_on_lines_above_the_plot():
    from figures.plots import ranked_bars

    long = "Sensitivity to parameter noise, σ·rms(W) with σ = 0.05 (whole model: 0.31)"
    fig = ranked_bars(["layer 0", "layer 1"], [0.2, 0.1], xlabel="S", title=long)
    assert "<br>" in fig.layout.title.text and fig.layout.title.text.replace("<br>", " ") == long
    assert fig.layout.title.yref == "paper" and fig.layout.title.yanchor == "bottom"  # the margin grows to hold it
    short = ranked_bars(["layer 0"], [0.2], title="Critical layers")
    assert short.layout.title.text == "Critical layers" and short.layout.title.yref is None  # the template's height
    assert fig.layout.title.xref == short.layout.title.xref == "container"
