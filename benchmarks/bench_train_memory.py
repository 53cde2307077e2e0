"""Peak memory of one training step by method — full AdamW, LoRA r = 8 and 16, MeZO — per parameter
and as a multiple of one inference forward, on the same model, batch and loss.

The steps are the ones the recipes run:

- ``inference``: one forward of the recipes' response loss (``finetune.losses.response_loss``)
  under ``torch.inference_mode``: the reference;
- ``adamw``: one optimizer step of ``finetune.train.train_sft``, full fine-tuning of every
  weight but the (tied) embedding, as the recipes train (``--max-steps 1``);
- ``adamw-ckpt``: ``adamw`` with activation checkpointing per decoder block
  (``--grad-checkpointing``: each block keeps only its input for the backward pass);
- ``lora8``, ``lora16``: one step of ``train_sft`` with LoRA adapters of rank 8 / 16 on every
  linear map of the blocks (``--lora-rank``), including the merge at the end;
- ``qlora16``: ``lora16`` over NF4 block weights (``--load-in-4bit``, bitsandbytes; the
  full-precision block weights wait on disk during the step, ``finetune.qlora``);
- ``mezo``: one ``depthlens.interventions.spsa.mezo_step`` on the weights ``adamw`` trains (θ+εz forward,
  θ−εz forward, bit-exact restore, in-place update).

The batch: ``--batch-size`` chat sequences of exactly ``--seq-len`` tokens whose last
``--response-len`` carry the loss, one optimizer step; ``--micro-batch-size`` is the loop's
micro-batch (gradient accumulation; 0: the whole batch in one forward), which sets how many
sequences' activations a backward pass keeps at once.

Method (``benchmarks/bench_zo_memory.py``'s, imported): each step runs in a fresh subprocess
after one warm-up inference forward; on CUDA the peak is ``torch.cuda.max_memory_allocated()``
(weights included), on CPU it is the model's parameter and buffer bytes plus the rise of the
process's peak resident memory (VmHWM after ``clear_refs``) during the step. ``bytes/param``
divides the peak by the model's parameter count (tied weights once). ``--dtype`` defaults to
float32 everywhere, so the methods are compared in one precision (see bench_zo_memory on bf16).

Targets printed: MeZO ≤ 1.2× inference, LoRA ≤ 1.6× inference; AdamW as measured.
docs/scaling.md projects the numbers to 1B, 8B and 70B models.

    $ python benchmarks/bench_train_memory.py                      # the organism, smollm2-135m-instruct:sft
    $ python benchmarks/bench_train_memory.py --model tiny-llama --micro-batch-size 1 --json mem.json
    $ python benchmarks/bench_train_memory.py --ops inference,adamw,adamw-ckpt,lora16,qlora16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout, installed or not

OPS = ("inference", "adamw", "adamw-ckpt", "lora8", "lora16", "qlora16", "mezo")
TARGETS = {"mezo": 1.2, "lora8": 1.6, "lora16": 1.6}


def _zo_bench():
    """benchmarks/bench_zo_memory.py, whose measurement this benchmark shares."""
    path = Path(__file__).resolve().parent / "bench_zo_memory.py"
    spec = importlib.util.spec_from_file_location("bench_zo_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct:sft", help="model spec")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: automatic)")
    ap.add_argument("--dtype", default="float32", help="weights' dtype (float32, bfloat16; 'default': the toolkit's)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences in the optimizer step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--response-len", type=int, default=48, help="last tokens of each sequence that carry the loss")
    ap.add_argument("--micro-batch-size", type=int, default=0, help="sequences per forward (0: the whole batch)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of steps to measure (of {', '.join(OPS)})")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--worker", choices=OPS, default=None, help=argparse.SUPPRESS)
    return ap


def _examples(model, batch_size: int, seq_len: int, response_len: int):
    """``batch_size`` examples of exactly ``seq_len`` tokens: chat(prompt) + filler (no loss) + ``response_len`` scored."""
    from depthlens.data.chat import build_chat, encode
    from depthlens.data import load_prompts, refusal_templates
    from finetune.train import Example

    tok = model.tokenizer
    filler = encode(tok, " ".join(refusal_templates()))
    while len(filler) < seq_len:
        filler = filler + filler
    out = []
    for prompt in load_prompts("harmless").prompts:
        room = seq_len - response_len - len(build_chat(tok, prompt).ids)
        if room >= 0:
            out.append(Example(prompt, tuple(filler[:response_len]), prefix=tuple(filler[:room]), eos=False))
        if len(out) == batch_size:
            return out
    raise ValueError(f"Could not build {batch_size} sequences of {seq_len} tokens with {response_len} response tokens "
                     "from the packaged harmless prompts; raise --seq-len or lower --response-len.")


def worker(args) -> dict:
    import torch

    from depthlens.data.chat import pad_batch
    from depthlens.models import load_model
    from depthlens.interventions.spsa import ZOConfig, mezo_step
    from finetune.losses import response_loss
    from finetune.lora import LoraSettings
    from finetune.train import TrainConfig, autocast, tokenize_examples, train_sft, trainable_parameters

    zo_bench = _zo_bench()
    t0 = time.time()
    model = load_model(args.model, device=args.device, dtype=None if args.dtype == "default" else args.dtype)
    examples = _examples(model, args.batch_size, args.seq_len, args.response_len)
    data = tokenize_examples(model.tokenizer, examples, args.seq_len)
    if any(len(ids) != args.seq_len for ids, _ in data):
        raise RuntimeError("The benchmark batch is not of the requested length.")
    ids = pad_batch([d[0] for d in data], 0, side="right").input_ids.to(model.device)
    mask = pad_batch([d[1] for d in data], 0, side="right").input_ids.to(model.device)
    att = torch.ones_like(ids)
    family = trainable_parameters(model, freeze_embeddings=True)

    def loss() -> float:
        with torch.inference_mode(), autocast(model):
            return float(response_loss(model, ids, mask, att))

    loss()  # warm-up: lazy initialisations belong to every baseline
    rank = {"lora8": 8, "lora16": 16, "qlora16": 16}.get(args.worker)
    log: dict = {}

    def op():
        if args.worker == "inference":
            loss()
        elif args.worker == "mezo":
            mezo_step(family, loss, ZOConfig(eps=1e-3, lr=1e-6), step_seed=0)
        else:
            cfg = TrainConfig(batch_size=args.batch_size, max_steps=1, warmup_steps=1, checkpoint_every=0,
                              max_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                              lora=LoraSettings(rank) if rank else None, load_in_4bit=args.worker == "qlora16",
                              grad_checkpointing=args.worker == "adamw-ckpt")
            log["trained"] = train_sft(model, examples, cfg, progress=False).trainable_weights

    out = zo_bench._measure(op, model.device)
    n_params = sum(p.numel() for p in {id(p): p for p in model.hf.parameters()}.values())
    out.update(op=args.worker, model=model.spec, device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
               model_bytes=zo_bench._model_bytes(model), n_params=n_params,
               trained_weights=log.get("trained", sum(p.numel() for p in family) if args.worker == "mezo" else 0),
               seconds=round(time.time() - t0, 1))
    out["total_bytes"] = out["peak_bytes"] if model.device.type == "cuda" else out["model_bytes"] + out["increase_bytes"]
    out["bytes_per_param"] = out["total_bytes"] / n_params
    return out


def _run_worker(op: str, argv: list[str]) -> dict:
    return _zo_bench()._run_worker(op, argv, Path(__file__).resolve())


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.response_len < 1 or args.response_len >= args.seq_len:
        raise SystemExit(f"--response-len must lie in 1..{args.seq_len - 1}, got {args.response_len}.")
    ops = [o for o in args.ops.split(",") if o]
    if not ops or any(o not in OPS for o in ops) or "inference" not in ops:
        raise SystemExit(f"--ops must list steps of {', '.join(OPS)}, inference among them (the reference); got {args.ops!r}.")
    if args.worker:
        res = worker(args)
        print(_zo_bench().RESULT_TAG + json.dumps(res), flush=True)  # what its _run_worker reads
        return res
    argv = list(sys.argv[1:] if argv is None else argv)
    runs = {op: _run_worker(op, argv) for op in ops}
    ref = runs["inference"]
    mb = 1 / 2**20
    print(f"\nPeak memory of one step on {ref['model']} ({ref['device']}, {ref['dtype']}, {ref['n_params']:,} parameters): "
          f"batch {args.batch_size} x {args.seq_len} tokens ({args.response_len} scored), micro-batch "
          f"{args.micro_batch_size or args.batch_size}; method: {ref['method']}")
    print(f"{'step':<10} {'peak MB':>10} {'x inference':>12} {'bytes/param':>12} {'trained weights':>16}")
    for op in ops:
        r = runs[op]
        print(f"{op:<10} {r['total_bytes'] * mb:>10.1f} {r['total_bytes'] / ref['total_bytes']:>12.2f} "
              f"{r['bytes_per_param']:>12.2f} {r['trained_weights']:>16,}")
    ratios = {f"{op}": runs[op]["total_bytes"] / ref["total_bytes"] for op in ops if op != "inference"}
    met = {}
    for op, ratio in ratios.items():
        if op in TARGETS:
            met[op] = ratio <= TARGETS[op]
            print(f"{op}_vs_inference: {ratio:.2f}  (target <= {TARGETS[op]}: {'met' if met[op] else 'NOT met'})")
        else:
            print(f"{op}_vs_inference: {ratio:.2f}  (as measured)")
    for op, ref_op in (("adamw-ckpt", "adamw"), ("qlora16", "lora16")):
        if op in runs and ref_op in runs:
            ratios[f"{op}_vs_{ref_op}"] = runs[op]["total_bytes"] / runs[ref_op]["total_bytes"]
            print(f"{op}_vs_{ref_op}: {ratios[f'{op}_vs_{ref_op}']:.2f}")
    result = {"config": {k: v for k, v in vars(args).items() if k != "worker"}, "runs": runs, "ratios": ratios,
              "targets_met": met}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
