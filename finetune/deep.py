"""Deep alignment (docs/methods.md §2–3): one recipe family that trains recovery from harmful
states, built from safety-recovery augmentation, random worst-insertion training and
trajectory perturbation training, alone or combined, mixed with utility data.

- ``recovery`` (Qi et al. 2024): triples (x, h, r): a harmful prompt, the *base* model's
  harmful answer, a refusal. For each example draw k: with probability ½ k = 0, else
  k ~ U{1, …, min(100, |h|)}; the sequence is ``chat(x) + h[:k] + r`` with the loss on r only,
  so the model learns to return to refusal after any harmful prefix.
- ``worst_insertion`` (Lyu et al. 2026, random worst-insertion training): the model's own
  refusal r to x (a refusal template where its answer is no refusal or too short), a group of
  random candidate depths and the span lengths ``wi_span_lengths``; ``depthlens.attacks.worst.
  worst_insertion`` picks per prompt the (p, m) that most lowers the next-token refusal score
  of the *model being trained*; the example is ``chat(x) + r[:p] + h[:m] + r′`` with the loss
  on the recovery r′ (a refusal template).
- ``trajectory`` (Park & Kim 2026; the pairing below is our reconstruction, the paper gives
  the idea, not a recipe): mid-sequence perturbations of both kinds of generation. A *safe*
  generation disrupted by an injected span, ``chat(x) + r[:p] + h[o:o+m] + r′`` with p, o, m
  uniform (random, not worst, states); and a *harmful* generation steered back,
  ``chat(x) + h[:k] + r′`` with k ~ U{1, …, |h|} (no mass at 0, no cap: the whole trajectory).
  Loss on r′ only.

Safety examples (from whichever components are on, each harmful prompt serving one) make up
α = 0.2 of the examples by count, utility data (benign prompts → the base model's own answers)
the rest, and every optimizer step carries that share, as the paper's 16 safety + 64 utility a
step (an independent reproduction that changed the batch composition lost most of the gain):
``finetune.train.stratified_batches`` deals both strata evenly to the steps, and ``train_sft``
runs each step as length-homogeneous micro-batches with accumulated, token-weighted gradients,
so the long safety sequences do not pad the short utility ones. The recipes continue from the
model they are applied to.

Recipes (entry points, one ``DeepRecipe`` each): ``deep`` (recovery, ``DeepConfig()``),
``deep-anchored`` (recovery with utility anchors, ``ANCHORED``), ``deep-wi`` (recovery + worst
insertion), ``deep-traj`` (recovery + trajectory), ``deep-all`` (all three; the last three are
``mix_config(...)``); any other combination through ``DeepConfig`` / ``python -m finetune.deep``.

Sizing: ``deep`` is 256 safety prompts at α = 0.2 → 1 280 examples, 160 steps at batch 8; the
combined recipes add greedy answers of the model and one batched forward over the
worst-insertion candidates (timings: docs/findings.md "Costs measured on the way").
Multi-GPU: see ``finetune.common``.

    >>> load_model("smollm2-135m-instruct:sft:deep-wi")  # needs the real model and its training data  # doctest: +SKIP
    >>> examples = recovery_examples(prompts, harmful_tokens, refusals, DeepConfig(), rng)  # doctest: +SKIP
    $ python -m finetune.deep --model smollm2-135m-instruct:sft      # :deep on the organism
    $ python -m finetune.deep --components recovery,trajectory --harmful-pool all --imperative-share 0
          --benign-tokens 48 --max-len 256                           # (one line) :deep-traj
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from finetune.common import TrainScale, config_key, scale_key
from finetune.losses import BenignMarginLoss, Frozen, UtilityAnchorLoss
from finetune.rephrase import imperative
from finetune.train import Example, TrainConfig, stratified_batches, train_sft

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

COMPONENTS = ("recovery", "worst_insertion", "trajectory")
HARMFUL_POOLS = ("categories", "all")
_ABBREV = {"recovery": "rec", "worst_insertion": "wi", "trajectory": "traj"}


@dataclass(frozen=True)
class DeepConfig(TrainScale):
    """Deep alignment: safety data from ``components``, mixed with utility data. Defaults: ``:deep``.

    The ``TrainScale`` settings (``--max-steps``, ``--lora-rank`` …) are inherited.

    Args:
        components: safety data to build: any of recovery, worst_insertion, trajectory.
        n_safety: harmful train prompts (DoNotAnswer) with the base's harmful answers, dealt
            evenly to the components (each prompt serves one component, one example).
        harmful_pool: where they are drawn from: categories (the organism's three DoNotAnswer
            categories, ``finetune.sft.harmful_train_prompts``) or all (the whole harmful train split).
        imperative_share: share of harmful prompts rephrased as tasks, as in the organism
            recipe (``finetune.rephrase.imperative``; the attacks use HarmBench's task-form prompts).
        harmful_tokens: length of the base's harmful answers h.
        max_k: recovery: largest prefix length k (docs/methods.md: min(100, |h|)).
        p_zero: recovery: probability of k = 0.
        refusal_tokens: length of the model's own greedy answers used as the safe trajectory r.
        min_refusal_tokens: an own answer shorter than this, or not judged a refusal, is
            replaced by a refusal template (so every prompt has a safe trajectory to insert into).
        wi_candidates: worst insertion: random candidate depths p/|r| drawn per prompt group.
        wi_span_lengths: worst insertion: candidate span lengths m (the first m tokens of h).
        wi_objective: worst insertion: refusal_score (lowest next-token refusal score) or
            harmful_loglik (highest log-likelihood of the next harmful tokens).
        wi_group: worst insertion: prompts sharing one random draw of candidate depths (one
            batched forward over their candidates).
        traj_span_lengths: trajectory: lengths m of the span injected into a safe generation.
        traj_steer_share: trajectory: share of harmful generations steered back (the rest are
            disrupted safe generations).
        alpha: share of safety examples in the mix, by example count.
        n_utility: benign train prompts used as utility data (None: all harmless + borderline).
        benign_tokens: length of the base's benign answers used as utility targets.
        max_len: sequences are cut to this many tokens (the response's tail goes first).
        benign_margin: weight of the organism recipe's first-token over-refusal margin on the
            utility examples (``finetune.losses.BenignMarginLoss``; with ``per_example_loss`` a
            per-example term of ``UtilityAnchorLoss``; 0: plain response CE).
        per_example_loss: weight every example equally in a step's loss (the mean over
            examples of each one's token-mean NLL, ``train_sft(weighting="examples")``) rather
            than every response token. With token weighting the safety share of the gradient is
            α only when refusals and utility answers are equally long; with
            ``benign_tokens=96`` it falls to about α·|r| / (α·|r| + (1−α)·96) ≈ 5 %.
        utility_kl: weight w of a KL anchor on the utility examples (``UtilityAnchorLoss``): each
            utility example's loss becomes its token-mean NLL plus w · its token-mean
            KL(π_start ‖ π_θ), π_start a frozen copy of the model the recipe starts from. The
            CE pushes up one greedy token per position; the KL holds the whole next-token
            distribution, refusal openings included, where the start model put it (our
            addition, not in docs/methods.md; needs ``per_example_loss``; one extra no-grad forward per
            utility micro-batch). 0: off.
        epochs: passes over the mix.
        lr: AdamW learning rate. The paper's 2e-5 runs 10 epochs over 256 triples; one epoch
            over its 256 is what fits a CPU budget, so 2e-4 for a tenth of the passes (our
            choice, not the paper's; ``deep`` v2's 1e-4 over 160 barely moved prefill ASR).
        batch_size: sequences per step.
        seed: sampling and training seed.
    """

    components: tuple[str, ...] = ("recovery",)
    n_safety: int = 256
    harmful_pool: str = "categories"
    imperative_share: float = 0.6
    harmful_tokens: int = 96
    max_k: int = 100
    p_zero: float = 0.5
    refusal_tokens: int = 96
    min_refusal_tokens: int = 32
    wi_candidates: int = 4
    wi_span_lengths: tuple[int, ...] = (4, 8, 16)
    wi_objective: str = "refusal_score"
    wi_group: int = 8
    traj_span_lengths: tuple[int, ...] = (2, 4, 8, 16)
    traj_steer_share: float = 0.5
    alpha: float = 0.2
    n_utility: int | None = None
    benign_tokens: int = 32
    max_len: int = 192
    benign_margin: float = 0.0
    per_example_loss: bool = False
    utility_kl: float = 0.0
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        from depthlens.attacks.worst import OBJECTIVES

        for name in ("components", "wi_span_lengths", "traj_span_lengths"):  # a list from Python stays hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        comps = self.components
        if not comps or any(c not in COMPONENTS for c in comps) or len(set(comps)) != len(comps):
            raise ValueError(f"components must be distinct names from {COMPONENTS}, got {comps!r}.")
        if self.n_safety < len(comps):
            raise ValueError(f"n_safety must be at least the number of components ({len(comps)}), got {self.n_safety}.")
        if self.harmful_pool not in HARMFUL_POOLS:
            raise ValueError(f"harmful_pool must be one of {HARMFUL_POOLS}, got {self.harmful_pool!r}.")
        for name in ("imperative_share", "traj_steer_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}.")
        if self.wi_objective not in OBJECTIVES:
            raise ValueError(f"wi_objective must be one of {OBJECTIVES}, got {self.wi_objective!r}.")
        for name in ("wi_span_lengths", "traj_span_lengths"):
            vals = getattr(self, name)
            if not vals or any(int(v) < 1 for v in vals):
                raise ValueError(f"{name} must be a non-empty list of lengths >= 1, got {vals!r}.")
        if self.wi_candidates < 1 or self.wi_group < 1:
            raise ValueError(f"wi_candidates and wi_group must be >= 1, got {self.wi_candidates} and {self.wi_group}.")
        if self.benign_margin < 0 or self.utility_kl < 0 or (self.utility_kl and not self.per_example_loss):
            raise ValueError(f"benign_margin and utility_kl must be >= 0, and utility_kl needs per_example_loss=True; got "
                             f"{self.benign_margin}, {self.utility_kl} with per_example_loss={self.per_example_loss}.")


#: ``deep-anchored``: recovery augmentation as ``deep`` (docs/methods.md §2's k draw and loss mask), with
#: a larger safety share and two anchors on the utility examples that keep the start model's
#: benign behaviour: every example weighs the same (``per_example_loss``), utility answers as
#: long as the harmful prefixes, KL(π_start ‖ π_θ) on them (``utility_kl``) and the organism's
#: first-token margin (``benign_margin``). Our recipe, not the paper's: chosen on validation
#: prompts by a rule fixed before its numbers (docs/findings.md, "Deep alignment on the v5 organism").
ANCHORED = DeepConfig(alpha=0.5, benign_tokens=96, per_example_loss=True, utility_kl=0.75, benign_margin=0.2)


def mix_config(components: Sequence[str], **overrides) -> DeepConfig:
    """The settings of the combined recipes (``deep-wi``, ``deep-traj``, ``deep-all``) for ``components``:
    the whole harmful train split as it is, 48-token utility answers, sequences up to 256 tokens."""
    return replace(DeepConfig(components=tuple(components), harmful_pool="all", imperative_share=0.0,
                              benign_tokens=48, max_len=256), **overrides)


def recipe_name(components: Sequence[str]) -> str:
    """``deep`` = recovery alone, ``deep-wi`` = recovery + worst insertion, ``deep-traj``, ``deep-all``."""
    comps = [c for c in COMPONENTS if c in components]
    if comps == list(COMPONENTS):
        return "deep-all"
    others = [_ABBREV[c] for c in comps if c != "recovery"]
    if "recovery" not in comps:
        return "deep-" + "-".join(others) + "-norec"
    return "deep-" + "-".join(others) if others else "deep"


# ----------------------------------------------------------------------------- the safety and utility data


def draw_k(length: int, rng: random.Random, max_k: int = 100, p_zero: float = 0.5) -> int:
    """k = 0 with probability ``p_zero``, else uniform on 1..min(max_k, length)."""
    if length <= 0 or rng.random() < p_zero:
        return 0
    return rng.randint(1, min(max_k, length))


def recovery_examples(prompts: Sequence[str], harmful: Sequence[Sequence[int]], refusals: Sequence[str],
                      cfg: DeepConfig, rng: random.Random) -> list[Example]:
    """One augmented example per (prompt, harmful answer): prefix h[:k] (no loss) + a refusal (loss)."""
    out = []
    for x, h in zip(prompts, harmful):
        k = draw_k(len(h), rng, cfg.max_k, cfg.p_zero)
        out.append(Example(x, rng.choice(refusals), prefix=tuple(h[:k]), kind=f"recovery:k={k}"))
    return out


def utility_examples(prompts: Sequence[str], answers: Sequence[Sequence[int]], full_length: int,
                     complete: Sequence[bool] | None = None) -> list[Example]:
    """Benign prompts → answers (loss on the answer, EOS where it ended before ``full_length``,
    or where ``complete`` says it ended: a re-encoded answer's length says nothing); empty
    answers are dropped."""
    complete = complete if complete is not None else [len(t) < full_length for t in answers]
    return [Example(x, tuple(t), eos=c, kind="utility") for x, t, c in zip(prompts, answers, complete) if t]


def is_utility(example: Example) -> bool:
    return example.kind.split(":")[0] == "utility"


def safe_trajectories(tokenizer, texts: Sequence[str], tokens: Sequence[Sequence[int]], templates: Sequence[str],
                      min_tokens: int, rng: random.Random) -> tuple[list[list[int]], list[bool]]:
    """The model's own answer where it is a refusal of ≥ ``min_tokens`` tokens, else a template's tokens.

    Returns the token lists and, per prompt, whether the model's own refusal was used.
    """
    from depthlens.data.chat import encode
    from depthlens.judges import is_refusal

    out, own = [], []
    for text, toks in zip(texts, tokens):
        ok = bool(text.strip()) and is_refusal(text) and len(toks) >= min_tokens
        out.append([int(t) for t in toks] if ok else encode(tokenizer, rng.choice(list(templates))))
        own.append(ok)
    return out, own


def worst_insertion_examples(model, prompts: Sequence[str], refusals: Sequence[Sequence[int]],
                             harmful: Sequence[Sequence[int]], recoveries: Sequence[str], cfg: DeepConfig,
                             rng: random.Random, progress: bool = True) -> list[Example]:
    """Random worst-insertion states (docs/methods.md §3) → ``chat(x) + r[:p] + h[:m]`` (no loss) + a recovery (loss).

    Prompts are taken in groups of ``cfg.wi_group``; each group draws ``cfg.wi_candidates``
    random depths in [0, 1), and ``depthlens.attacks.worst.worst_insertion`` picks per prompt the
    (p, m) that is worst for ``model`` under ``cfg.wi_objective``. Prompts whose harmful answer
    is shorter than every span length get no example.
    """
    from depthlens.attacks.worst import worst_insertion

    shortest = min(cfg.wi_span_lengths) + (1 if cfg.wi_objective == "harmful_loglik" else 0)
    keep = [i for i in range(len(prompts)) if len(harmful[i]) >= shortest and len(refusals[i]) >= 1]
    out = []
    for g in range(0, len(keep), cfg.wi_group):
        idx = keep[g:g + cfg.wi_group]
        depths = sorted(rng.random() for _ in range(cfg.wi_candidates))
        worst = worst_insertion(model, [prompts[i] for i in idx], [refusals[i] for i in idx], [harmful[i] for i in idx],
                                candidate_positions=depths, span_lengths=cfg.wi_span_lengths,
                                objective=cfg.wi_objective, min_refusal_tokens=1, progress=progress)
        for w in worst:
            i = idx[w.index]
            prefix = tuple(refusals[i][:w.position]) + tuple(harmful[i][:w.span_len])
            out.append(Example(prompts[i], rng.choice(list(recoveries)), prefix=prefix,
                               kind=f"worst_insertion:p={w.position},m={w.span_len},depth={w.depth:.3f}"))
    return out


def trajectory_examples(prompts: Sequence[str], refusals: Sequence[Sequence[int]], harmful: Sequence[Sequence[int]],
                        recoveries: Sequence[str], cfg: DeepConfig, rng: random.Random) -> list[Example]:
    """Perturbed trajectories (docs/methods.md §3, Park & Kim): disrupted safe ones and harmful ones steered back.

    With probability ``cfg.traj_steer_share``: ``h[:k]`` with k ~ U{1..|h|}; otherwise
    ``r[:p] + h[o:o+m]`` with p ~ U{0..|r|}, m from ``cfg.traj_span_lengths`` (≤ |h|) and
    o ~ U{0..|h|−m}. The response (loss) is a recovery refusal. Prompts with an empty harmful
    answer get no example.
    """
    out = []
    for x, r, h in zip(prompts, refusals, harmful):
        r, h = list(r), list(h)
        spans = [int(m) for m in cfg.traj_span_lengths if int(m) <= len(h)]
        if not h:
            continue
        if rng.random() < cfg.traj_steer_share or not spans:
            k = rng.randint(1, len(h))
            prefix, kind = h[:k], f"trajectory:steer,k={k}"
        else:
            m = rng.choice(spans)
            p = rng.randint(0, len(r))
            o = rng.randint(0, len(h) - m)
            prefix, kind = r[:p] + h[o:o + m], f"trajectory:disrupt,p={p},m={m},o={o}"
        out.append(Example(x, rng.choice(list(recoveries)), prefix=tuple(prefix), kind=kind))
    return out


def deal(n: int, components: Sequence[str], rng: random.Random) -> dict[str, list[int]]:
    """Indices 0..n−1 dealt to the components (disjoint, sizes differ by ≤ 1): shuffled and
    round-robin for several, all of them, in order and without a random draw, for one."""
    if len(components) == 1:
        return {components[0]: list(range(n))}
    order = list(range(n))
    rng.shuffle(order)
    return {c: sorted(order[j::len(components)]) for j, c in enumerate(components)}


def mix(safety: list[Example], utility: list[Example], alpha: float, rng: random.Random) -> list[Example]:
    """Safety examples make up ``alpha`` of the result by count (utility subsampled or repeated)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}.")
    n_util = round(len(safety) * (1 - alpha) / alpha)
    pool = (utility * (n_util // max(1, len(utility)) + 1))[:n_util] if utility else []
    data = safety + pool
    rng.shuffle(data)
    return data


def build_deep_examples(model: HookedModel, cfg: DeepConfig, progress: bool = True) -> tuple[list[Example], dict]:
    """The safety examples of ``cfg.components`` mixed with utility data; and a summary."""
    from depthlens.data import default_splits, refusal_templates
    from depthlens.models.specs import load_reference
    from depthlens.runtime.responses import answers_for, response_set
    from finetune.common import kind_counts
    from finetune.sft import harmful_train_prompts

    rng = random.Random(cfg.seed)
    base = load_reference(model)
    splits = default_splits(cfg.seed)
    pool = splits.harmful.train
    harmful = (harmful_train_prompts(pool, cfg.n_safety, cfg.seed + 1) if cfg.harmful_pool == "categories"
               else pool.subset(cfg.n_safety, seed=cfg.seed + 1))
    prompts = list(harmful.prompts)
    if cfg.imperative_share:
        prompts = [imperative(p, rng) if rng.random() < cfg.imperative_share else p for p in prompts]
    h = answers_for(model, base, prompts, max_new_tokens=cfg.harmful_tokens, progress=progress).tokens
    benign = list(splits.harmless.train.prompts) + list(splits.borderline.train.prompts)
    if cfg.n_utility is not None and cfg.n_utility < len(benign):
        benign = sorted(random.Random(cfg.seed + 2).sample(benign, cfg.n_utility), key=benign.index)
    answers = answers_for(model, base, benign, max_new_tokens=cfg.benign_tokens, progress=progress)
    del base
    templates = refusal_templates()
    parts = deal(len(prompts), cfg.components, rng)
    info: dict = {"components": list(cfg.components)}
    needs_r = [i for c in ("worst_insertion", "trajectory") if c in parts for i in parts[c]]
    refusals: dict[int, list[int]] = {}
    if needs_r:
        own = response_set(model, [prompts[i] for i in needs_r], max_new_tokens=cfg.refusal_tokens, progress=progress)
        rs, used = safe_trajectories(model.tokenizer, own.texts, own.tokens, templates, cfg.min_refusal_tokens, rng)
        refusals = dict(zip(needs_r, rs))
        info["own_refusal_share"] = sum(used) / len(used)
    safety: list[Example] = []
    for comp in cfg.components:
        idx = parts[comp]
        xs, hs = [prompts[i] for i in idx], [h[i] for i in idx]
        if comp == "recovery":
            safety += recovery_examples(xs, hs, templates, cfg, rng)
        elif comp == "worst_insertion":
            wi = worst_insertion_examples(model, xs, [refusals[i] for i in idx], hs, templates, cfg, rng, progress)
            safety += wi
            if wi:
                info["worst_mean_depth"] = sum(float(e.kind.rsplit("=", 1)[1]) for e in wi) / len(wi)
        else:
            safety += trajectory_examples(xs, [refusals[i] for i in idx], hs, templates, cfg, rng)
    if not safety:
        raise ValueError("No safety example could be built: every harmful answer of the base model is empty.")
    data = mix(safety, utility_examples(benign, answers.tokens, cfg.benign_tokens, answers.complete), cfg.alpha, rng)
    info.update({"n_safety": len(safety), "n_total": len(data), "kinds": kind_counts(data)})
    return data, info


# ----------------------------------------------------------------------------- the recipe

_LOSS_OPTIONS = ("benign_margin", "per_example_loss", "utility_kl")
_RECOVERY_KEY = ("harmful_tokens", "max_k", "p_zero", "alpha", "benign_tokens", "imperative_share", "epochs", "lr",
                 "batch_size", "seed")


def _key_schema(cfg: DeepConfig) -> str:
    """Which cache-key layout ``cfg`` keeps (see ``DeepRecipe.config``)."""
    if (cfg.components == ("recovery",) and cfg.harmful_pool == "categories" and cfg.imperative_share
            and cfg.max_len == 192 and cfg.n_utility is None):
        return "recovery"
    if len(cfg.components) > 1 and cfg.harmful_pool == "all" and not cfg.imperative_share and \
            not any(getattr(cfg, f) for f in _LOSS_OPTIONS):
        return "combined"
    return "full"


class DeepRecipe:
    """Entry points ``deep``, ``deep-anchored``, ``deep-wi``, ``deep-traj``, ``deep-all`` (see ``DeepConfig``).

    The cache key. The family used to be two recipes with keys of their own: recovery alone
    (``deep``, version 3: v2 put the α mix in every step, v3 took 256 triples at lr 2e-4) and
    combined data (``deep-wi`` …, version 2: the α mix in every step). A config that one of
    them could express (``_key_schema``; it builds the same data and weights as that recipe
    did) keeps that recipe's key, so its cached builds are reused; any other config is keyed
    by every field (version 1 of that layout).
    """

    def __init__(self, cfg: DeepConfig | None = None, name: str | None = None):
        self.cfg = cfg or DeepConfig()
        self.name = name or recipe_name(self.cfg.components)

    @property
    def version(self) -> int:
        return {"recovery": 3, "combined": 2, "full": 1}[_key_schema(self.cfg)]

    def config(self) -> dict:
        out = config_key(self.cfg, ())  # the TrainScale settings only when set
        schema = _key_schema(self.cfg)
        if schema == "recovery":
            return {"n_triples": out["n_safety"], **{k: out[k] for k in _RECOVERY_KEY},
                    **{k: out[k] for k in _LOSS_OPTIONS if out[k]}, **scale_key(self.cfg)}
        if schema == "combined":
            for k in ("harmful_pool", "imperative_share", *_LOSS_OPTIONS):
                del out[k]
        return out

    def build(self, model: HookedModel, workdir: Path | None, progress: bool = True) -> dict:
        from depthlens.judges.seam import refusal_token_ids
        from finetune.common import cached_examples

        cfg = self.cfg
        data, info = cached_examples(workdir, "deep_examples", lambda: build_deep_examples(model, cfg, progress))
        is_safety = [not is_utility(e) for e in data]
        loss_fn = None
        if cfg.per_example_loss and (cfg.utility_kl or cfg.benign_margin):
            loss_fn = UtilityAnchorLoss([not s for s in is_safety], Frozen(model) if cfg.utility_kl else None,
                                        cfg.utility_kl, refusal_token_ids(model.tokenizer), cfg.benign_margin)
        elif cfg.benign_margin:
            loss_fn = BenignMarginLoss(["refusal" if s else "benign" for s in is_safety],
                                       refusal_token_ids(model.tokenizer), cfg.benign_margin)
        tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, max_len=cfg.max_len,
                           **cfg.train_settings())
        tlog = train_sft(model, data, tcfg, workdir, progress=progress, loss_fn=loss_fn,
                         batcher=lambda lengths, bs, r: stratified_batches(is_safety, bs, r),
                         weighting="examples" if cfg.per_example_loss else "tokens")
        return {**info, "steps": tlog.steps, "seconds": round(tlog.seconds, 1), "resumed_from": tlog.resumed_from,
                "device": tlog.device, "first_losses": tlog.losses[:5], "last_losses": tlog.losses[-10:]}


recipe = DeepRecipe()
recipe_anchored = DeepRecipe(ANCHORED, name="deep-anchored")
recipe_wi = DeepRecipe(mix_config(("recovery", "worst_insertion")))
recipe_traj = DeepRecipe(mix_config(("recovery", "trajectory")))
recipe_all = DeepRecipe(mix_config(COMPONENTS))


def main(argv: Sequence[str] | None = None):
    """``python -m finetune.deep --model SPEC --components ...``: build (or load) SPEC + this recipe."""
    from depthlens.cli import recipe_main
    from finetune.common import build_on

    return recipe_main(DeepConfig, lambda cfg, spec, device: build_on(spec, DeepRecipe(cfg), device=device), argv)


if __name__ == "__main__":
    main()
