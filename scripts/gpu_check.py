"""The steps of scripts/gpu_check.sh, each timed and with its peak memory (see that script).

``module NAME MODULE ARGS…`` runs ``python -m MODULE ARGS…`` in this process (so the peak of
*its* memory can be read afterwards); ``steps --model SPEC`` takes one LoRA step and one MeZO
step on SPEC and measures greedy generation throughput; ``scale --shape SHAPE`` boots a
random-weight model of a real shape (``benchmarks/bench_scaling.SHAPES``; Llama-3.1-8B in
bf16 on CUDA) and runs, each timed with its tokens/s and peak memory: a forward with residual
capture at every layer, generation at batch 16, one layer_sensitivity kind on one layer, one
LoRA step, one QLoRA step, one MeZO step and one FSDP2 step on one rank (the first four blocks
trained, fp32 masters: the whole 8B AdamW state would not fit one GPU); ``summary`` prints
the table of a report. Every step appends one JSON line to ``--report``. Peak memory: on CUDA
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


SCALE_STEPS = ("scale forward+capture", "scale generation b16", "scale layer_sensitivity", "scale lora step",
               "scale qlora step", "scale mezo step", "scale fsdp2 step")


def _bench_scaling():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scaling.py"
    spec = importlib.util.spec_from_file_location("bench_scaling", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _one_rank_group(device: str) -> None:
    """A one-process group, so that FSDP2 runs on this one rank."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def run_scale(args) -> None:
    """The real-scale steps on a random-weight model of ``args.shape`` (see the module docstring)."""
    from analyses.layer_sensitivity import LayerEvaluator
    from depthlens.data.chat import build_chat, pad_batch
    from depthlens.runtime.generation import generate
    from depthlens.interventions.perturbation import perturb
    from depthlens.interventions.spsa import ZOConfig, mezo_step
    from finetune.losses import response_loss
    from finetune.lora import LoraSettings
    from finetune.train import TrainConfig, autocast, tokenize_examples, train_sft, trainable_parameters

    report = Path(args.report)
    bench = _bench_scaling()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t0 = time.time()
    model = bench.build_model(args.shape, device=args.device, dtype=dtype)
    n_params = sum(p.numel() for p in {id(p): p for p in model.hf.parameters()}.values())
    print(f"gpu_check: random {args.shape} ({n_params:,} parameters, {str(dtype).removeprefix('torch.')}) "
          f"booted in {time.time() - t0:.1f} s", flush=True)
    examples = bench._examples(model)
    data = tokenize_examples(model.tokenizer, examples, bench.SEQ_LEN)
    ids = pad_batch([d[0] for d in data], 0, side="right").input_ids.to(model.device)
    mask = pad_batch([d[1] for d in data], 0, side="right").input_ids.to(model.device)
    att = torch.ones_like(ids)
    prompts = [f"How do I write a poem about the sea, version {i}?" for i in range(16)]
    base = {"shape": args.shape, "dtype": str(dtype).removeprefix("torch.")}

    def timed(name: str, op, tokens: int, **extra) -> None:
        _peak_reset(args.device)
        t = time.time()
        result = op()
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t
        peak, how = _peak_mb(args.device)
        _record(report, {"step": name, "seconds": round(seconds, 2), "peak_mb": round(peak, 1), "memory": how,
                         "tokens_per_s": round(tokens / seconds, 1), **base, **extra,
                         **(result if isinstance(result, dict) else {})})

    names = [f"blocks.{l}.hook_resid_post" for l in range(model.n_layers)]

    def capture():
        with torch.inference_mode(), autocast(model):
            _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
        if len(cache) != model.n_layers:
            raise RuntimeError(f"Captured {len(cache)} residual streams, expected {model.n_layers}.")
        return {"captured_layers": len(cache)}

    with torch.inference_mode():
        model.bridge(ids[:1, :16])  # warm-up
    timed("scale forward+capture", capture, ids.numel())

    def gen():
        out = generate(model, prompts, 64, batch_size=16, progress=False)
        return {"new_tokens": sum(len(t) for t in out.tokens)}

    generate(model, prompts[:2], 4, progress=False)  # warm-up
    _peak_reset(args.device)
    t = time.time()
    got = gen()
    seconds = time.time() - t
    peak, how = _peak_mb(args.device)
    _record(report, {"step": "scale generation b16", "seconds": round(seconds, 2), "peak_mb": round(peak, 1),
                     "memory": how, "tokens_per_s": round(got["new_tokens"] / seconds, 1), **base, **got})

    layer = model.n_layers // 2
    seqs = [build_chat(model.tokenizer, p) for p in prompts]
    ev = LayerEvaluator(model, seqs, [], batch_size=len(seqs))

    def sensitivity():
        with perturb(model, "param_noise", layer, 0.2, seed=0):
            scores, _ = ev.evaluate(layer)
        return {"layer": layer, "kind": "param_noise", "prompts": len(scores)}

    timed("scale layer_sensitivity", sensitivity, sum(len(s.ids) for s in seqs))

    def step(**cfg):
        def op():
            log = train_sft(model, examples, TrainConfig(batch_size=len(examples), max_steps=1, warmup_steps=1,
                                                         checkpoint_every=0, max_len=bench.SEQ_LEN, **cfg),
                            progress=False)
            return {"loss": round(log.losses[0], 4), "trained_weights": log.trainable_weights,
                    "local_trained_weights": log.local_trainable_weights, "precision": log.precision}
        return op

    timed("scale lora step", step(lora=LoraSettings(16)), ids.numel())
    timed("scale qlora step", step(lora=LoraSettings(16), load_in_4bit=True), ids.numel())

    params = [p for p in trainable_parameters(model) if p.ndim == 2]

    def loss() -> float:
        with torch.inference_mode(), autocast(model):
            return float(response_loss(model, ids, mask, att))

    timed("scale mezo step", lambda: {"loss": round(mezo_step(params, loss, ZOConfig(eps=1e-3, lr=1e-6),
                                                                step_seed=0).loss, 4)}, 2 * ids.numel())

    _one_rank_group(args.device)
    blocks = list(range(min(4, model.n_layers)))

    def fsdp_step():
        log = train_sft(model, examples, TrainConfig(batch_size=len(examples), max_steps=1, warmup_steps=1,
                                                     checkpoint_every=0, max_len=bench.SEQ_LEN, fsdp=True),
                        progress=False, layers=blocks)
        if log.sharding != "fsdp2":
            raise RuntimeError("The FSDP2 step did not run sharded.")
        return {"loss": round(log.losses[0], 4), "trained_weights": log.trainable_weights, "blocks": len(blocks),
                "precision": log.precision}

    timed("scale fsdp2 step", fsdp_step, ids.numel())


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
    c = sub.add_parser("scale", help="real-scale steps on a random-weight model of a real shape")
    c.add_argument("--shape", required=True, help="a shape of benchmarks/bench_scaling.SHAPES, e.g. llama-3.1-8b")
    t = sub.add_parser("summary", help="print the report; fail if an expected step is missing")
    t.add_argument("--expect", nargs="*", default=[])
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: DEPTHLENS_DEVICE is cuda but torch sees no CUDA device; "
                         "set DEPTHLENS_DEVICE=cpu (with --quick) to run the CPU check.")
    {"module": run_module, "steps": run_steps, "scale": run_scale, "summary": summary}[args.cmd](args)


if __name__ == "__main__":
    main()
