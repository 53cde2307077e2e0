"""Cost of one layer-sensitivity evaluation as a ratio to one plain forward pass.

Both sides run in this process on the same prompts: (a) one plain transformers-style forward
of the whole prompt set through the bridge (``refusal_score`` + utility NLL from layer 0, i.e.
``LayerEvaluator.evaluate(0)`` without any cache reuse is the same work), and (b) the
perturbed evaluations the sweep runs — each perturbs one layer and restarts from it. Prints
the mean cost of a sweep evaluation in units of one full forward (ideal ≈ 0.5 from the
``start_at_layer`` restart, plus the unembedding that every evaluation pays).

    $ python benchmarks/bench_layer_sensitivity.py --model smollm2-135m-instruct:sft
"""

from __future__ import annotations

import argparse
import statistics
import time

from analyses.layer_sensitivity import LayerEvaluator
from depthlens.chat import build_chat
from depthlens.data import default_splits
from depthlens.forward import last_logprobs
from depthlens.models import load_model
from depthlens.perturb import perturb


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct:sft")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--layers", type=int, default=6, help="layers sampled evenly for the timing")
    args = ap.parse_args(argv)
    model = load_model(args.model)
    prompts = default_splits(0).harmful.val.subset(args.n).prompts
    seqs = [build_chat(model.tokenizer, p) for p in prompts]
    ev = LayerEvaluator(model, seqs, [], batch_size=args.n)

    def plain():  # one ordinary forward over the same prompts, logits at every position
        last_logprobs(model, seqs, batch_size=args.n)

    plain()
    base = statistics.median(_t(plain) for _ in range(3))
    layers = [round(i * (model.n_layers - 1) / max(1, args.layers - 1)) for i in range(args.layers)]
    costs = []
    def one(layer):  # what the sweep does per (layer, kind, seed): perturb, evaluate, restore
        with perturb(model, "param_noise", layer, 0.2, seed=0):
            ev.evaluate(layer)

    for l in layers:
        costs.append(_t(lambda: one(l)))
    ratio = statistics.mean(costs) / base
    print(f"sweep_evaluation_vs_plain_forward: {ratio:.3f}  (plain forward {base:.2f} s over {args.n} prompts; "
          f"layers {layers})")
    return ratio


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
