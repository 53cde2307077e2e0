"""FSDP2 on CPU (gloo), as CI runs it: a sharded two-rank build of ``:sft`` equals the one-process
build, under ``torchrun --fsdp`` and under ``accelerate launch`` with ``configs/accelerate/fsdp2.yaml``,
and a sharded run interrupted after step 2 resumes from its DCP checkpoint to the weights of an
uninterrupted one. Small on purpose: tiny-llama, 4 steps (the isolation conventions of
``tests/test_distributed.py``: every launch gets its own ``DEPTHLENS_CACHE``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import SFT_FLAGS, _entry, _env, _free_port

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp2.yaml"


def torchrun(args: list[str], cache: Path, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_port", str(_free_port()), *args]
    out = subprocess.run(cmd, cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=900)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def accelerate_fsdp(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "2", "--main_process_port", str(_free_port()), *args]
    out = subprocess.run(cmd, cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def _info(entry: Path) -> dict:
    return json.loads((entry / "recipe.json").read_text())["info"]["train"]


def test_fsdp2_builds_under_torchrun_and_accelerate_equal_the_one_process_build(tmp_path, monkeypatch):
    torchrun(["-m", "finetune.sft", *SFT_FLAGS, "--fsdp"], tmp_path / "torchrun")
    accelerate_fsdp(["-m", "finetune.sft", *SFT_FLAGS], tmp_path / "accelerate")
    for key, value in _env(tmp_path / "one").items():
        monkeypatch.setenv(key, value)
    from finetune.sft import main

    main(SFT_FLAGS)
    one = _entry(tmp_path / "one", "tiny-llama-sft")
    single = load_file(one / "model.safetensors")
    from depthlens.models import load_model

    parent = {k: v.float() for k, v in load_model("tiny-llama").plain().state_dict().items()}
    assert max(float((single[k] - parent[k]).abs().max()) for k in single) > 1e-4   # training moved the weights
    for launch in ("torchrun", "accelerate"):
        entry = _entry(tmp_path / launch, "tiny-llama-sft")
        assert entry.name == one.name                       # neither sharding nor the launch enters the cache key
        info = _info(entry)
        assert info["sharding"] == "fsdp2" and info["processes"] == 2 and info["steps"] == 4
        assert info["local_trainable_weights"] < 0.6 * info["trainable_weights"]   # each rank held about half
        assert info["losses"] == pytest.approx(_info(one)["losses"], rel=1e-5)
        sharded = load_file(entry / "model.safetensors")
        assert sharded.keys() == single.keys()             # the standard HF checkpoint, every tensor whole
        assert max(float((sharded[k] - single[k]).abs().max()) for k in single) <= 1e-5
        assert not (tmp_path / launch / "work" / one.name / "train_state").exists()   # checkpoints cleared


WORKER = '''
import sys, torch
from pathlib import Path
from depthlens.models import load_model
from depthlens.models.recipes import process_state
from finetune.losses import response_loss
from finetune.train import Example, TrainConfig, train_sft

out, mode = Path(sys.argv[1]), sys.argv[2]
state = process_state()
model = load_model("tiny-llama", device=state.device if state else None)
examples = [Example(f"question {i}", f"answer number {i} is here") for i in range(16)]
cfg = TrainConfig(lr=1e-3, batch_size=4, max_steps=4, checkpoint_every=2, fsdp=mode != "single",
                  grad_checkpointing=mode == "checkpointed")
calls = {"n": 0}

def flaky(model, ids, mask, att, idx):
    calls["n"] += 1
    if mode == "interrupt" and calls["n"] == 3:      # the first micro-batch of step 3, on every rank
        raise KeyboardInterrupt
    return response_loss(model, ids, mask, att)

log = train_sft(model, examples, cfg, out / "work", progress=False, loss_fn=flaky)
rank = state.process_index if state else 0
torch.save({"weights": {k: v.detach().clone() for k, v in model.plain().state_dict().items()},
            "resumed_from": log.resumed_from, "losses": log.losses}, out / f"{mode}-rank{rank}.pt")
'''


def test_an_interrupted_sharded_run_resumes_from_its_dcp_checkpoint_to_the_uninterrupted_weights(tmp_path):
    """Also: the sharded run equals one process, and with activation checkpointing per block it is unchanged."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun([str(script), str(straight), "straight"], tmp_path / "cache")
    failed = torchrun([str(script), str(resumed), "interrupt"], tmp_path / "cache", check=False)
    assert failed.returncode != 0 and "KeyboardInterrupt" in failed.stderr
    step2 = resumed / "work" / "train_state" / "step-000002"
    assert (step2 / "complete").exists() and (step2 / "dcp" / ".metadata").exists()
    assert sorted(p.name for p in (step2 / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a shard each
    torchrun([str(script), str(resumed), "resume"], tmp_path / "cache")
    torchrun([str(script), str(tmp_path / "ckpt"), "checkpointed"], tmp_path / "cache")   # FSDP2 + activation ckpt
    subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "single"], cwd=REPO,
                   env=_env(tmp_path / "cache"), check=True, capture_output=True, timeout=600)
    a, b = (torch.load(d / f"{m}-rank0.pt", weights_only=True) for d, m in ((straight, "straight"), (resumed, "resume")))
    one = torch.load(tmp_path / "single" / "single-rank0.pt", weights_only=True)
    assert a["resumed_from"] == 0 and b["resumed_from"] == 2 and len(b["losses"]) == 4
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-6)
    rank1 = torch.load(resumed / "resume-rank1.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "ckpt" / "checkpointed-rank0.pt", weights_only=True)
    from depthlens.models import load_model

    start = load_model("tiny-llama").plain().state_dict()
    assert max(float((a["weights"][k] - start[k]).abs().max()) for k in start) > 1e-4   # the run moved the weights
    for k in one["weights"]:
        torch.testing.assert_close(b["weights"][k], a["weights"][k], rtol=0, atol=1e-6, msg=k)   # resumed = straight
        torch.testing.assert_close(rank1["weights"][k], b["weights"][k], rtol=0, atol=0, msg=k)  # every rank whole
        torch.testing.assert_close(a["weights"][k], one["weights"][k], rtol=0, atol=1e-5, msg=k)  # sharded = one process
        torch.testing.assert_close(ckpt["weights"][k], a["weights"][k], rtol=0, atol=1e-6, msg=k)  # + checkpointing
    assert not (resumed / "work" / "train_state").exists()


def test_an_fsdp1_launch_and_lora_under_fsdp_are_refused_in_one_sentence(monkeypatch, tiny):
    from depthlens.infra.errors import UsageError
    from finetune.lora import LoraSettings
    from finetune.train import Example, TrainConfig, train_sft

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UsageError, match="FSDP2 only"):
        train_sft(tiny, [Example("q", "a")], TrainConfig(checkpoint_every=0), progress=False)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UsageError, match="LoRA runs data-parallel"):
        train_sft(tiny, [Example("q", "a")], TrainConfig(checkpoint_every=0, lora=LoraSettings(4)), progress=False)


BF16_WORKER = '''
import sys, torch
from depthlens.models import load_model
from depthlens.models.recipes import process_state
from finetune.train import Example, TrainConfig, train_sft

state = process_state()
model = load_model("tiny-llama", device=state.device if state else None, dtype="bfloat16")
examples = [Example(f"question {i}", f"answer number {i} is here") for i in range(16)]
log = train_sft(model, examples, TrainConfig(lr=1e-3, batch_size=4, max_steps=3, checkpoint_every=0,
                                             fsdp=state is not None), progress=False)
if state is None or state.is_main_process:
    torch.save({"weights": {k: v.clone() for k, v in model.plain().state_dict().items()}, "precision": log.precision,
                "sharding": log.sharding, "losses": log.losses}, sys.argv[1])
'''


def test_fsdp2_mixed_precision_bf16_compute_over_fp32_masters_matches_one_process_within_bf16(tmp_path):
    """The CUDA precision path, run on CPU: a bf16 model sharded with MixedPrecisionPolicy(bf16, fp32 reduce)
    over fp32 master shards ends in bf16 within a few bf16 ulps of the one-process autocast run."""
    script = tmp_path / "bf16.py"
    script.write_text(BF16_WORKER)
    torchrun([str(script), str(tmp_path / "fsdp.pt")], tmp_path / "cache")
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], cwd=REPO, env=_env(tmp_path / "cache"),
                   check=True, capture_output=True, timeout=600)
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("fsdp.pt", "one.pt"))
    assert a["sharding"] == "fsdp2" and b["sharding"] == ""
    assert a["precision"] == b["precision"] == "bfloat16 weights, fp32 masters, bfloat16 compute"
    assert {v.dtype for v in a["weights"].values()} == {torch.bfloat16}
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-3)
    for k in a["weights"]:   # bf16 compute in two orders: a few ulps (2^-8 relative) of the weights
        torch.testing.assert_close(a["weights"][k].float(), b["weights"][k].float(), rtol=1.6e-2, atol=2e-3, msg=k)
