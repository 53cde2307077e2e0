"""The steps of scripts/gpu_check.sh, each timed and with its peak memory (see that script).

``module NAME MODULE ARGS…`` runs ``python -m MODULE ARGS…`` in this process (so the peak of
*its* memory can be read afterwards); ``steps --model SPEC`` takes one LoRA step and one MeZO
step on SPEC and measures greedy generation throughput; ``summary`` prints the table of a
report. Every step appends one JSON line to ``--report``. Peak memory: on CUDA
``torch.cuda.max_memory_allocated()`` over the step, on CPU the process's peak resident set
(``ru_maxrss``, which includes the interpreter and libraries).

    $ python scripts/gpu_check.py --device cuda --report r.jsonl module sft finetune.sft --max-steps 20
    $ python scripts/gpu_check.py --device cuda --report r.jsonl steps --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import resource
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import torch  # noqa: E402


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> tuple[float, str]:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def _record(report: Path, row: dict) -> None:
    extra = "".join(f", {k} {v}" for k, v in row.items() if k not in ("step", "seconds", "peak_mb", "memory"))
    print(f"gpu_check: {row['step']}: {row['seconds']:.1f} s, peak memory {row['peak_mb']:.0f} MB "
          f"({row['memory']}){extra}", flush=True)
    with report.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def run_module(args) -> None:
    """``python -m MODULE ARGS`` in this process, timed, with its peak memory."""
    _peak_reset(args.device)
    sys.argv = [args.module, *args.args]
    t0 = time.time()
    try:
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise
    peak, how = _peak_mb(args.device)
    _record(Path(args.report), {"step": args.name, "seconds": round(time.time() - t0, 1), "peak_mb": round(peak, 1),
                                "memory": how})


def run_steps(args) -> None:
    """One LoRA step, one MeZO step and generation throughput on ``args.model``."""
    from depthlens.data.chat import pad_batch
    from depthlens.data import default_splits, refusal_templates
    from depthlens.runtime.generation import generate
    from depthlens.models import load_model
    from depthlens.interventions.spsa import ZOConfig, mezo_step
    from finetune.losses import response_loss
    from finetune.lora import LoraSettings
    from finetune.train import Example, TrainConfig, autocast, tokenize_examples, train_sft, trainable_parameters

    report = Path(args.report)
    model = load_model(args.model, device=args.device)
    prompts = list(default_splits(0).harmless.train.prompts[: args.batch_size])
    examples = [Example(p, refusal_templates()[i % 4]) for i, p in enumerate(prompts)]

    _peak_reset(args.device)
    t0 = time.time()
    log = train_sft(model, examples, TrainConfig(batch_size=len(examples), max_steps=1, checkpoint_every=0,
                                                 lora=LoraSettings(rank=16)), progress=False)
    peak, how = _peak_mb(args.device)
    _record(report, {"step": "lora r=16 step", "seconds": round(time.time() - t0, 2), "peak_mb": round(peak, 1),
                     "memory": how, "loss": round(log.losses[0], 4), "trained_weights": log.trainable_weights,
                     "dtype": str(model.dtype).removeprefix("torch.")})

    data = tokenize_examples(model.tokenizer, examples, 192)
    ids = pad_batch([d[0] for d in data], 0, side="right").input_ids.to(model.device)
    mask = pad_batch([d[1] for d in data], 0, side="right").input_ids.to(model.device)
    att = pad_batch([d[0] for d in data], 0, side="right").attention_mask.to(model.device)

    def loss() -> float:
        with torch.inference_mode(), autocast(model):
            return float(response_loss(model, ids, mask, att))

    params = [p for p in trainable_parameters(model) if p.ndim == 2]
    _peak_reset(args.device)
    t0 = time.time()
    res = mezo_step(params, loss, ZOConfig(eps=1e-3, lr=1e-6), step_seed=0)
    peak, how = _peak_mb(args.device)
    _record(report, {"step": "mezo step", "seconds": round(time.time() - t0, 2), "peak_mb": round(peak, 1),
                     "memory": how, "loss": round(res.loss, 4), "weights": sum(p.numel() for p in params)})

    gen_prompts = list(default_splits(0).harmless.val.prompts) * 4
    gen_prompts = gen_prompts[: args.gen_prompts]
    generate(model, gen_prompts[:2], 4, progress=False)  # warm-up
    _peak_reset(args.device)
    t0 = time.time()
    out = generate(model, gen_prompts, args.gen_tokens, batch_size=args.gen_batch_size, progress=False)
    seconds = time.time() - t0
    n_tokens = sum(len(t) for t in out.tokens)
    peak, how = _peak_mb(args.device)
    if n_tokens == 0:
        raise RuntimeError("Generation produced no token.")
    _record(report, {"step": "generation", "seconds": round(seconds, 2), "peak_mb": round(peak, 1), "memory": how,
                     "tokens_per_s": round(n_tokens / seconds, 1), "new_tokens": n_tokens, "prompts": len(gen_prompts),
                     "batch_size": args.gen_batch_size})


def summary(args) -> None:
    rows = [json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]
    print(f"\n{'step':<22} {'seconds':>8} {'peak MB':>9}  notes")
    for r in rows:
        notes = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("step", "seconds", "peak_mb"))
        print(f"{r['step']:<22} {r['seconds']:>8.1f} {r['peak_mb']:>9.0f}  {notes}")
    missing = [s for s in args.expect if s not in {r["step"] for r in rows}]
    if missing:
        raise SystemExit(f"gpu_check: steps without a result: {', '.join(missing)}.")
    print(f"gpu_check: all {len(rows)} steps passed")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--report", required=True, help="JSON-lines file each step appends to")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("module", help="run python -m MODULE ARGS")
    m.add_argument("name")
    m.add_argument("module")
    m.add_argument("args", nargs=argparse.REMAINDER)
    s = sub.add_parser("steps", help="a LoRA step, a MeZO step, generation throughput")
    s.add_argument("--model", required=True)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--gen-prompts", type=int, default=64)
    s.add_argument("--gen-tokens", type=int, default=64)
    s.add_argument("--gen-batch-size", type=int, default=32)
    t = sub.add_parser("summary", help="print the report; fail if an expected step is missing")
    t.add_argument("--expect", nargs="*", default=[])
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: DEPTHLENS_DEVICE is cuda but torch sees no CUDA device; "
                         "set DEPTHLENS_DEVICE=cpu (with --quick) to run the CPU check.")
    {"module": run_module, "steps": run_steps, "summary": summary}[args.cmd](args)


if __name__ == "__main__":
    main()
