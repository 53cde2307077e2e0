"""Deep alignment (docs/methods.md §2–3): safety-recovery augmentation, random worst-insertion
training and trajectory perturbation training, each alone or combined, mixed with utility data.

- ``recovery`` (Qi et al. 2024): triples (x, h, r): a harmful prompt, the *base* model's
  harmful answer, a refusal. For each example draw k: with probability ½ k = 0, else
  k ~ U{1, …, min(100, |h|)}; the sequence is ``chat(x) + h[:k] + r`` with the loss on r only,
  so the model learns to return to refusal after any harmful prefix.
- ``worst_insertion`` (Lyu et al. 2026, random worst-insertion training): the model's own
  refusal r to x (a refusal template where its answer is no refusal or too short), a group of
  random candidate depths and the span lengths ``wi_span_lengths``; ``depthlens.attacks.
  worst_insertion`` picks per prompt the (p, m) that most lowers the next-token refusal score
  of the *model being trained*; the example is ``chat(x) + r[:p] + h[:m] + r′`` with the loss
  on the recovery r′ (a refusal template).
- ``trajectory`` (Park & Kim 2026; the pairing below is our reconstruction, the paper gives
  the idea, not a recipe): mid-sequence perturbations of both kinds of generation. A *safe*
  generation disrupted by an injected span, ``chat(x) + r[:p] + h[o:o+m] + r′`` with p, o, m
  uniform (random, not worst, states); and a *harmful* generation steered back,
  ``chat(x) + h[:k] + r′`` with k ~ U{1, …, |h|} (no mass at 0, no cap: the whole trajectory).
  Loss on r′ only.

Safety examples (from whichever components are on) make up α = 0.2 of the examples by count,
utility data (benign prompts → the base model's own answers) the rest, and every optimizer
step carries that share, as the paper's 16 safety + 64 utility a step (an independent
reproduction that changed the batch composition lost most of the gain): ``stratified_batches``
deals both strata evenly to the steps, and ``train_sft`` runs each step as length-homogeneous
micro-batches with accumulated, token-weighted gradients, so the long safety sequences do
not pad the short utility ones. The recipes continue from the model they are
applied to.

Recipes (entry points): ``deep`` (recovery only, ``DeepConfig``), ``deep-anchored`` (recovery
with utility anchors, ``ANCHORED``), ``deep-wi`` (recovery +
worst insertion), ``deep-traj`` (recovery + trajectory), ``deep-all`` (all three); any other
combination through ``DeepMixConfig(components=...)`` / ``python -m finetune.deep``.

Sizing: a step of batch 8 costs ≈ 3–5 s on the 135M default on 2 CPU cores (NOTES.md), so
the defaults stay at ≈ 80 steps (128 safety examples, α = 0.2 → 640 examples, batch 8, one
epoch): ≈ 5–7 min on CPU plus ≈ 1–2 min of data preparation (greedy answers of the base and
the model, cached; one batched forward over the worst-insertion candidates), well under a
minute on a GPU. Multi-GPU: see ``finetune.common``.

    >>> load_model("smollm2-135m-instruct:sft:deep-wi")
    >>> examples = recovery_examples(prompts, harmful_tokens, refusals, DeepConfig(), rng)
    $ python -m finetune.deep --model smollm2-135m-instruct:sft --components recovery,trajectory
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.sft import (BenignMarginLoss, Example, TrainConfig, config_key, harmful_train_prompts, imperative,
                          train_sft)


@dataclass(frozen=True)
class DeepConfig:
    """Safety-recovery augmentation (deep alignment).

    Args:
        n_triples: harmful train prompts (DoNotAnswer) with the base's harmful answers.
        harmful_tokens: length of the base's harmful answers h.
        max_k: largest prefix length k (docs/methods.md: min(100, |h|)).
        p_zero: probability of k = 0.
        alpha: share of safety examples in the mix, by example count.
        benign_tokens: length of the base's benign answers used as utility targets.
        imperative_share: share of harmful prompts rephrased as tasks, as in the organism
            recipe (``finetune.sft.imperative``; the attacks use HarmBench's task-form prompts).
        epochs: passes over the mix.
        lr: AdamW learning rate. The paper's 2e-5 runs 10 epochs over 256 triples; one epoch
            over its 256 is what fits a CPU budget, so 2e-4 for a tenth of the passes (our
            choice, not the paper's; v2's 1e-4 over 160 barely moved prefill ASR).
        batch_size: sequences per step.
        seed: sampling and training seed.
        benign_margin: weight of the organism recipe's first-token over-refusal margin on the
            utility examples (``finetune.sft.BenignMarginLoss``; with ``per_example_loss`` a
            per-example term of ``UtilityAnchorLoss``; 0: plain response CE).
        refusal_margin: weight of its positive half on the recovery examples: ``−log p_R`` at
            the first refusal token, i.e. after the harmful prefix h[:k] (0: off).
        per_example_loss: weight every example equally in a step's loss (the mean over
            examples of each one's token-mean NLL, ``train_sft(weighting="examples")``) rather
            than every response token. With token weighting the safety share of the gradient is
            α only when refusals and utility answers are equally long; with
            ``benign_tokens=96`` it falls to about α·|r| / (α·|r| + (1−α)·96) ≈ 5 %.
        utility_prefix: split every utility answer y as the recovery examples split h: k drawn
            by the same rule (``draw_k``, kept below |y|), y[:k] a prefix without loss and
            y[k:] the target. The safety examples teach "after a harmful prefix, refuse"; these
            are their contrast, "after a benign prefix, go on", at the same depths (our
            addition, not in docs/methods.md; the utility term becomes −log π(y′>k | x′, y′≤k)). Off
            by default.
        utility_kl: weight w of a KL anchor on the utility examples (``UtilityAnchorLoss``): each
            utility example's loss becomes its token-mean NLL plus w · its token-mean
            KL(π_start ‖ π_θ), π_start a frozen copy of the model the recipe starts from. The
            CE pushes up one greedy token per position; the KL holds the whole next-token
            distribution, refusal openings included, where the start model put it (our
            addition, not in docs/methods.md; needs ``per_example_loss``; one extra no-grad forward per
            utility micro-batch). 0: off.
    """

    n_triples: int = 256
    harmful_tokens: int = 96
    max_k: int = 100
    p_zero: float = 0.5
    alpha: float = 0.2
    benign_tokens: int = 32
    imperative_share: float = 0.6
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0
    benign_margin: float = 0.0
    refusal_margin: float = 0.0
    per_example_loss: bool = False
    utility_prefix: bool = False
    utility_kl: float = 0.0

    def __post_init__(self):
        if self.per_example_loss and self.refusal_margin:
            raise ValueError("per_example_loss takes the benign margin only; set refusal_margin to 0 to use it.")
        if self.utility_kl < 0 or (self.utility_kl and not self.per_example_loss):
            raise ValueError(f"utility_kl must be >= 0 and needs per_example_loss=True, got {self.utility_kl} "
                             f"with per_example_loss={self.per_example_loss}.")


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
                     split: random.Random | None = None, max_k: int = 100, p_zero: float = 0.5) -> list[Example]:
    """Benign prompts → answers (loss on the answer, EOS where it ended before ``full_length``);
    empty answers are dropped.

    With a ``split`` rng each answer y is cut at k = ``draw_k(|y| − 1, split, max_k, p_zero)``:
    y[:k] is a prefix without loss, y[k:] (never empty) the target (``DeepConfig.utility_prefix``).
    Without one, no random number is drawn.
    """
    out = []
    for x, t in zip(prompts, answers):
        if not t:
            continue
        k = draw_k(len(t) - 1, split, max_k, p_zero) if split else 0
        out.append(Example(x, tuple(t[k:]), prefix=tuple(t[:k]), eos=len(t) < full_length,
                           kind=f"utility:k={k}" if split else "utility"))
    return out


def is_utility(example: Example) -> bool:
    return example.kind.split(":")[0] == "utility"


class Frozen:
    """A no-grad copy of a model's plain module, usable wherever ``response_logits`` takes a model."""

    def __init__(self, model):
        import copy

        self._module = copy.deepcopy(model.plain()).eval().requires_grad_(False)

    def plain(self):
        return self._module


class UtilityAnchorLoss:
    """Example-mean response NLL, plus two optional anchors on the utility rows.

    For a utility example with response positions t = 1..T the loss is
    ``(1/T) Σ_t [−log π_θ(y_t | ·) + kl · KL(π_ref(· | y_<t) ‖ π_θ(· | y_<t))] + margin · −log(1 − p_R')``,
    p_R' the probability of the refusal first tokens R (other than y_1) at t = 1, the organism
    recipe's benign margin (``finetune.sft.BenignMarginLoss``); safety examples keep their
    plain token-mean NLL. The call returns the mean over its rows, as
    ``train_sft(weighting="examples")`` expects. The reference logits come from one no-grad
    forward of ``reference`` (``Frozen``) over the micro-batch's utility rows only.
    """

    def __init__(self, utility: Sequence[bool], reference=None, kl: float = 0.0,
                 refusal_ids: Sequence[int] = (), margin: float = 0.0):
        if kl < 0 or margin < 0:
            raise ValueError(f"The anchor weights must be >= 0, got kl={kl} and margin={margin}.")
        if kl and reference is None:
            raise ValueError("The KL anchor needs a reference model.")
        if margin and not refusal_ids:
            raise ValueError("The benign margin needs a non-empty refusal token set R.")
        self.utility, self.reference, self.kl = list(utility), reference, kl
        self.refusal_ids, self.margin = sorted(set(refusal_ids)), margin

    def __call__(self, model, ids, mask, att, idx):
        import torch

        from finetune.sft import benign_margin_terms, response_logits, row_index, row_means

        logits, targets, keep = response_logits(model, ids, mask, att)
        if not len(targets):
            return logits.sum() * 0.0
        per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        counts = keep.sum(1)
        rows = [b for b, i in enumerate(idx) if self.utility[i] and counts[b] > 0]
        if not rows:
            return row_means(per_token, keep).mean()
        sel = torch.tensor(rows, device=ids.device)
        if self.kl:
            with torch.no_grad():
                ref, _, _ = response_logits(self.reference, ids[sel], mask[sel], att[sel])
            tok = torch.isin(row_index(keep), sel)
            if ref.shape[0] != int(tok.sum()):
                raise RuntimeError("UtilityAnchorLoss: reference and model response positions disagree.")
            ref_logp = torch.log_softmax(ref.float(), dim=-1)
            kl = (ref_logp.exp() * (ref_logp - torch.log_softmax(logits[tok], dim=-1))).sum(-1)
            per_token = per_token.index_add(0, torch.nonzero(tok).squeeze(1), self.kl * kl)
        per_row = row_means(per_token, keep)
        if self.margin:
            first = (torch.cumsum(counts, 0) - counts)[sel]
            r_ids = torch.tensor(self.refusal_ids, device=logits.device)
            per_row = per_row.index_add(0, sel, self.margin * benign_margin_terms(logits[first], targets[first], r_ids))
        return per_row.mean()


def mix(safety: list[Example], utility: list[Example], alpha: float, rng: random.Random) -> list[Example]:
    """Safety examples make up ``alpha`` of the result by count (utility subsampled or repeated)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}.")
    n_util = round(len(safety) * (1 - alpha) / alpha)
    pool = (utility * (n_util // max(1, len(utility)) + 1))[:n_util] if utility else []
    data = safety + pool
    rng.shuffle(data)
    return data


def stratified_batches(is_safety: Sequence[bool], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches that each carry the mix's safety share (±1 example), as the paper's 16 + 64 a step.

    ``train_sft`` buckets by length, which segregates the mix: safety sequences (a harmful
    prefix + a refusal) are longer than utility ones, so most batches hold no safety example
    and a few hold nothing else. Here both strata are shuffled separately and dealt evenly:
    batch j gets ``round((j+1)·S/B) − round(j·S/B)`` of the S safety examples (likewise for
    utility), B = ⌈n / batch_size⌉. Same signature as ``finetune.sft._batches`` once
    ``is_safety`` is bound (``functools.partial``); wiring it in needs a batcher argument on
    ``train_sft``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    strata = [[i for i, s in enumerate(is_safety) if s], [i for i, s in enumerate(is_safety) if not s]]
    for part in strata:
        rng.shuffle(part)
    n_b = max(1, -(-len(is_safety) // batch_size))
    out: list[list[int]] = [[] for _ in range(n_b)]
    for part in strata:
        for j in range(n_b):
            out[j] += part[round(j * len(part) / n_b):round((j + 1) * len(part) / n_b)]
    for b in out:
        rng.shuffle(b)
    return [b for b in out if b]


class DeepRecipe:
    """Entry point ``deep``: safety-recovery augmentation on top of the model it is applied to."""

    name = "deep"
    # v2: every step carries the alpha mix (stratified batches + micro-batches).
    # v3: 256 triples (the paper's count) at lr 2e-4; v2 (160 at 1e-4) left prefill ASR@10 at 0.875.
    version = 3

    def __init__(self, cfg: DeepConfig | None = None, name: str = "deep"):
        self.cfg = cfg or DeepConfig()
        self.name = name

    def config(self) -> dict:
        return config_key(self.cfg, ("benign_margin", "refusal_margin", "per_example_loss", "utility_prefix",
                                     "utility_kl"))

    def build(self, model, workdir: Path) -> dict:
        from depthlens.data import default_splits, refusal_templates
        from depthlens.models import load_model
        from depthlens.organism import base_spec
        from depthlens.responses import response_set

        cfg = self.cfg
        rng = random.Random(cfg.seed)
        base = load_model(base_spec(model.spec), device=model.device)
        splits = default_splits(cfg.seed)
        harmful = harmful_train_prompts(splits.harmful.train, cfg.n_triples, cfg.seed + 1)
        prompts = [imperative(p, rng) if rng.random() < cfg.imperative_share else p for p in harmful.prompts]
        h = response_set(base, prompts, max_new_tokens=cfg.harmful_tokens).tokens
        benign_prompts = list(splits.harmless.train.prompts) + list(splits.borderline.train.prompts)
        answers = response_set(base, benign_prompts, max_new_tokens=cfg.benign_tokens).tokens
        del base
        safety = recovery_examples(prompts, h, refusal_templates(), cfg, rng)
        utility = utility_examples(benign_prompts, answers, cfg.benign_tokens,
                                   rng if cfg.utility_prefix else None, cfg.max_k, cfg.p_zero)
        data = mix(safety, utility, cfg.alpha, rng)
        is_safety = [not is_utility(e) for e in data]
        loss_fn = None
        if cfg.per_example_loss and (cfg.utility_kl or cfg.benign_margin):
            from depthlens.judge import refusal_token_ids
            loss_fn = UtilityAnchorLoss([not s for s in is_safety], Frozen(model) if cfg.utility_kl else None,
                                        cfg.utility_kl, refusal_token_ids(model.tokenizer), cfg.benign_margin)
        elif cfg.benign_margin or cfg.refusal_margin:
            from depthlens.judge import refusal_token_ids
            loss_fn = BenignMarginLoss(["refusal" if s else "benign" for s in is_safety],
                                       refusal_token_ids(model.tokenizer), cfg.benign_margin, cfg.refusal_margin)
        tlog = train_sft(model, data, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                                  seed=cfg.seed), workdir,
                         batcher=lambda lengths, bs, r: stratified_batches(is_safety, bs, r), loss_fn=loss_fn,
                         weighting="examples" if cfg.per_example_loss else "tokens")
        return {"n_safety": len(safety), "n_total": len(data), "steps": tlog.steps, "seconds": tlog.seconds,
                "last_losses": tlog.losses[-10:]}


recipe = DeepRecipe()

#: ``deep-anchored``: recovery augmentation as ``deep`` (docs/methods.md §2's k draw and loss mask), with
#: a larger safety share and two anchors on the utility examples that keep the start model's
#: benign behaviour: every example weighs the same (``per_example_loss``), utility answers as
#: long as the harmful prefixes, KL(π_start ‖ π_θ) on them (``utility_kl``) and the organism's
#: first-token margin (``benign_margin``). Our recipe, not the paper's: chosen on validation
#: prompts by a rule fixed before its numbers (README, "Deep alignment on the v5 organism").
ANCHORED = DeepConfig(alpha=0.5, benign_tokens=96, per_example_loss=True, utility_kl=0.75, benign_margin=0.2)
recipe_anchored = DeepRecipe(ANCHORED, name="deep-anchored")


# ----------------------------------------------------------------------------- combinable recipes

COMPONENTS = ("recovery", "worst_insertion", "trajectory")
_ABBREV = {"recovery": "rec", "worst_insertion": "wi", "trajectory": "traj"}


@dataclass(frozen=True)
class DeepMixConfig:
    """Deep alignment with any combination of recovery, worst-insertion and trajectory data.

    Args:
        components: safety data to build: any of recovery, worst_insertion, trajectory.
        n_safety: harmful train prompts (DoNotAnswer), dealt evenly to the components (each
            prompt serves one component, one example).
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
        max_len: sequences are cut to this many tokens (the refusal's tail goes first).
        epochs: passes over the mix.
        lr: AdamW learning rate. The defaults (256 safety prompts, lr 2e-4, one epoch) are
            ``:deep`` v3's training budget (until 2026-12-04: 128 prompts at 2e-5, a tenth of
            the step size that already barely moved ``deep`` v2).
        batch_size: sequences per step.
        seed: sampling and training seed.
    """

    components: tuple[str, ...] = ("recovery", "worst_insertion")
    n_safety: int = 256
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
    benign_tokens: int = 48
    max_len: int = 256
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        from depthlens.attacks import OBJECTIVES

        comps = tuple(self.components)
        unknown = [c for c in comps if c not in COMPONENTS]
        if not comps or unknown or len(set(comps)) != len(comps):
            raise ValueError(f"components must be distinct names from {COMPONENTS}, got {comps!r}.")
        if self.n_safety < len(comps):
            raise ValueError(f"n_safety must be at least the number of components ({len(comps)}), got {self.n_safety}.")
        if self.wi_objective not in OBJECTIVES:
            raise ValueError(f"wi_objective must be one of {OBJECTIVES}, got {self.wi_objective!r}.")
        if not 0.0 <= self.traj_steer_share <= 1.0:
            raise ValueError(f"traj_steer_share must lie in [0, 1], got {self.traj_steer_share}.")
        for name in ("wi_span_lengths", "traj_span_lengths"):
            vals = getattr(self, name)
            if not vals or any(int(v) < 1 for v in vals):
                raise ValueError(f"{name} must be a non-empty list of lengths >= 1, got {vals!r}.")
        if self.wi_candidates < 1 or self.wi_group < 1:
            raise ValueError(f"wi_candidates and wi_group must be >= 1, got {self.wi_candidates} and {self.wi_group}.")


def recipe_name(components: Sequence[str]) -> str:
    """``deep-wi`` = recovery + worst insertion, ``deep-traj``, ``deep-all``; ``deep-rec`` = recovery alone."""
    comps = [c for c in COMPONENTS if c in components]
    if comps == list(COMPONENTS):
        return "deep-all"
    others = [_ABBREV[c] for c in comps if c != "recovery"]
    if "recovery" not in comps:
        return "deep-" + "-".join(others) + "-norec"
    return "deep-" + ("-".join(others) if others else "rec")


def safe_trajectories(tokenizer, texts: Sequence[str], tokens: Sequence[Sequence[int]], templates: Sequence[str],
                      min_tokens: int, rng: random.Random) -> tuple[list[list[int]], list[bool]]:
    """The model's own answer where it is a refusal of ≥ ``min_tokens`` tokens, else a template's tokens.

    Returns the token lists and, per prompt, whether the model's own refusal was used.
    """
    from depthlens.chat import encode
    from depthlens.judge import is_refusal

    out, own = [], []
    for text, toks in zip(texts, tokens):
        ok = bool(text.strip()) and is_refusal(text) and len(toks) >= min_tokens
        out.append([int(t) for t in toks] if ok else encode(tokenizer, rng.choice(list(templates))))
        own.append(ok)
    return out, own


def worst_insertion_examples(model, prompts: Sequence[str], refusals: Sequence[Sequence[int]],
                             harmful: Sequence[Sequence[int]], recoveries: Sequence[str], cfg: DeepMixConfig,
                             rng: random.Random, progress: bool = True) -> list[Example]:
    """Random worst-insertion states (docs/methods.md §3) → ``chat(x) + r[:p] + h[:m]`` (no loss) + a recovery (loss).

    Prompts are taken in groups of ``cfg.wi_group``; each group draws ``cfg.wi_candidates``
    random depths in [0, 1), and ``depthlens.attacks.worst_insertion`` picks per prompt the
    (p, m) that is worst for ``model`` under ``cfg.wi_objective``. Prompts whose harmful answer
    is shorter than every span length get no example.
    """
    from depthlens.attacks import worst_insertion

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
                        recoveries: Sequence[str], cfg: DeepMixConfig, rng: random.Random) -> list[Example]:
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
    """Indices 0..n−1 shuffled and dealt round-robin to the components (disjoint, sizes differ by ≤ 1)."""
    order = list(range(n))
    rng.shuffle(order)
    return {c: sorted(order[j::len(components)]) for j, c in enumerate(components)}


def build_deep_examples(model, cfg: DeepMixConfig, progress: bool = True) -> tuple[list[Example], dict]:
    """The safety examples of ``cfg.components`` mixed with utility data; and a summary."""
    from depthlens.data import default_splits, refusal_templates
    from depthlens.models import load_model
    from depthlens.organism import base_spec
    from depthlens.responses import response_set

    rng = random.Random(cfg.seed)
    base_name = base_spec(model.spec)
    base = model if base_name == model.spec else load_model(base_name, device=model.device)
    splits = default_splits(cfg.seed)
    harmful = splits.harmful.train.subset(cfg.n_safety, seed=cfg.seed + 1)  # the same prompts as ``deep``
    prompts = list(harmful.prompts)
    h = response_set(base, prompts, max_new_tokens=cfg.harmful_tokens, progress=progress).tokens
    benign = list(splits.harmless.train.prompts) + list(splits.borderline.train.prompts)
    if cfg.n_utility is not None and cfg.n_utility < len(benign):
        benign = sorted(random.Random(cfg.seed + 2).sample(benign, cfg.n_utility), key=benign.index)
    answers = response_set(base, benign, max_new_tokens=cfg.benign_tokens, progress=progress).tokens
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
            rc = DeepConfig(max_k=cfg.max_k, p_zero=cfg.p_zero)
            safety += recovery_examples(xs, hs, templates, rc, rng)
        elif comp == "worst_insertion":
            wi = worst_insertion_examples(model, xs, [refusals[i] for i in idx], hs, templates, cfg, rng, progress)
            safety += wi
            if wi:
                info["worst_mean_depth"] = sum(float(e.kind.rsplit("=", 1)[1]) for e in wi) / len(wi)
        else:
            safety += trajectory_examples(xs, [refusals[i] for i in idx], hs, templates, cfg, rng)
    if not safety:
        raise ValueError("No safety example could be built: every harmful answer of the base model is empty.")
    utility = utility_examples(benign, answers, cfg.benign_tokens)
    data = mix(safety, utility, cfg.alpha, rng)
    from finetune.common import kind_counts

    info.update({"n_safety": len(safety), "n_total": len(data), "kinds": kind_counts(data)})
    return data, info


class DeepMixRecipe:
    """Entry points ``deep-wi``, ``deep-traj``, ``deep-all``: deep alignment with combined safety data."""

    version = 2  # v2: every step carries the alpha mix (stratified batches + micro-batches)

    def __init__(self, cfg: DeepMixConfig | None = None):
        self.cfg = cfg or DeepMixConfig()
        self.name = recipe_name(self.cfg.components)

    def config(self) -> dict:
        return asdict(self.cfg)

    def build(self, model, workdir: Path | None, progress: bool = True) -> dict:
        from finetune.common import cached_examples

        cfg = self.cfg
        data, info = cached_examples(workdir, "deep_examples", lambda: build_deep_examples(model, cfg, progress))
        tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, max_len=cfg.max_len)
        is_safety = [not is_utility(e) for e in data]
        tlog = train_sft(model, data, tcfg, workdir, progress=progress,
                         batcher=lambda lengths, bs, r: stratified_batches(is_safety, bs, r))
        return {**info, "steps": tlog.steps, "seconds": round(tlog.seconds, 1), "resumed_from": tlog.resumed_from,
                "device": tlog.device, "first_losses": tlog.losses[:5], "last_losses": tlog.losses[-10:]}


recipe_wi = DeepMixRecipe(DeepMixConfig(components=("recovery", "worst_insertion")))
recipe_traj = DeepMixRecipe(DeepMixConfig(components=("recovery", "trajectory")))
recipe_all = DeepMixRecipe(DeepMixConfig(components=COMPONENTS))


def main(argv: Sequence[str] | None = None):
    """``python -m finetune.deep --model SPEC --components ...``: build (or load) SPEC + this recipe."""
    from depthlens.cli import recipe_main
    from finetune.common import build_on

    return recipe_main(DeepMixConfig, lambda cfg, spec, device: build_on(spec, DeepMixRecipe(cfg), device=device), argv)


if __name__ == "__main__":
    main()
