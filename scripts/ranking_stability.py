"""How many harmful prompts would layer_sensitivity need for a stable top-k? From one of its records.

For each prompt count n, the sensitivities S_{l,k} are redrawn as they would vary over sets of n
prompts, the layers are ranked by ``analyses.layer_sensitivity``'s normalized score, and
P(layer in top k) is counted for the record's first layers. Two ways, by what the record holds:

- ``per_prompt_drop`` present (records of the current code): an m-out-of-n bootstrap, n prompts
  drawn with replacement from the record's prompts, every layer and kind on the same draw, so
  the correlation between layers over prompts is kept;
- otherwise (older records): a normal approximation, S_{l,k} ~ N(S, se² · n₀ / n) with se from
  the record's 95 % interval and n₀ its prompt count, independent across layers and kinds.
  Prompts are shared by all layers, so their scores are positively correlated and the ranking
  is steadier than this assumes: read the n it gives as an upper estimate.

The result is a record (``results/ranking_stability/<model-tag>/<run-id>/results.json``).

    $ python scripts/ranking_stability.py docs/gallery/results/layer_sensitivity/<tag>/<run>/results.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses.layer_sensitivity import normalized_scores  # noqa: E402
from depthlens.infra.results import RunRecord, read_run, start_stamp, write_run  # noqa: E402
from depthlens.stats import top_k_probability  # noqa: E402

Z95 = 1.959963984540054


def stability(rec: RunRecord, counts: list[int], top_k: int, first: int, draws: int, seed: int) -> dict:
    """Rows of P(top-k) for the record's first ``first`` layers at each prompt count, and the method."""
    kinds = list(rec.config["kinds"])
    ranking = rec.tables["ranking"]
    layers = sorted(int(r["layer"]) for r in ranking)
    pos = {l: i for i, l in enumerate(layers)}
    watch = [int(r["layer"]) for r in ranking[:first]]
    rng = np.random.default_rng(seed)
    per_prompt = rec.tables.get("per_prompt_drop")
    rows = []
    if per_prompt:
        drops = {k: np.zeros((len(layers), len(per_prompt[0]["drop"]))) for k in kinds}
        for row in per_prompt:
            drops[row["kind"]][pos[int(row["layer"])]] = row["drop"]
        n0, method = drops[kinds[0]].shape[1], "m-out-of-n prompt bootstrap of the record's per-prompt drops"
    else:
        cells = {(int(r["layer"]), r["kind"]): r for r in rec.tables["sensitivity"]}
        mean = {k: np.array([cells[(l, k)]["sensitivity"] for l in layers]) for k in kinds}
        se = {k: np.array([(cells[(l, k)]["hi"] - cells[(l, k)]["lo"]) / (2 * Z95) for l in layers]) for k in kinds}
        n0 = int(rec.metrics["n_harmful"])
        method = "normal approximation from the record's 95 % intervals, layers independent (an upper estimate of n)"
    for n in counts:
        if per_prompt:
            idx = rng.integers(0, n0, size=(draws, n))
            boots = normalized_scores({k: v[:, idx].mean(axis=-1).T for k, v in drops.items()})
        else:
            boots = normalized_scores({k: mean[k] + se[k] * np.sqrt(n0 / n) * rng.standard_normal((draws, len(layers)))
                                       for k in kinds})
        p = top_k_probability(boots, top_k)
        rows.append({"n_harmful": n, **{f"p_top{top_k}_layer{l}": float(p[pos[l]]) for l in watch},
                     "min_p": float(min(p[pos[l]] for l in watch))})
    return {"rows": rows, "method": method, "watched_layers": watch, "n_record": n0}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", help="a layer_sensitivity results.json (or its directory)")
    ap.add_argument("--counts", default="16,24,32,48,64,96,128,188", help="prompt counts n to evaluate")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--first", type=int, default=3, help="how many of the record's top layers to follow")
    ap.add_argument("--target", type=float, default=0.8, help="the P(top-k) every followed layer should reach")
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    started = start_stamp()
    rec = read_run(args.record)
    if rec.analysis != "layer_sensitivity":
        ap.error(f"{args.record} holds a {rec.analysis} run, not a layer_sensitivity one")
    counts = [int(x) for x in args.counts.split(",")]
    out = stability(rec, counts, args.top_k, args.first, args.draws, args.seed)
    reached = [r["n_harmful"] for r in out["rows"] if r["min_p"] >= args.target]
    metrics = {"method": out["method"], "watched_layers": out["watched_layers"], "n_harmful_of_record": out["n_record"],
               "target": args.target, "top_k": args.top_k,
               "n_harmful_reaching_target": reached[0] if reached else None,
               "note": None if reached else f"no count up to {max(counts)} reaches the target"}
    path = write_run(RunRecord(analysis="ranking_stability", model=rec.model, seed=args.seed, started=started,
                               config={**vars(args), "source_record": str(args.record), "source_run_id": rec.run_id},
                               metrics=metrics, tables={"by_n_harmful": out["rows"]}), args.out)
    for r in out["rows"]:
        print(r)
    print(metrics)
    print(f"results: {path}")
    return path


if __name__ == "__main__":
    main()
