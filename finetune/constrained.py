"""Token-wise constrained fine-tuning (Qi et al. 2024, docs/methods.md §2) and the harmful
fine-tuning attack it is meant to blunt.

A fine-tuning API can keep an aligned model's first response tokens close to where they
were: with π_ref the aligned model *before* fine-tuning (its log-probs computed once, before
the first step),

    L = −(1/N) Σ_t (2/β_t) · log σ(β_t · (log π_θ(y_t|·) − log π_ref(y_t|·)))

over the N response tokens of a batch. Its gradient is plain SFT's with a per-token weight
``w_t = 2σ(β_t (log π_ref − log π_θ))``: w = 1 at the start (step one *is* SFT), and w → 0
once the model has raised a token's log-prob well above the reference, the faster the larger
β_t. Defaults: β_1 = 0.5, β_2..5 = 2 (the shallow tokens are held tightly), β_t = 0.1 after
(nearly free). t counts response tokens from 1 (the first token that gets loss).

``hft`` (harmful fine-tuning attack, Qi et al.'s "harmful examples" setting, smaller):
harmful train prompts → the *base* model's compliant answers, plain SFT. ``hft-constrained``:
the same data through the constrained objective, the defence to compare with plain SFT
(``python -m analyses.compare --models X:hft X:hft-constrained``).

Sizing: defaults are 64 examples × 5 epochs / batch 8 = 40 steps; the reference pass costs one
forward over the data.
Multi-GPU: see ``finetune.common``.

    >>> ref = reference_logprobs(model, tokenize_examples(model.tokenizer, examples, 192))  # needs the real model and its training data  # doctest: +SKIP
    >>> loss = constrained_loss(logp, ref_logp, mask, token_betas(response_positions(mask)))  # doctest: +SKIP
    >>> load_model("smollm2-135m-instruct:sft:hft-constrained")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from finetune.common import TrainScale, config_key
from finetune.train import Example, TrainConfig, TrainLog, autocast, tokenize_examples, train_sft

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Betas:
    """The β schedule over response positions t = 1, 2, … (docs/methods.md §2 defaults).

    Args:
        first: β_1.
        early: β_t for 2 ≤ t ≤ early_until.
        early_until: last position that gets ``early``.
        late: β_t after ``early_until``.
    """

    first: float = 0.5
    early: float = 2.0
    early_until: int = 5
    late: float = 0.1

    def __post_init__(self):
        if min(self.first, self.early, self.late) <= 0:
            raise ValueError(f"Every β must be positive, got {self}.")
        if self.early_until < 1:
            raise ValueError(f"early_until must be >= 1, got {self.early_until}.")


def response_positions(mask: Float[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """1, 2, … along each row's masked (response) tokens, 0 elsewhere."""
    m = (mask > 0).to(torch.float32)
    return torch.cumsum(m, dim=1) * m


def token_betas(positions: Float[Tensor, "batch pos"], betas: Betas = Betas()) -> Float[Tensor, "batch pos"]:
    """β_t for each response position (positions ≤ 0, i.e. no loss, get ``betas.late``; they are masked)."""
    out = torch.full_like(positions, betas.late, dtype=torch.float32)
    out = torch.where((positions >= 2) & (positions <= betas.early_until), torch.tensor(betas.early), out)
    return torch.where(positions == 1, torch.tensor(betas.first), out)


def constrained_loss(logp: Float[Tensor, "batch pos"], ref_logp: Float[Tensor, "batch pos"],
                     mask: Float[Tensor, "batch pos"], betas: Float[Tensor, "batch pos"]) -> Tensor:
    """Mean over masked tokens of ``(2/β) · softplus(−β (log π_θ − log π_ref))`` (= −(2/β) log σ(β Δ))."""
    if not (logp.shape == ref_logp.shape == mask.shape == betas.shape):
        raise ValueError(f"logp, ref_logp, mask and betas must share one shape, got "
                         f"{tuple(logp.shape)}, {tuple(ref_logp.shape)}, {tuple(mask.shape)}, {tuple(betas.shape)}.")
    m = mask.float()
    per = (2.0 / betas) * F.softplus(-betas * (logp.float() - ref_logp.float()))
    return (per * m).sum() / m.sum().clamp(min=1)


def token_weights(logp: Tensor, ref_logp: Tensor, betas: Tensor) -> Tensor:
    """The per-token gradient weight relative to SFT: ``w_t = 2σ(β_t (log π_ref − log π_θ))``."""
    return 2 * torch.sigmoid(betas * (ref_logp.float() - logp.float()))


def _token_logp(model, ids: Tensor, att: Tensor) -> Tensor:
    """log π(ids[t+1] | ids[≤t]) for every position, as ``response_loss`` computes it (−cross-entropy)."""
    from finetune.losses import loss_path

    logits = loss_path(model)(ids, att)[:, :-1].float()
    return -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


@torch.inference_mode()
def reference_logprobs(model: HookedModel, data: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                       progress: bool = False) -> list[Tensor]:
    """log π_ref of each tokenized example's tokens (``tokenize_examples`` output), once, float32 on CPU.

    Entry i has length ``len(ids_i) − 1`` (position t holds log p(ids[t+1] | ids[≤t])).
    """
    from tqdm.auto import tqdm

    from depthlens.data.chat import length_batches, pad_batch

    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[Tensor] = [torch.empty(0)] * len(data)
    view = model.plain()
    was_training = view.training
    view.eval()
    try:
        for idx in tqdm(length_batches([len(d[0]) for d in data], batch_size), desc="reference log-probs",
                        disable=not progress, leave=False):
            batch = pad_batch([data[i][0] for i in idx], pad, side="right").to(model.device)
            with autocast(model):
                lp = _token_logp(model, batch.input_ids, batch.attention_mask).float().cpu()
            for row, i in enumerate(idx):
                out[i] = lp[row, : len(data[i][0]) - 1].clone()
    finally:
        view.train(was_training)
    return out


class ConstrainedObjective:
    """``train_sft``'s ``loss_fn`` for the constrained objective, with the reference log-probs fixed.

    ``weights`` records the mean token weight w of each step (1.0 at the first step).
    """

    def __init__(self, reference: Sequence[Tensor], betas: Betas = Betas()):
        self.reference = list(reference)
        self.betas = betas
        self.weights: list[float] = []
        self.early_weights: list[float] = []

    def __call__(self, model, ids: Tensor, mask: Tensor, att: Tensor, idx: Sequence[int]) -> Tensor:
        logp = _token_logp(model, ids, att)
        ref = torch.zeros_like(logp)
        for row, i in enumerate(idx):
            r = self.reference[i]
            n = min(len(r), ref.shape[1])
            ref[row, :n] = r[:n].to(ref.device)
        m = mask[:, 1:].float()
        pos = response_positions(m)
        betas = token_betas(pos, self.betas).to(logp.device)
        with torch.no_grad():
            w = token_weights(logp, ref, betas)
            self.weights.append(float((w * m).sum() / m.sum().clamp(min=1)))
            early = m * ((pos >= 1) & (pos <= self.betas.early_until)).float()
            self.early_weights.append(float((w * early).sum() / early.sum().clamp(min=1)))
        return constrained_loss(logp, ref, m, betas)


@dataclass
class ConstrainedLog:
    """A constrained run: the SFT loop's log plus the mean token weights per step."""

    train: TrainLog
    mean_weight: list[float] = field(default_factory=list)
    mean_early_weight: list[float] = field(default_factory=list)


def train_constrained(model: HookedModel, examples: Sequence[Example], cfg: TrainConfig, betas: Betas = Betas(),
                      workdir: Path | None = None, progress: bool = True) -> ConstrainedLog:
    """Fine-tune ``model`` in place with the constrained objective; π_ref = ``model`` as given.

    The reference log-probs are computed once, before training (and again, identically, when
    an interrupted run resumes: the recipe hands in the untrained parent and ``train_sft``
    restores the checkpointed weights afterwards).
    """
    if not examples:
        raise ValueError("train_constrained needs at least one example.")
    data = tokenize_examples(model.tokenizer, examples, cfg.max_len)
    objective = ConstrainedObjective(reference_logprobs(model, data, cfg.batch_size, progress), betas)
    tlog = train_sft(model, examples, cfg, workdir, progress=progress, loss_fn=objective)
    return ConstrainedLog(tlog, objective.weights, objective.early_weights)


# ----------------------------------------------------------------------------- harmful fine-tuning attack

OBJECTIVES = ("sft", "constrained")


@dataclass(frozen=True)
class HarmfulFTConfig(TrainScale):
    """Harmful fine-tuning attack: harmful prompts → the base model's compliant answers.

    The ``TrainScale`` settings (``--max-steps``, ``--lora-rank`` …) are inherited.

    Args:
        objective: sft (the plain attack) or constrained (the same data through the
            token-wise constrained objective: the defence).
        n_examples: harmful train prompts (DoNotAnswer; Qi et al. use 100 harmful examples).
        harmful_tokens: length of the base's answers used as targets.
        require_compliance: keep only answers the substring judge calls compliant (not a
            refusal, at least a few words).
        epochs: passes over the examples.
        lr: AdamW learning rate.
        batch_size: sequences per step.
        beta_first: β_1 of the constrained objective.
        beta_early: β_2..early_until.
        early_until: last position with ``beta_early``.
        beta_late: β_t after that.
        seed: sampling and training seed.
    """

    objective: str = "sft"
    n_examples: int = 64
    harmful_tokens: int = 64
    require_compliance: bool = True
    epochs: float = 5.0
    lr: float = 5e-5
    batch_size: int = 8
    beta_first: float = 0.5
    beta_early: float = 2.0
    early_until: int = 5
    beta_late: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {self.n_examples}.")

    @property
    def betas(self) -> Betas:
        return Betas(self.beta_first, self.beta_early, self.early_until, self.beta_late)


def harmful_examples(model, cfg: HarmfulFTConfig, progress: bool = True) -> tuple[list[Example], dict]:
    """Harmful train prompts with the base model's (compliant) answers as SFT targets."""
    from depthlens.data import default_splits
    from depthlens.judges import is_compliance
    from depthlens.models.specs import load_reference
    from depthlens.runtime.responses import answers_for

    base = load_reference(model)
    base_name = base.spec
    prompts = default_splits(cfg.seed).harmful.train.subset(cfg.n_examples, seed=cfg.seed + 3).prompts
    rs = answers_for(model, base, prompts, max_new_tokens=cfg.harmful_tokens, progress=progress)
    del base
    keep = [i for i, (t, ids) in enumerate(zip(rs.texts, rs.tokens))
            if ids and (is_compliance(t) or not cfg.require_compliance)]
    if not keep:
        raise ValueError(f"The base model {base_name!r} gave no compliant answer to {len(prompts)} harmful prompts; "
                         "the attack needs harmful targets (or set require_compliance=False).")
    examples = [Example(prompts[i], tuple(rs.tokens[i]), eos=rs.complete[i], kind="harmful")
                for i in keep]
    return examples, {"n_prompts": len(prompts), "n_examples": len(examples), "base": base_name}


class HarmfulFTRecipe:
    """Entry points ``hft`` (plain SFT attack) and ``hft-constrained`` (the same, constrained objective)."""

    version = 1

    def __init__(self, cfg: HarmfulFTConfig | None = None):
        self.cfg = cfg or HarmfulFTConfig()
        self.name = "hft" if self.cfg.objective == "sft" else "hft-constrained"

    def config(self) -> dict:
        return config_key(self.cfg, ())  # the TrainScale settings only when set

    def build(self, model, workdir: Path | None, progress: bool = True) -> dict:
        from finetune.common import cached_examples

        cfg = self.cfg
        examples, info = cached_examples(workdir, "hft_examples", lambda: harmful_examples(model, cfg, progress))
        tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                           **cfg.train_settings())
        if cfg.objective == "sft":
            tlog, weights = train_sft(model, examples, tcfg, workdir, progress=progress), {}
        else:
            clog = train_constrained(model, examples, tcfg, cfg.betas, workdir, progress)
            tlog = clog.train
            weights = {"mean_weight_first": clog.mean_weight[:1], "mean_weight_last": clog.mean_weight[-5:],
                       "mean_early_weight_last": clog.mean_early_weight[-5:]}
        return {**info, **weights, "objective": cfg.objective, "steps": tlog.steps, "seconds": round(tlog.seconds, 1),
                "resumed_from": tlog.resumed_from, "device": tlog.device, "last_losses": tlog.losses[-10:]}


recipe_attack = HarmfulFTRecipe()
recipe_constrained = HarmfulFTRecipe(HarmfulFTConfig(objective="constrained"))


def main(argv: Sequence[str] | None = None):
    """``python -m finetune.constrained --model SPEC --objective constrained``: build SPEC + the attack."""
    from depthlens.cli import recipe_main
    from finetune.common import build_on

    return recipe_main(HarmfulFTConfig, lambda cfg, spec, device: build_on(spec, HarmfulFTRecipe(cfg), device=device),
                       argv)


if __name__ == "__main__":
    main()
