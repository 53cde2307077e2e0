"""Cost of ``generate`` with the batch's shared chat prefix prefilled once, as a ratio to the plain batch.

Both sides run in this process, alternating, on the same prompts (harmless train prompts,
greedy, ``--tokens`` new tokens, ``--batch-size`` rows per batch):

- baseline: ``depthlens.runtime.generation.generate`` with prefix sharing switched off
  (``MIN_SHARED_PREFIX`` raised past every prompt): every row is left-padded and prefilled whole;
- measured: ``generate`` as the toolkit runs it (the system prompt and user header, 24 tokens
  on SmolLM2, prefilled once per batch at batch 1 into an expanded KV cache).

It checks that both sides produce the same tokens and prints the ratio measured / baseline
(lower is better), median over the repetitions.

    $ python benchmarks/bench_generate.py --model smollm2-135m-instruct --prompts 64 --tokens 32 --reps 2
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import depthlens.runtime.generation as gen  # noqa: E402
from depthlens.cli import ArgumentParser, add_debug_flag, cli_errors  # noqa: E402
from depthlens.data import default_splits  # noqa: E402
from depthlens.models import load_model  # noqa: E402


@cli_errors
def main(argv=None) -> dict:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    add_debug_flag(ap)
    args = ap.parse_args(argv)

    model = load_model(args.model)
    prompts = list(default_splits(0).harmless.train.prompts[: args.prompts])
    shared_min = gen.MIN_SHARED_PREFIX
    from depthlens.runtime.forward import common_prefix_len

    prefix = common_prefix_len([c.ids for c in gen.as_chats(model, prompts)])
    if prefix < shared_min:
        raise SystemExit(f"{args.model}'s prompts share fewer than {shared_min} tokens: nothing to measure.")

    def run(kind: str):
        gen.MIN_SHARED_PREFIX = shared_min if kind == "measured" else 10**9
        try:
            t0 = time.perf_counter()
            out = gen.generate(model, prompts, max_new_tokens=args.tokens, batch_size=args.batch_size, progress=False)
            return time.perf_counter() - t0, out.tokens
        finally:
            gen.MIN_SHARED_PREFIX = shared_min

    gen.generate(model, prompts[:4], max_new_tokens=4, progress=False)  # warm-up
    times: dict[str, list[float]] = {"baseline": [], "measured": []}
    for _ in range(args.reps):
        for kind in times:
            sec, tokens = run(kind)
            times[kind].append(sec)
            if kind == "baseline":
                ref = tokens
            elif tokens != ref:
                rows = sum(a != b for a, b in zip(tokens, ref))
                print(f"warning: {rows} of {len(ref)} greedy continuations differ (float rounding at a near-tie)")
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tokens = sum(len(t) for t in ref)
    out = {"prefix_tokens": prefix, "seconds": med, "tokens_per_second":
           {k: n_tokens / v for k, v in med.items()}, "ratio_measured_over_baseline": med["measured"] / med["baseline"]}
    print(out)
    return out


if __name__ == "__main__":
    main()
