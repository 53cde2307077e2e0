"""Cost of one layer-sensitivity evaluation as a ratio to one plain forward pass.

Both sides run in this process on the same harmful validation prompts, same batch: (a) one
plain forward of the whole prompt set — the unbridged transformers model on the same weights
(the fastest honest baseline) and, for reference, the bridge as users call it; (b) what the
sweep does per (layer, kind, seed): perturb one layer, ``LayerEvaluator.evaluate(layer)``
(blocks layer… only, shared chat prefix computed once, last position unembedded), restore —
timed on layers spread evenly over the depth. Prints the mean cost of a sweep evaluation in
units of one plain forward.

    $ python benchmarks/bench_layer_sensitivity.py --model smollm2-135m-instruct:sft
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from analyses.layer_sensitivity import LayerEvaluator
from depthlens.data.chat import build_chat, pad_batch
from depthlens.models.checkpoint import hf_state_dict
from depthlens.cli import ArgumentParser, add_debug_flag, cli_errors
from depthlens.data import default_splits
from depthlens.runtime.forward import last_logprobs
from depthlens.models import load_model
from depthlens.interventions.perturbation import perturb


@cli_errors
def main(argv=None) -> float:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct:sft")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--layers", type=int, default=6, help="layers sampled evenly for the timing")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    model = load_model(args.model)
    prompts = default_splits(0).harmful.val.subset(args.n).prompts
    seqs = [build_chat(model.tokenizer, p) for p in prompts]
    ev = LayerEvaluator(model, seqs, [], batch_size=args.n)

    batch = pad_batch([s.ids for s in seqs], model.tokenizer.pad_token_id).to(model.device)

    @torch.inference_mode()
    def plain():  # one ordinary HF forward over the same prompts (no hook points)
        hf_plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    def bridged():  # the bridge's forward, as last_logprobs runs it
        last_logprobs(model, seqs, batch_size=args.n)

    hf_plain = AutoModelForCausalLM.from_config(model.hf.config)  # an unbridged copy of the same weights
    hf_plain.load_state_dict(hf_state_dict(model.hf, hf_plain.state_dict().keys()))
    hf_plain = hf_plain.to(model.device, model.dtype).eval()
    plain(), bridged()
    base = statistics.median(_t(plain) for _ in range(3))
    base_bridge = statistics.median(_t(bridged) for _ in range(3))
    layers = [round(i * (model.n_layers - 1) / max(1, args.layers - 1)) for i in range(args.layers)]
    costs = []
    def one(layer):  # what the sweep does per (layer, kind, seed): perturb, evaluate, restore
        with perturb(model, "param_noise", layer, 0.2, seed=0):
            ev.evaluate(layer)

    for l in layers:
        costs.append(_t(lambda: one(l)))
    ratio = statistics.mean(costs) / base
    print(f"sweep_evaluation_vs_plain_forward: {ratio:.3f}  (HF forward {base:.2f} s, bridge forward "
          f"{base_bridge:.2f} s over {args.n} prompts; evaluation {statistics.mean(costs):.2f} s; layers {layers})")
    return ratio


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
