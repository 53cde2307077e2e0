"""Cost of one SFT training step with the shared chat prefix computed once, as a ratio to the full batch.

Both sides run in this process, alternating, on the same batches of the organism recipe's
kind (harmful train prompts → refusal templates, harmless train prompts → a fixed answer;
right-padded, length-bucketed as ``train_sft`` makes them) and the same trainable parameters
(every block, embedding frozen):

- baseline: ``response_loss`` with the prefix sharing switched off (the whole batch runs
  through the decoder, as before), then ``backward``;
- measured: ``response_loss`` as ``train_sft`` runs it (``response_logits``: the prefix every
  row shares — system prompt and user header — runs once at batch 1 into a KV cache), then
  ``backward``; and the same with the organism's ``BenignMarginLoss`` on top.

It also checks that both sides give the same loss and gradient norm. Prints the ratios
measured / baseline (lower is better), median over the repetitions.

    $ python benchmarks/bench_sft_step.py --model smollm2-135m-instruct --batches 4 --reps 3
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finetune.losses as losses  # noqa: E402
from depthlens.data.chat import pad_batch  # noqa: E402
from depthlens.cli import ArgumentParser, add_debug_flag, cli_errors  # noqa: E402
from depthlens.data import default_splits, refusal_templates  # noqa: E402
from depthlens.judges.seam import refusal_token_ids  # noqa: E402
from depthlens.models import load_model  # noqa: E402
from finetune.train import Example, tokenize_examples, trainable_parameters  # noqa: E402


def _batches(model, n_batches: int, batch_size: int):
    splits = default_splits(0)
    templates = refusal_templates()
    harmful = splits.harmful.train.prompts[: n_batches * batch_size // 2]
    harmless = splits.harmless.train.prompts[: n_batches * batch_size // 2]
    examples = [Example(p, templates[i % len(templates)], kind="refusal") for i, p in enumerate(harmful)]
    examples += [Example(p, "Here is a short, helpful answer to that request, with a few details.", kind="benign")
                 for p in harmless]
    data = tokenize_examples(model.tokenizer, examples, 192)
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    out = []
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        b = pad_batch([data[i][0] for i in idx], pad, side="right")
        m = pad_batch([data[i][1] for i in idx], 0, side="right").input_ids
        out.append((b.input_ids.to(model.device), m.to(model.device), b.attention_mask.to(model.device), idx))
    return out, [e.kind for e in examples]


@cli_errors
def main(argv=None) -> dict:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    add_debug_flag(ap)
    args = ap.parse_args(argv)

    model = load_model(args.model)
    batches, kinds = _batches(model, args.batches, args.batch_size)
    params = trainable_parameters(model)
    margin = losses.BenignMarginLoss(kinds, refusal_token_ids(model.tokenizer), 0.2)
    shared = losses.shared_prefix_len

    def step(kind: str) -> tuple[float, float, float]:
        losses.shared_prefix_len = shared if kind != "baseline" else (lambda *a: 0)
        try:
            t0 = time.perf_counter()
            total, norm = 0.0, 0.0
            for ids, mask, att, idx in batches:
                loss = margin(model, ids, mask, att, idx) if kind == "margin" else losses.response_loss(model, ids, mask, att)
                loss.backward()
                total += loss.item()
                norm += float(sum(p.grad.pow(2).sum() for p in params)) ** 0.5
                for p in params:
                    p.grad = None
            return time.perf_counter() - t0, total, norm
        finally:
            losses.shared_prefix_len = shared

    for p in params:
        p.requires_grad_(True)
    prefix = [shared(ids, mask) for ids, mask, _, _ in batches]
    step("baseline"), step("measured")  # warm-up
    times = {"baseline": [], "measured": [], "margin": []}
    for _ in range(args.reps):
        for kind in times:
            sec, loss, norm = step(kind)
            times[kind].append(sec)
            if kind == "baseline":
                ref = (loss, norm)
            elif kind == "measured" and not (abs(loss - ref[0]) <= 1e-4 * abs(ref[0]) and abs(norm - ref[1]) <= 1e-3 * ref[1]):
                raise SystemExit(f"shared-prefix step differs from the full batch: loss {loss} vs {ref[0]}, grad norm {norm} vs {ref[1]}")
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"shared_prefix_tokens": prefix, "seconds_per_step": {k: v / len(batches) for k, v in med.items()},
           "ratio_measured_over_baseline": med["measured"] / med["baseline"],
           "ratio_margin_over_baseline": med["margin"] / med["baseline"]}
    print(out)
    return out


if __name__ == "__main__":
    main()
