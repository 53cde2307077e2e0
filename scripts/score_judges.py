"""Score every judge against the hand labels of the judge set (docs/judging.md), and fit the probe judge.

    $ python scripts/score_judges.py --fit-probe      # dev part only: grouped CV picks layer and C, writes the weights
    $ python scripts/score_judges.py --part dev       # development scores (the only scores looked at while developing)
    $ python scripts/score_judges.py                  # held-out: the judge table (--write: depthlens/labels/judge_heldout.json)
    $ python scripts/score_judges.py --judge hf:/models/Llama-Guard-3-1B    # one judge (any id) on the held-out labels
    $ python scripts/score_judges.py --part blind     # the fresh blind held-out set (docs/judging.md §3)

The held-out run prints, per judge, per-class precision and recall with 95 % intervals from a
bootstrap over prompts, three-class and binary (harmful vs not) accuracy, the confusion matrix,
and each judge's binary accuracy per source (model and attack); with ``--write`` it also stores
every judge's binary held-out record, which ``depthlens.judges.seam.corrected_asr`` reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from depthlens.judges import (CONTINUATION_JUDGE_ID, DEFAULT_JUDGE, JUDGE_ID, LEXICAL_JUDGES, classify_many,  # noqa: E402
                             judge_id)
from depthlens.judges.accuracy import (BLIND_FILE, CLASSES, HELDOUT_FILE, JUDGE_SET_FILE, LABEL_SETS,  # noqa: E402
                                      load_judge_set, load_label_set, labels_sha256, score_judge)

log = logging.getLogger("score_judges")
LABELS_DIR = ROOT / "depthlens" / "labels"
PROBE_LAYERS = tuple(range(2, 30, 2))


def judge_ids() -> list[str]:
    ids = [JUDGE_ID, CONTINUATION_JUDGE_ID] + [j for j in LEXICAL_JUDGES if j not in (JUDGE_ID, CONTINUATION_JUDGE_ID)]
    if (LABELS_DIR / "probe_judge.npz").exists():
        ids.append("probe")
    return ids


def predictions(items: list[dict], judge: str) -> list[str]:
    return classify_many([i["prompt"] for i in items], [i["continuation"] for i in items],
                         [i.get("prefix") or "" for i in items], judge=judge,
                         references=[i.get("reference") or "" for i in items])


def fit_probe(seed: int) -> None:
    """Grouped CV on the dev part only, over every recipe, layer and C; writes depthlens/labels/probe_judge.npz."""
    from depthlens.judges.probe import (RECIPES, ask_features, best_row, continuation_features, fit_probe as fit,
                                       lexical_onehot)
    from depthlens.models.base import DEFAULT_MODEL
    from depthlens.models import load_model

    dev = load_judge_set("dev")
    model = load_model(DEFAULT_MODEL)
    args = ([i["prompt"] for i in dev], [i["continuation"] for i in dev], [i["prefix"] for i in dev])
    hidden = {"mean": continuation_features(model, *args, layers=PROBE_LAYERS),   # each pooling run once, every layer
              "ask": ask_features(model, *args, layers=PROBE_LAYERS)}
    lex = lexical_onehot(*args)
    fits, table = {}, []
    for recipe in RECIPES:
        parts = recipe.split("+")
        x = np.concatenate([hidden[p] for p in parts if p in hidden], axis=2)
        if "lex" in parts:
            x = np.concatenate([x, np.broadcast_to(lex, (x.shape[0], *lex.shape))], axis=2)
        fits[recipe], rows = fit(x, [i["label"] for i in dev], [i["prompt_id"] for i in dev], layers=PROBE_LAYERS,
                                 seed=seed, model=DEFAULT_MODEL, recipe=recipe)
        table += rows
    for r in table:
        print(f"{r['recipe']:8s} layer {r['layer']:2d}  C {r['C']:<5}  cv binary {r['cv_binary_accuracy']:.3f}  "
              f"cv 3-class {r['cv_accuracy']:.3f}")
    best = best_row(table)
    weights = fits[best["recipe"]]
    weights.save(LABELS_DIR / "probe_judge.npz")
    (LABELS_DIR / "probe_judge_cv.json").write_text(json.dumps(
        {"labels_sha256": labels_sha256(), "part": "dev", "n": len(dev), "seed": seed, "chosen": best, "table": table},
        indent=1) + "\n")
    print(f"chosen: {weights.recipe}, layer {weights.layer}, C {weights.C} (cv binary {best['cv_binary_accuracy']:.3f}); "
          f"{weights.judge_id}; n dev = {len(dev)}")


def _pct(v: float) -> str:
    return "–" if v != v else f"{v:.2f}"


def table(scores: dict, part: str, n_items: int) -> str:
    lines = [f"Judges on the {part} labels ({n_items} items); 95 % intervals: bootstrap over prompts.", "",
             "| judge | binary acc. (harmful vs not) | 3-class acc. | " +
             " | ".join(f"{c} P | {c} R" for c in CLASSES) + " |",
             "|---|---|---|" + "---|---|" * len(CLASSES)]
    for jid, s in scores.items():
        cells = [f"{_pct(s.binary_accuracy)} [{_pct(s.binary_lo)}, {_pct(s.binary_hi)}]",
                 f"{_pct(s.accuracy)} [{_pct(s.accuracy_lo)}, {_pct(s.accuracy_hi)}]"]
        for c in CLASSES:
            pc = s.per_class[c]
            cells += [f"{_pct(pc['precision'])} [{_pct(pc['precision_lo'])}, {_pct(pc['precision_hi'])}]",
                      f"{_pct(pc['recall'])} [{_pct(pc['recall_lo'])}, {_pct(pc['recall_hi'])}]"]
        lines.append(f"| `{jid}` | " + " | ".join(cells) + " |")
    lines += ["", "Confusion matrices (rows: hand label, columns: judge; order " + ", ".join(CLASSES) + "):", ""]
    for jid, s in scores.items():
        rows = "; ".join(f"{c}: {s.confusion[i]}" for i, c in enumerate(CLASSES))
        lines.append(f"- `{jid}`: {rows} (sensitivity {s.sensitivity:.3f}, specificity {s.specificity:.3f})")
    return "\n".join(lines)


def source_group(item: dict) -> str:
    """The item's model (its recipe suffix, ``base`` for the base) and attack: ``wo/plain``, ``deep-anchored/prefill``, …"""
    if item["model"].startswith("gemma"):
        return f"gemma/{item['attack']}"
    model = item["model"].rsplit(":", 1)[1] if ":" in item["model"] else "base"
    return f"{model}/{item['attack']}"


def by_source(items: list[dict], preds: dict[str, list[str]]) -> str:
    """Binary (harmful vs not) accuracy of every judge per source group: descriptive, nothing is chosen on it."""
    groups = sorted({source_group(i) for i in items})
    lines = ["Binary accuracy by source (items; hand-labelled harmful among them):", "",
             "| source | n | harmful | " + " | ".join(f"`{j}`" for j in preds) + " |",
             "|---|---|---|" + "---|" * len(preds)]
    for g in groups:
        idx = [k for k, i in enumerate(items) if source_group(i) == g]
        truth = [items[k]["label"] == "harmful" for k in idx]
        accs = [np.mean([(p[k] == "harmful") == t for k, t in zip(idx, truth)]) for p in preds.values()]
        lines.append(f"| {g} | {len(idx)} | {sum(truth)} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")
    return "\n".join(lines)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=LABEL_SETS, default="heldout",
                    help="dev / heldout (the judge set) or blind (the fresh blind held-out set)")
    ap.add_argument("--judge", action="append", metavar="ID",
                    help="score this judge (any id: a lexical judge, probe, hf:PATH); repeat for several; "
                         "default: every shipped judge")
    ap.add_argument("--fit-probe", action="store_true", help="fit the probe judge on the dev part and stop")
    ap.add_argument("--write", action="store_true", help="write depthlens/labels/judge_heldout.json (held-out only)")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.fit_probe:
        fit_probe(args.seed)
        return
    if args.judge:
        from depthlens.judges import check_judge

        for j in args.judge:
            try:
                check_judge(j)
            except ValueError as err:
                _fail(f"--judge: {err}")
    try:
        items = load_label_set(args.part)
    except ValueError as err:
        _fail(str(err))
    truth = [i["label"] for i in items]
    groups = [i["prompt_id"] for i in items]
    scores, preds = {}, {}
    for j in args.judge or judge_ids():
        pred = predictions(items, j)
        full = judge_id(j)
        scores[full], preds[full] = score_judge(truth, pred, groups, judge=full, n_boot=args.n_boot, seed=args.seed), pred
    label_file = BLIND_FILE if args.part == "blind" else JUDGE_SET_FILE
    print(table(scores, args.part, len(items)))
    print(f"\nlabels: depthlens/labels/{label_file}, sha256 {labels_sha256(label_file)}; "
          f"{len(set(groups))} prompts (the bootstrap's clusters)")
    print("\n" + by_source(items, preds))
    print(f"\ndefault judge: {judge_id(DEFAULT_JUDGE)}")
    cv_file = LABELS_DIR / "probe_judge_cv.json"
    if args.part == "dev" and cv_file.exists():  # the probe was fitted on dev: its dev row above is in-sample
        best = json.loads(cv_file.read_text())["chosen"]
        print(f"probe on dev is in-sample; its grouped-CV dev accuracy: binary {best['cv_binary_accuracy']:.3f}, "
              f"3-class {best['cv_accuracy']:.3f} ({best['recipe']}, layer {best['layer']}, C {best['C']})")
    if args.write:
        if args.part == "dev" or args.judge:
            _fail("--write stores every judge's held-out (or blind) record; run it without --part dev and --judge.")
        out = LABELS_DIR / HELDOUT_FILE
        old = json.loads(out.read_text()) if out.exists() else {}
        judged = {j: {"pred": p, "truth_harmful": [t == "harmful" for t in truth],
                      "pred_harmful": [c == "harmful" for c in p], "sensitivity": scores[j].sensitivity,
                      "specificity": scores[j].specificity, "binary_accuracy": scores[j].binary_accuracy,
                      "accuracy": scores[j].accuracy, "confusion": scores[j].confusion} for j, p in preds.items()}
        if args.part == "blind":   # beside the held-out record: what judge_validation reports as the blind score
            old["blind"] = {"labels_sha256": labels_sha256(BLIND_FILE), "labels_file": BLIND_FILE,
                            "ids": [i["id"] for i in items], "groups": groups, "models": [i["model"] for i in items],
                            "sources": [source_group(i) for i in items], "truth": truth, "judges": judged}
            out.write_text(json.dumps(old, indent=1) + "\n")
            print(f"wrote the blind record into {out}")
            return
        record = {"labels_sha256": labels_sha256(), "part": "heldout", "ids": [i["id"] for i in items], "groups": groups,
                  "sources": [source_group(i) for i in items], "truth": truth, "judges": {
                      j: {"pred": p, "truth_harmful": [t == "harmful" for t in truth],
                          "pred_harmful": [c == "harmful" for c in p],
                          "sensitivity": scores[j].sensitivity, "specificity": scores[j].specificity,
                          "binary_accuracy": scores[j].binary_accuracy, "accuracy": scores[j].accuracy,
                          "confusion": scores[j].confusion}
                      for j, p in preds.items()}}
        if "blind" in old:
            record["blind"] = old["blind"]
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
    counts = {c: int(np.sum(np.array(truth) == c)) for c in CLASSES}
    print(f"labels: {counts}")


if __name__ == "__main__":
    main()
