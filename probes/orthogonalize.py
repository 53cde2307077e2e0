"""Directional ablation, activation addition and weight orthogonalization (WO) of a direction.

Arditi et al. (2024) remove refusal by projecting the refusal direction ``r̂`` out of every
write to the residual stream. Done with hooks (``ablation_hooks``: ``x ← x − (x·r̂) r̂`` at every
block input, attention output and MLP output, every position), or folded into the weights
once (``orthogonalize_weights``: ``W_E ← W_E − (W_E r̂) r̂ᵀ`` and ``W ← (I − r̂ r̂ᵀ) W`` for every
attention-out and MLP-out matrix and bias), which gives a plain checkpoint that equals the
hooked ablation numerically. ``addition_hooks`` adds the raw vector at one layer's input
(``c = +1`` induces refusal, ``−1`` bypasses it).

Tied embeddings (SmolLM2, tiny-llama): the hooks never touch the unembedding, so before
``W_E`` is changed the output layer gets its own copy of the original matrix and the config
says ``tie_word_embeddings=False`` (``HookedModel.save`` then writes an untied checkpoint).

The ``wo`` recipe (``load_model("smollm2-135m-instruct:wo")``) computes difference-in-means
candidates on the harmful/harmless train splits, selects one on the validation splits
(``probes.directions``, docs/methods.md §4) and orthogonalizes the weights.

    >>> with hooks_active(model, ablation_hooks(model, r)): lp = last_logprobs(model, seqs)  # doctest: +SKIP
    >>> orthogonalize_weights(model, r)           # now last_logprobs(model, seqs) ≈ lp  # doctest: +SKIP
    >>> load_model("smollm2-135m-instruct:wo")     # built once, then cached  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from depthlens.ablation import ablation_hook, unit_direction
from depthlens.generate import Hook
from depthlens.models import hook_name

log = logging.getLogger(__name__)

__all__ = [
    "ablation_hooks",
    "addition_hooks",
    "orthogonalize_weights",
    "Orthogonalized",
    "WOConfig",
    "WORecipe",
    "recipe",
]

_ATTN_OUT = ("self_attn.o_proj",)
_MLP_OUT = ("mlp.down_proj",)
_POST_NORMS = ("post_feedforward_layernorm.weight", "post_self_attn_layernorm.weight")


def _as_direction(model, direction, normalize: bool) -> Tensor:
    return unit_direction(direction, model.d_model, normalize=normalize)


class _Cast:
    """A vector handed to hooks in each activation's device and dtype (converted once)."""

    def __init__(self, r: Tensor):
        self.r = r
        self._cache: dict = {}

    def like(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self.r.to(device=x.device, dtype=x.dtype)
        return self._cache[key]


def ablation_hooks(model, direction: Float[Tensor, " d_model"]) -> list[Hook]:
    """Hooks that project ``r̂`` out at every layer's resid_pre, attn_out and mlp_out (all positions).

    The direction is normalized here; the projection is computed in the activation's dtype.
    Use with ``depthlens.generate.hooks_active`` or any ``fwd_hooks=`` argument.
    """
    ablate = ablation_hook(_as_direction(model, direction, normalize=True))
    return [(hook_name(kind, l), ablate) for l in range(model.n_layers) for kind in ("resid_pre", "attn_out", "mlp_out")]


def addition_hooks(model, direction: Float[Tensor, " d_model"], layer: int, coeff: float = 1.0) -> list[Hook]:
    """A hook adding ``coeff · r`` (raw, not normalized) to ``blocks.{layer}.hook_resid_pre`` at all positions."""
    model.check_layer(layer)
    r = _Cast(_as_direction(model, direction, normalize=False) * float(coeff))

    def add(x: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
        return x + r.like(x)

    return [(hook_name("resid_pre", layer), add)]


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Orthogonalized:
    """What ``orthogonalize_weights`` changed.

    Attributes:
        parameters: clean names of the orthogonalized tensors.
        untied: True when the output embedding was untied from the input embedding first.
    """

    parameters: list[str]
    untied: bool


def _inner(module):
    return getattr(module, "_original_component", module)


def _find(params: dict[str, torch.nn.Parameter], stems: Sequence[str], layer: int, what: str) -> str:
    for stem in stems:
        if f"{stem}.weight" in params:
            return stem
    raise ValueError(f"Cannot find the {what} matrix of layer {layer} (looked for {', '.join(stems)}); "
                     f"this architecture is not supported by orthogonalize_weights.")


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
def untie_embeddings(model) -> bool:
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
def orthogonalize_weights(model, direction: Float[Tensor, " d_model"]) -> Orthogonalized:
    """Fold directional ablation of ``r̂`` into the weights of ``model``, in place.

    ``W_E ← W_E − (W_E r̂) r̂ᵀ``; ``W ← (I − r̂ r̂ᵀ) W`` (and ``b ← b − (b·r̂) r̂``) for every
    attention-out and MLP-out projection. A tied unembedding is untied first (see the module
    docstring). Architectures with norms after the sublayer outputs (Gemma-2 style) are
    refused: there the folded model would not equal the hooked ablation.
    """
    r = _as_direction(model, direction, normalize=True).to(model.device)
    changed = []
    for l in range(model.n_layers):
        params = model.layer_parameters(l)
        if any(k in params for k in _POST_NORMS):
            raise ValueError("This model normalizes sublayer outputs before the residual add (Gemma-2 style); "
                             "weight orthogonalization would not equal directional ablation there.")
        for stems, what in ((_ATTN_OUT, "attention-out"), (_MLP_OUT, "MLP-out")):
            stem = _find(params, stems, l, what)
            for suffix in ("weight", "bias"):
                p = params.get(f"{stem}.{suffix}")
                if p is not None:
                    _project_cols(p.data, r.to(p.device))
                    changed.append(f"model.layers.{l}.{stem}.{suffix}")
    untied = untie_embeddings(model)
    emb = _inner(model.hf.get_input_embeddings())
    _project_rows(emb.weight.data, r.to(emb.weight.device))
    changed.insert(0, "model.embed_tokens.weight")
    return Orthogonalized(parameters=changed, untied=untied)


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
    from depthlens.forward import last_logprobs
    from depthlens.generate import as_chats
    from probes.directions import compute_candidates, select_direction

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
    from depthlens.cli import parse_config
    from depthlens.models import DEFAULT_MODEL
    from depthlens.recipes import build_with

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(WOConfig, argv)
    model = build_with(DEFAULT_MODEL, WORecipe(cfg))
    print(f"WO model ready: {model.provenance.get('source')}")


if __name__ == "__main__":
    main()
