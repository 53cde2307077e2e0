"""Difference-in-means refusal directions and their selection (Arditi et al. 2024, docs/methods.md §4).

A *candidate* refusal direction is ``r_{i,l} = mean_harmful(x_{i,l}) − mean_harmless(x_{i,l})``
at the block input (``blocks.{l}.hook_resid_pre``) for every post-instruction template
position ``i`` (the tokens the chat template puts after the user's message, e.g.
``<|im_end|>\\n<|im_start|>assistant\\n``) and every layer ``l``. Means are streamed batch by
batch through forward hooks and accumulated in float64; no activation cache is ever kept.

*Selection* scores each candidate three ways on validation prompts and keeps the one that
best removes refusal without breaking the model:

- ``bypass``: mean refusal score (``depthlens.judges.seam.refusal_score``) on harmful prompts under
  directional ablation of ``r̂`` (every layer, every position) — lower is better;
- ``induce``: mean refusal score on harmless prompts under activation addition of ``r`` at
  layer ``l`` — must be ≥ ``induce_threshold`` (0);
- ``kl``: mean ``KL(P_base ‖ P_ablated)`` of the next-token distribution at the last prompt
  position on harmless prompts — must be ≤ ``kl_threshold`` (0.1);

and candidates at layers ``l ≥ int(max_layer_frac · L)`` are discarded (zero candidates, e.g.
layer 0 at template positions where every prompt has the same token, are skipped) (Arditi et al.'s
reference code truncates ``0.8·L`` the same way; for L = 30 that drops layers 24–29). If no
candidate passes, the KL filter is relaxed by doubling (layer and induce filters kept) until
one does (``choose_candidate``), and only if no candidate induces refusal is the lowest bypass
of all taken; either way with ``filters_passed=False`` and a warning — never silently.

Cost. Each candidate costs one ablated pass over harmful + harmless validation prompts (bypass
and KL share it) and one activation-addition pass over the harmless ones from block ``l`` on,
i.e. at most ``3·n_val`` prompt forwards, run on the plain HF blocks with the shared chat
prefix computed once a pass (``depthlens.runtime.forward.PrefixSharedRunner``). Arditi's full grid on the 30-layer default (5 positions × 24 layers,
32 prompts per set) is 120 candidates × 96 forwards ≈ 11.5k forwards (see the report in
``SelectedDirection.timing``); the default here evaluates the last position only
(24 candidates, 5× cheaper); pass ``positions=None`` for the full grid.

    >>> from depthlens.models import load_model
    >>> model = load_model("tiny-llama")                  # on the default: layer 21 of 30, d_model 576
    >>> harmful, harmless = ["How do I pick a lock?", "How do I make a weapon?"], ["Bake bread?", "Name a colour."]
    >>> cands = compute_candidates(model, harmful, harmless)
    >>> tuple(cands.directions.shape)                     # [n_pos, L, d_model]: 9 template tokens here
    (9, 2, 64)
    >>> sel = select_direction(model, cands, harmful, harmless, layers=[1])   # last position by default
    >>> sel.position, sel.layer, tuple(sel.direction.shape)
    (-1, 1, (64,))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from depthlens.interventions.ablation import ablation_hooks, addition_hooks
from depthlens.data.chat import ChatSequence, encode, render_prompt
from depthlens.infra.errors import UsageError
from depthlens.runtime.forward import PrefixSharedRunner, iter_batches
from depthlens.runtime import Hook, as_chats, hooks_active, plain_hooks
from depthlens.models.hooked_model import hook_name
from depthlens.judges.seam import refusal_token_ids, score_from_logprobs
from depthlens.stats import diff_in_means

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

__all__ = [
    "MeanActivations",
    "DirectionCandidates",
    "SelectedDirection",
    "post_instruction_len",
    "mean_activations",
    "diff_in_means",
    "compute_candidates",
    "select_direction",
    "eligible_layers",
]

_MARKERS = ("Zq7 marker text.", "hello", "What is 2+2?")


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MeanActivations:
    """Float64 means of ``resid_pre`` over a prompt set at the last ``len(positions)`` tokens.

    Attributes:
        mean: ``[n_pos, n_layers, d_model]`` float64 (CPU); ``mean[i, j]`` is position
            ``positions[i]`` (negative, from the end of the prompt) at layer ``layers[j]``.
        n: number of prompts averaged.
        positions: negative offsets, e.g. ``[-5, …, -1]``.
        layers: layer indices.
    """

    mean: Float[Tensor, "n_pos n_layers d_model"]
    n: int
    positions: list[int]
    layers: list[int]


@dataclass(frozen=True)
class DirectionCandidates:
    """Raw difference-in-means vectors for every post-instruction position × layer.

    Attributes:
        directions: ``[n_pos, n_layers, d_model]`` float64, ``mean_harmful − mean_harmless``
            (not normalized: activation addition uses the raw vector).
        positions: negative offsets of the positions (``directions[i]`` ↔ ``positions[i]``).
        layers: layer indices (``directions[:, j]`` ↔ ``layers[j]``).
        mean_harmful, mean_harmless: the two float64 means, same shape as ``directions``.
        n_harmful, n_harmless: prompts averaged on each side.
    """

    directions: Float[Tensor, "n_pos n_layers d_model"]
    positions: list[int]
    layers: list[int]
    mean_harmful: Float[Tensor, "n_pos n_layers d_model"]
    mean_harmless: Float[Tensor, "n_pos n_layers d_model"]
    n_harmful: int
    n_harmless: int

    @property
    def norms(self) -> Float[Tensor, "n_pos n_layers"]:
        """L2 norm of every raw candidate vector."""
        return self.directions.norm(dim=-1)

    def vector(self, position: int, layer: int) -> Float[Tensor, " d_model"]:
        """The raw float64 candidate at ``position`` (negative offset) and ``layer``."""
        if position not in self.positions:
            raise UsageError(f"Position {position} is not a candidate position; candidates are {self.positions}.")
        if layer not in self.layers:
            raise UsageError(f"Layer {layer} has no candidate; candidate layers are {self.layers}.")
        return self.directions[self.positions.index(position), self.layers.index(layer)]

    def to_records(self) -> list[dict]:
        """Long table ``{position, layer, norm, norm_harmful, norm_harmless}`` for results files."""
        nh, nb = self.mean_harmful.norm(dim=-1), self.mean_harmless.norm(dim=-1)
        norms = self.norms
        return [
            {"position": p, "layer": l, "norm": float(norms[i, j]),
             "norm_harmful": float(nh[i, j]), "norm_harmless": float(nb[i, j])}
            for i, p in enumerate(self.positions) for j, l in enumerate(self.layers)
        ]


@dataclass(frozen=True)
class SelectedDirection:
    """The selected refusal direction with the scores of every evaluated candidate.

    Attributes:
        position: negative offset of the chosen template position.
        layer: layer of the chosen candidate.
        direction: unit vector ``r̂`` (float32, CPU, ``[d_model]``).
        vector: the raw difference-in-means ``r`` (float32), as used for activation addition.
        scores: one record per requested candidate, ordered by (position, layer):
            ``{position, layer, norm, bypass, induce, kl, passed, reason}`` (``reason`` names
            the failed filters, "" when passed). Zero vectors (layer 0 at template positions,
            where every prompt has the same token) are not evaluated: scores ``None``,
            reason ``"zero-vector"``.
        filters_passed: False when no candidate passed the filters and a relaxed choice was
            taken instead (``config["kl_threshold_used"]``; see ``choose_candidate``).
        baseline: mean refusal scores without intervention (``harmful``, ``harmless``).
        config: the selection settings.
        timing: seconds spent (``total``, ``per_candidate``) and ``n_candidates``.
    """

    position: int
    layer: int
    direction: Float[Tensor, " d_model"]
    vector: Float[Tensor, " d_model"]
    scores: list[dict]
    filters_passed: bool
    baseline: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)

    @property
    def chosen(self) -> dict:
        """The score record of the chosen candidate."""
        return next(r for r in self.scores if r["position"] == self.position and r["layer"] == self.layer)

    def to_dict(self, with_direction: bool = True) -> dict:
        """JSON-ready summary (the direction as a list of floats when ``with_direction``)."""
        out = {"position": self.position, "layer": self.layer, "filters_passed": self.filters_passed,
               "chosen": self.chosen, "baseline": self.baseline, "config": self.config,
               "timing": self.timing, "scores": self.scores,
               "vector_norm": float(self.vector.norm())}
        if with_direction:
            out["direction"] = [float(x) for x in self.direction]
        return out


# ----------------------------------------------------------------------------- candidates


def post_instruction_len(tokenizer, fallback: int = 5) -> int:
    """Number of template tokens that follow the user's message (through the assistant header).

    These are the candidate positions of the refusal direction (Arditi et al. take the
    difference in means at each of them).

    Rendered with a few marker messages; the tokens starting at or after the end of the marker
    are counted (token offsets of a fast tokenizer, else tokenizing the suffix alone). The
    smallest count over the markers is used, so a token that merges with the message end is
    never counted as template. Falls back to ``fallback`` when it cannot be worked out.
    """
    counts = []
    for marker in _MARKERS:
        try:
            text = render_prompt(tokenizer, marker)
        except ValueError:
            break
        end = text.rfind(marker) + len(marker)
        if end < len(marker):
            continue
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            counts.append(sum(1 for s, _ in enc["offset_mapping"] if s >= end))
        except (NotImplementedError, ValueError, KeyError, TypeError):
            counts.append(len(encode(tokenizer, text[end:])))
    n = min(counts) if counts else 0
    if n < 1:
        log.warning("Could not find the post-instruction template tokens; using the fallback n_pos=%d.", fallback)
        return fallback
    return n


@torch.inference_mode()
def mean_activations(model: HookedModel, prompts: Sequence[str | ChatSequence], *, n_pos: int, layers: Sequence[int] | None = None,
                     batch_size: int = 16, fwd_hooks: Sequence[Hook] = (), progress: bool = False) -> MeanActivations:
    """Float64 mean of ``resid_pre`` at the last ``n_pos`` tokens of each chat prompt, per layer.

    One forward pass per (length-bucketed, left-padded) batch; hooks add each batch's sums into
    float64 accumulators, and the pass stops after the last layer needed. ``fwd_hooks`` are
    active during the pass and run before the accumulating hooks.
    """
    if len(prompts) == 0:
        raise UsageError("mean_activations needs at least one prompt.")
    layers = list(range(model.n_layers)) if layers is None else [model.check_layer(l) for l in layers]
    chats = as_chats(model, prompts)
    shortest = min(len(c) for c in chats)
    if not 1 <= n_pos <= shortest:
        raise UsageError(f"n_pos={n_pos} must lie in 1..{shortest} (the shortest prompt's length).")
    sums = torch.zeros(n_pos, len(layers), model.d_model, dtype=torch.float64, device=model.device)

    def accumulate(j: int):
        def fn(x, hook):
            sums[:, j] += x[:, -n_pos:].to(torch.float64).sum(0)
        return fn

    acc_hooks = [(hook_name("resid_pre", l), accumulate(j)) for j, l in enumerate(layers)]
    stop = max(layers) + 1
    with hooks_active(model, fwd_hooks), hooks_active(model, acc_hooks):
        for _, batch in iter_batches(model, chats, batch_size, progress, desc="mean resid_pre"):
            model.bridge(batch.input_ids, attention_mask=batch.attention_mask,
                         stop_at_layer=stop if stop < model.n_layers else None)
    return MeanActivations((sums / len(chats)).cpu(), len(chats), list(range(-n_pos, 0)), layers)


def compute_candidates(model: HookedModel, harmful: Sequence[str | ChatSequence], harmless: Sequence[str | ChatSequence], *,
                       n_pos: int | None = None, layers: Sequence[int] | None = None, batch_size: int = 16,
                       progress: bool = False) -> DirectionCandidates:
    """Difference-in-means candidates at every post-instruction position × layer (resid_pre).

    ``n_pos`` defaults to ``post_instruction_len(model.tokenizer)``.
    """
    if not harmful or not harmless:
        raise UsageError(f"compute_candidates needs harmful and harmless prompts, got {len(harmful)} and {len(harmless)}.")
    n_pos = post_instruction_len(model.tokenizer) if n_pos is None else int(n_pos)
    mh = mean_activations(model, harmful, n_pos=n_pos, layers=layers, batch_size=batch_size, progress=progress)
    mb = mean_activations(model, harmless, n_pos=n_pos, layers=layers, batch_size=batch_size, progress=progress)
    return DirectionCandidates(mh.mean - mb.mean, mh.positions, mh.layers, mh.mean, mb.mean, mh.n, mb.n)


# ----------------------------------------------------------------------------- selection


def eligible_layers(n_layers: int, max_layer_frac: float = 0.8) -> list[int]:
    """Layers kept by the layer filter: ``l < int(max_layer_frac · n_layers)`` (Arditi's reference code)."""
    if not 0.0 < max_layer_frac <= 1.0:
        raise UsageError(f"max_layer_frac must lie in (0, 1], got {max_layer_frac}.")
    return list(range(int(max_layer_frac * n_layers)))


def _kl(logp: Float[Tensor, "n vocab"], logq: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """``KL(P ‖ Q)`` per row from log-probs, in float64."""
    logp, logq = logp.double(), logq.double()
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)


@torch.inference_mode()
def choose_candidate(records: Sequence[dict], keep_layers, kl_threshold: float, induce_threshold: float,
                     max_relax: int = 8) -> tuple[dict, bool, float | None]:
    """The lowest-bypass candidate that passes the filters; (record, filters_passed, KL threshold used).

    When none passes, the layer and induce filters are kept and the KL threshold is doubled
    (up to ``max_relax`` times) until one passes: the least damaging of the candidates that do
    induce refusal, rather than the lowest bypass at any KL (which on the v4 organism picked a
    direction whose ablation destroyed the model: KL 6.7, harmless CE 0.58 → 4.9). Only when no
    candidate induces refusal at all is the lowest bypass of all evaluated taken (KL used: None).
    """
    evaluated = [r for r in records if r.get("bypass") is not None]
    if not evaluated:
        raise UsageError("No candidate was evaluated.")
    key = lambda r: (r["bypass"], r["kl"])  # noqa: E731
    passed = [r for r in evaluated if r["passed"]]
    if passed:
        return min(passed, key=key), True, kl_threshold
    base = [r for r in evaluated if r["layer"] in keep_layers and r["induce"] >= induce_threshold]
    limit = kl_threshold
    for _ in range(max_relax if kl_threshold > 0 else 0):
        limit *= 2
        pool = [r for r in base if r["kl"] <= limit]
        if pool:
            return min(pool, key=key), False, limit
    return min(evaluated, key=key), False, None


def select_direction(model: HookedModel, candidates: DirectionCandidates, harmful_val: Sequence[str | ChatSequence],
                     harmless_val: Sequence[str | ChatSequence], *, positions: Sequence[int] | None = (-1,),
                     layers: Sequence[int] | None = None, max_layer_frac: float = 0.8, kl_threshold: float = 0.1,
                     induce_threshold: float = 0.0, batch_size: int = 16, progress: bool = False) -> SelectedDirection:
    """Score candidates by bypass / induce / KL on validation prompts and pick one (docs/methods.md §4).

    Args:
        positions: candidate positions to evaluate (negative offsets); ``None`` = all of them.
            Default: the last prompt token only (5× cheaper than the full grid).
        layers: candidate layers to evaluate; ``None`` = every candidate layer that passes the
            layer filter. Layers given explicitly are evaluated even when the filter drops them.
        max_layer_frac: layer filter, drop ``l ≥ int(max_layer_frac · L)``.
        kl_threshold: drop candidates whose mean KL on harmless prompts exceeds this.
        induce_threshold: drop candidates whose induced refusal score is below this.
    """
    if not harmful_val or not harmless_val:
        raise UsageError(f"select_direction needs harmful and harmless validation prompts, got {len(harmful_val)} and {len(harmless_val)}.")
    keep = set(eligible_layers(model.n_layers, max_layer_frac))
    pos_list = list(candidates.positions) if positions is None else list(positions)
    for p in pos_list:
        if p not in candidates.positions:
            raise UsageError(f"Position {p} is not a candidate position; candidates are {candidates.positions}.")
    if layers is None:
        layer_list = [l for l in candidates.layers if l in keep]
        if not layer_list:
            raise UsageError(f"No candidate layer lies below int({max_layer_frac} · {model.n_layers}); pass layers= explicitly.")
    else:
        layer_list = [model.check_layer(l) for l in layers]
        for l in layer_list:
            if l not in candidates.layers:
                raise UsageError(f"Layer {l} has no candidate; candidate layers are {candidates.layers}.")
    config = dict(positions=pos_list, layers=layer_list, max_layer_frac=max_layer_frac, kl_threshold=kl_threshold,
                  induce_threshold=induce_threshold, n_harmful_val=len(harmful_val), n_harmless_val=len(harmless_val))

    t0 = time.perf_counter()
    harm, safe = as_chats(model, harmful_val), as_chats(model, harmless_val)
    both = harm + safe
    nh = len(harm)
    rid = refusal_token_ids(model.tokenizer)
    # plain HF blocks, the shared chat prefix computed once a run, and activation addition at
    # layer l run from block l (the blocks below it are clean): same log-probs as bridge
    # forwards with the hooks (tests), at about a third of the cost
    runner_both, runner_safe = PrefixSharedRunner(model, both, batch_size), PrefixSharedRunner(model, safe, batch_size)
    lp_both = runner_both.last_logprobs()
    base_scores = score_from_logprobs(lp_both, rid)
    base_safe = lp_both[nh:]
    baseline = {"harmful": float(base_scores[:nh].mean()), "harmless": float(base_scores[nh:].mean())}

    records = []
    grid = [(p, l) for p in pos_list for l in layer_list]
    scale = float(candidates.norms.max())
    zero = [(p, l) for p, l in grid if float(candidates.vector(p, l).norm()) <= 1e-8 * max(scale, 1e-30)]
    if zero:  # e.g. layer 0 at template positions: the same token embedding for every prompt
        log.info("Skipping %d zero candidate vector(s) (same activation for both sets): %s", len(zero), zero)
        records += [{"position": p, "layer": l, "norm": float(candidates.vector(p, l).norm()), "bypass": None,
                     "induce": None, "kl": None, "passed": False, "reason": "zero-vector"} for p, l in zero]
        grid = [g for g in grid if g not in zero]
    if not grid:
        raise UsageError(f"Every requested candidate (positions {pos_list}, layers {layer_list}) is the zero vector; "
                         "choose other layers or positions.")
    for k, (p, l) in enumerate(grid):
        r = candidates.vector(p, l).to(torch.float32)
        with plain_hooks(model, ablation_hooks(model, r)):
            lp_abl = runner_both.last_logprobs()
        s_abl = score_from_logprobs(lp_abl, rid)
        with plain_hooks(model, addition_hooks(model, r, l)):
            lp_add = runner_safe.last_logprobs(l)
        rec = {"position": p, "layer": l, "norm": float(r.norm()),
               "bypass": float(s_abl[:nh].mean()),
               "induce": float(score_from_logprobs(lp_add, rid).mean()),
               "kl": float(_kl(base_safe, lp_abl[nh:]).mean())}
        reasons = []
        if l not in keep:
            reasons.append(f"layer>=int({max_layer_frac}*L)")
        if not rec["kl"] <= kl_threshold:
            reasons.append(f"kl>{kl_threshold}")
        if not rec["induce"] >= induce_threshold:
            reasons.append(f"induce<{induce_threshold}")
        rec.update(passed=not reasons, reason=",".join(reasons))
        records.append(rec)
        if progress:
            log.info("candidate %d/%d pos %d layer %d: bypass %.3f induce %.3f kl %.4f %s", k + 1, len(grid), p, l,
                     rec["bypass"], rec["induce"], rec["kl"], "ok" if rec["passed"] else rec["reason"])

    records.sort(key=lambda r: (r["position"], r["layer"]))
    best, filters_passed, kl_used = choose_candidate(records, keep, kl_threshold, induce_threshold)
    config["kl_threshold_used"] = kl_used
    if not filters_passed:
        log.warning("No refusal-direction candidate passed the filters (layer < int(%.2f·L), KL ≤ %g, induce ≥ %g); "
                    "%s: position %d, layer %d (KL %.3f, filters_passed=False).", max_layer_frac, kl_threshold,
                    induce_threshold, f"relaxed the KL filter to {kl_used:g}" if kl_used is not None
                    else "no candidate induces refusal either, took the lowest bypass of all", best["position"],
                    best["layer"], best["kl"])
    vec = candidates.vector(best["position"], best["layer"]).to(torch.float32)
    elapsed = time.perf_counter() - t0
    timing = {"total": round(elapsed, 2), "per_candidate": round(elapsed / len(grid), 3), "n_candidates": len(grid)}
    return SelectedDirection(position=best["position"], layer=best["layer"], direction=(vec / vec.norm()).contiguous(),
                             vector=vec, scores=records, filters_passed=filters_passed, baseline=baseline,
                             config=config, timing=timing)
