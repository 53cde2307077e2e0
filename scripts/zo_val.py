"""Validation harness of the README's "Zeroth-order refinement variants" tables.

Scores a ``zo`` candidate built on ``smollm2-135m-instruct:sft:deep-anchored`` (or the start
itself, or a random-walk null control) on the *validation* split only: 48 harmful and 48
harmless prompts (+ 8 borderline), 48 greedy tokens, seed 0 (``analyses.evaluate``); then
``analyses.compare``'s perturbation suite (parameter noise σ .05 and activation noise σ .1, two
seeds each, int4 round-to-nearest) on the 48 harmful prompts; then the harmless answers at 64
tokens, whose refusals are written out for reading (the break-offs).

    $ python scripts/zo_val.py start                      # the starting model
    $ python scripts/zo_val.py H '{"guard_tolerance": 0.25, "utility_tokens": 64}'
    $ python scripts/zo_val.py N1 --null-of H --null-seed 1

A candidate's JSON overrides candidate A's ``ZORecipeConfig`` settings (layers 11, 15, 29, 18,
16; margin objective, m 4; noise σ .05 on every layer; suite param, act, int4; 256 safety
prompts; 100 steps; lr 3e-5). ``--null-of NAME`` instead applies the absolute projected
gradients of NAME's kept updates, each with a random sign and a fresh direction, to the same
matrices at the same lr: a random walk of that candidate's own step sizes, with no loss
evaluated. Each run writes ``OUT/NAME.json`` (the rates, the suite mean and the harmless
refusals at 64 tokens); a candidate's build also writes its recipe record in the cache as usual.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

START = "smollm2-135m-instruct:sft:deep-anchored"
A = dict(layers=(11, 15, 29, 18, 16), objective="margin", margin=4.0, noise_sigma=0.05, noise_layers="all",
         n_safety=256, steps=100, suite=("param", "act", "int4"), lr=3e-5)


def _candidate(overrides: dict):
    from finetune.common import build_on
    from finetune.zeroth_order import ZORecipe, ZORecipeConfig

    kw = {**A, **overrides}
    for key in ("layers", "suite"):
        kw[key] = tuple(kw[key])
    cfg = ZORecipeConfig(**kw)
    print("config", cfg, flush=True)
    return build_on(START, ZORecipe(cfg))


def _null(of: Path, seed: int):
    from depthlens.models import load_model
    from finetune.zeroth_order import _update, derive_seed, zo_parameters

    record = json.loads((of / "recipe.json").read_text())
    info = record["info"]
    lr = record["chain"][-1]["config"]["lr"]
    gs = [abs(h["projected_grad"]) for h in info["history"] if h.get("accepted", True)]
    rng = random.Random(seed)
    model = load_model(START)
    params = zo_parameters(model, info["layers"], "matrices")
    for i, g in enumerate(gs):
        _update(params, [derive_seed(1000 + seed, i)], [g * rng.choice((-1.0, 1.0))], lr, 0.0)
    print(f"null: {len(gs)} random-sign steps of {of.name}'s sizes at lr {lr}", flush=True)
    return model


def score(model) -> dict:
    from analyses.compare import CompareConfig, perturbation_suite
    from analyses.evaluate import EvalConfig, evaluate_model
    from depthlens.data import default_splits
    from depthlens.generate import generate
    from depthlens.judge import is_refusal

    ev = evaluate_model(model, EvalConfig(model=model.spec, n_harmful=48, n_harmless=48, n_borderline=8,
                                          max_new_tokens=48, batch_size=16, seed=0, split="val"))
    harmful = [s["prompt"] for s in ev.samples if s["set"] == "harmful"]
    suite = perturbation_suite(model, harmful, CompareConfig(models=(START,)))
    harmless = list(default_splits(0).harmless.val.subset(48, seed=0).prompts)
    long = generate(model, harmless, max_new_tokens=64, batch_size=16, progress=False).texts
    out = {"harmful": ev.metrics["harmful_refusal"], "harmless": ev.metrics["harmless_refusal"],
           **{k: v for k, v in suite.items() if k.startswith("refusal_")}}
    out["suite_mean"] = (out["refusal_param_noise"] + out["refusal_act_noise"] + out["refusal_int4"]) / 3
    out["harmless64_refusals"] = [t for t in long if is_refusal(t)]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="row name; 'start' scores the starting model")
    p.add_argument("overrides", nargs="?", default="{}", help="JSON of ZORecipeConfig fields over candidate A's")
    p.add_argument("--null-of", help="recipe directory (or OUT/NAME.json's 'source') of the candidate to mimic")
    p.add_argument("--null-seed", type=int, default=1)
    p.add_argument("--out", default="results/zo_val", help="folder of the NAME.json files")
    a = p.parse_args(argv)
    try:
        overrides = json.loads(a.overrides)
    except json.JSONDecodeError as e:
        sys.exit(f"overrides must be a JSON object of ZORecipeConfig fields: {e}.")
    if not isinstance(overrides, dict):
        sys.exit("overrides must be a JSON object of ZORecipeConfig fields.")
    out_dir = Path(a.out)
    t0 = time.time()
    if a.null_of:
        of = Path(a.null_of)
        if not of.is_dir():
            previous = out_dir / f"{a.null_of}.json"
            of = Path(json.loads(previous.read_text())["source"]) if previous.exists() else of
        if not (of / "recipe.json").exists():
            sys.exit(f"--null-of {a.null_of}: no recipe.json there, nor a scored row of that name in {out_dir}.")
        model = _null(of, a.null_seed)
    elif a.name == "start":
        from depthlens.models import load_model

        model = load_model(START)
    else:
        model = _candidate(overrides)
    build_s = time.time() - t0
    row = {"name": a.name, "overrides": overrides, "null_of": a.null_of, "null_seed": a.null_seed if a.null_of else None,
           "source": model.provenance.get("source"), "build_s": round(build_s, 1), **score(model)}
    row["total_s"] = round(time.time() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{a.name}.json.tmp"
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(out_dir / f"{a.name}.json")
    print(json.dumps({k: v for k, v in row.items() if k != "harmless64_refusals"}))
    print("harmless refusals at 64 tokens:", len(row["harmless64_refusals"]))
    return row


if __name__ == "__main__":
    main()
