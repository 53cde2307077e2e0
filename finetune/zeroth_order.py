"""The ``zo`` recipe: zeroth-order (MeZO) refinement of the robustness-critical layers.

Spec suffix ``:zo``, stacking on any model (``…:sft:deep-anchored:zo``). It runs the MeZO
engine of ``depthlens.interventions.spsa`` on a subspace of the robustness-critical layers
(``finetune.zo_subspace``: their weight matrices, LoRA adapters on them, or their norm gains),
with the safety/recovery loss under functional random parameter noise plus a utility term.
The layers come from measurement: ``--layers``, ``--sensitivity RESULTS_JSON``, or by default
the ``critical_layers`` of the newest layer_sensitivity record of the parent model under
``--results-root`` (an error naming the command that makes one when there is none). Every
step's L₊, L₋ and projected gradient and an evaluation of the objective every ``eval_every``
steps are kept in the entry's info (plotted by ``figures.builders.zo_curve``); per-layer ZO
probes are logged during the run; checkpoints make it resumable; on CUDA the refined tensors
keep fp32 masters (bf16 autocast). Under ``accelerate launch`` every rank evaluates the
objective on its rows of each batch (``Shard``) and the engine all-reduces the two losses of
each step (``depthlens.interventions.spsa``), so every rank applies the same update (tested); rank 0 builds
the batches and writes the checkpoints.

    $ python -m analyses.layer_sensitivity --model smollm2-135m-instruct:sft:deep-anchored
    $ python -m finetune.zeroth_order --model smollm2-135m-instruct:sft:deep-anchored --subspace lora
    >>> load_model("smollm2-135m-instruct:sft:zo")      # layers from results/layer_sensitivity/…  # builds on the real organism and a layer_sensitivity record  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from depthlens.infra.errors import UsageError
from depthlens.interventions.spsa import ZOConfig, ZOStepResult, derive_seed, mezo_train, spsa_grad_scalar
from finetune.lora import LoraSettings
from finetune.zo_subspace import SUBSPACES, Subspace, fp32_masters, matrices, open_subspace
from finetune.zo_objective import (  # noqa: F401  (the objective's names stay importable from here)
    PERTURBATION_KINDS,
    RobustObjective,
    Shard,
    _Batch,
    _fixed_batches,
    _noise_z,
    functional_int4,
    functional_param_noise,
    masked_nll,
)

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

# Zeroth-order refinement of the robustness-critical layers (docs/methods.md §5, Liu, Wu et al. 2026).
# Only a subspace of the chosen layers moves; the objective is the safety (recovery) loss under
# random perturbations plus a utility term (``finetune.zo_objective``).
#
# Sizing (135M default, CPU): a MeZO step is 2·n_spsa loss evaluations, each a safety forward
# (8 sequences of ≤ 256 tokens) + a utility forward. Blocks below the lowest refined layer run
# once per step for the safety batch and once per run for each utility batch (the objective's
# ``frozen_below``), and the noise / int4 weights are swapped in rather than added as a second
# matmul (the cost of a step is in docs/findings.md §6.3). The full subspace defaults to lr 1e-5
# (per-weight random walk ≈ lr·|g|·√steps ≈ 1e-3 of a weight's scale); the lr sweep behind it,
# the variants rejected on validation (a first-token margin objective, int4 schedules, refusal
# guards) and the run at MeZO's own budget (whose settings the `lora` subspace keeps as its
# defaults, for anyone who runs longer) are in docs/findings.md §6.3 and "Recipe-selection history".

NOISE_LAYERS = ("trained", "all")
#: (lr, ε) of each subspace when ``lr`` / ``eps`` are not given: full as measured here (above);
#: lora MeZO's LoRA settings (Malladi et al. 2023, App. D); norms the gains-only variant F of
#: docs/findings.md (`zo` history).
SUBSPACE_DEFAULTS = {"full": (1e-5, 1e-3), "lora": (5e-5, 1e-2), "norms": (2e-4, 1e-3)}
#: Settings that change the log, not the weights: never in the cache key.
_LOG_ONLY = ("eval_every", "eval_batches", "results_root")


def zo_parameters(model, layers: Sequence[int]) -> list[Tensor]:
    """The tensors of ``layers`` that the ``full`` subspace refines: every weight matrix."""
    out = [p for l in layers for p in matrices(model, l)]
    if not out:
        raise ValueError(f"Layers {list(layers)} have no weight matrices to refine.")
    return out


@dataclass(frozen=True)
class ZORecipeConfig:
    """The ``zo`` recipe: MeZO on the robustness-critical layers with a noise-robust safety objective.

    Args:
        layers: layers to refine (takes precedence over ``sensitivity``).
        sensitivity: a layer_sensitivity results.json (or its run directory) whose
            ``metrics.critical_layers`` are refined. Without ``layers`` and ``sensitivity`` the
            newest layer_sensitivity record of the parent model under ``results_root`` is used.
        top_k: how many critical layers to take from the record.
        steps: MeZO steps (each 2·n_spsa loss evaluations).
        eps: SPSA perturbation scale ε (absolute, z ~ N(0, I)); none: the subspace's default
            (full 1e-3, lora 1e-2, norms 1e-3).
        lr: MeZO learning rate; none: the subspace's default (full 1e-5, lora 5e-5, norms 2e-4).
        weight_decay: λ of θ ← θ − η(g z + λθ).
        n_spsa: SPSA estimates averaged per step (n-SPSA / MeZO-n).
        noise_sigma: parameter noise σ of the robust objective, relative (δ = σ‖W‖_F/√n·ζ, as
            ``depthlens.interventions.perturbation.param_noise``); 0 turns the noise off.
        noise_layers: trained (noise on the refined layers) or all (noise on every layer).
        utility_weight: λ_u, weight of the utility NLL.
        n_safety: harmful train prompts (recovery examples with the base's harmful answers).
        n_utility: benign train prompts answered by the starting model (utility targets).
        harmful_tokens: length of the base's harmful answers.
        utility_tokens: length of the starting model's benign answers.
        max_len: sequences are cut to this many tokens.
        batch_size: safety sequences and utility sequences per loss evaluation.
        probe_every: per-layer ZO probes c_l are logged every this many steps (and at the
            start and end); 0: start and end only.
        checkpoint_every: save a resumable state every this many steps (0: never).
        seed: data, direction, adapter and noise seed.
        max_steps: stop after this many MeZO steps (0: ``steps``); in the cache key only when set.
        subspace: what moves in the chosen layers: full (every weight matrix), lora (LoRA
            adapters, merged into the weights at the end) or norms (the norm gains).
        lora_rank: rank r of the adapters of the lora subspace.
        lora_alpha: LoRA α, the update being (α/r)·B·A (none: 2·rank, as MeZO's α 16 at r 8).
        lora_targets: linear maps to adapt, e.g. q_proj,v_proj (default: every linear map).
        eval_every: evaluate the objective on the first ``eval_batches`` batches (each with its
            own fixed noise draw) every this many steps, and at the start and end, for the
            objective curve (0: start and end only). Not in the cache key.
        eval_batches: batches of that evaluation.
        perturbations: what the safety term runs under, one per step in turn (step s runs under
            ``perturbations[s % len(perturbations)]``): param (parameter noise σ ``noise_sigma``), act
            (activation noise σ ``act_noise_sigma``) or int4 (round-to-nearest weights), all on the
            noised layers; empty: param on every step. In the cache key only when set.
        act_noise_sigma: activation noise σ of the act steps, relative to the residual RMS per token.
        results_root: where the default layer_sensitivity record is looked for
            (``<results_root>/layer_sensitivity/<parent tag>/…``). Not in the cache key (the
            record's hash and layers are).
    """

    layers: tuple[int, ...] | None = None
    sensitivity: str | None = None
    top_k: int = 5
    steps: int = 100
    eps: float | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    n_spsa: int = 1
    noise_sigma: float = 0.1
    noise_layers: str = "trained"
    utility_weight: float = 1.0
    n_safety: int = 64
    n_utility: int = 64
    harmful_tokens: int = 96
    utility_tokens: int = 48
    max_len: int = 256
    batch_size: int = 8
    probe_every: int = 50
    checkpoint_every: int = 10
    seed: int = 0
    max_steps: int = 0
    subspace: str = "full"
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ()
    eval_every: int = 50
    eval_batches: int = 4
    perturbations: tuple[str, ...] = ()
    act_noise_sigma: float = 0.1
    results_root: str = "results"

    def __post_init__(self):
        if not (isinstance(self.max_steps, int) and self.max_steps >= 0):
            raise ValueError(f"max_steps must be a non-negative integer (0: off), got {self.max_steps!r}.")
        if self.subspace not in SUBSPACES:
            raise ValueError(f"subspace must be one of {', '.join(SUBSPACES)}, got {self.subspace!r}.")
        ZOConfig(steps=self.steps, eps=self.step_eps, lr=self.step_lr, weight_decay=self.weight_decay,
                 n_spsa=self.n_spsa)
        if self.noise_layers not in NOISE_LAYERS:
            raise ValueError(f"noise_layers must be one of {NOISE_LAYERS}, got {self.noise_layers!r}.")
        if not (math.isfinite(self.noise_sigma) and self.noise_sigma >= 0):
            raise ValueError(f"noise_sigma must be >= 0 and finite, got {self.noise_sigma!r}.")
        if self.top_k < 1 or self.n_safety < 1 or self.batch_size < 1:
            raise ValueError(f"top_k, n_safety and batch_size must be >= 1, got {self.top_k}, {self.n_safety}, "
                             f"{self.batch_size}.")
        if self.utility_weight < 0:
            raise ValueError(f"utility_weight must be >= 0, got {self.utility_weight}.")
        for name in ("eval_every", "eval_batches"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}.")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "perturbations", tuple(self.perturbations))  # a list from Python stays hashable
        bad = [k for k in self.perturbations if k not in PERTURBATION_KINDS]
        if bad:
            raise ValueError(f"perturbations must be among {', '.join(PERTURBATION_KINDS)}, got {bad[0]!r}.")
        if not (math.isfinite(self.act_noise_sigma) and self.act_noise_sigma >= 0):
            raise ValueError(f"act_noise_sigma must be >= 0 and finite, got {self.act_noise_sigma!r}.")
        self.lora_settings()  # checks rank, alpha and targets

    @property
    def step_lr(self) -> float:
        """The learning rate that runs: ``lr``, or the subspace's default."""
        return self.lr if self.lr is not None else SUBSPACE_DEFAULTS[self.subspace][0]

    @property
    def step_eps(self) -> float:
        """The perturbation scale that runs: ``eps``, or the subspace's default."""
        return self.eps if self.eps is not None else SUBSPACE_DEFAULTS[self.subspace][1]

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(self.lora_rank, self.lora_alpha, self.lora_targets)

    @property
    def n_steps(self) -> int:
        """The MeZO steps that run: ``steps``, or ``max_steps`` when that is set and smaller."""
        return min(self.steps, self.max_steps) if self.max_steps else self.steps

    def zo(self) -> ZOConfig:
        return ZOConfig(steps=self.n_steps, eps=self.step_eps, lr=self.step_lr, weight_decay=self.weight_decay,
                        n_spsa=self.n_spsa, seed=self.seed, log_every=max(1, self.n_steps // 10))


def critical_layer_stability(path: str | Path, layers: list[int]) -> dict[int, float | None]:
    """P(layer in top-k) over the prompt bootstrap, as the layer_sensitivity record gives it, for ``layers``
    (None where the record predates the ranking bootstrap or does not list the layer)."""
    from depthlens.infra.results import read_run

    rec = read_run(path)
    rows = rec.metrics.get("critical_layers") or []
    known = {int(c["layer"]): c.get("p_top_k") for c in rows if isinstance(c, dict)}
    return {l: known.get(l) for l in layers}


def critical_layers_from(path: str | Path, top_k: int | None = None) -> list[int]:
    """``metrics.critical_layers`` of a layer_sensitivity results file (first ``top_k``)."""
    from depthlens.infra.results import read_run

    rec = read_run(path)
    if rec.analysis != "layer_sensitivity":
        raise ValueError(f"{str(path)!r} holds a {rec.analysis!r} run; the zo recipe needs a layer_sensitivity "
                         "results file (python -m analyses.layer_sensitivity).")
    crit = rec.metrics.get("critical_layers") or []
    layers = [int(c["layer"] if isinstance(c, dict) else c) for c in crit]
    if not layers:
        raise ValueError(f"{str(path)!r} lists no critical_layers; re-run analyses.layer_sensitivity.")
    return layers[:top_k] if top_k else layers


def find_sensitivity(spec: str, results_root: str | Path = "results") -> Path:
    """The newest layer_sensitivity results.json of model ``spec`` under ``results_root``; a
    ``UsageError`` naming the command that makes one when there is none."""
    from depthlens.infra.results import latest_run

    found = latest_run(results_root, "layer_sensitivity", model=spec)
    if found is None:
        raise UsageError(f"The zo recipe refines the critical layers of a layer_sensitivity record, and there is none "
                         f"for {spec!r} under {str(Path(results_root) / 'layer_sensitivity')!r}: run `python -m "
                         f"analyses.layer_sensitivity --model {spec}` first, or pass --layers (or --sensitivity).")
    return found


# ----------------------------------------------------------------------------- the recipe


class ZORecipe:
    """Entry point ``zo``: MeZO refinement of the robustness-critical layers (stacks on any model).

    ``build_or_load`` binds it to its parent model first (``for_parent``): without ``layers``
    or ``sensitivity`` that finds the parent's newest layer_sensitivity record, whose hash and
    critical layers then enter the cache key.
    """

    name = "zo"
    version = 1

    def __init__(self, cfg: ZORecipeConfig | None = None, found: Path | None = None):
        self.cfg = cfg or ZORecipeConfig()
        self.found = found  # the record found for the parent when the config names none

    def for_parent(self, spec: str) -> ZORecipe:
        """This recipe as it applies on top of ``spec``: with the layer_sensitivity record found
        for ``spec`` when the config gives neither ``layers`` nor ``sensitivity``."""
        if self.cfg.layers is not None or self.cfg.sensitivity:
            return self
        found = find_sensitivity(spec, self.cfg.results_root)
        log.info("zo: critical layers of %s from %s", spec, found)
        return ZORecipe(self.cfg, found=found)

    def _record(self) -> Path | None:
        """The layer_sensitivity results.json the layers come from (None with ``layers``)."""
        if self.cfg.layers is not None:
            return None
        if self.cfg.sensitivity:
            path = Path(self.cfg.sensitivity)
            return path / "results.json" if path.is_dir() else path
        return self.found

    def config(self) -> dict:
        from finetune.common import config_key

        cfg = self.cfg
        out = config_key(cfg, ("max_steps", "perturbations"))
        if "act" not in cfg.perturbations:
            del out["act_noise_sigma"]
        out["lr"], out["eps"] = cfg.step_lr, cfg.step_eps
        for name in _LOG_ONLY:
            del out[name]
        if cfg.subspace == "full":  # keys of builds made before the subspaces stay as they were
            del out["subspace"]
        if cfg.subspace != "lora":
            for name in ("lora_rank", "lora_alpha", "lora_targets"):
                del out[name]
        record = self._record()
        if record is not None:
            from depthlens.infra.cache import file_sha256

            out["resolved_layers"] = critical_layers_from(record, cfg.top_k)
            out["sensitivity_sha256"] = file_sha256(record)
        return out

    def _layers(self, model) -> tuple[list[int], str]:
        cfg = self.cfg
        if cfg.layers is not None:
            return list(dict.fromkeys(model.check_layer(int(l)) for l in cfg.layers)), "given"
        record = self._record() or self.for_parent(model.spec).found  # a direct build() call: bind now
        from depthlens.infra.results import read_run

        layers = [model.check_layer(l) for l in critical_layers_from(record, cfg.top_k)]
        measured_on = read_run(record).model
        if measured_on != model.spec:
            log.warning("Critical layers were measured on %s; refining %s.", measured_on, model.spec)
        return layers, f"file:{record}"

    def batches(self, model, progress: bool = True) -> tuple[list[_Batch], list[_Batch]]:
        """The fixed safety (recovery) and utility batches of the objective, for ``model``."""
        from depthlens.data import default_splits, refusal_templates
        from depthlens.models.specs import load_reference
        from depthlens.runtime.responses import answers_for, response_set
        from finetune.deep import DeepConfig, recovery_examples, utility_examples

        cfg = self.cfg
        rng = random.Random(cfg.seed)
        splits = default_splits(cfg.seed)
        harmful = splits.harmful.train.subset(cfg.n_safety, seed=cfg.seed + 1)
        base = load_reference(model)
        h = answers_for(model, base, harmful.prompts, max_new_tokens=cfg.harmful_tokens, progress=progress).tokens
        del base
        safety_ex = recovery_examples(harmful.prompts, h, refusal_templates(), DeepConfig(), rng)
        benign = list(splits.harmless.train.prompts) + list(splits.borderline.train.prompts)
        benign = sorted(random.Random(cfg.seed + 2).sample(benign, min(cfg.n_utility, len(benign))), key=benign.index)
        own = response_set(model, benign, max_new_tokens=cfg.utility_tokens, progress=progress)
        util_ex = utility_examples(benign, own.tokens, cfg.utility_tokens)
        safety = _fixed_batches(model, safety_ex, cfg.max_len, cfg.batch_size, cfg.seed)
        utility = _fixed_batches(model, util_ex, cfg.max_len, cfg.batch_size, cfg.seed + 1)
        return safety, utility

    def _shared_batches(self, model, shard: Shard | None, progress: bool) -> tuple[list[_Batch], list[_Batch]]:
        """``batches``, made by rank 0 alone and sent to the other ranks under a launch (every rank the same)."""
        if shard is None:
            return self.batches(model, progress)
        from accelerate.utils import broadcast_object_list

        made = [self.batches(model, progress) if shard.rank == 0 else None]
        if shard.rank == 0:
            made = [tuple([b.to("cpu") for b in part] for part in made[0])]
        safety, utility = broadcast_object_list(made, from_process=0)[0]
        return [b.to(model.device) for b in safety], [b.to(model.device) for b in utility]

    def build(self, model: HookedModel, workdir: Path | None, progress: bool = True) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        shard = Shard.current()
        main = shard is None or shard.rank == 0
        progress = progress and main
        layers, source = self._layers(model)
        safety, utility = self._shared_batches(model, shard, progress)
        noise_layers = layers if cfg.noise_layers == "trained" else list(range(model.n_layers))
        objective = RobustObjective(model, safety, utility, noise_layers, cfg.noise_sigma, cfg.utility_weight,
                                    cfg.seed, shard, cfg.perturbations, cfg.act_noise_sigma, frozen_below=min(layers))
        sub = open_subspace(model, cfg.subspace, layers, cfg.lora_settings(), cfg.seed)
        done = False
        try:  # an interrupted lora build leaves the weights as they were (adapters removed unmerged)
            info = self._run(model, sub, objective, layers, workdir, shard, progress)
            done = True
        finally:
            adapter_dir = Path(workdir) / "adapter" if workdir is not None and main else None
            sub.finish(done, adapter_dir)
        # fp32 masters stay fp32: the checkpoint is saved in float32 and keeps the small updates.
        _barrier(shard)
        state_path = Path(workdir) / "zo_state.pt" if workdir is not None else None
        if main and state_path is not None and state_path.exists():
            state_path.unlink()
        record = self._record()
        stability = ({str(l): p for l, p in critical_layer_stability(record, layers).items()} if record else None)
        return {"layers": layers, "layer_source": source, "sensitivity": str(record) if record else None,
                "layers_p_top_k": stability,  # how stable the ranking that chose them is (not in the cache key)
                "subspace": cfg.subspace, "lr": cfg.step_lr, "eps": cfg.step_eps,
                "lora": asdict(cfg.lora_settings()) if cfg.subspace == "lora" else None,
                "noise_layers": noise_layers, **info, "processes": shard.world if shard is not None else 1}

    def _run(self, model, sub: Subspace, objective: RobustObjective, layers: list[int], workdir: Path | None,
             shard: Shard | None, progress: bool) -> dict:
        """The MeZO steps on ``sub``, with probes, the objective curve and checkpoints; the info of the build."""
        cfg = self.cfg
        main = shard is None or shard.rank == 0
        reduce = shard.reduce if shard is not None else None
        params = sub.params
        masters = fp32_masters(model, params)
        log.info("zo: refining the %s subspace of layers %s, %d weights, noise σ=%g on %s layers, lr %g, ε %g",
                 cfg.subspace, layers, sub.n_weights, cfg.noise_sigma, cfg.noise_layers, cfg.step_lr, cfg.step_eps)

        probe_step = 0  # the probes use batch 0 and one fixed noise draw
        clean_before = objective.components(probe_step, noise=False)
        noisy_before = objective.total(probe_step)
        state_path = Path(workdir) / "zo_state.pt" if workdir is not None else None
        start, history, probes, evals = 0, [], [], []
        if state_path is not None and state_path.exists():
            state = torch.load(state_path, weights_only=True, map_location=model.device)
            if state["layers"] != layers or state.get("subspace", "full") != cfg.subspace:
                raise ValueError(f"The checkpoint in {state_path.parent} refines layers {state['layers']}, not {layers} "
                                 f"(subspace {state.get('subspace', 'full')}, not {cfg.subspace}); delete it to "
                                 "start over.")
            with torch.no_grad():
                for p, saved in zip(params, state["params"]):
                    p.copy_(saved)
            start, history, probes = int(state["step"]), json.loads(state["history"]), json.loads(state["probes"])
            evals = json.loads(state.get("evals", "[]"))
            log.info("zo: resuming from step %d of %d", start, cfg.n_steps)

        def probe(step: int) -> None:  # c_l = |L(θ+εz_l) − L(θ−εz_l)|/2ε, only layer l's part of the subspace moved
            seed = derive_seed(cfg.seed, 0xB0, step)
            c = {l: abs(spsa_grad_scalar(ps, lambda: objective(probe_step), cfg.step_eps, derive_seed(seed, l, 0),
                                         reduce).projected_grad) for l, ps in sub.by_layer.items()}
            probes.extend({"step": step, "layer": l, "c": v} for l, v in c.items())
            log.info("zo probes at step %d: %s", step, ", ".join(f"L{l}={v:.4g}" for l, v in c.items()))

        def evaluate(step: int) -> None:  # the objective on fixed batches, each with its own fixed noise draw
            parts = [objective.components(i) for i in range(min(cfg.eval_batches, len(objective.safety)))]
            if not parts:
                return
            safety, util = (sum(v) / len(parts) for v in zip(*parts))
            evals.append({"step": step, "objective": safety + cfg.utility_weight * util, "safety": safety,
                          "utility": util})

        def save(step: int) -> None:  # rank 0 writes (every rank holds the same weights)
            if main:
                state_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = state_path.with_suffix(".tmp")
                torch.save({"params": [p.detach() for p in params], "step": step, "layers": layers,
                            "subspace": cfg.subspace, "history": json.dumps(history), "probes": json.dumps(probes),
                            "evals": json.dumps(evals)}, tmp)
                tmp.replace(state_path)
            _barrier(shard)

        def on_step(step: int, res: ZOStepResult) -> None:
            history.append({"step": step, "loss_plus": res.loss_plus, "loss_minus": res.loss_minus,
                            "projected_grad": res.projected_grad, "stashed": res.stashed})
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.n_steps:
                evaluate(done)
            if cfg.probe_every and done % cfg.probe_every == 0 and done < cfg.n_steps:
                probe(done)
            if state_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.n_steps:
                save(done)

        if start == 0:
            evaluate(0)
            probe(0)
        t0 = time.time()
        mezo_train(params, objective, cfg.zo(), progress=progress, on_step=on_step, start=start, reduce=reduce)
        seconds = time.time() - t0
        evaluate(cfg.n_steps)
        probe(cfg.n_steps)
        clean_after = objective.components(probe_step, noise=False)
        noisy_after = objective.total(probe_step)
        ran = cfg.n_steps - start
        return {"n_weights": sub.n_weights, "steps": cfg.n_steps, "resumed_from": start, "seconds": round(seconds, 1),
                "seconds_per_step": round(seconds / ran, 3) if ran else None, "device": str(model.device),
                "fp32_masters": masters,
                "objective_batch0_before": {"noisy": noisy_before, "safety_clean": clean_before[0],
                                            "utility": clean_before[1]},
                "objective_batch0_after": {"noisy": noisy_after, "safety_clean": clean_after[0],
                                           "utility": clean_after[1]},
                "probes": probes, "evals": evals, "history": history}


def _barrier(shard: Shard | None) -> None:
    if shard is not None:
        from depthlens.models.recipes import process_state

        process_state().wait_for_everyone()


recipe = ZORecipe()


def main(argv: Sequence[str] | None = None):
    """``python -m finetune.zeroth_order --model SPEC [--subspace lora] [--layers 0,1,2 | --sensitivity RESULTS]``."""
    from depthlens.cli import recipe_main
    from finetune.common import build_on

    return recipe_main(ZORecipeConfig, lambda cfg, spec, device: build_on(spec, ZORecipe(cfg), device=device), argv)


if __name__ == "__main__":
    main()
