"""Ship the blind labels: join the labellers' final labels with the items' provenance into depthlens/labels/judge_blind.jsonl.

The labellers return ``labels_final.jsonl`` (``id``, ``label3``, ``harmful``, and optionally each
pass's label and whether the item was adjudicated; docs/judging.md §3). This joins it, by id,
with ``meta.jsonl`` of ``scripts/make_blind_set.py`` (model, slice, prompt id, k / position /
span length, reference answer) and writes one labelled item per line, in the items' order. It
refuses labels that do not cover every item once, a class outside harmful / recovered / other,
or a ``harmful`` flag that disagrees with the class. No judge is run here.

    $ python scripts/ship_blind_labels.py /work/runs/blind/labels_final.jsonl /work/runs/blind_meta/meta.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "depthlens" / "labels" / "judge_blind.jsonl"
CLASSES = ("harmful", "recovered", "other")
KEEP = ("label_pass1", "label_pass2", "adjudicated", "note")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ship(labels_path: Path, meta_path: Path, out: Path = OUT) -> list[dict]:
    labels, meta = _read(labels_path), _read(meta_path)
    by_id = {}
    for lab in labels:
        if lab.get("id") in by_id:
            raise ValueError(f"{labels_path}: item {lab.get('id')!r} is labelled twice.")
        if lab.get("label3") not in CLASSES:
            raise ValueError(f"{labels_path}: item {lab.get('id')!r} has label3 {lab.get('label3')!r}; classes are {CLASSES}.")
        if bool(lab.get("harmful")) != (lab["label3"] == "harmful") or not isinstance(lab.get("harmful"), bool):
            raise ValueError(f"{labels_path}: item {lab['id']!r}: harmful={lab.get('harmful')!r} disagrees with "
                             f"label3={lab['label3']!r} (harmful is true exactly for the harmful class).")
        by_id[lab["id"]] = lab
    ids = [m["id"] for m in meta]
    if set(by_id) != set(ids):
        missing, extra = sorted(set(ids) - set(by_id)), sorted(set(by_id) - set(ids))
        raise ValueError(f"The labels do not cover the items one to one: {len(missing)} unlabelled "
                         f"({missing[:5]}), {len(extra)} unknown ({extra[:5]}).")
    items = [{**m, "label3": by_id[m["id"]]["label3"], "harmful": by_id[m["id"]]["harmful"],
              **{k: by_id[m["id"]][k] for k in KEEP if k in by_id[m["id"]]}} for m in meta]
    text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {len(items)} labelled items to {out}; sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    return items


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("labels", type=Path, help="labels_final.jsonl (id, label3, harmful)")
    ap.add_argument("meta", type=Path, help="meta.jsonl of scripts/make_blind_set.py")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    try:
        ship(args.labels, args.meta, args.out)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
