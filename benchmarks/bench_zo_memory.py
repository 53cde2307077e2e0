"""Peak memory of one MeZO step vs one inference forward vs one AdamW step, same model and batch.

MeZO's claim (Malladi et al. 2023, docs/methods.md §5): a zeroth-order step costs inference memory,
against several times that for Adam fine-tuning. This measures the three on one batch of
``--batch-size`` chat sequences of ``--seq-len`` tokens whose last ``--response-len`` tokens
carry the loss, with the ``zo`` recipe's loss (``finetune.zeroth_order.masked_nll``: mean NLL of
the response tokens, logits only where scored) for all three:

- ``inference``: one forward under ``torch.inference_mode``;
- ``zo``: one ``mezo_step`` (θ+εz forward, θ−εz forward, bit-exact restore, in-place update);
- ``adamw``: forward + backward + gradient clipping + ``AdamW.step`` (the first step, so the
  optimizer state is allocated, as in every training run).

ZO and AdamW act on the same parameters: every 2-D matrix of every block (``--params
matrices``, the ``zo`` recipe's family, here on all layers unless ``--layers``), or every
parameter (``--params all``).

Method. Each operation runs in a fresh subprocess (``--worker``), so freed memory that one
operation leaves in an allocator cannot hide the cost of the next. In it: load the model, build
the batch, one warm-up inference forward (lazy initialisations land in every baseline), then
- CUDA: ``reset_peak_memory_stats``; run; peak = ``torch.cuda.max_memory_allocated()``
  (absolute: weights included);
- CPU: ``malloc_trim``; baseline = VmRSS; the kernel's high-water mark is reset
  (``echo 5 > /proc/self/clear_refs``); run; increase = VmHWM − baseline; peak = the bytes of
  the model's parameters and buffers + increase (the interpreter's and libraries' resident
  pages are no model memory). Without ``clear_refs`` a 1-ms VmRSS sampler replaces VmHWM;
  without ``/proc`` (not Linux) ``ru_maxrss`` is used and flagged approximate. glibc's
  dynamic mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so large tensors are returned
  to the system when freed.

Precision. ``--dtype`` defaults to float32 on every device: the comparison is of the
algorithms in one precision. In bf16 the exact restore keeps a copy of each perturbed tensor
(its grid is too coarse for ε = 1e-3 round trips; see ``depthlens.interventions.spsa``), which the
``zo`` recipe avoids on CUDA by fp32 master weights of the few layers it refines
(``--layers`` measures that family).

``--objective suite`` measures the ``zo`` recipe's own step instead (``finetune.zo_objective``):
the safety NLL under the compare noise suite (parameter noise σ 0.05 on every block, activation
noise σ 0.1, int4 weights: three MeZO steps, one of each) plus the utility NLL, with the
residual streams entering the lowest refined layer cached as in a run (``frozen_below``): one
safety batch and ``--utility-batches`` utility batches (the run's steady state; the cache is
filled inside the measured operation, so it counts). ``--params lora`` perturbs LoRA adapters
(rank 8, α 16) of ``--layers`` instead of their matrices (AdamW then trains those adapters).

Targets printed: ZO ≤ 1.2× inference, AdamW ≥ 2.5× inference.

    $ python benchmarks/bench_zo_memory.py                          # smollm2-135m-instruct:sft
    $ python benchmarks/bench_zo_memory.py --model tiny-llama --json zo_memory.json
    $ python benchmarks/bench_zo_memory.py --model smollm2-135m-instruct:sft:deep-anchored \
        --objective suite --params lora --layers 11,15,29,18,16          # the C1 step of findings §6.3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout, installed or not

from depthlens.cli import ArgumentParser, add_debug_flag, cli_errors  # noqa: E402
from depthlens.infra.errors import UsageError  # noqa: E402

OPS = ("inference", "zo", "adamw")
TARGETS = {"zo": ("<=", 1.2), "adamw": (">=", 2.5)}
RESULT_TAG = "RESULT "


def _parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct:sft", help="model spec")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: automatic)")
    ap.add_argument("--dtype", default="float32", help="weights' dtype (float32, bfloat16; 'default': the toolkit's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--response-len", type=int, default=48, help="last tokens of each sequence that carry the loss")
    ap.add_argument("--params", choices=("matrices", "all", "lora"), default="matrices",
                    help="parameters ZO perturbs and AdamW trains (lora: rank-8 adapters on --layers)")
    ap.add_argument("--objective", choices=("nll", "suite"), default="nll",
                    help="the ZO step's loss: the response NLL, or the zo recipe's noise-suite objective")
    ap.add_argument("--utility-batches", type=int, default=32,
                    help="with --objective suite: utility batches whose cached residuals the step holds")
    ap.add_argument("--layers", default=None, help="comma list of blocks (default: all)")
    ap.add_argument("--eps", type=float, default=1e-3, help="MeZO ε")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--worker", choices=OPS, default=None, help=argparse.SUPPRESS)
    add_debug_flag(ap)
    return ap


# ----------------------------------------------------------------------------- memory readings


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); True when it took."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Sampler:
    """Polls VmRSS every millisecond in a thread (torch kernels release the GIL)."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("VmRSS") or 0)
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status_kb("VmRSS") or 0)
        return False


def _measure(op, device) -> dict:
    """Run ``op()`` once; peak bytes over the baseline, by the cleanest method available here."""
    import gc
    import resource

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        op()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"method": "torch.cuda.max_memory_allocated", "baseline_bytes": base, "peak_bytes": peak,
                "increase_bytes": peak - base, "approximate": False}
    _malloc_trim()
    base_kb = _status_kb("VmRSS")
    if base_kb is None:  # no /proc: ru_maxrss (kB on Linux, bytes on macOS) over the current high-water mark
        scale = 1 if sys.platform == "darwin" else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        op()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return {"method": "ru_maxrss delta (approximate: hidden below an earlier peak)", "baseline_bytes": before,
                "peak_bytes": after, "increase_bytes": after - before, "approximate": True}
    if _reset_hwm():
        op()
        peak_kb, method = _status_kb("VmHWM"), "VmHWM after clear_refs"
    else:
        with _Sampler() as s:
            op()
        peak_kb, method = s.peak, "VmRSS sampled every 1 ms"
    return {"method": method, "baseline_bytes": base_kb * 1024, "peak_bytes": peak_kb * 1024,
            "increase_bytes": max(0, peak_kb - base_kb) * 1024, "approximate": method.startswith("VmRSS sampled")}


# ----------------------------------------------------------------------------- the worker


def _batch(model, batch_size: int, seq_len: int, response_len: int):
    """``batch_size`` sequences of exactly ``seq_len`` tokens: chat(prompt) + filler (no loss) + response (loss)."""
    import torch

    from depthlens.data.chat import build_chat, encode
    from depthlens.data import load_prompts, refusal_templates
    from finetune.train import Example, tokenize_examples

    tok = model.tokenizer
    text = " ".join(refusal_templates())
    filler = encode(tok, text)
    while len(filler) < seq_len:
        filler = filler + filler
    rows, masks = [], []
    for prompt in load_prompts("harmless").prompts:
        room = seq_len - response_len - len(build_chat(tok, prompt).ids)
        if room < 0:
            continue
        ex = Example(prompt, tuple(filler[:response_len]), prefix=tuple(filler[:room]), eos=False)
        (ids, mask), = tokenize_examples(tok, [ex], seq_len)
        rows.append(ids)
        masks.append(mask)
        if len(rows) == batch_size:
            break
    if len(rows) < batch_size or any(len(r) != seq_len for r in rows):
        raise ValueError(f"Could not build {batch_size} sequences of {seq_len} tokens with {response_len} response "
                         "tokens from the packaged harmless prompts; raise --seq-len or lower --response-len.")
    ids = torch.tensor(rows, device=model.device)
    return ids, torch.ones_like(ids), torch.tensor(masks, device=model.device)


def _family(model, kind: str, layers: list[int] | None):
    from finetune.train import trainable_parameters

    layers = list(range(model.n_layers)) if layers is None else [model.check_layer(l) for l in layers]
    if kind == "lora":
        from finetune.lora import LoraSettings
        from finetune.zo_subspace import open_subspace

        return open_subspace(model, "lora", layers, LoraSettings(rank=8), seed=0).params
    if kind == "matrices":
        return [p for l in layers for p in model.layer_parameters(l).values() if p.ndim == 2]
    if len(layers) == model.n_layers:
        return trainable_parameters(model, freeze_embeddings=False)
    return trainable_parameters(model, layers=layers)


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.hf.parameters(), *model.hf.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def worker(args) -> dict:
    import torch

    from depthlens.models import load_model
    from depthlens.interventions.spsa import ZOConfig, mezo_step
    from finetune.train import autocast
    from finetune.zeroth_order import masked_nll

    dtype = None if args.dtype == "default" else args.dtype
    t0 = time.time()
    model = load_model(args.model, device=args.device, dtype=dtype)
    ids, att, mask = _batch(model, args.batch_size, args.seq_len, args.response_len)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    params = _family(model, args.params, layers)
    view = model.plain()

    def loss() -> float:
        with torch.inference_mode(), autocast(model):
            return float(masked_nll(model, ids, att, mask))

    loss()  # warm-up: lazy initialisations belong to every baseline

    suite = None
    if args.objective == "suite":
        from finetune.zo_objective import RobustObjective, _Batch

        batch = _Batch(ids, att, mask)
        suite = RobustObjective(model, [batch], [batch] * args.utility_batches, list(range(model.n_layers)), 0.05,
                                1.0, seed=0, perturbations=("param", "act", "int4"), act_noise_sigma=0.1,
                                frozen_below=min(layers) if layers else 0)

    def op():
        if args.worker == "inference":
            loss()
        elif args.worker == "zo" and suite is not None:
            for u in range(args.utility_batches):  # the run's steady state: every utility residual cached
                suite.components(u, noise=False)
            for step in range(3):  # one step under each perturbation
                mezo_step(params, lambda step=step: suite(step), ZOConfig(eps=args.eps, lr=1e-6), step_seed=step)
        elif args.worker == "zo":
            mezo_step(params, lambda: loss(), ZOConfig(eps=args.eps, lr=1e-6), step_seed=0)
        else:
            for p in params:
                p.requires_grad_(True)
            view.train()
            opt = torch.optim.AdamW(params, lr=1e-5)
            with autocast(model):
                value = masked_nll(model, ids, att, mask)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=False)  # grads and both moments stay allocated until here

    out = _measure(op, model.device)
    out.update(op=args.worker, model=model.spec, device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
               model_bytes=_model_bytes(model), n_params_family=sum(p.numel() for p in params),
               objective=args.objective,
               cached_residual_bytes=suite.cached_bytes if suite is not None else 0,
               seconds=round(time.time() - t0, 1))
    # the peak that the ratios compare: absolute on CUDA; weights + increase on CPU
    out["total_bytes"] = out["peak_bytes"] if model.device.type == "cuda" else out["model_bytes"] + out["increase_bytes"]
    return out


# ----------------------------------------------------------------------------- the driver


def _run_worker(op: str, argv: list[str], script: Path | None = None) -> dict:
    """The result line of ``script`` (default: this benchmark) run as a fresh ``--worker op`` process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, str(script or Path(__file__).resolve()), *argv, "--worker", op],
                          capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"The {op} measurement failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.objective == "suite" and args.utility_batches < 1:
        raise UsageError(f"--utility-batches must be >= 1, got {args.utility_batches}.")
    if args.response_len < 1 or args.response_len >= args.seq_len:
        raise UsageError(f"--response-len must lie in 1..{args.seq_len - 1}, got {args.response_len}.")
    if args.worker:
        res = worker(args)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return res
    argv = list(sys.argv[1:] if argv is None else argv)
    runs = {op: _run_worker(op, argv) for op in OPS}
    ref = runs["inference"]["total_bytes"]
    mb = 1 / 2**20
    print(f"\nPeak memory of one step on {runs['inference']['model']} ({runs['inference']['device']}, "
          f"{runs['inference']['dtype']}), batch {args.batch_size} x {args.seq_len} tokens "
          f"({args.response_len} scored), ZO/AdamW on {runs['zo']['n_params_family']:,} weights ({args.params}); "
          f"method: {runs['inference']['method']}")
    print(f"{'operation':<10} {'peak MB':>10} {'increase MB':>12} {'x inference':>12}")
    for op in OPS:
        r = runs[op]
        print(f"{op:<10} {r['total_bytes'] * mb:>10.1f} {r['increase_bytes'] * mb:>12.1f} {r['total_bytes'] / ref:>12.2f}")
    print(f"(model parameters and buffers: {runs['inference']['model_bytes'] * mb:.1f} MB)")
    if args.objective == "suite":
        print(f"(zo: the noise-suite objective, 3 steps; cached residuals held: "
              f"{runs['zo']['cached_residual_bytes'] * mb:.1f} MB)")
    ratios = {op: runs[op]["total_bytes"] / ref for op in ("zo", "adamw")}
    verdict = {}
    for op, (cmp, target) in TARGETS.items():
        ok = ratios[op] <= target if cmp == "<=" else ratios[op] >= target
        verdict[op] = ok
        print(f"{op}_vs_inference: {ratios[op]:.2f}  (target {cmp} {target}: {'met' if ok else 'NOT met'})")
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "debug")}, "runs": runs,
              "ratios": ratios, "targets_met": verdict}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
