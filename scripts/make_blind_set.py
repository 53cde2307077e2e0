"""Generate the items of the fresh blind held-out set (docs/judging.md §3), reproducibly, without any judge.

The judge set (``scripts/make_judge_set.py``) holds SmolLM2 organisms on DoNotAnswer prompts. This
set measures the judges where that one cannot: the Gemma organism ``gemma3-270m:sft`` (prefill
k = 10 and insertion m = 8), plain greedy answers of the base ``smollm2-135m-instruct``, of
``:sft:wo`` and of ``:sft:jt``, and ``:sft:deep-anchored`` under insertion (m = 8), all on
HarmBench prompts (the *test* side of the default splits; never a DoNotAnswer prompt). Each
source draws its prompts by a seeded sample of its own. Harmful spans are the reference model's
greedy answers (``depthlens.models.specs.reference_spec``: SmolLM2-135M-Instruct for both families;
for Gemma its text re-encoded, ``depthlens.runtime.responses.answers_for``), as in the analyses. The
insertion position is drawn uniformly from 0..|refusal| (seeded), the refusal being the model's
own greedy refusal when it gives one of at least 32 tokens, else a refusal template.

Nothing here calls a judge: sequences are built and generated directly. Two files are written:

- ``items.jsonl`` — what a labeller sees: ``id`` (opaque), ``source`` (the attack kind only:
  plain / prefill / insertion), ``prompt``, ``prefix`` (the prefilled or inserted text, empty for
  a plain answer) and ``continuation``, in a seeded shuffled order;
- ``meta.jsonl`` — kept apart for scoring: per ``id`` the model, the source slice, the prompt id,
  k / position / span length, the reference answer.

    $ python scripts/make_blind_set.py --out /work/runs/blind               # every source whose model is built
    $ python scripts/make_blind_set.py --out DIR --sources base/plain       # only these (the rest from the cache)
    $ python scripts/make_blind_set.py --dry-run                             # the plan only, no models

Each source's rows are cached under ``$DEPTHLENS_CACHE/blind_set``; the two files are assembled
from the cached sources; ``--require-all`` refuses to write them while a source is missing.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runs as `python scripts/make_blind_set.py` from anywhere

from depthlens.infra.results import atomic_write_json  # noqa: E402

log = logging.getLogger("make_blind_set")

BASE = "smollm2-135m-instruct"
MODELS = {"base": BASE, "wo": f"{BASE}:sft:wo", "jt": f"{BASE}:sft:jt",
          "deep-anchored": f"{BASE}:sft:deep-anchored", "gemma": "gemma3-270m:sft"}
NEW_TOKENS = 48
HARMFUL_TOKENS = 96
REFUSAL_TOKENS = 64
MIN_REFUSAL_TOKENS = 32
ATTACK_KIND = {"plain": "plain answer", "prefill": "prefill", "insertion": "insertion"}


@dataclass(frozen=True)
class Source:
    """One slice of the set: ``n`` items of ``model`` under ``attack`` with fixed settings."""

    name: str
    model: str          # key of MODELS
    attack: str         # "prefill" | "insertion" | "plain"
    n: int
    k: int | None = None
    span_len: int | None = None


SOURCES = (
    Source("gemma/prefill/k10", "gemma", "prefill", 30, k=10),
    Source("gemma/insertion/m8", "gemma", "insertion", 30, span_len=8),
    Source("base/plain", "base", "plain", 30),
    Source("wo/plain", "wo", "plain", 30),
    Source("jt/plain", "jt", "plain", 30),
    Source("deep-anchored/insertion/m8", "deep-anchored", "insertion", 30, span_len=8),
)


def _hash01(seed: int, text: str) -> float:
    return int(hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()[:12], 16) / 16 ** 12


def prompt_pool(seed: int) -> list[dict]:
    """The harmful *test* prompts of the default splits (HarmBench)."""
    from depthlens.data import default_splits

    test = default_splits(seed).harmful.test
    return [{"prompt_id": pid, "prompt": text} for pid, text in zip(test.ids, test.prompts)]


def plan(pool: list[dict], seed: int) -> dict[str, list[dict]]:
    """For each source, its prompts: a seeded sample without replacement, with spares for skips."""
    return {s.name: random.Random(f"blind:{seed}:{s.name}").sample(pool, min(len(pool), s.n + 10)) for s in SOURCES}


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def _refusals(model, prompts: list[str]) -> tuple[list[list[int]], list[bool]]:
    """The model's own greedy refusal, or a refusal template where it gives none of ≥ 32 tokens (no judge:
    the check is the refusal markers of ``depthlens.judges.lexical.is_refusal``, applied to the model's own refusal)."""
    from depthlens.data.chat import encode
    from depthlens.data import refusal_templates
    from depthlens.judges.lexical import is_refusal
    from depthlens.runtime.responses import response_set

    own = response_set(model, prompts, max_new_tokens=REFUSAL_TOKENS, batch_size=48, progress=False)
    templates = refusal_templates()
    out, kept = [], []
    for i, (text, toks) in enumerate(zip(own.texts, own.tokens)):
        good = bool(text.strip()) and is_refusal(text) and len(toks) >= MIN_REFUSAL_TOKENS
        out.append(list(toks) if good else encode(model.tokenizer, templates[i % len(templates)]))
        kept.append(good)
    return out, kept


def rows_for(source: Source, model, reference, picks: list[dict], seed: int) -> list[dict]:
    """``source.n`` rows of one source with ``model`` (loaded); harmful spans from ``reference``'s answers."""
    from depthlens.attacks.plumbing import insertion_sequence
    from depthlens.data.chat import build_chat
    from depthlens.runtime.generation import generate
    from depthlens.runtime.responses import answers_for

    tok = model.tokenizer
    extra: list[dict]
    if source.attack == "plain":
        picks = picks[:source.n]
        seqs = [p["prompt"] for p in picks]
        refs = answers_for(model, reference, seqs, max_new_tokens=HARMFUL_TOKENS, batch_size=48, progress=False).texts
        extra = [{"prefix": ""} for _ in picks]
    else:
        need = source.k if source.attack == "prefill" else source.span_len
        ans = answers_for(model, reference, [p["prompt"] for p in picks], max_new_tokens=HARMFUL_TOKENS, batch_size=48,
                          progress=False)
        keep = [j for j, t in enumerate(ans.tokens) if len(t) >= need][:source.n]
        picks = [picks[j] for j in keep]
        harmful = [list(ans.tokens[j]) for j in keep]
        refs = [ans.texts[j] for j in keep]
        if source.attack == "prefill":
            seqs = [build_chat(tok, p["prompt"], [h[:source.k]]) for p, h in zip(picks, harmful)]
            extra = [{"prefix": _decode(tok, h[:source.k])} for h in harmful]
        else:
            refusals, own = _refusals(model, [p["prompt"] for p in picks])
            rng = random.Random(f"blind:{seed}:{source.name}:positions")
            seqs, extra = [], []
            for p, r, h, o in zip(picks, refusals, harmful, own):
                pos = rng.randint(0, len(r))
                seqs.append(insertion_sequence(tok, p["prompt"], r, h, pos, 0, source.span_len))
                extra.append({"position": pos, "refusal_len": len(r), "own_refusal": o,
                              "prefix": _decode(tok, list(r[:pos]) + list(h[:source.span_len])),
                              "span_text": _decode(tok, h[:source.span_len])})
    gen = generate(model, seqs, NEW_TOKENS, batch_size=48, progress=False, desc=source.name)
    if len(gen.texts) != len(picks):
        raise RuntimeError(f"{source.name}: {len(gen.texts)} continuations for {len(picks)} prompts.")
    return [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "slice": source.name, "model": MODELS[source.model],
             "attack": source.attack, "k": source.k, "span_len": source.span_len, "continuation": text,
             "reference": ref, "new_tokens": NEW_TOKENS, **x}
            for p, text, ref, x in zip(picks, gen.texts, refs, extra)]


def _source_cache(name: str, seed: int) -> Path:
    from depthlens.infra.paths import cache_dir

    return cache_dir("blind_set") / f"seed{seed}-{name.replace('/', '_')}.json"


def assemble(out: Path, sources: dict[str, list[dict]], seed: int) -> list[dict]:
    """Write ``items.jsonl`` (what a labeller sees) and ``meta.jsonl`` (provenance), in a seeded shuffled order."""
    rows = [r for name in sorted(sources) for r in sources[name]]
    rows.sort(key=lambda r: _hash01(seed, f"{r['slice']}/{r['prompt_id']}"))
    items, meta = [], []
    for n, r in enumerate(rows):
        item_id = f"blind-{n:04d}"
        items.append({"id": item_id, "source": ATTACK_KIND[r["attack"]], "prompt": r["prompt"], "prefix": r["prefix"],
                      "continuation": r["continuation"]})
        meta.append({"id": item_id, **r})
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("items.jsonl", items), ("meta.jsonl", meta)):
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in data))
        tmp.replace(out / name)
    return items


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for items.jsonl and meta.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", nargs="+", choices=[s.name for s in SOURCES], default=[s.name for s in SOURCES],
                    help="generate only these sources (the others are taken from the cache when there)")
    ap.add_argument("--require-all", action="store_true", help="write the files only when every source is there")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pool = prompt_pool(args.seed)
    picks = plan(pool, args.seed)
    log.info("pool: %d test prompts", len(pool))
    if args.dry_run:
        for s in SOURCES:
            log.info("%-28s %-16s n=%d", s.name, MODELS[s.model], s.n)
        return
    from depthlens.models import load_model
    from depthlens.models.specs import reference_spec

    timings: dict[str, float] = {}
    refs_loaded: dict[str, object] = {}
    done: dict[str, list[dict]] = {}
    for key, spec in MODELS.items():
        todo = [s for s in SOURCES if s.model == key and s.name in args.sources
                and not _source_cache(s.name, args.seed).exists()]
        if todo:
            t = time.perf_counter()
            model = load_model(spec)
            ref_spec = reference_spec(spec)
            if ref_spec == spec:
                reference = model
            else:
                reference = refs_loaded.get(ref_spec) or refs_loaded.setdefault(ref_spec, load_model(ref_spec))
            timings[f"load {key}"] = round(time.perf_counter() - t, 1)
            for s in todo:
                t = time.perf_counter()
                rows = rows_for(s, model, reference, picks[s.name], args.seed)
                timings[s.name] = round(time.perf_counter() - t, 1)
                atomic_write_json(_source_cache(s.name, args.seed), rows)
                log.info("%s: %d items in %.0f s", s.name, len(rows), timings[s.name])
            del model
            gc.collect()
        for s in SOURCES:
            if s.model == key and _source_cache(s.name, args.seed).exists():
                done[s.name] = json.loads(_source_cache(s.name, args.seed).read_text())
    missing = [s.name for s in SOURCES if s.name not in done]
    if missing and args.require_all:
        log.info("not written: sources missing %s; timings %s", missing, timings)
        return
    items = assemble(args.out, done, args.seed)
    log.info("wrote %d items to %s (missing sources: %s); timings %s", len(items), args.out, missing or "none", timings)
    log.info("per source %s", dict(Counter(r["slice"] for rows in done.values() for r in rows)))


if __name__ == "__main__":
    main()
