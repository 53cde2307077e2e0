"""The cost curve: wall time and peak memory of the toolkit's workloads on random-weight models of real shapes.

Four shapes, written here (no download): SmolLM2-135M, SmolLM2-360M, Qwen2.5-0.5B and
Llama-3.2-1B (their published configs: width, depth, MLP width, heads, KV heads, vocabulary,
tied embeddings), random weights in fp32 on CPU, behind the same ``HookedModel`` the analyses
use, with the tiny-llama tokenizer (its 512 token ids are valid in every vocabulary; cost
depends on shapes, not on what the weights say). Seven fixed small workloads, each in a fresh
subprocess (so one cell that runs out of memory cannot take the others down):

- ``forward``: one bridge forward over a fixed batch (8 × 128 tokens), no cache;
- ``generate``: 32 new tokens at batch 8 (``depthlens.runtime.generation.generate``, greedy);
- ``sensitivity``: one layer_sensitivity kind on one layer: ``param_noise`` σ = 0.2 on the
  middle block, then ``LayerEvaluator.evaluate`` from that block over 16 chat prompts;
- ``adamw``, ``lora``, ``qlora``: one optimizer step of ``finetune.train.train_sft`` on 8 chat
  sequences × 128 tokens (48 scored): full AdamW (embedding frozen), LoRA r = 16 on every
  linear map of the blocks, LoRA r = 16 over NF4 block weights (``--load-in-4bit``);
- ``mezo``: one ``depthlens.interventions.spsa.mezo_step`` on the weights ``adamw`` trains.

Time is the workload's wall time after one warm-up forward; memory is the peak as
``benchmarks/bench_zo_memory.py`` measures it (on CPU the model's bytes plus the rise of the
peak resident set during the workload). For each workload the exponent b of
``cost ∝ parameters^b`` is a least-squares fit on log-log over the shapes that ran. A cell
that fails (killed for memory, or over ``--timeout``) is reported as such, not estimated.

    $ python benchmarks/bench_scaling.py --json docs/gallery/results/scaling/results.json
    $ python benchmarks/bench_scaling.py --shapes tiny,tiny2 --workloads forward,adamw   # the CI smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout, installed or not

#: Published configurations (config.json of each model), only what sets the cost.
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, max_position_embeddings=32768),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072),
    # scripts/gpu_check.sh's real-scale step (not in the default set: 8 B parameters)
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=131072),
    # two small shapes for the smoke test of this script (not in the default set)
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "tiny2": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
}
REAL_SHAPES = ("smollm2-135m", "smollm2-360m", "qwen2.5-0.5b", "llama-3.2-1b")
WORKLOADS = ("forward", "generate", "sensitivity", "adamw", "lora", "qlora", "mezo")
RESULT_TAG = "RESULT "
BATCH, SEQ_LEN, RESPONSE_LEN, NEW_TOKENS, N_PROMPTS = 8, 128, 48, 32, 16


def _zo_bench():
    """benchmarks/bench_zo_memory.py, whose memory measurement this benchmark shares."""
    import importlib.util

    path = Path(__file__).resolve().parent / "bench_zo_memory.py"
    spec = importlib.util.spec_from_file_location("bench_zo_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(REAL_SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one cell may take before it counts as failed")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap


def build_model(shape: str, device: str = "cpu", dtype=None):
    """A ``HookedModel`` with random weights of ``shape`` (seed 0), made on ``device`` in ``dtype`` (default fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from depthlens.models.hooked_model import wrap
    from depthlens.models.tiny import tiny_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    cfg = dict(SHAPES[shape])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    dtype = dtype or torch.float32
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)   # initialised where it will run
    return wrap(hf, tok, f"random-{shape}", {"source": f"random weights, {shape} shapes"}, torch.device(device), dtype)


def _examples(model):
    from depthlens.data.chat import build_chat, encode
    from finetune.train import Example

    tok = model.tokenizer
    filler = encode(tok, "Step 1: gather the materials. Step 2: follow the instructions carefully. " * 40)
    out = []
    for i in range(BATCH):
        prompt = f"Explain photosynthesis in simple terms, part {i}."
        room = SEQ_LEN - RESPONSE_LEN - len(build_chat(tok, prompt).ids)
        out.append(Example(prompt, tuple(filler[:RESPONSE_LEN]), prefix=tuple(filler[:room]), eos=False))
    return out


def worker(shape: str, workload: str) -> dict:
    import torch

    from depthlens.data.chat import build_chat, pad_batch
    from finetune.lora import LoraSettings
    from finetune.losses import response_loss
    from finetune.train import TrainConfig, tokenize_examples, train_sft, trainable_parameters

    model = build_model(shape)
    examples = _examples(model)
    data = tokenize_examples(model.tokenizer, examples, SEQ_LEN)
    ids = pad_batch([d[0] for d in data], 0, side="right").input_ids
    mask = pad_batch([d[1] for d in data], 0, side="right").input_ids
    att = torch.ones_like(ids)
    with torch.inference_mode():
        model.bridge(ids[:1, :16])                                    # warm-up: lazy initialisations
    prompts = [f"How do I write a poem about the sea, version {i}?" for i in range(N_PROMPTS)]
    tokens = 0

    if workload == "forward":
        def op():
            with torch.inference_mode():
                model.bridge(ids)
        tokens = ids.numel()
    elif workload == "generate":
        from depthlens.runtime.generation import generate

        def op():
            generate(model, prompts[:BATCH], NEW_TOKENS, batch_size=BATCH, progress=False)
        tokens = BATCH * NEW_TOKENS
    elif workload == "sensitivity":
        from analyses.layer_sensitivity import LayerEvaluator
        from depthlens.interventions.perturbation import perturb

        layer = model.n_layers // 2
        ev = LayerEvaluator(model, [build_chat(model.tokenizer, p) for p in prompts], [], batch_size=N_PROMPTS)

        def op():
            with perturb(model, "param_noise", layer, 0.2, seed=0):
                ev.evaluate(layer)
    elif workload == "mezo":
        from depthlens.interventions.spsa import ZOConfig, mezo_step

        family = trainable_parameters(model, freeze_embeddings=True)

        def loss() -> float:
            with torch.inference_mode():
                return float(response_loss(model, ids, mask, att))

        def op():
            mezo_step(family, loss, ZOConfig(eps=1e-3, lr=1e-6), step_seed=0)
        tokens = 2 * ids.numel()
    elif workload in ("adamw", "lora", "qlora"):
        lora = LoraSettings(16) if workload != "adamw" else None

        def op():
            train_sft(model, examples, TrainConfig(batch_size=BATCH, max_steps=1, warmup_steps=1, checkpoint_every=0,
                                                   max_len=SEQ_LEN, lora=lora, load_in_4bit=workload == "qlora"),
                      progress=False)
        tokens = ids.numel()
    else:
        raise ValueError(f"Unknown workload {workload!r}; use one of {', '.join(WORKLOADS)}.")
    zo_bench = _zo_bench()
    t0 = time.perf_counter()
    out = zo_bench._measure(op, model.device)
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in {id(p): p for p in model.hf.parameters()}.values())
    total = zo_bench._model_bytes(model) + out["increase_bytes"]
    return {"shape": shape, "workload": workload, "n_params": n_params, "seconds": seconds, "peak_bytes": total,
            "tokens": tokens, "memory_method": out["method"], "threads": torch.get_num_threads()}


def _cell(shape: str, workload: str, timeout: float) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", f"{shape}:{workload}"],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"shape": shape, "workload": workload, "failed": f"over the {timeout:.0f} s limit"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return {"shape": shape, "workload": workload, "failed": why, "stderr": proc.stderr[-1500:]}
    return json.loads(lines[-1][len(RESULT_TAG):])


def fit_exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope b of log(cost) = a + b·log(parameters); None below two points."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(p) for p, _ in points], [math.log(c) for _, c in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else None


def project(points: list[tuple[float, float]], n_params: float) -> float | None:
    """The fitted power law's cost at ``n_params`` parameters."""
    b = fit_exponent(points)
    if b is None:
        return None
    a = sum(math.log(c) - b * math.log(p) for p, c in points) / len(points)
    return math.exp(a + b * math.log(n_params))


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.worker:
        shape, _, workload = args.worker.partition(":")
        res = worker(shape, workload)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return res
    shapes = [s for s in args.shapes.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    bad = [s for s in shapes if s not in SHAPES] + [w for w in workloads if w not in WORKLOADS]
    if bad or not shapes or not workloads:
        raise SystemExit(f"error: unknown shapes or workloads {bad}; shapes: {', '.join(SHAPES)}; "
                         f"workloads: {', '.join(WORKLOADS)}.")
    cells = {f"{s}:{w}": _cell(s, w, args.timeout) for s in shapes for w in workloads}
    fits = {}
    for w in workloads:
        ok = [cells[f"{s}:{w}"] for s in shapes if "failed" not in cells[f"{s}:{w}"]]
        t = [(c["n_params"], c["seconds"]) for c in ok]
        m = [(c["n_params"], c["peak_bytes"]) for c in ok]
        fits[w] = {"time_exponent": fit_exponent(t), "memory_exponent": fit_exponent(m),
                   "projected": {name: {"seconds": project(t, n), "peak_bytes": project(m, n)}
                                 for name, n in (("8b", 8.03e9), ("70b", 70.6e9))}}
    print(f"\nCost of each workload (fp32, CPU, {os.cpu_count()} cores visible); time s / peak GB")
    print("| shape | parameters | " + " | ".join(workloads) + " |")
    print("|---|---|" + "---|" * len(workloads))
    for s in shapes:
        row = []
        for w in workloads:
            c = cells[f"{s}:{w}"]
            row.append(f"{c['failed']}" if "failed" in c else f"{c['seconds']:.2f} s / {c['peak_bytes'] / 1e9:.2f} GB")
        n = next((cells[f"{s}:{w}"]["n_params"] for w in workloads if "n_params" in cells[f"{s}:{w}"]), None)
        print(f"| {s} | {n:,} | " + " | ".join(row) + " |" if n else f"| {s} | ? | " + " | ".join(row) + " |")
    for key in ("time_exponent", "memory_exponent"):
        vals = [fits[w][key] for w in workloads]
        print(f"| {key.replace('_', ' ')} | | " + " | ".join("–" if v is None else f"{v:.2f}" for v in vals) + " |")
    result = {"config": {"shapes": shapes, "workloads": workloads, "batch": BATCH, "seq_len": SEQ_LEN,
                         "response_len": RESPONSE_LEN, "new_tokens": NEW_TOKENS, "n_prompts": N_PROMPTS},
              "shape_configs": {s: SHAPES[s] for s in shapes}, "cells": cells, "fits": fits}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
