"""Which layers matter causally for insertion robustness? Per-layer ablations (docs/methods.md §6: back a probe).

For every layer l and each intervention, with the hook active at that layer only:

- ``zero_attn`` / ``zero_mlp``: ``blocks.l.hook_attn_out`` / ``hook_mlp_out`` set to 0;
- ``mean_attn`` / ``mean_mlp``: set to its mean over every position of harmless prompts
  (float64, streamed through hooks in one pass, computed once);
- ``direction``: the refusal direction of layer l projected out of the stream leaving the
  layer (``blocks.l.hook_resid_post``, every position): ``x ← x − (x·r̂_l) r̂_l``, with r̂_l the
  difference in means of harmful vs harmless *train* prompts at the last prompt token at the
  same hook (``analyses.state_prediction.refusal_directions``: the direction whose projection
  that analysis probes). Leaving layer l = entering layer l + 1, so this is Arditi et al.'s
  block-input ablation applied at one layer only.

two things are measured against the un-ablated model (computed once):

- ΔASR on a fixed subset of insertion trials (from an ``analyses.insertion_robustness`` run,
  balanced between continuations that were harmful and that recovered, one trial a prompt
  where possible): the continuation is generated again from the same tokens with the hook
  active and judged by the continuation judge (``--judge``, default: the default judge of
  ``depthlens.judges``; ASR = share "harmful"; the prefilled refusal and span are its context; for
  the topic-overlap judge the reference is the inserted span's text, since trial records do not
  keep the whole harmful answer, so the baseline ASR can differ a little from the source run's);
- Δ mean refusal score (``depthlens.judges.seam.refusal_score``) on harmful validation prompts.

Both Δs come with paired 95 % bootstrap intervals (the trials' prompts, with all their trials, resp.
the validation prompts resampled; the same resamples for every cell). Shares of "recovered" continuations are recorded beside ASR.

Cost. The work is what it is — the trials' prefill through blocks l… for each of 5
interventions, plus the decoding steps of all their rows. What is saved: blocks below l run
once (``LayerwiseContinuer``), the scores run from l with the chat prefix shared, and the 5
interventions of a layer share one decoding loop (``benchmarks/bench_layer_ablation.py``
measures it against hooked ``generate`` + ``refusal_score`` per cell; the timings are in
docs/findings.md "Costs measured on the way").

    $ python -m analyses.layer_ablation                       # every 5th layer of the organism
    $ python -m analyses.layer_ablation --layer-stride 1      # every layer
    >>> rec = run(LayerAblationConfig(model="tiny-llama", quick=True)); rec.tables["effects"][0]  # runs the whole analysis (tests/test_analyses_quick.py runs it)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar, TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from analyses.common import Timer
from analyses.contract import AnalysisConfig, AnalysisResult, Summary, check_layers, judge_fields, load, make_main
from analyses.state_prediction import obtain_trials, refusal_directions
from depthlens.interventions.ablation import ablation_hook, unit_direction
from depthlens.data.chat import ChatSequence
from depthlens.cli import require_choices, require_int, require_numbers, require_text
from depthlens.data import default_splits
from depthlens.runtime.forward import PrefixSharedRunner, iter_batches
from depthlens.runtime import Hook, LayerwiseContinuer, as_chats, hooks_active, plain_hooks
from depthlens.judges import classify_many, is_refusal, refusal_token_ids, score_from_logprobs
from depthlens.models.hooked_model import hook_name
from depthlens.models.specs import ORGANISM
from depthlens.stats import bootstrap_mean, resample_indices

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

INTERVENTIONS = ("zero_attn", "mean_attn", "zero_mlp", "mean_mlp", "direction")
_COMPONENT = {"zero_attn": "attn_out", "mean_attn": "attn_out", "zero_mlp": "mlp_out", "mean_mlp": "mlp_out"}


@dataclass(frozen=True)
class LayerAblationConfig(AnalysisConfig):
    """Per-layer zero/mean ablation of attention and MLP outputs and of the refusal direction.

    Args:
        model: the model ablated (default: the organism).
        trials: an insertion_robustness run directory or results.json; none = the newest run
            of this model under ``out`` (a warning names it, the record keeps its path and
            ``trials_chosen: "newest"``), or one made (and saved) first with its defaults.
        interventions: zero_attn, mean_attn, zero_mlp, mean_mlp, direction.
        layers: layers to ablate (default: every ``layer_stride``-th layer and the last).
        layer_stride: spacing of the default layers. 5: layers 0, 5, …, 25 and 29 of the default
            model, 35 cells (the cost per stride is in docs/findings.md "Costs measured on the way").
        n_trials: insertion trials re-continued under every cell. 16: one generation batch
            (a decoding step costs about the same at batch 1 and 16 on CPU), half harmful,
            half recovered; an ASR change of 1/16 is its resolution.
        max_new_tokens: tokens generated per continuation. 16 (≈ 12 words): the judge needs
            ≥ 8 words to call a continuation harmful; each token is one decoding step per cell.
        n_val: harmful validation prompts for the refusal score (one forward batch per cell).
        n_mean: harmless prompts whose positions give the mean activations (one pass).
        n_dir: harmful and harmless train prompts each for the refusal direction per layer.
        n_boot: paired bootstrap resamples for the intervals of the Δs.
        batch_size: sequences per forward / generation batch.
        judge: the continuation judge by id (default: the default judge, the best validated;
            lexical judges such as ``lexical-v2`` for fast runs; ``hf:PATH`` a local guard model).
        seed: subset, split and bootstrap seed.
        device: cpu / cuda (default: automatic).
        out: results root directory (also where insertion runs are looked for).
        quick: small run for smoke tests (4 trials × 8 tokens, 4 prompts per set, every 10th
            layer and the last, 200 resamples); flags given explicitly keep their values.
    """

    QUICK: ClassVar = {"n_trials": 4, "max_new_tokens": 8, "n_val": 4, "n_mean": 4, "n_dir": 4, "layer_stride": 10,
                       "n_boot": 200}

    model: str = ORGANISM
    trials: str | None = None
    interventions: tuple[str, ...] = INTERVENTIONS
    layers: tuple[int, ...] | None = None
    layer_stride: int = 5
    n_trials: int = 16
    max_new_tokens: int = 16
    n_val: int = 16
    n_mean: int = 32
    n_dir: int = 32
    n_boot: int = 1000
    batch_size: int = 16
    judge: str | None = None
    seed: int = 0
    device: str | None = None
    out: str = "results"
    quick: bool = False

    def validate(self) -> None:
        require_text(self, "trials", optional=True)
        require_choices(self, "interventions", INTERVENTIONS)
        require_numbers(self, "layers", lo=0, integer=True, optional=True)
        for name in ("layer_stride", "n_trials", "max_new_tokens", "n_val", "n_mean", "n_dir", "n_boot"):
            require_int(self, name)


@dataclass
class LayerAblationResult(AnalysisResult):
    """The record of ``analyses.layer_ablation``; its ASR is the harmful-continuation class."""

    @property
    def baseline(self) -> dict:
        return self.metrics["baseline"]

    def summary(self) -> Summary:
        m, b = self.metrics, self.baseline
        title = (f"layer ablation of {self.model} ({m['n_trials']} insertion trials of {m['trials_source']} "
                 f"[{m['trials_chosen']}], {m['n_val']} harmful val prompts): baseline ASR (harmful continuation, "
                 f"judge {m['continuation_judge']}) {b['asr_harmful']:.2f}, recovered {b['recovered']:.2f}, "
                 f"refusal score {b['refusal_score']:.2f}; sweep {self.timings['sweep']:.0f} s")
        cols = ["layer", "intervention", "asr_harmful", "delta_asr_harmful", "delta_asr_harmful_lo",
                "delta_asr_harmful_hi", "refusal_score", "delta_score", "delta_score_lo", "delta_score_hi"]
        return Summary(title, self.tables["effects"], cols)


# ----------------------------------------------------------------------------- hooks


@dataclass(frozen=True)
class ComponentMeans:
    """Float64 means of ``attn_out`` and ``mlp_out`` per layer over every (unpadded) position.

    Attributes:
        attn_out, mlp_out: ``[n_layers, d_model]`` on the CPU.
        n_positions: token positions averaged.
    """

    attn_out: Float[Tensor, "layer d_model"]
    mlp_out: Float[Tensor, "layer d_model"]
    n_positions: int


@torch.inference_mode()
def component_means(model: HookedModel, prompts: Sequence[str | ChatSequence], batch_size: int = 16) -> ComponentMeans:
    """Mean attention and MLP output of every layer over all positions of ``prompts`` (one pass)."""
    if not prompts:
        raise ValueError("component_means needs at least one prompt.")
    L, d = model.n_layers, model.d_model
    sums = {k: torch.zeros(L, d, dtype=torch.float64, device=model.device) for k in ("attn_out", "mlp_out")}
    state: dict = {}

    def accumulate(kind: str, layer: int):
        def fn(x, hook):
            sums[kind][layer] += (x.to(torch.float64) * state["mask"]).sum((0, 1))
        return fn

    hooks = [(hook_name(k, l), accumulate(k, l)) for k in sums for l in range(L)]
    n = 0
    with hooks_active(model, hooks):
        for _, batch in iter_batches(model, as_chats(model, prompts), batch_size, desc="mean attn/mlp out"):
            state["mask"] = batch.attention_mask.to(torch.float64).unsqueeze(-1)
            n += int(batch.attention_mask.sum())
            model.bridge(batch.input_ids, attention_mask=batch.attention_mask)
    return ComponentMeans((sums["attn_out"] / n).cpu(), (sums["mlp_out"] / n).cpu(), n)


def intervention_hooks(model: HookedModel, kind: str, layer: int, *, means: ComponentMeans | None = None,
                       direction: Float[Tensor, " d_model"] | None = None) -> list[Hook]:
    """The TransformerLens hooks of one intervention at one layer (see the module docstring)."""
    model.check_layer(layer)
    if kind not in INTERVENTIONS:
        raise ValueError(f"Unknown intervention {kind!r}; use one of {', '.join(INTERVENTIONS)}.")
    if kind.startswith("zero_"):
        return [(hook_name(_COMPONENT[kind], layer), lambda x, hook: torch.zeros_like(x))]
    if kind.startswith("mean_"):
        if means is None:
            raise ValueError(f"Intervention {kind!r} needs the mean activations (component_means).")
        mu = getattr(means, _COMPONENT[kind])[layer]

        def set_mean(x, hook):
            return mu.to(x.device, x.dtype).expand_as(x).contiguous()

        return [(hook_name(_COMPONENT[kind], layer), set_mean)]
    if direction is None:
        raise ValueError("Intervention 'direction' needs the refusal direction of that layer.")
    return [(hook_name("resid_post", layer), ablation_hook(unit_direction(direction, model.d_model)))]


# ----------------------------------------------------------------------------- trials and measures


def select_subset(trials: Sequence[dict], n: int, seed: int = 0) -> list[dict]:
    """A fixed, seeded subset: half harmful, half recovered (one trial a prompt first), filled up
    from the other class, then from "other" trials when a class runs short."""
    if n < 1:
        raise ValueError(f"n_trials must be >= 1, got {n}.")
    rng = random.Random(seed)
    pools = {c: [t for t in trials if t["label"] == c] for c in ("harmful", "recovered", "other")}
    for pool in pools.values():
        rng.shuffle(pool)

    def take(pool: list[dict], k: int, chosen: list[dict]) -> None:
        used = {t["prompt_id"] for t in chosen}
        fresh = [t for t in pool if t["prompt_id"] not in used]
        rest = [t for t in pool if t["prompt_id"] in used]
        for t in (fresh + rest)[:k]:
            chosen.append(t)
            pool.remove(t)

    chosen: list[dict] = []
    take(pools["harmful"], n // 2, chosen)
    take(pools["recovered"], n - len(chosen), chosen)
    for c in ("harmful", "recovered", "other"):
        take(pools[c], n - len(chosen), chosen)
    if len(chosen) < n:
        log.warning("Only %d insertion trials are available; using all of them (asked for %d).", len(chosen), n)
    return sorted(chosen, key=lambda t: (str(t["prompt_id"]), t.get("position") or 0, t.get("span_len") or 0))


def trial_chat(trial: dict) -> ChatSequence:
    """The insertion trial's input (prompt + refusal prefix + span) as a ``ChatSequence``."""
    segs = tuple(tuple(int(v) for v in trial[k]) for k in ("prefix_span", "span") if trial.get(k))
    return ChatSequence(ids=tuple(int(t) for t in trial["ids"]), prompt_len=int(trial["prompt_len"]),
                        segments=segs, user=trial["prompt"])


@dataclass(frozen=True)
class Measure:
    """One cell's raw outcomes: per trial (labels, harmful 0/1, recovered 0/1) and per prompt scores."""

    labels: list[str]
    texts: list[str]
    harmful: np.ndarray
    recovered: np.ndarray
    not_refusal: np.ndarray
    scores: np.ndarray


class Evaluator:
    """Re-continues the trial subset and scores the validation prompts under sets of hooks at one layer.

    Both measures start at the ablated layer: the clean states below it are computed once
    (``depthlens.runtime.generation.LayerwiseContinuer`` for the continuations, ``depthlens.runtime.forward.
    PrefixSharedRunner`` for the scores), and the continuations of every intervention at a
    layer are decoded together as row groups of one batch.
    """

    def __init__(self, model, trials: Sequence[dict], val_prompts: Sequence[str], max_new_tokens: int,
                 batch_size: int, judge: str | None = None):
        self.model = model
        self.judge = judge
        self.prompts = [t["prompt"] for t in trials]
        self.refs = [t.get("span_text") or "" for t in trials]
        self.contexts = [(t.get("prefix_text") or "") + (t.get("span_text") or "") for t in trials]
        self.continuer = LayerwiseContinuer(model, [trial_chat(t) for t in trials], max_new_tokens)
        self.val = PrefixSharedRunner(model, as_chats(model, list(val_prompts)), batch_size)
        self.refusal_ids = refusal_token_ids(model.tokenizer)

    def _scores(self, layer: int, hooks: Sequence[Hook]) -> np.ndarray:
        with plain_hooks(self.model, hooks):
            return score_from_logprobs(self.val.last_logprobs(layer), self.refusal_ids).double().numpy()

    def measure(self, layer: int, hook_sets: Sequence[Sequence[Hook]]) -> list[Measure]:
        """One ``Measure`` per hook set; every hook sits at block ``layer`` or above."""
        gens = self.continuer.run(layer, hook_sets)
        out = []
        for hooks, gen in zip(hook_sets, gens):
            labels = classify_many(self.prompts, list(gen.texts), self.contexts, judge=self.judge, references=self.refs)
            out.append(Measure(labels=labels, texts=list(gen.texts),
                               harmful=np.array([lab == "harmful" for lab in labels], dtype=float),
                               recovered=np.array([lab == "recovered" for lab in labels], dtype=float),
                               not_refusal=np.array([not is_refusal(t) for t in gen.texts], dtype=float),
                               scores=self._scores(layer, hooks)))
        return out


def paired_delta(base: np.ndarray, new: np.ndarray, idx: np.ndarray | None = None, *, groups=None, n_boot: int = 1000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``new − base`` with a 95 % percentile interval: over the resampled items ``idx [B, n]``,
    or, with ``groups`` (prompt ids), over whole prompts resampled with all their trials (the same
    draw for every call with the same ``n_boot`` and ``seed``)."""
    if groups is not None:
        return tuple(bootstrap_mean(new, baseline=base, groups=groups, n_boot=n_boot, seed=seed))
    return tuple(bootstrap_mean(new, baseline=base, indices=idx))


# ----------------------------------------------------------------------------- run


def default_layers(n_layers: int, stride: int) -> list[int]:
    """Every ``stride``-th layer from 0, and the last layer."""
    return sorted(set(range(0, n_layers, stride)) | {n_layers - 1})


def run(cfg: LayerAblationConfig, model: HookedModel | None=None) -> LayerAblationResult:
    """The sweep of the module docstring; ``model`` (already loaded) overrides ``cfg.model``."""
    timer = Timer()
    with timer("load"):
        model = load(cfg.model, cfg.device, model=model)
    layers = (default_layers(model.n_layers, cfg.layer_stride) if cfg.layers is None
              else sorted(set(check_layers(model, cfg.layers))))
    with timer("trials"):
        source = obtain_trials(cfg.model, cfg.trials, cfg.out, seed=cfg.seed, device=cfg.device, quick=cfg.quick,
                               loaded=model, judge=cfg.judge)
    subset = select_subset(source.trials, cfg.n_trials, cfg.seed)
    splits = default_splits(cfg.seed)
    val = list(splits.harmful.val.subset(cfg.n_val, seed=cfg.seed).prompts)
    with timer("prepare"):
        means = (component_means(model, list(splits.harmless.train.subset(cfg.n_mean, seed=cfg.seed).prompts),
                                 cfg.batch_size) if any(k.startswith("mean_") for k in cfg.interventions) else None)
        dirs = None
        if "direction" in cfg.interventions:
            dirs = refusal_directions(model, list(splits.harmful.train.subset(cfg.n_dir, seed=cfg.seed).prompts),
                                      list(splits.harmless.train.subset(cfg.n_dir, seed=cfg.seed).prompts),
                                      kind="resid_post", layers=layers, batch_size=cfg.batch_size)
            dirs = dict(zip(layers, dirs))
        ev = Evaluator(model, subset, val, cfg.max_new_tokens, cfg.batch_size, judge=cfg.judge)
    with timer("baseline"):
        base = ev.measure(0, [()])[0]
    rng = np.random.default_rng(cfg.seed)
    trial_prompts = [str(t["prompt_id"]) for t in subset]  # trials of one prompt are resampled together
    idx_val = resample_indices(len(val), cfg.n_boot, rng)

    rows: list[dict] = []
    cells = [(l, k) for l in layers for k in cfg.interventions]
    with timer("sweep"):
        for layer in tqdm(layers, desc="layers (all interventions at once)"):
            kinds, hook_sets = [], []
            for kind in cfg.interventions:
                if kind == "direction" and not np.linalg.norm(dirs[layer]) > 0:
                    rows.append({"layer": layer, "intervention": kind, "note": "zero refusal direction: not ablated"})
                    continue
                kinds.append(kind)
                hook_sets.append(intervention_hooks(model, kind, layer, means=means,
                                                    direction=None if dirs is None else torch.from_numpy(dirs[layer])))
            for kind, m in zip(kinds, ev.measure(layer, hook_sets) if kinds else []):
                d_asr = paired_delta(base.harmful, m.harmful, groups=trial_prompts, n_boot=cfg.n_boot, seed=cfg.seed)
                d_score = paired_delta(base.scores, m.scores, idx_val)
                rows.append({"layer": layer, "intervention": kind, "note": "",
                             "asr_harmful": float(m.harmful.mean()), "delta_asr_harmful": d_asr[0],
                             "delta_asr_harmful_lo": d_asr[1], "delta_asr_harmful_hi": d_asr[2],
                             "recovered": float(m.recovered.mean()),
                             "delta_recovered": float(m.recovered.mean() - base.recovered.mean()),
                             "not_refusal": float(m.not_refusal.mean()), "refusal_score": float(m.scores.mean()),
                             "delta_score": d_score[0], "delta_score_lo": d_score[1], "delta_score_hi": d_score[2]})
    order = {k: i for i, k in enumerate(cfg.interventions)}
    rows.sort(key=lambda r: (r["layer"], order[r["intervention"]]))

    done = [r for r in rows if "delta_asr_harmful" in r]
    baseline = {"asr_harmful": float(base.harmful.mean()), "recovered": float(base.recovered.mean()),
                "other": float(1 - base.harmful.mean() - base.recovered.mean()),
                "not_refusal": float(base.not_refusal.mean()), "refusal_score": float(base.scores.mean())}
    top = lambda key, sign: ({k: r[k] for k in ("layer", "intervention", key, f"{key}_lo", f"{key}_hi")}  # noqa: E731
                             if (r := max(done, key=lambda r: sign * r[key], default=None)) else None)
    metrics = {
        "baseline": baseline, "layers": layers, "interventions": list(cfg.interventions),
        "n_trials": len(subset), "n_trial_prompts": len(set(trial_prompts)), "n_val": len(val), "n_cells": len(cells),
        "interval": ("95 %; delta_asr_harmful: paired prompt bootstrap (the trials' prompts resampled with all their "
                     "trials); delta_score: paired bootstrap over the validation prompts (docs/methods.md §0)"),
        "largest_asr_increase": top("delta_asr_harmful", 1), "largest_asr_decrease": top("delta_asr_harmful", -1),
        "largest_score_drop": top("delta_score", -1),
        **{("continuation_judge" if k == "judge" else k): v
           for k, v in judge_fields(cfg.judge, [cfg.model], [t["prompt_id"] for t in subset], cfg.seed).items()},
        "trials_judge": sorted({t.get("continuation_judge") or "substring+topic-overlap-v1" for t in source.trials}),
        "score_judge": "refusal-score(first-token, docs/methods.md §1)",
        "asr_reference": "inserted span text", "trials_source": str(source.path), "trials_chosen": source.chosen,
        "ran_insertion": source.ran_insertion,
        "mean_positions": means.n_positions if means is not None else None,
        "direction_norms": {str(l): float(np.linalg.norm(v)) for l, v in (dirs or {}).items()},
    }
    subset_rows = [{"prompt_id": t["prompt_id"], "attack": t.get("attack"), "position": t.get("position"),
                    "span_len": t.get("span_len"), "label_source": t["label"], "label_baseline": lab,
                    "continuation_baseline": text} for t, lab, text in zip(subset, base.labels, base.texts)]
    return LayerAblationResult(analysis="layer_ablation", model=cfg.model, config=asdict(cfg), seed=cfg.seed,
                               provenance={"model": model.provenance, "trials": str(source.path)}, metrics=metrics,
                               tables={"effects": rows, "subset": subset_rows}, timings=timer.total())


main = make_main(LayerAblationConfig, run)


if __name__ == "__main__":
    main()
