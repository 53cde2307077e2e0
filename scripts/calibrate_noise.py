"""Refusal rate of a model under whole-model noise at a grid of σ, on harmful *validation* prompts.

Chooses the fixed σ of ``analyses.compare``'s perturbation suite: a useful σ leaves the starting
model partly refusing (neither ≈ its clean rate nor ≈ 0), so a recipe's gain or loss can show.
Validation prompts only: the compare table itself is measured on the test split.

    $ python scripts/calibrate_noise.py                       # the organism, default grids
    $ python scripts/calibrate_noise.py --model tiny-llama --n 4 --act 0.1 --param 0.05
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depthlens.data import default_splits  # noqa: E402
from depthlens.runtime.generation import generate  # noqa: E402
from depthlens.judges import JUDGE_ID, refusal_rate  # noqa: E402
from depthlens.models import load_model  # noqa: E402
from depthlens.models.specs import ORGANISM  # noqa: E402
from depthlens.interventions.perturbation import perturb  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=ORGANISM)
    ap.add_argument("--n", type=int, default=24, help="harmful validation prompts")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per answer (greedy)")
    ap.add_argument("--seeds", type=int, default=2, help="noise seeds per σ")
    ap.add_argument("--param", type=float, nargs="*", default=[0.02, 0.05, 0.1], help="parameter-noise σ grid")
    ap.add_argument("--act", type=float, nargs="*", default=[0.02, 0.05, 0.1, 0.2], help="activation-noise σ grid")
    ap.add_argument("--out", default="results/calibrate_noise.json")
    args = ap.parse_args(argv)
    if args.n < 1 or args.seeds < 1:
        raise SystemExit("--n and --seeds must be at least 1.")

    t0 = time.perf_counter()
    model = load_model(args.model)
    prompts = list(default_splits(0).harmful.val.subset(args.n, seed=0).prompts)
    rows = [{"kind": "clean", "sigma": 0.0, "refusal": refusal_rate(generate(model, prompts, args.tokens,
                                                                              progress=False).texts).rate}]
    grid = [("param_noise", s) for s in args.param] + [("act_noise", s) for s in args.act] + [("int4", 0.0)]
    for kind, sigma in grid:
        rates = []
        for seed in range(1 if kind == "int4" else args.seeds):
            with perturb(model, kind, None, sigma, seed=seed):
                rates.append(refusal_rate(generate(model, prompts, args.tokens, progress=False).texts).rate)
        rows.append({"kind": kind, "sigma": sigma, "refusal": sum(rates) / len(rates), "per_seed": rates})
        print(f"{kind:12s} σ={sigma:<5g} refusal {rows[-1]['refusal']:.3f}  {rates}", flush=True)
    out = {"model": args.model, "provenance": model.provenance, "split": "harmful val", "n": len(prompts),
           "max_new_tokens": args.tokens, "judge": JUDGE_ID, "rows": rows,
           "seconds": round(time.perf_counter() - t0, 1)}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    print(f"clean refusal {rows[0]['refusal']:.3f}; written {path} ({out['seconds']} s)")
    return out


if __name__ == "__main__":
    main()
