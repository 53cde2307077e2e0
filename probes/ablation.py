"""Parametrised directional ablation: per-layer kernels, an interpolated direction, norm preservation.

Arditi et al.'s weight orthogonalization (``probes.orthogonalize``) projects one unit
direction r̂ out of every residual write at full strength. Here the strength is a parameter
per layer and per write, so that an optimiser (``probes.pareto``) can trade refusal removal
against collateral damage (docs/methods.md §4.7):

- **kernel** (``Kernel``): the weight of layer l's attention-out (or MLP-out) write is
  ``max_weight`` at layer ``position``, falling linearly to ``min_weight`` at distance
  ``width``, and 0 beyond (the family of the public abliteration tool heretic);
- **direction index** (``interpolate_direction``): a float index into the layers'
  difference-in-means directions; ``r̂ = normalize(lerp(r̂_⌊i⌋, r̂_⌈i⌉, i − ⌊i⌋))``;
- **norm preservation** (``AblationParams.norm_preserving``): every column ``W_j`` of an
  output matrix (the vector input unit j writes) keeps its length after the projection,
  ``W'_j = ‖W_j‖ · P W_j / ‖P W_j‖`` with ``P = I − w r̂ r̂ᵀ``, i.e. ``W' = P W diag(s)``.

The ablation is defined on the output projection of each sublayer (``o_proj``, ``down_proj``)
and written two ways that are equal (``tests/test_ablation.py``, < 1e-4): TransformerLens
hooks (``weighted_ablation_hooks``, the per-layer-weighted counterpart of
``depthlens.interventions.ablation.ablation_hooks``: scale the projection's input by s at
``blocks.{l}.attn.o.hook_in``, project its output at ``blocks.{l}.attn.o.hook_out``;
``mlp.out`` likewise) and weights
folded once (``fold_ablation``: ``W ← P W diag(s)``, ``b ← P b``). Post-norm blocks (Gemma 2/3,
OLMo 2) normalize the projection's output h before the residual add, ``N(h) = g ⊙ h / rms(h)``;
there the projection is against ``r̃ = normalize(g ⊙ r̂)``, which at weight 1 makes the block write
nothing along r̂ (``r̂ · N(h) ∝ r̃ · h``). The gain g is read off the norm module itself
(``N(1) ∝ g``), so Gemma's ``1 + γ`` and OLMo's ``γ`` need no special case. (The same r̃ is
used by the post-norm-aware weight orthogonalization being added to ``probes.orthogonalize``;
the two should share one helper.)

    >>> r = interpolate_direction(layer_directions, 17.4)  # doctest: +SKIP
    >>> p = AblationParams(17.4, Kernel(1.2, 20.0, 0.3, 8.0), Kernel(1.0, 22.0, 0.0, 6.0), norm_preserving=True)  # doctest: +SKIP
    >>> with hooks_active(model, weighted_ablation_hooks(model, r, p)): lp = last_logprobs(model, seqs)  # doctest: +SKIP
    >>> with ablated(model, r, p): last_logprobs(model, seqs)      # ≈ lp; weights restored after  # doctest: +SKIP
    >>> fold_ablation(model, r, p)                                 # permanent (the wo-opt recipe)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from depthlens.runtime import Hook
from depthlens.models.hooked_model import hook_name
from probes.orthogonalize import untie_embeddings

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

__all__ = [
    "COMPONENTS",
    "Kernel",
    "AblationParams",
    "Folded",
    "interpolate_direction",
    "weighted_ablation_hooks",
    "fold_ablation",
    "ablated",
]

COMPONENTS = ("attn", "mlp")
# the output projection of each sublayer, by Hugging Face module path, and its bridge hook stem
_OUT_PROJ = {"attn": ("self_attn.o_proj", "self_attn.dense", "attention.dense"),
             "mlp": ("mlp.down_proj", "mlp.dense_4h_to_h", "mlp.fc2")}
_HOOK_STEM = {"attn": "attn.o", "mlp": "mlp.out"}
_MLP_POST_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")
_EPS = 1e-12


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Kernel:
    """Per-layer ablation weights of one write (attention-out or MLP-out): a linear tent.

    ``w(l) = max_weight + (min_weight − max_weight) · |l − position| / width`` where
    ``|l − position| ≤ width``, else 0.

    Attributes:
        max_weight: weight at the peak (1 = full projection; above 1 over-subtracts).
        position: layer of the peak (a float: the tent need not peak on a layer).
        min_weight: weight at distance ``width`` from the peak.
        width: half-width of the tent in layers (> 0); layers farther away are not ablated.
    """

    max_weight: float = 1.0
    position: float = 0.0
    min_weight: float = 1.0
    width: float = 1.0

    def __post_init__(self):
        for name in ("max_weight", "position", "min_weight", "width"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"Kernel.{name} must be finite, got {getattr(self, name)}.")
        if self.max_weight < 0 or self.min_weight < 0:
            raise ValueError(f"Kernel weights must be >= 0, got max {self.max_weight} and min {self.min_weight}.")
        if self.width <= 0:
            raise ValueError(f"Kernel.width must be > 0 layers, got {self.width}.")

    @classmethod
    def constant(cls, weight: float, n_layers: int) -> Kernel:
        """The same ``weight`` at every one of ``n_layers`` layers (``1.0``: Arditi's full ablation)."""
        return cls(max_weight=weight, position=0.0, min_weight=weight, width=float(max(n_layers, 1)))

    def weights(self, n_layers: int) -> list[float]:
        """The weight of every layer 0..n_layers−1."""
        out = []
        for l in range(n_layers):
            d = abs(l - self.position)
            out.append(0.0 if d > self.width else self.max_weight + (self.min_weight - self.max_weight) * d / self.width)
        return out


@dataclass(frozen=True)
class AblationParams:
    """One parametrised ablation: where the direction comes from and how strongly each write loses it.

    Attributes:
        direction_index: float index into the layers' difference-in-means directions
            (``interpolate_direction``); recorded here so one object names the whole ablation.
        attn: kernel of the attention-out writes.
        mlp: kernel of the MLP-out writes.
        norm_preserving: rescale every output-matrix column to its original length after the
            projection (see the module docstring).
        embed_weight: weight of the projection on the token embeddings (0: untouched, as in
            heretic; 1 with constant unit kernels is Arditi's weight orthogonalization).
    """

    direction_index: float
    attn: Kernel = field(default_factory=Kernel)
    mlp: Kernel = field(default_factory=Kernel)
    norm_preserving: bool = False
    embed_weight: float = 0.0

    def __post_init__(self):
        if not math.isfinite(self.direction_index):
            raise ValueError(f"direction_index must be finite, got {self.direction_index}.")
        if not (math.isfinite(self.embed_weight) and self.embed_weight >= 0):
            raise ValueError(f"embed_weight must be a finite number >= 0, got {self.embed_weight}.")

    def layer_weights(self, n_layers: int) -> dict[str, list[float]]:
        """``{"attn": [w_0 …], "mlp": [w_0 …]}``."""
        return {"attn": self.attn.weights(n_layers), "mlp": self.mlp.weights(n_layers)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> AblationParams:
        return cls(direction_index=float(d["direction_index"]), attn=Kernel(**d["attn"]), mlp=Kernel(**d["mlp"]),
                   norm_preserving=bool(d.get("norm_preserving", False)), embed_weight=float(d.get("embed_weight", 0.0)))


def interpolate_direction(directions: Float[Tensor, "n_layers d_model"], index: float) -> Float[Tensor, " d_model"]:
    """Unit direction at a fractional layer index: ``normalize(lerp(r̂_⌊i⌋, r̂_⌈i⌉, i − ⌊i⌋))`` (float64).

    ``directions[l]`` is layer l's raw difference in means; each is normalized before the
    interpolation, so neighbouring layers count by orientation, not by norm.
    """
    if directions.ndim != 2:
        raise ValueError(f"directions must be [n_layers, d_model], got shape {tuple(directions.shape)}.")
    n = directions.shape[0]
    if not 0.0 <= index <= n - 1:
        raise ValueError(f"direction index {index} lies outside the layers 0..{n - 1} of the directions.")
    lo = math.floor(index)
    hi = min(lo + 1, n - 1)
    frac = index - lo
    ends = directions[[lo, hi]].to(torch.float64)
    norms = ends.norm(dim=-1)
    used = [(l, nrm) for l, nrm, wt in ((lo, norms[0], 1 - frac), (hi, norms[1], frac)) if wt > 0]
    if any(float(nrm) <= _EPS for _, nrm in used):
        raise ValueError(f"direction index {index} uses the zero direction of layer "
                         f"{next(l for l, nrm in used if float(nrm) <= _EPS)}; choose another index.")
    unit = ends / norms.clamp(min=_EPS).unsqueeze(-1)
    r = torch.lerp(unit[0], unit[1], frac)
    if float(r.norm()) <= 1e-8:
        raise ValueError(f"The directions of layers {lo} and {hi} are opposite; their interpolation at {index} vanishes.")
    return r / r.norm()


# ----------------------------------------------------------------------------- the architecture


def _inner(module):
    return getattr(module, "_original_component", module)


def _out_proj(block, component: str) -> torch.nn.Module:
    for path in _OUT_PROJ[component]:
        try:
            return _inner(block.get_submodule(path))
        except AttributeError:
            continue
    raise ValueError(f"Cannot find the {component}-out projection of this block (looked for "
                     f"{', '.join(_OUT_PROJ[component])}); this architecture is not supported by probes.ablation.")


def _post_norm(block, component: str) -> torch.nn.Module | None:
    """The norm applied to the sublayer's output before the residual add, or None (pre-norm block).

    ``post_attention_layernorm`` is Llama's *pre*-MLP norm; it is the attention post-norm only
    in blocks that also normalize the MLP output (Gemma 2/3, OLMo 2).
    """
    has = lambda name: isinstance(getattr(block, name, None), torch.nn.Module)
    mlp_post = next((n for n in _MLP_POST_NORMS if has(n)), None)
    if component == "mlp":
        name = mlp_post
    elif has("post_self_attn_layernorm"):
        name = "post_self_attn_layernorm"
    else:
        name = "post_attention_layernorm" if mlp_post and has("post_attention_layernorm") else None
    return None if name is None else _inner(getattr(block, name))


@torch.no_grad()
def _gain(norm: torch.nn.Module, d_model: int, like: Tensor) -> Tensor:
    """The elementwise gain g of an RMS-style norm, up to a positive factor: ``N(1)`` (float64)."""
    ones = torch.ones(1, 1, d_model, device=like.device, dtype=like.dtype)
    g1, g2 = norm(ones).reshape(-1).double(), norm(2 * ones).reshape(-1).double()
    if not torch.allclose(g1, g2, rtol=1e-4, atol=1e-6) or float(g1.abs().max()) == 0:
        raise ValueError(f"The post-norm {type(norm).__name__} is not an RMS-style norm (N(c·x) ≠ N(x)); "
                         "probes.ablation cannot fold an ablation through it.")
    return g1


def _blocks(model) -> list[torch.nn.Module]:
    return list(model.plain().model.layers)


@dataclass(frozen=True)
class _Write:
    """One weighted output projection: its module, weight, target direction and column scales."""

    layer: int
    component: str
    module: torch.nn.Module
    weight: float
    target: Tensor  # unit, float64: r̂, or r̃ behind a post-norm
    scales: Tensor | None  # float64 [d_in] when norm-preserving
    post_norm: bool


def _as_unit(model, direction) -> Tensor:
    r = torch.as_tensor(direction).detach().to(torch.float64).reshape(-1)
    if r.shape != (model.d_model,):
        raise ValueError(f"The direction must have shape ({model.d_model},) for this model, got {tuple(r.shape)}.")
    if not torch.isfinite(r).all() or float(r.norm()) == 0:
        raise ValueError("The direction must be a finite, non-zero vector.")
    return r / r.norm()


def _column_scales(w: Tensor, t: Tensor, weight: float) -> Tensor:
    """``s_j = ‖W_j‖ / ‖(I − w t tᵀ) W_j‖`` for the columns of ``w`` ([d_model, d_in]); 1 where one vanishes."""
    w64 = w.to(torch.float64)
    before = w64.norm(dim=0)
    after = (w64 - weight * torch.outer(t, t @ w64)).norm(dim=0)
    ok = after > _EPS * before.clamp(min=1.0)
    return torch.where(ok, before / after.clamp(min=_EPS), torch.ones_like(before))


def _writes(model, direction, params: AblationParams) -> list[_Write]:
    """Every output projection with a non-zero weight, from the model's current (original) weights."""
    r = _as_unit(model, direction)
    weights = params.layer_weights(model.n_layers)
    out = []
    for l, block in enumerate(_blocks(model)):
        for comp in COMPONENTS:
            w = weights[comp][l]
            if w == 0.0:
                continue
            module = _out_proj(block, comp)
            dev = module.weight.device
            norm = _post_norm(block, comp)
            t = r.to(dev)
            if norm is not None:
                t = _gain(norm, model.d_model, module.weight).to(dev) * t
                t = t / t.norm()
            scales = _column_scales(module.weight, t, w) if params.norm_preserving else None
            out.append(_Write(l, comp, module, w, t, scales, norm is not None))
    return out


# ----------------------------------------------------------------------------- hooks and folding


class _Like:
    """A float64 vector handed to hooks in each activation's device and dtype (converted once)."""

    def __init__(self, v: Tensor):
        self.v, self._cache = v, {}

    def __call__(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self.v.to(device=x.device, dtype=x.dtype)
        return self._cache[key]


def _project_fn(t: Tensor, weight: float):
    vec = _Like(t)

    def project(x: Tensor, hook) -> Tensor:
        tt = vec(x)
        return x - weight * (x @ tt).unsqueeze(-1) * tt

    return project


def _scale_fn(s: Tensor):
    vec = _Like(s)

    def scale(x: Tensor, hook) -> Tensor:
        v = vec(x)
        if x.shape[-1] == v.numel():
            return x * v
        # attention's o.hook_in sees [batch, pos, heads, d_head]: the columns are its flattened last two axes
        return (x.flatten(-2) * v).view_as(x)

    return scale


def weighted_ablation_hooks(model: HookedModel, direction: Float[Tensor, " d_model"], params: AblationParams) -> list[Hook]:
    """TransformerLens hooks that apply ``params`` with ``direction`` (see the module docstring).

    Per weighted write: ``blocks.{l}.attn.o.hook_in`` (``mlp.out.hook_in``) scales the
    projection's input by the column scales when norm-preserving, ``…hook_out`` subtracts
    ``w (h·t) t``; the embedding weight acts at ``blocks.0.hook_resid_pre``. Scales are
    computed from the weights as they are now, so build the hooks on an unablated model.
    """
    hooks: list[Hook] = []
    if params.embed_weight:
        hooks.append((hook_name("resid_pre", 0), _project_fn(_as_unit(model, direction), params.embed_weight)))
    for wr in _writes(model, direction, params):
        stem = f"blocks.{wr.layer}.{_HOOK_STEM[wr.component]}"
        if wr.scales is not None:
            hooks.append((f"{stem}.hook_in", _scale_fn(wr.scales)))
        hooks.append((f"{stem}.hook_out", _project_fn(wr.target, wr.weight)))
    missing = [name for name, _ in hooks if name not in model.bridge.hook_dict]
    if missing:
        raise ValueError(f"This model's bridge has no hook point {missing[0]!r}; probes.ablation cannot hook it.")
    return hooks


@dataclass(frozen=True)
class Folded:
    """What ``fold_ablation`` changed.

    Attributes:
        parameters: clean names of the changed tensors.
        untied: True when the output embedding was untied from the input embedding first.
        post_norm: True when some projection was made against the gain-scaled r̃.
        layer_weights: the per-layer weights that were applied (``{"attn": […], "mlp": […]}``).
    """

    parameters: list[str]
    untied: bool
    post_norm: bool
    layer_weights: dict[str, list[float]]


def _touched(model, params: AblationParams) -> list[torch.nn.Parameter]:
    weights = params.layer_weights(model.n_layers)
    out = []
    for l, block in enumerate(_blocks(model)):
        for comp in COMPONENTS:
            if weights[comp][l] != 0.0:
                m = _out_proj(block, comp)
                out += [p for p in (m.weight, getattr(m, "bias", None)) if p is not None]
    if params.embed_weight:
        out.append(_inner(model.hf.get_input_embeddings()).weight)
    return out


@torch.no_grad()
def fold_ablation(model: HookedModel, direction: Float[Tensor, " d_model"], params: AblationParams) -> Folded:
    """Fold the ablation into the weights of ``model``, in place: ``W ← P W diag(s)``, ``b ← P b``, ``P = I − w t tᵀ``.

    A tied unembedding is untied first when the embeddings are projected (``embed_weight``).
    """
    names = {id(p): n for n, p in model.plain().named_parameters()}
    writes = _writes(model, direction, params)
    changed = []
    for wr in writes:
        for p in (wr.module.weight, getattr(wr.module, "bias", None)):
            if p is None:
                continue
            x = p.data.to(torch.float64)
            if x.ndim == 2 and wr.scales is not None:
                x = x * wr.scales.to(x.device)
            x = x - wr.weight * (torch.outer(wr.target, wr.target @ x) if x.ndim == 2 else (x @ wr.target) * wr.target)
            p.data.copy_(x.to(p.dtype))
            changed.append(names.get(id(p), f"layers.{wr.layer}.{wr.component}"))
    untied = False
    if params.embed_weight:
        untied = untie_embeddings(model)
        emb = _inner(model.hf.get_input_embeddings()).weight
        r = _as_unit(model, direction).to(emb.device)
        x = emb.data.to(torch.float64)
        emb.data.copy_((x - params.embed_weight * torch.outer(x @ r, r)).to(emb.dtype))
        changed.insert(0, names.get(id(emb), "embed_tokens.weight"))
    return Folded(parameters=changed, untied=untied, post_norm=any(w.post_norm for w in writes),
                  layer_weights=params.layer_weights(model.n_layers))


@contextmanager
def ablated(model, direction: Float[Tensor, " d_model"], params: AblationParams) -> Iterator[Folded]:
    """Fold the ablation for the duration of the block, then put the original weights back.

    The search's trial loop: generation and forward passes inside run the plain fast paths.
    (With ``embed_weight`` a tied unembedding stays untied afterwards, holding the same values.)
    """
    saved = [(p, p.data.clone()) for p in _touched(model, params)]
    try:
        yield fold_ablation(model, direction, params)
    finally:
        with torch.no_grad():
            for p, data in saved:
                p.data.copy_(data)

