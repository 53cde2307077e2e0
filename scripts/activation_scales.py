"""Per layer, how much a family's massive activations inflate the RMS scale of activation noise.

For each layer's output (``hook_resid_post``) on a few harmful validation prompts, the ratio of
the per-token RMS to the robust per-token scale ``1.4826 · median_c |x_c|``
(``depthlens.interventions.perturbation.activation_scale``): the median ratio over tokens and the largest. Activation
noise σ relative to the RMS is a disturbance ratio × σ of the ordinary channels, so where the
ratio differs between families the same σ is not the same disturbance; relative to the robust
scale it is. The result is a record (``results/activation_scales/<model-tag>/<run-id>/results.json``).

    $ python scripts/activation_scales.py --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depthlens.data.chat import build_chat  # noqa: E402
from depthlens.data import default_splits  # noqa: E402
from depthlens.runtime.forward import last_logprobs  # noqa: E402
from depthlens.runtime.hooks import mirrored_hooks  # noqa: E402
from depthlens.models import load_model  # noqa: E402
from depthlens.interventions.perturbation import activation_noise_hooks, activation_scale  # noqa: E402
from depthlens.infra.results import RunRecord, start_stamp, write_run  # noqa: E402


def scale_ratios(model, prompts: list[str]) -> list[dict]:
    """Rows per layer: median and max over tokens of RMS / robust scale of the layer's output."""
    captured: dict[int, list[torch.Tensor]] = {l: [] for l in range(model.n_layers)}
    # the noise hooks' own hook points, with σ = 0: the tensors the noise would be added to
    points = [name for name, _ in activation_noise_hooks(model, None, 0.0)]
    hooks = []
    for l, name in enumerate(points):
        def keep(x, hook, l=l):
            captured[l].append((activation_scale(x[0], "rms") / activation_scale(x[0], "robust")).squeeze(-1).cpu())
            return x
        hooks.append((name, keep))
    with torch.inference_mode(), mirrored_hooks(model, hooks):  # the forward activation noise perturbs
        for p in prompts:
            last_logprobs(model, [list(build_chat(model.tokenizer, p).ids)])
    rows = []
    for l in range(model.n_layers):
        r = torch.cat(captured[l])
        rows.append({"layer": l, "median_ratio": float(r.median()), "max_ratio": float(r.max()), "n_tokens": int(r.numel())})
    return rows


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=4, help="harmful validation prompts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    started = start_stamp()
    model = load_model(args.model)
    prompts = list(default_splits(args.seed).harmful.val.subset(args.n, seed=args.seed).prompts)
    rows = scale_ratios(model, prompts)
    meds = sorted(r["median_ratio"] for r in rows)
    metrics = {"median_ratio_min": meds[0], "median_ratio_max": meds[-1], "median_ratio_median": meds[len(meds) // 2],
               "max_ratio": max(r["max_ratio"] for r in rows), "n_prompts": len(prompts)}
    path = write_run(RunRecord(analysis="activation_scales", model=args.model, seed=args.seed, config=vars(args),
                               started=started, provenance=model.provenance, metrics=metrics,
                               tables={"by_layer": rows}), args.out)
    for r in rows:
        print(r)
    print(metrics, f"\nresults: {path}")
    return path


if __name__ == "__main__":
    main()
