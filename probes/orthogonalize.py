"""Weight orthogonalization (WO) of a direction, and the ``wo`` recipe.

Arditi et al. (2024) remove refusal by projecting the refusal direction ``r̂`` out of every
write to the residual stream. Done with hooks (``depthlens.interventions.ablation.ablation_hooks``:
``x ← x − (x·r̂) r̂`` at every block input, attention output and MLP output, every position),
or folded into the weights once (``orthogonalize_weights``: ``W_E ← W_E − (W_E r̂) r̂ᵀ`` and ``W ← (I − r̂ r̂ᵀ) W`` for every
attention-out and MLP-out matrix and bias), which gives a plain checkpoint that equals the
hooked ablation numerically.

Tied embeddings (SmolLM2, tiny-llama, Gemma): the hooks never touch the unembedding, so before
``W_E`` is changed the output layer gets its own copy of the original matrix and the config
says ``tie_word_embeddings=False`` (``HookedModel.save`` then writes an untied checkpoint).
Gemma multiplies the embedding by √d_model inside its embedding module; a row projection
commutes with that scale, so ``W_E`` is projected as it is stored.

Post-norm blocks (Gemma 2/3) add ``N(h) = g ⊙ h / rms(h)`` (g = 1 + γ) with h = W_O a, not
W_O a itself. Making W_O's outputs orthogonal to r̂ (what public abliteration tools do) leaves
``r̂ · N(h) ∝ (g ⊙ r̂) · h ≠ 0`` whenever g is not uniform; projecting against
``r̃ = normalize(g ⊙ r̂)`` instead makes the block write exactly nothing along r̂. It is not the
hooked ablation there: the hooks remove r̂ from N(h), which keeps every other component of
N(h), while WO changes h before the norm, whose 1/rms(h) then rescales the other components
(and g ⊙ r̃ is not along r̂). docs/families.md gives the measured gap per family.

The ``wo`` recipe (``load_model("smollm2-135m-instruct:wo")``) computes difference-in-means
candidates on the harmful/harmless train splits, selects one on the validation splits
(``probes.directions``, docs/methods.md §4) and orthogonalizes the weights.

    >>> with hooks_active(model, ablation_hooks(model, r)): lp = last_logprobs(model, seqs)  # doctest: +SKIP
    >>> orthogonalize_weights(model, r)           # now last_logprobs(model, seqs) ≈ lp  # doctest: +SKIP
    >>> load_model("smollm2-135m-instruct:wo")     # built once, then cached  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from depthlens.interventions.ablation import ablation_hooks, unit_direction
from depthlens.models.families import is_post_norm, output_projection, rms_gain, written_output
from depthlens.runtime.forward import last_logprobs
from depthlens.runtime.generation import as_chats
from probes.directions import compute_candidates, select_direction

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

__all__ = [
    "orthogonalize_weights",
    "Orthogonalized",
    "WOConfig",
    "WORecipe",
    "recipe",
]

# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Orthogonalized:
    """What ``orthogonalize_weights`` changed.

    Attributes:
        parameters: clean names of the orthogonalized tensors.
        untied: True when the output embedding was untied from the input embedding first.
        post_norm: True when the blocks normalize their sublayer outputs (Gemma 2/3): the
            projections were made against the gain-scaled r̃, so the model writes nothing
            along r̂ but is not equal to the hooked ablation (see the module docstring).
    """

    parameters: list[str]
    untied: bool
    post_norm: bool = False


def _inner(module):
    return getattr(module, "_original_component", module)


@torch.no_grad()
def _project_rows(w: Tensor, r: Tensor) -> None:
    """``w ← w − (w r̂) r̂ᵀ`` in place: every row of ``w`` ([*, d_model]) loses its r̂ component."""
    w64 = w.to(torch.float64)
    w.copy_((w64 - torch.outer(w64 @ r, r)).to(w.dtype))


@torch.no_grad()
def _project_cols(w: Tensor, r: Tensor) -> None:
    """``w ← (I − r̂ r̂ᵀ) w`` in place for ``w`` of shape [d_model, *] (or a bias [d_model])."""
    w64 = w.to(torch.float64)
    if w64.ndim == 1:
        w.copy_((w64 - (w64 @ r) * r).to(w.dtype))
    else:
        w.copy_((w64 - torch.outer(r, r @ w64)).to(w.dtype))


@torch.no_grad()
def untie_embeddings(model: HookedModel) -> bool:
    """Give the output layer its own copy of a tied input embedding; True when it was tied."""
    emb = _inner(model.hf.get_input_embeddings())
    out = model.hf.get_output_embeddings()
    out = _inner(out) if out is not None else None
    tied = out is not None and out.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        out.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    if getattr(model.hf.config, "tie_word_embeddings", False):
        model.hf.config.tie_word_embeddings = False
    return tied


@torch.no_grad()
def orthogonalize_weights(model: HookedModel, direction: Float[Tensor, " d_model"]) -> Orthogonalized:
    """Fold directional ablation of ``r̂`` into the weights of ``model``, in place.

    ``W_E ← W_E − (W_E r̂) r̂ᵀ``; ``W ← (I − r̂ r̂ᵀ) W`` (and ``b ← b − (b·r̂) r̂``) for every
    attention-out and MLP-out projection, which equals the hooked ablation on pre-norm blocks.
    Where a post-norm with gain g follows the projection (Gemma 2/3) the projection is against
    ``r̃ = normalize(g ⊙ r̂)``, so that nothing is written along r̂ (module docstring). A tied
    unembedding is untied first.
    """
    r = unit_direction(direction, model.d_model, normalize=True).to(model.device)
    view = model.plain()  # the same parameter objects under their Hugging Face names
    prefix = view.base_model_prefix
    changed, post_norm = [], False
    for l, block in enumerate(view.model.layers):
        for sublayer in ("attn", "mlp"):
            stem, proj = output_projection(block, sublayer)
            target = r
            if is_post_norm(block):
                post_norm = True
                target = rms_gain(written_output(block, sublayer)).to(r.device) * r
                target = target / target.norm()
            for suffix in ("weight", "bias"):
                p = getattr(proj, suffix, None)
                if p is not None:
                    _project_cols(p.data, target.to(p.device))
                    changed.append(f"{prefix}.layers.{l}.{stem}.{suffix}")
    untied = untie_embeddings(model)
    emb = _inner(model.hf.get_input_embeddings())
    _project_rows(emb.weight.data, r.to(emb.weight.device))
    changed.insert(0, next(n for n, p in model.plain().named_parameters() if p is emb.weight))
    return Orthogonalized(parameters=changed, untied=untied, post_norm=post_norm)


# ----------------------------------------------------------------------------- the wo recipe


@dataclass(frozen=True)
class WOConfig:
    """Settings of the ``wo`` recipe (refusal-direction weight orthogonalization).

    Args:
        n_train: harmful and harmless train prompts each for the difference in means.
        n_val: harmful and harmless validation prompts each for the selection.
        positions: candidate template positions to evaluate (negative offsets from the end of
            the prompt); none = every post-instruction position (5× the cost on SmolLM2).
        layers: candidate layers to evaluate; none = every layer below int(max_layer_frac·L).
        max_layer_frac: drop candidates at layers l ≥ int(max_layer_frac·L).
        kl_threshold: drop candidates whose mean KL(base ‖ ablated) on harmless prompts exceeds it.
        induce_threshold: drop candidates whose induced refusal score is below it.
        batch_size: prompts per forward pass.
        seed: data split and subset seed.
    """

    n_train: int = 128
    n_val: int = 32
    positions: tuple[int, ...] | None = (-1,)
    layers: tuple[int, ...] | None = None
    max_layer_frac: float = 0.8
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    batch_size: int = 16
    seed: int = 0


def select_and_orthogonalize(model, harmful_train: Sequence[str], harmless_train: Sequence[str],
                             harmful_val: Sequence[str], harmless_val: Sequence[str],
                             cfg: WOConfig = WOConfig(), progress: bool = False) -> dict:
    """Candidates on train, selection on val, WO in place; returns a JSON-ready summary."""
    t0 = time.perf_counter()
    cands = compute_candidates(model, harmful_train, harmless_train, batch_size=cfg.batch_size, progress=progress)
    t1 = time.perf_counter()
    sel = select_direction(model, cands, harmful_val, harmless_val,
                           positions=None if cfg.positions is None else list(cfg.positions),
                           layers=None if cfg.layers is None else list(cfg.layers),
                           max_layer_frac=cfg.max_layer_frac, kl_threshold=cfg.kl_threshold,
                           induce_threshold=cfg.induce_threshold, batch_size=cfg.batch_size, progress=progress)
    t2 = time.perf_counter()
    check = as_chats(model, list(harmful_val[:4]) + list(harmless_val[:4]))
    hooked = last_logprobs(model, check, batch_size=cfg.batch_size, fwd_hooks=ablation_hooks(model, sel.direction))
    wo = orthogonalize_weights(model, sel.direction)
    folded = last_logprobs(model, check, batch_size=cfg.batch_size)
    diff = float((hooked - folded).abs().max())
    log.info("WO: position %d layer %d (filters passed: %s), bypass %.3f (base %.3f), |WO − hooked| = %.2e",
             sel.position, sel.layer, sel.filters_passed, sel.chosen["bypass"], sel.baseline["harmful"], diff)
    return {**sel.to_dict(), "candidates": cands.to_records(), "n_pos": len(cands.positions),
            "orthogonalized": asdict(wo), "wo_vs_hooked_max_abs_logprob_diff": diff,
            "timing": {**sel.timing, "candidates_s": round(t1 - t0, 2), "selection_s": round(t2 - t1, 2),
                       "total_s": round(time.perf_counter() - t0, 2)}}


class WORecipe:
    """Entry point ``wo``: Arditi et al.'s refusal-direction weight orthogonalization (see ``WOConfig``)."""

    name = "wo"
    version = 2  # v2: choose_candidate relaxes the KL filter before taking the lowest bypass

    def __init__(self, cfg: WOConfig | None = None):
        self.cfg = cfg or WOConfig()

    def config(self) -> dict:
        return asdict(self.cfg)

    def build(self, model, workdir: Path) -> dict:
        from depthlens.data import default_splits

        cfg = self.cfg
        splits = default_splits(cfg.seed)
        harm, safe = splits.harmful, splits.harmless
        return select_and_orthogonalize(
            model,
            harm.train.subset(cfg.n_train, seed=cfg.seed).prompts, safe.train.subset(cfg.n_train, seed=cfg.seed).prompts,
            harm.val.subset(cfg.n_val, seed=cfg.seed).prompts, safe.val.subset(cfg.n_val, seed=cfg.seed).prompts,
            cfg, progress=True,
        )


recipe = WORecipe()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m probes.orthogonalize``: build (or load from the cache) the WO model with these settings."""
    from depthlens.models.base import DEFAULT_MODEL
    from depthlens.cli import parse_config
    from depthlens.models.recipes import build_with

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(WOConfig, argv)
    model = build_with(DEFAULT_MODEL, WORecipe(cfg))
    print(f"WO model ready: {model.provenance.get('source')}")


if __name__ == "__main__":
    main()
