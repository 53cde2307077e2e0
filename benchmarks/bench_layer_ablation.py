"""Cost of one layer of ``analyses.layer_ablation`` as a ratio to the straightforward way.

Both sides run in this process on the same insertion trials (from the latest
insertion_robustness run of the model under ``results/``) and harmful validation prompts:

- baseline: for each intervention at the layer, ``generate(..., fwd_hooks=hooks)`` over the
  trials (KV cache on the plain view, batch 16) and ``refusal_score(..., fwd_hooks=hooks)``
  over the prompts (bridge forward) — what the analysis did before;
- measured: ``Evaluator.measure(layer, hook_sets)`` — the trials' clean states below the
  layer computed once, every intervention decoded together as row groups of one batch from
  the layer, the scores run from the layer with the shared chat prefix computed once.

It also checks that both give the same continuations and scores. Prints the ratio
measured / baseline (lower is better) averaged over the sampled layers.

    $ python benchmarks/bench_layer_ablation.py --model smollm2-135m-instruct:sft --layers 0,14,28
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import layer_ablation as la  # noqa: E402
from analyses.state_prediction import obtain_trials, refusal_directions  # noqa: E402
from depthlens.cli import ArgumentParser, add_debug_flag, cli_errors  # noqa: E402
from depthlens.data import default_splits  # noqa: E402
from depthlens.runtime.generation import generate  # noqa: E402
from depthlens.judges.seam import refusal_score  # noqa: E402
from depthlens.models import load_model  # noqa: E402


@cli_errors
def main(argv=None) -> float:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct:sft")
    ap.add_argument("--layers", default="0,14,28", help="layers timed (comma-separated)")
    ap.add_argument("--n-trials", type=int, default=16)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default="results")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    model = load_model(args.model)
    source = obtain_trials(args.model, None, args.out)
    trials = la.select_subset(source.trials, args.n_trials)
    splits = default_splits(0)
    val = list(splits.harmful.val.subset(args.n_val, seed=0).prompts)
    layers = [model.check_layer(int(x)) for x in args.layers.split(",")]
    means = la.component_means(model, list(splits.harmless.train.subset(32, seed=0).prompts))
    dirs = dict(zip(layers, refusal_directions(model, list(splits.harmful.train.subset(32, seed=0).prompts),
                                               list(splits.harmless.train.subset(32, seed=0).prompts),
                                               kind="resid_post", layers=layers)))
    chats = [la.trial_chat(t) for t in trials]
    t0 = time.perf_counter()
    ev = la.Evaluator(model, trials, val, args.max_new_tokens, 16)
    setup = time.perf_counter() - t0
    ev.measure(0, [()])  # warm both paths once
    generate(model, chats[:2], 2, progress=False)

    ratios, same_text, max_score_diff = [], [], 0.0
    for layer in layers:
        sets = [la.intervention_hooks(model, k, layer, means=means, direction=torch.from_numpy(dirs[layer]))
                for k in la.INTERVENTIONS]
        t = time.perf_counter()
        old = [(generate(model, chats, args.max_new_tokens, fwd_hooks=h, progress=False).texts,
                refusal_score(model, val, fwd_hooks=h).scores.double().numpy()) for h in sets]
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        new = ev.measure(layer, sets)
        t_new = time.perf_counter() - t
        ratios.append(t_new / t_old)
        for (texts, scores), m in zip(old, new):
            same_text.append(np.mean([a == b for a, b in zip(texts, m.texts)]))
            max_score_diff = max(max_score_diff, float(np.abs(scores - m.scores).max()))
        print(f"layer {layer}: baseline {t_old:.1f} s, measured {t_new:.1f} s (ratio {t_new / t_old:.3f})")
    ratio = statistics.mean(ratios)
    print(f"layer_ablation_layer_vs_per_cell_hooked_runs: {ratio:.3f}  (setup {setup:.1f} s once; identical "
          f"continuations {statistics.mean(same_text):.3f}, max |Δ score| {max_score_diff:.1e}; "
          f"{len(trials)} trials × {args.max_new_tokens} tokens, {len(val)} prompts, 5 interventions, layers {layers})")
    return ratio


if __name__ == "__main__":
    main()
