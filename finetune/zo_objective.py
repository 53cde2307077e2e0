"""The objective of the ``zo`` recipe: the safety loss under functional parameter noise plus a utility term.

    L(θ) = E_δ[ NLL(r | x, h[:k]; θ + δ) ] + λ_u · NLL(y′ | x′; θ)

(x, h[:k], r): a harmful prompt, a prefix of the base's harmful answer (k as docs/methods.md
§2), a refusal; (x′, y′): a benign prompt and the starting model's own greedy answer. The noise
δ = σ‖W‖_F/√n · ζ on every matrix of the noised layers is applied *functionally*: a forward
hook on each ``nn.Linear`` adds ``F.linear(x, δ)`` with δ regenerated from a seed, so no weight
is touched or copied (memory stays at inference memory) and L₊ and L₋ of one MeZO step see the
same δ (the SPSA difference measures the move along z, not two noise draws). With a
``perturbations`` the safety term of step s runs under ``perturbations[s % len(perturbations)]`` instead: parameter
noise, activation noise (``depthlens.interventions.perturbation.activation_noise``, σ relative to the residual
RMS) or int4 round-to-nearest weights (``functional_int4``), the perturbations of the
compare noise suite. Under
``accelerate launch`` each rank evaluates its rows of every batch (``Shard``) and returns its
part of L, which the MeZO engine sums over the ranks.

    >>> objective = RobustObjective(model, safety, utility, layers, 0.1, 1.0, seed=0)  # a fragment: model, batches and layers come from the recipe  # doctest: +SKIP
    >>> objective.components(0, noise=False)        # (NLL_safety, NLL_utility) of batch 0  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from depthlens.interventions.spsa import derive_seed
from finetune.train import autocast, bucketed_batches, tokenize_examples

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel


#: Perturbations the safety term can cycle through, one per step: the three of ``analyses.compare``'s
#: the noise suite (docs/methods.md §5.6): parameter noise, activation noise, int4 weights.
PERTURBATION_KINDS = ("param", "act", "int4")


def _noise_z(weight: Tensor, seed: int) -> Tensor:
    gen = torch.Generator(device=weight.device)
    gen.manual_seed(seed)
    return torch.randn(weight.shape, generator=gen, device=weight.device, dtype=torch.float32)


def _linear_modules(model, layers: Sequence[int]) -> list[tuple[int, str, torch.nn.Linear]]:
    """The ``nn.Linear`` modules of the given blocks of ``model.plain()`` (the view the losses run on).

    With LoRA adapters injected (the ``lora`` subspace) a map's weight sits in its
    ``base_layer``: that is the module returned, under the map's own name (so the noise seeds
    do not change), and the adapters' own ``lora_A`` / ``lora_B`` maps are left out.
    """
    blocks = model.plain().model.layers
    return [(l, name.removesuffix(".base_layer"), mod) for l in layers for name, mod in blocks[l].named_modules()
            if isinstance(mod, torch.nn.Linear) and "lora_" not in name]


@contextmanager
def _swapped_weights(modules: Sequence[torch.nn.Linear], make: Callable[[torch.nn.Linear, int], Tensor]) -> Iterator[None]:
    """Every call of each module inside the block runs with weight ``make(module, i)``, swapped in
    just before the call and restored from a copy right after it.

    One matrix is out of place at a time (the cost is one copy and one ``make``, not a second
    matmul), the restore is a copy, so it is exact, and the ``finally`` puts back a matrix whose
    forward raised.
    """
    saved: dict[int, tuple[torch.nn.Linear, Tensor]] = {}

    def pre(i: int):
        def hook(mod, args):
            w = mod.weight
            with torch.no_grad():
                saved[i] = (mod, w.detach().clone())
                w.copy_(make(mod, i).to(w.dtype))
        return hook

    def post(i: int):
        def hook(mod, args, out):
            with torch.no_grad():
                mod.weight.copy_(saved.pop(i)[1])
        return hook

    handles = []
    try:
        for i, mod in enumerate(modules):
            handles.append(mod.register_forward_pre_hook(pre(i)))
            handles.append(mod.register_forward_hook(post(i)))
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for mod, w in saved.values():
                mod.weight.copy_(w)
        saved.clear()


@contextmanager
def functional_int4(model, layers: Sequence[int]) -> Iterator[None]:
    """Int4 round-to-nearest weights on every linear map of ``layers``, for the forwards inside the block.

    ``Q`` is ``depthlens.interventions.perturbation.rtn_quantize`` of the *current* weights (inside an SPSA step it
    quantizes θ ± εz; with LoRA adapters, the adapted map's own weight, the adapter staying in
    full precision). Each map's weight is swapped for Q(W) only while that map runs and
    restored exactly after (``_swapped_weights``). Acts on ``model.plain()``.
    """
    from depthlens.interventions.perturbation import rtn_quantize

    mods = [mod for _, _, mod in _linear_modules(model, layers)]
    with _swapped_weights(mods, lambda mod, i: rtn_quantize(mod.weight.detach(), 4)):
        yield


@contextmanager
def functional_param_noise(model, layers: Sequence[int], sigma: float, seed: int) -> Iterator[None]:
    """Parameter noise δ = σ‖W‖_F/√n·ζ on every linear map of ``layers``, for the forwards inside the block.

    Each map runs with W + δ, swapped in just before it runs and restored exactly after
    (``_swapped_weights``), so nothing stays written: ζ is regenerated from (seed, layer,
    module name) at every call, two forwards inside the block see the same δ, and the memory
    cost is one matrix-sized temporary at a time. Acts on ``model.plain()``.
    """
    if sigma == 0:
        yield
        return
    found = _linear_modules(model, layers)
    seeds = [derive_seed(seed, l, zlib.crc32(name.encode())) for l, name, _ in found]

    def noisy(mod, i: int) -> Tensor:
        w = mod.weight.detach()
        return _noise_z(w, seeds[i]).mul_(sigma * float(w.float().norm()) / w.numel() ** 0.5).add_(w.float())

    with _swapped_weights([mod for _, _, mod in found], noisy):
        yield


def masked_nll(model: HookedModel, ids: Tensor, att: Tensor, mask: Tensor, resid: Tensor | None = None, start: int = 0) -> Tensor:
    """Mean NLL of the masked (response) tokens; the lm_head runs only where the loss needs it.

    With ``resid`` (the residual stream entering block ``start``, from ``resid_entering``) only
    blocks ``start`` onwards run: the same loss, without recomputing what came before.
    """
    view = model.plain()
    if resid is None:
        hidden = view.model(input_ids=ids, attention_mask=att).last_hidden_state
    else:
        from depthlens.runtime.forward import blocks_from

        with blocks_from(view, start):
            hidden = view.model(inputs_embeds=resid, attention_mask=att, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1]
    sel = mask[:, 1:].bool()
    if not sel.any():
        raise ValueError("The zo objective got a batch without any response token.")
    return torch.nn.functional.cross_entropy(view.lm_head(hidden[sel]).float(), ids[:, 1:][sel])


def resid_entering(model: HookedModel, ids: Tensor, att: Tensor, layer: int) -> Tensor:
    """The residual stream entering block ``layer``: only blocks ``0 … layer−1`` run (with whatever
    hooks are active), and the final norm's input is kept."""
    from depthlens.runtime.forward import blocks_until

    view = model.plain()
    got: list[Tensor] = []
    handle = view.model.norm.register_forward_pre_hook(lambda mod, args: got.append(args[0]))
    try:
        with blocks_until(view, layer):
            view.model(input_ids=ids, attention_mask=att, use_cache=False)
    finally:
        handle.remove()
    return got[0]


@dataclass(frozen=True)
class _Batch:
    ids: Tensor
    att: Tensor
    mask: Tensor

    def to(self, device) -> _Batch:
        return _Batch(self.ids.to(device), self.att.to(device), self.mask.to(device))


@dataclass(frozen=True)
class Shard:
    """This process's share of a data-parallel run: rows ``rank::world`` of every batch.

    ``reduce`` sums a float64 CPU tensor over the processes (``depthlens.interventions.spsa.Reduce``).
    """

    rank: int
    world: int
    reduce: Callable[[Tensor], Tensor]

    @staticmethod
    def current() -> Shard | None:
        """The shard of this process under ``accelerate launch``; None in a single process."""
        from depthlens.models.recipes import process_state

        state = process_state()
        if state is None:
            return None
        from accelerate.utils import reduce

        return Shard(state.process_index, state.num_processes,
                     lambda t: reduce(t.to(state.device), reduction="sum").cpu())


def _rows(b: _Batch, shard: Shard | None) -> tuple[_Batch, Tensor | None]:
    """This rank's rows of ``b`` and their share of the batch's response tokens (None: the whole batch)."""
    if shard is None or shard.world == 1:
        return b, None
    rows = slice(shard.rank, None, shard.world)
    return _Batch(b.ids[rows], b.att[rows], b.mask[rows]), b.mask[rows][:, 1:].sum() / b.mask[:, 1:].sum()


def batch_nll(model, b: _Batch, shard: Shard | None = None, resid: Tensor | None = None, start: int = 0) -> Tensor:
    """The batch's mean response NLL, or with ``shard`` this rank's part of it (its rows' sum / the batch's count).

    ``resid``: the residual stream entering block ``start`` of this rank's rows (``masked_nll``).
    """
    mine, share = _rows(b, shard)
    if share is not None and not int(mine.mask[:, 1:].sum()):
        return torch.zeros((), device=b.ids.device)
    nll = masked_nll(model, mine.ids, mine.att, mine.mask, resid, start)
    return nll if share is None else nll * share


def _fixed_batches(model, examples, max_len: int, batch_size: int, seed: int) -> list[_Batch]:
    """Length-bucketed, right-padded batches, in a seeded order, on the model's device."""
    from depthlens.data.chat import pad_batch

    kept = [d for d in tokenize_examples(model.tokenizer, examples, max_len) if sum(d[1][1:])]
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for idx in bucketed_batches([len(d[0]) for d in kept], batch_size, random.Random(seed)):
        b = pad_batch([kept[i][0] for i in idx], pad, side="right")
        m = pad_batch([kept[i][1] for i in idx], 0, side="right").input_ids
        out.append(_Batch(b.input_ids.to(model.device), b.attention_mask.to(model.device), m.to(model.device)))
    return out


class RobustObjective:
    """``L = NLL_safety(θ + δ_step) + λ_u · NLL_utility(θ)`` on batch ``step`` (see the section comment).

    ``components(step)`` gives the two parts separately (the noise-free safety loss with
    ``noise=False``) for logging and tests.

    ``frozen_below`` = l > 0 promises that blocks ``0 … l−1`` do not change during the run (the
    recipe refines layers ≥ l only). The residual stream entering block l is then computed once
    per (step, perturbation) for the safety batch, so the two SPSA evaluations of a step share
    it (they see the same perturbation draw), and once per utility batch for the whole run
    (that term is noise-free); only blocks l onwards run again. The values are those of the
    full forward (tested). With a ``shard`` (a data-parallel run) calling the
    objective gives this rank's part of L, which the MeZO engine sums over the ranks
    (``reduce``); ``total`` and ``components`` give the whole value on every rank.
    """

    def __init__(self, model, safety: list[_Batch], utility: list[_Batch], noise_layers: Sequence[int],
                 sigma: float, utility_weight: float, seed: int, shard: Shard | None = None,
                 perturbations: Sequence[str] = (), act_noise_sigma: float = 0.1, frozen_below: int = 0):
        if not safety:
            raise ValueError("The zo objective needs at least one safety batch.")
        bad = [k for k in perturbations if k not in PERTURBATION_KINDS]
        if bad:
            raise ValueError(f"perturbations must be among {PERTURBATION_KINDS}, got {bad[0]!r}.")
        self.model, self.safety, self.utility = model, safety, utility
        self.noise_layers, self.sigma = list(noise_layers), sigma
        self.utility_weight, self.seed = utility_weight, seed
        self.shard = shard
        self.perturbations, self.act_noise_sigma = tuple(perturbations), act_noise_sigma
        if frozen_below:
            model.check_layer(frozen_below)
        self.frozen_below = frozen_below
        self._safety_resid: tuple[tuple, Tensor] | None = None  # (key, resid) of the last safety batch
        self._utility_resid: dict[int, Tensor] = {}

    def kind(self, step: int) -> str:
        """The perturbation of ``step``'s safety term: ``perturbations[step % len(perturbations)]``, param without any."""
        return self.perturbations[step % len(self.perturbations)] if self.perturbations else "param"

    def perturbation(self, step: int, noise: bool = True):
        """The context of ``step``'s safety term, a pure function of (step, current weights): both
        SPSA evaluations of a step see the same draw. ``noise=False``: none."""
        kind = self.kind(step) if noise else "param"
        if kind == "int4":
            return functional_int4(self.model, self.noise_layers)
        if kind == "act":
            from depthlens.interventions.perturbation import activation_noise

            # the RMS scale its builds were made with (their cache keys do not name a scale)
            return activation_noise(self.model, self.noise_layers, self.act_noise_sigma, self.noise_seed(step), scale="rms")
        return functional_param_noise(self.model, self.noise_layers, self.sigma if noise else 0.0,
                                      self.noise_seed(step))

    @property
    def reduce(self):
        """The engine's ``reduce`` for this objective (None in a single process)."""
        return self.shard.reduce if self.shard is not None else None

    def noise_seed(self, step: int) -> int:
        return derive_seed(self.seed, 0x5A, step)

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the cached residuals (``frozen_below``): the last safety batch's and every utility batch's."""
        held = list(self._utility_resid.values()) + ([self._safety_resid[1]] if self._safety_resid else [])
        return sum(t.numel() * t.element_size() for t in held)

    def _nll(self, b: _Batch, key: tuple) -> Tensor:
        """``batch_nll`` of ``b``, starting from the cached residual at ``frozen_below`` when there is one."""
        if not self.frozen_below:
            return batch_nll(self.model, b, self.shard)
        if key[0] == "utility":
            resid = self._utility_resid.get(key[1])
        else:
            resid = self._safety_resid[1] if self._safety_resid and self._safety_resid[0] == key else None
        if resid is None:
            mine, _ = _rows(b, self.shard)
            resid = resid_entering(self.model, mine.ids, mine.att, self.frozen_below)
            if key[0] == "utility":
                self._utility_resid[key[1]] = resid
            else:
                self._safety_resid = (key, resid)
        return batch_nll(self.model, b, self.shard, resid, self.frozen_below)

    @torch.inference_mode()
    def _parts(self, step: int, noise: bool = True) -> tuple[float, float]:
        """This rank's parts of ``(NLL_safety, NLL_utility)`` (the whole values in one process)."""
        s = self.safety[step % len(self.safety)]
        with autocast(self.model):
            with self.perturbation(step, noise):
                safety = float(self._nll(s, ("safety", step, self.kind(step) if noise else "clean")))
            util = 0.0
            if self.utility and self.utility_weight:
                u = step % len(self.utility)
                util = float(self._nll(self.utility[u], ("utility", u)))
        return safety, util

    def components(self, step: int, noise: bool = True) -> tuple[float, float]:
        """``(NLL_safety, NLL_utility)`` of ``step`` (the safety term noise-free with ``noise=False``);
        the utility term is not computed and reads 0 when it has no weight."""
        safety, util = self._parts(step, noise)
        if self.shard is not None:
            safety, util = (float(v) for v in self.shard.reduce(torch.tensor([safety, util], dtype=torch.float64)))
        return safety, util

    def __call__(self, step: int) -> float:
        safety, util = self._parts(step)
        return safety + self.utility_weight * util

    def total(self, step: int) -> float:
        """L of ``step`` on every rank (the sum of the ranks' parts)."""
        safety, util = self.components(step)
        return safety + self.utility_weight * util
