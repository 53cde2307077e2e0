"""Every name the user docs mention exists: README.md and docs/*.md are checked against the code.

Docs drift silently: a function moves, a flag is renamed, a folder is never created, and the
text still names the old one. This test reads README.md and every docs/*.md and resolves

- each dotted name of the repository's packages (``depthlens.stats.wilson_interval``): the
  longest importable module prefix, then attributes for the rest;
- each ``python -m X`` command: ``X`` is importable, and every ``--flag`` on that command line
  is one of ``X``'s own flags (read from its ``--help``);
- each ``python path/to/script.py`` command: the script exists, and its flags likewise;
- each other ``--flag`` in backticks: some command line of the repository has it;
- each repository path (``depthlens/labels/judge_set.jsonl``, ``docs/methods.md``,
  markdown links): it exists, except paths a run writes (``results/…``, ``figures/out/…``).

and fails with the list of what does not resolve, by file and line.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import runpy
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("depthlens", "probes", "analyses", "finetune", "figures", "benchmarks", "scripts")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# what a run writes, or what lives outside the repository: named in the docs, never committed
GENERATED = ("results/", "figures/out/", "runs/", "~/", "$", "/tmp/", "out/", "gallery/figures/")
# names that are dotted but are not Python objects: the entry-point group the recipes are declared in
NOT_OBJECTS = {"depthlens.recipes"}
# a line that runs another tool: its flags are that tool's
OTHER_TOOLS = re.compile(r"\b(pip|accelerate|torchrun|git|pytest|jupyter|apt-get|heretic)\b")
# flags of other tools that the docs name without the tool on the same line (pip install --no-deps)
OTHER_FLAGS = {"--no-deps"}
# the docs' own examples of a module to be written (``analyses.my_analysis``) and placeholders (``analyses.<name>``)
HYPOTHETICAL = re.compile(r"\.my_\w+|\.<|\.$")
# sections of findings.md that record what was: removed options and scripts, flags of old versions
HISTORY = ("## Recipe-selection history", "## Options removed")

DOTTED = re.compile(r"(?<![\w./-])((?:depthlens|probes|analyses|finetune|figures)(?:\.[A-Za-z_]\w*)+)")
CODE_SPAN = re.compile(r"``?([^`\n]+?)``?")
MODULE_CMD = re.compile(r"python3? -m ([\w.]+)([^\n`|;&]*)")
SCRIPT_CMD = re.compile(r"python3? ((?:scripts|benchmarks)/[\w/]+\.py)([^\n`|;&]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
PATH = re.compile(r"(?<![\w./$~-])((?:depthlens|probes|analyses|finetune|figures|docs|scripts|tests|notebooks|benchmarks|"
                  r"configs)/[\w./*<>{}-]*)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _lines(path: Path):
    """``(line number, text)`` of a markdown file, continuation lines (``\\``) of a command joined."""
    raw = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(raw):
        start, text = i + 1, raw[i]
        while text.rstrip().endswith("\\") and i + 1 < len(raw):
            i += 1
            text = text.rstrip()[:-1] + " " + raw[i].strip()
        yield start, text
        i += 1


@cache
def resolves(dotted: str) -> bool:
    """Whether ``dotted`` names a module of the repository or an attribute reachable from one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        obj = importlib.import_module(name)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@cache
def flags_of(target: str) -> frozenset[str] | None:
    """The flags ``target`` (a module name, or a script path) lists under ``--help``; None if it has no CLI."""
    out = io.StringIO()
    argv = sys.argv
    try:
        sys.argv = [target, "--help"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if target.endswith(".py"):
                runpy.run_path(str(ROOT / target), run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        sys.argv = argv
    text = out.getvalue()
    return frozenset(FLAG.findall(text)) if "usage:" in text else None


def _all_commands() -> list[str]:
    """Every module and script of the repository that has a command line."""
    names = []
    for pkg in ("analyses", "finetune", "probes", "benchmarks", "figures"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if "__main__" in text and path.name != "__init__.py":
                mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                names.append(mod[: -len(".__main__")] if mod.endswith(".__main__") else mod)
    names += ["depthlens.infra.cache", "depthlens.models.recipes"]
    names += [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "scripts").glob("*.py"))]
    return names


@cache
def every_flag() -> frozenset[str]:
    flags: set[str] = set()
    for target in _all_commands():
        flags |= flags_of(target) or set()
    return frozenset(flags)


def _path_exists(rel: str) -> bool:
    rel = rel.rstrip(".,:;)")
    if any(rel.startswith(g) or f"/{g}" in rel for g in GENERATED):
        return True
    if re.search(r"[<>{}]", rel):  # a placeholder: the part before it must exist
        rel = re.split(r"[<>{}]", rel)[0].rsplit("/", 1)[0]
    if "*" in rel:
        return any(ROOT.glob(rel))
    return (ROOT / rel).exists()


def problems_in(path: Path) -> list[str]:
    out = []
    where = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    in_code = history = False
    prev = ""
    for n, line in _lines(path):
        near, prev = prev + " " + line, line  # a tool named on the line before still owns the flags
        if line.startswith("## "):
            history = line.startswith(HISTORY)
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        block = in_code or line.startswith("    ")  # a fenced or an indented code block
        spans = [line] if block else CODE_SPAN.findall(line)
        commanded: set[str] = set()
        for text in spans:
            for mod, rest in MODULE_CMD.findall(text):
                if HYPOTHETICAL.search(mod + (rest[:1] if rest.startswith("<") else "")):
                    commanded.update(FLAG.findall(rest))  # a module still to be written: its flags too
                    continue
                if not resolves(mod) or importlib.util.find_spec(mod) is None:
                    out.append(f"{where}:{n}: `python -m {mod}`: no such module")
                    continue
                flags = flags_of(mod)
                for f in FLAG.findall(rest):
                    commanded.add(f)
                    if flags is None or f not in flags:
                        out.append(f"{where}:{n}: `python -m {mod}` has no flag {f}")
            for script, rest in SCRIPT_CMD.findall(text):
                if not (ROOT / script).exists():
                    out.append(f"{where}:{n}: `python {script}`: no such file")
                    continue
                flags = flags_of(script)
                for f in FLAG.findall(rest):
                    commanded.add(f)
                    if flags is None or f not in flags:
                        out.append(f"{where}:{n}: `python {script}` has no flag {f}")
            for name in DOTTED.findall(text):
                name = name.rstrip(".")
                if name not in NOT_OBJECTS and not HYPOTHETICAL.search(name) and not resolves(name):
                    out.append(f"{where}:{n}: {name} does not resolve")
            for rel in PATH.findall(text) if not history else ():
                if not _path_exists(rel):
                    out.append(f"{where}:{n}: path {rel} does not exist")
            if not block and not history and not OTHER_TOOLS.search(near):
                for f in FLAG.findall(text):
                    if f not in commanded and f not in OTHER_FLAGS and f not in every_flag():
                        out.append(f"{where}:{n}: no command line has the flag {f}")
        for target in LINK.findall(line):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                out.append(f"{where}:{n}: link {target} does not exist")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_name_path_command_and_flag_in_the_docs_exists(doc):
    found = problems_in(doc)
    assert not found, f"{len(found)} names in {doc.name} that the code does not have:\n" + "\n".join(found)


def test_the_checker_finds_what_does_not_exist(tmp_path):
    doc = tmp_path / "planted.md"
    doc.write_text(
        "Use `depthlens.stats.wilson_interval` and `depthlens.stats.no_such_function`.\n"
        "    $ python -m analyses.token_depth --quick --no-such-flag\n"
        "```\npython -m analyses.nope --quick\n```\n"
        "Pass `--model` or `--flag-nobody-has`; read `docs/methods.md`, not `docs/missing.md`, "
        "nor [this](missing-too.md); runs write `results/token_depth/` (generated).\n",
        encoding="utf-8")
    found = problems_in(doc)
    text = "\n".join(found)
    assert "depthlens.stats.no_such_function does not resolve" in text and "wilson_interval" not in text
    assert "`python -m analyses.token_depth` has no flag --no-such-flag" in text and "--quick" not in text
    assert "`python -m analyses.nope`: no such module" in text and "analyses.nope does not resolve" in text
    assert "no command line has the flag --flag-nobody-has" in text and "flag --model" not in text
    assert "path docs/missing.md does not exist" in text and "docs/methods.md" not in text
    assert "link missing-too.md does not exist" in text and "results/" not in text
    assert len(found) == 7, text
