"""``python -m figures --gallery``: the README gallery is rebuilt from the records kept beside it.

Records come from real --quick runs on tiny-llama; only their results.json files go into the
gallery's results folder, as the lead's organism records will.
"""

from __future__ import annotations

import shutil

import pytest

from figures.__main__ import GALLERY, GALLERY_RESULTS, main
from figures.save import static_export_unavailable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gallery_results(tmp_path_factory):
    """A gallery results folder holding only the results.json of quick evaluate and token_depth runs."""
    from analyses.evaluate import main as evaluate
    from analyses.token_depth import main as token_depth

    runs = tmp_path_factory.mktemp("runs")
    paths = [evaluate(["--model", "tiny-llama", "--quick", "--out", str(runs)]),
             token_depth(["--model", "tiny-llama", "--base", "tiny-llama", "--quick", "--out", str(runs)])]
    results = tmp_path_factory.mktemp("gallery") / "results"
    for path in paths:
        rel = path.relative_to(runs)              # <analysis>/<model-tag>/<run-id>/results.json
        (results / rel).parent.mkdir(parents=True)
        shutil.copyfile(path, results / rel)
    return results


@pytest.mark.skipif(static_export_unavailable() is not None, reason=f"no PNG export: {static_export_unavailable()}")
def test_gallery_rebuilds_every_png_from_the_records_and_nothing_else(gallery_results, capsys):
    gallery = gallery_results.parent
    stale = gallery / "tiny-llama" / "token_depth_old.png"
    stale.parent.mkdir()
    stale.write_bytes(PNG_MAGIC)

    assert main(["--gallery", "--results", str(gallery_results), "--out", str(gallery)]) == 1  # the stale one fails it
    out = capsys.readouterr().out
    made = {p.relative_to(gallery).as_posix() for p in gallery.rglob("*.png") if gallery_results not in p.parents}
    assert made == {"tiny-llama/evaluate_refusal.png", "tiny-llama/token_depth_kl.png",
                    "tiny-llama/token_depth_prefill.png", "tiny-llama/token_depth_old.png"}
    for rel in made - {"tiny-llama/token_depth_old.png"}:
        assert (gallery / rel).read_bytes().startswith(PNG_MAGIC) and (gallery / rel).stat().st_size > 10_000
    # PNG only: no HTML, JSON or plotly.js beside the pictures; the records are untouched
    assert not [p for p in gallery.rglob("*") if p.suffix in {".html", ".json", ".js"} and gallery_results not in p.parents]
    assert sorted(p.name for p in gallery_results.rglob("*") if p.is_file()) == ["results.json", "results.json"]
    assert "3 figure(s) written" in out and "not rebuilt" in out and str(stale) in out

    stale.unlink()
    assert main(["--gallery", "--results", str(gallery_results), "--out", str(gallery)]) == 0
    assert "not rebuilt" not in capsys.readouterr().out


def test_gallery_without_png_export_fails(gallery_results, tmp_path, monkeypatch, capsys):
    import figures.save as save_mod

    monkeypatch.setattr(save_mod, "static_export_unavailable", lambda: "no browser here")
    monkeypatch.setattr(save_mod, "_browser_missing", None)
    assert main(["--gallery", "--results", str(gallery_results), "--out", str(tmp_path / "g")]) == 1
    assert "static formats not written: no browser here" in capsys.readouterr().out
    assert not list((tmp_path / "g").rglob("*.*"))


def test_gallery_defaults_and_refused_flags(capsys):
    assert (GALLERY, GALLERY_RESULTS) == (GALLERY, GALLERY / "results") and GALLERY.as_posix() == "docs/gallery"
    with pytest.raises(SystemExit) as err:
        main(["--gallery", "--formats", "pdf"])
    assert err.value.code == 2 and "--gallery writes PNGs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--gallery", "--all"])
    assert "drop --all" in capsys.readouterr().err
