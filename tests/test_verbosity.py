"""depthlens.infra.verbosity: a recipe build keeps accelerate's checkpoint lines off the terminal unless asked, and ends with its cache entry."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from depthlens.infra.verbosity import QUIET_LOGGERS, VERBOSE_ENV, quiet_build, verbose

ROOT = Path(__file__).resolve().parents[1]

# A tiny recipe whose training checkpoints after every step, built the way an analysis builds
# its organism: logging set up as the analyses' command lines do (INFO, with level prefixes).
BUILD = """
import sys
from analyses.common import setup_logging
from depthlens.models.recipes import build_with
from finetune.train import Example, TrainConfig, train_sft

setup_logging()


class Chatty:
    name, version = "chatty", 1

    def config(self):
        return {"steps": 4}

    def build(self, model, workdir):
        examples = [Example("Hi?", "Hello there."), Example("Name a colour.", "Blue.")] * 4
        train_sft(model, examples, TrainConfig(batch_size=2, checkpoint_every=1, lr=1e-4), workdir, progress=False)


build_with("tiny-llama", Chatty())
"""

# accelerate's checkpoint lines: the loop now saves its state itself (finetune.distributed.save_loop_state),
# so they should never appear; transformers' own bars (writing the entry) are what --verbose lets through
CHECKPOINT_LINES = ("Saving current state", "Optimizer state saved", "Random states saved", "Scheduler state saved")
TRANSFORMERS_BARS = ("Writing model shards",)


def _build(tmp_path: Path, verbose_env: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    env.update(DEPTHLENS_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    if verbose_env:
        env[VERBOSE_ENV] = "1"
    done = subprocess.run([sys.executable, "-c", BUILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_a_build_prints_no_checkpoint_lines_and_names_its_entry(tmp_path):
    out = _build(tmp_path, verbose_env=False)
    noise = CHECKPOINT_LINES + TRANSFORMERS_BARS
    assert not [line for line in out.splitlines() if any(c in line for c in noise)], out[-2000:]
    (entry,) = [p for p in (tmp_path / "cache" / "organisms").iterdir() if not p.name.startswith(".")]
    final = [line for line in out.splitlines() if "Built tiny-llama:chatty in" in line]
    assert final and str(entry) in final[-1], out[-2000:]


def test_verbose_lets_the_library_output_through(tmp_path):
    """The same build with DEPTHLENS_VERBOSE=1 shows transformers' bars: the check above can fail."""
    out = _build(tmp_path, verbose_env=True)
    assert all(any(c in line for line in out.splitlines()) for c in TRANSFORMERS_BARS), out[-2000:]


def test_quiet_build_restores_the_levels(monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "0")  # restored (unset) after the test, whatever the test sets
    logging.getLogger("accelerate.checkpointing").setLevel(logging.DEBUG)
    try:
        with pytest.raises(RuntimeError), quiet_build():
            assert not logging.getLogger("accelerate.checkpointing").isEnabledFor(logging.INFO)
            raise RuntimeError("a failing build")
        assert logging.getLogger("accelerate.checkpointing").level == logging.DEBUG
    finally:
        logging.getLogger("accelerate.checkpointing").setLevel(logging.NOTSET)
    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert verbose()
    with quiet_build():
        assert all(logging.getLogger(n).level == logging.NOTSET for n in QUIET_LOGGERS)


def test_verbose_flag_of_the_command_lines(monkeypatch):
    from dataclasses import dataclass

    from depthlens.cli import parse_config

    @dataclass(frozen=True)
    class Config:
        seed: int = 0

    monkeypatch.setenv(VERBOSE_ENV, "0")  # restored (unset) after the test, whatever the test sets
    assert parse_config(Config, ["--seed", "1"]) == Config(1) and not verbose()
    assert parse_config(Config, ["--verbose"]) == Config() and verbose()
