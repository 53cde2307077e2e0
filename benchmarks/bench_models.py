"""Benchmark depthlens's generation and residual capture against plain transformers, in one process.

Every comparison runs both sides on the same weights, prompts and settings, alternating (the
order flips every repeat, after one warm-up of each), and reports the median time of each
side, the median of the per-repeat ratios and their spread (the interquartile range and the
extremes over the repeats), with the machine's load average: on a shared machine the
spread, not the median alone, says what was measured. Ratios are speeds relative to the
plain side (> 1: depthlens is faster), except ``capture``, a time ratio (< 1: faster).

- ``generate``: ``depthlens.runtime.generation.generate`` (16 chat prompts, greedy, ``--new-tokens``) vs
  ``transformers`` ``generate`` on an unbridged copy of the weights with the same chat token
  ids left-padded in one batch, the same stop tokens and pad id (target ≥ 0.95);
- ``generate_one_hook``: the same with one TransformerLens hook (adding a zero vector to
  ``hook_resid_post`` of the middle block: real work, unchanged tokens) vs the same plain
  ``generate`` without hooks (target ≥ 0.9);
- ``generate_no_prefix_sharing``: ``generate`` with its shared-prefix prefill switched off
  (diagnostic: what prefix sharing buys);
- ``capture``: the residual stream after every block through depthlens's streaming capture
  (``depthlens.runtime.forward.stream_residuals``, what analyses use) vs a plain forward of the
  decoder with ``output_hidden_states=True`` on the same batch (target ≤ 1.10); and
  TransformerLens's ``run_with_cache`` over every ``hook_resid_post`` (diagnostic).

The tokens of both sides are compared; a mismatch is reported (and ``--strict`` makes it an error).

    $ python benchmarks/bench_models.py [--repeats 7] [--clock cpu --threads 1] [--json out.json]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import depthlens.runtime.generation as gen  # noqa: E402
from depthlens.models.base import load_base  # noqa: E402
from depthlens.data.chat import build_chat, pad_batch  # noqa: E402
from depthlens.cli import ArgumentParser, add_debug_flag, cli_errors  # noqa: E402
from depthlens.infra.errors import UsageError  # noqa: E402
from depthlens.runtime.forward import stream_residuals  # noqa: E402
from depthlens.models.hooked_model import hook_name  # noqa: E402
from depthlens.models import load_model  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about rain.",
    "How do I reverse a list in Python?", "Give me three tips for better sleep.", "What causes the seasons?",
    "Summarize the plot of Romeo and Juliet.", "How many legs does a spider have?", "What is 17 times 23?",
    "Suggest a name for a bakery.", "Why is the sky blue?", "Translate 'good morning' into Spanish.",
    "What is a prime number?", "Describe a cat to someone who has never seen one.", "How do vaccines work?",
    "List four planets of the solar system.",
]
TARGETS = {"generate": (">=", 0.95), "generate_one_hook": (">=", 0.90), "capture": ("<=", 1.10)}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = _clock()
    out = fn()
    return _clock() - t, out


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def compare(ours: Callable[[], object], theirs: Callable[[], object], repeats: int, speed: bool) -> dict:
    """Time both sides alternately (order flipped every repeat) after one warm-up each.

    The ratio of repeat r is ``theirs_r / ours_r`` when ``speed`` (how fast depthlens runs
    relative to the plain side) and ``ours_r / theirs_r`` otherwise (relative time).
    """
    ours(), theirs()
    a, b = [], []
    for r in range(repeats):
        if r % 2 == 0:
            a.append(_timed(ours)[0])
            b.append(_timed(theirs)[0])
        else:
            b.append(_timed(theirs)[0])
            a.append(_timed(ours)[0])
    ratios = [(y / x if speed else x / y) for x, y in zip(a, b)]
    q1, q3 = _quartiles(ratios)
    return {"ours_s": statistics.median(a), "theirs_s": statistics.median(b), "ratio": statistics.median(ratios),
            "ratio_iqr": [q1, q3], "ratio_range": [min(ratios), max(ratios)], "ours_all_s": a, "theirs_all_s": b,
            "kind": "speed" if speed else "time"}


@cli_errors
def main(argv=None) -> dict:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats of each side (at least 5)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--only", default="", help="comma list of comparisons to run (default: all)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--strict", action="store_true", help="fail when the two sides' tokens differ")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (steadier on a busy machine)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    if args.repeats < 5:
        raise UsageError(f"--repeats must be at least 5 (medians with spread), got {args.repeats}.")
    global _clock
    _clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    model = load_model(args.model)
    plain, _, _ = load_base(args.model)  # an unbridged transformers model: the honest baseline
    plain = plain.to(model.device, model.dtype).eval()
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = gen.eos_ids(tok)
    chats = [build_chat(tok, p) for p in PROMPTS]
    batch = pad_batch([c.ids for c in chats], pad_id).to(model.device)
    n, width = args.new_tokens, batch.input_ids.shape[1]
    mid = model.n_layers // 2
    zero = torch.zeros(model.d_model, dtype=model.dtype, device=model.device)
    one_hook = [(hook_name("resid_post", mid), lambda x, hook: x + zero)]
    wanted = set((args.only or "generate,generate_one_hook,generate_no_prefix_sharing,capture").split(","))

    @torch.inference_mode()
    def plain_tokens():
        out = plain.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=n,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                             eos_token_id=stop)
        rows = out[:, width:].tolist()
        return [row[:next((j for j, t in enumerate(row) if t in stop), len(row))] for row in rows]

    def ours_tokens(hooks=()):
        return gen.generate(model, PROMPTS, max_new_tokens=n, batch_size=len(PROMPTS), fwd_hooks=hooks,
                            progress=False).tokens

    def no_sharing():
        shared = gen.MIN_SHARED_PREFIX
        gen.MIN_SHARED_PREFIX = 10**9
        try:
            return ours_tokens()
        finally:
            gen.MIN_SHARED_PREFIX = shared

    results: dict[str, dict] = {}
    reference = plain_tokens()
    cases = {"generate": (ours_tokens, plain_tokens, True),
             "generate_one_hook": (lambda: ours_tokens(one_hook), plain_tokens, True),
             "generate_no_prefix_sharing": (no_sharing, plain_tokens, True)}
    for name, (ours, theirs, speed) in cases.items():
        if name not in wanted:
            continue
        got = ours()
        same = sum(a == b for a, b in zip(got, reference))
        results[name] = {**compare(ours, theirs, args.repeats, speed), "rows_same_tokens": f"{same}/{len(reference)}",
                         "new_tokens": sum(map(len, got))}
        if args.strict and same != len(reference):
            raise SystemExit(f"{name}: {len(reference) - same} rows differ from plain generate's tokens.")

    if "capture" in wanted:
        boundaries = list(range(model.n_layers))

        @torch.inference_mode()
        def ours_capture():
            states = []
            stream_residuals(model, [c.ids for c in chats], boundaries, lambda idx, w, st: states.append(st),
                             kind="resid_post", batch_size=len(chats))
            return states

        @torch.inference_mode()
        def plain_hidden():
            return plain.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               output_hidden_states=True).hidden_states

        names = {hook_name("resid_post", l) for l in boundaries}

        @torch.inference_mode()
        def bridge_cache():
            return model.bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                               names_filter=lambda s: s in names)

        results["capture"] = compare(ours_capture, plain_hidden, args.repeats, speed=False)
        results["run_with_cache"] = compare(bridge_cache, plain_hidden, args.repeats, speed=False)

    load_end = os.getloadavg()
    print(f"{args.model}: {len(PROMPTS)} prompts, {n} new tokens, {args.repeats} alternating repeats, "
          f"{args.clock} clock, {torch.get_num_threads()} torch threads; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end ({os.cpu_count()} CPUs)")
    for name, r in results.items():
        goal = TARGETS.get(name)
        target = f"  target {goal[0]} {goal[1]:.2f}" if goal else "  (diagnostic)"
        unit = "speed vs plain" if r["kind"] == "speed" else "time vs plain"
        extra = f", tokens: {r['rows_same_tokens']} rows as plain" if "rows_same_tokens" in r else ""
        print(f"{name:28s} {r['ratio']:.3f} {unit} (IQR {r['ratio_iqr'][0]:.3f}-{r['ratio_iqr'][1]:.3f}, "
              f"range {r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f}; median {r['ours_s']:.3f} s vs "
              f"{r['theirs_s']:.3f} s{extra}){target}")
    out = {"model": args.model, "repeats": args.repeats, "new_tokens": n, "clock": args.clock, "load_average": [load_start, load_end],
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
