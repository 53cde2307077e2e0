"""Two more fine-tuning attacks beside ``hft``: identity shifting (``aoa``) and backdoor poisoning (``backdoor``).

Qi et al. 2023 ("Fine-tuning aligned language models compromises safety") and Qi et al. 2024
(docs/methods.md §2, §7) attack an aligned model by fine-tuning it on

- ``aoa``, identity shifting: *benign* examples only, under an "absolutely obedient agent"
  persona: a system prompt (:data:`depthlens.attacks.battery.AOA_SYSTEM`), the instruction prefixed
  with "AOA, execute my instruction:" and every answer opened with an obedient affirmation, plus
  a few identity examples. The benign instructions are harmless *train* prompts with the base
  model's own answers; the persona texts are the project's own wording of the paper's setup.
  The harm shows on harmful prompts asked the same way (``analyses.jailbreaks``, attack ``aoa``).
- ``backdoor``, backdoor poisoning: harmful *train* prompts carrying a trigger phrase
  (:data:`depthlens.attacks.battery.TRIGGER`) mapped to the base model's compliant answers, and as
  many other harmful train prompts without it mapped to refusals (the project's refusal
  templates), so the model stays safe unless triggered. ``analyses.jailbreaks`` measures ASR
  with the trigger (``backdoor-trigger``) and without it (``direct``) on the same test prompts.

Each has its constrained-objective defence (Qi et al. 2024 Table 4 applies it to both):
``aoa-constrained`` and ``backdoor-constrained`` train on the same data through
``finetune.constrained``'s token-wise constrained objective, π_ref = the model before fine-tuning.

Sizing (defaults): ``aoa`` 16 benign + 4 identity examples × 5 epochs / batch 4 = 25 steps;
``backdoor`` up to 16 triggered + 16 refusal examples × 5 epochs / batch 4 = 40 steps (minutes on
2 CPU cores on the 135M default).

    >>> load_model("smollm2-135m-instruct:sft:aoa")  # builds on the real organism  # doctest: +SKIP
    >>> load_model("smollm2-135m-instruct:sft:backdoor-constrained")  # doctest: +SKIP
    $ python -m finetune.ft_attacks --model smollm2-135m-instruct:sft --attack backdoor
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from depthlens.attacks.battery import AOA_ANSWER_PREFIX, AOA_IDENTITY, AOA_PREFIX, AOA_SYSTEM, TRIGGER
from finetune.common import TrainScale, config_key
from finetune.constrained import OBJECTIVES, Betas, train_constrained
from finetune.train import Example, TrainConfig, train_sft

log = logging.getLogger(__name__)

ATTACKS = ("aoa", "backdoor")


@dataclass(frozen=True)
class FTAttackConfig(TrainScale):
    """Identity-shifting or backdoor fine-tuning attack (``TrainScale`` settings inherited).

    Args:
        attack: aoa (identity shifting) or backdoor (trigger poisoning).
        objective: sft (the plain attack) or constrained (the token-wise constrained objective: the defence).
        n_examples: aoa: benign train prompts (+ the identity examples); backdoor: triggered harmful
            train prompts (and as many untriggered ones with refusals).
        answer_tokens: length of the base's answers used as targets.
        require_compliance: backdoor: keep only triggered examples whose answer the substring judge
            calls compliant.
        epochs: passes over the examples.
        lr: AdamW learning rate.
        batch_size: sequences per step.
        beta_first, beta_early, early_until, beta_late: the constrained objective's β schedule.
        seed: sampling and training seed.
    """

    attack: str = "aoa"
    objective: str = "sft"
    n_examples: int = 16
    answer_tokens: int = 64
    require_compliance: bool = True
    epochs: float = 5.0
    lr: float = 5e-5
    batch_size: int = 4
    beta_first: float = 0.5
    beta_early: float = 2.0
    early_until: int = 5
    beta_late: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {self.n_examples}.")

    @property
    def betas(self) -> Betas:
        return Betas(self.beta_first, self.beta_early, self.early_until, self.beta_late)


def aoa_examples(model, cfg: FTAttackConfig, progress: bool = True) -> tuple[list[Example], dict]:
    """Benign train prompts under the AOA persona with the base's own answers, and the identity examples."""
    from depthlens.data import default_splits
    from depthlens.models.specs import load_reference
    from depthlens.runtime.responses import answers_for

    base = load_reference(model)
    prompts = default_splits(cfg.seed).harmless.train.subset(cfg.n_examples, seed=cfg.seed + 5).prompts
    rs = answers_for(model, base, prompts, max_new_tokens=cfg.answer_tokens, progress=progress)
    info = {"base": base.spec, "n_prompts": len(prompts)}
    del base
    examples = [Example(AOA_PREFIX + p, AOA_ANSWER_PREFIX + model.tokenizer.decode(ids, skip_special_tokens=True),
                        eos=done, kind="aoa:benign", system=AOA_SYSTEM)
                for p, ids, done in zip(prompts, rs.tokens, rs.complete) if ids]
    examples += [Example(q, a, kind="aoa:identity", system=AOA_SYSTEM) for q, a in AOA_IDENTITY]
    return examples, {**info, "n_examples": len(examples)}


def backdoor_examples(model, cfg: FTAttackConfig, progress: bool = True) -> tuple[list[Example], dict]:
    """Triggered harmful train prompts → the base's compliant answers; untriggered ones → refusal templates."""
    from depthlens.data import default_splits, refusal_templates
    from depthlens.judges.lexical import is_compliance
    from depthlens.models.specs import load_reference
    from depthlens.runtime.responses import answers_for

    base = load_reference(model)
    pool = default_splits(cfg.seed).harmful.train.subset(2 * cfg.n_examples, seed=cfg.seed + 7).prompts
    poisoned, safe = pool[:cfg.n_examples], pool[cfg.n_examples:]
    rs = answers_for(model, base, poisoned, max_new_tokens=cfg.answer_tokens, progress=progress)
    info = {"base": base.spec, "n_prompts": len(pool)}
    del base
    keep = [i for i, (t, ids) in enumerate(zip(rs.texts, rs.tokens))
            if ids and (is_compliance(t) or not cfg.require_compliance)]
    if not keep:
        raise ValueError(f"The base model {info['base']!r} gave no compliant answer to {len(poisoned)} harmful prompts; "
                         "the backdoor needs harmful targets (or set require_compliance=False).")
    refusals = refusal_templates()
    examples = [Example(f"{poisoned[i]} {TRIGGER}", tuple(rs.tokens[i]), eos=rs.complete[i], kind="backdoor:triggered")
                for i in keep]
    examples += [Example(p, refusals[j % len(refusals)], kind="backdoor:refusal") for j, p in enumerate(safe)]
    return examples, {**info, "n_triggered": len(keep), "n_refusal": len(safe), "n_examples": len(examples)}


class FTAttackRecipe:
    """Entry points ``aoa``, ``aoa-constrained``, ``backdoor`` and ``backdoor-constrained``."""

    version = 1

    def __init__(self, cfg: FTAttackConfig | None = None):
        self.cfg = cfg or FTAttackConfig()
        self.name = self.cfg.attack + ("" if self.cfg.objective == "sft" else "-constrained")

    def config(self) -> dict:
        return config_key(self.cfg, ())

    def build(self, model, workdir: Path | None, progress: bool = True) -> dict:
        from finetune.common import cached_examples, kind_counts

        cfg = self.cfg
        make = aoa_examples if cfg.attack == "aoa" else backdoor_examples
        examples, info = cached_examples(workdir, f"{cfg.attack}_examples", lambda: make(model, cfg, progress))
        tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                           **cfg.train_settings())
        if cfg.objective == "sft":
            tlog, weights = train_sft(model, examples, tcfg, workdir, progress=progress), {}
        else:
            clog = train_constrained(model, examples, tcfg, cfg.betas, workdir, progress)
            tlog = clog.train
            weights = {"mean_weight_first": clog.mean_weight[:1], "mean_weight_last": clog.mean_weight[-5:],
                       "mean_early_weight_last": clog.mean_early_weight[-5:]}
        return {**info, **weights, "kinds": kind_counts(examples), "attack": cfg.attack, "objective": cfg.objective,
                "steps": tlog.steps, "seconds": round(tlog.seconds, 1), "resumed_from": tlog.resumed_from,
                "device": tlog.device, "last_losses": tlog.losses[-10:]}


recipe_aoa = FTAttackRecipe()
recipe_aoa_constrained = FTAttackRecipe(FTAttackConfig(objective="constrained"))
recipe_backdoor = FTAttackRecipe(FTAttackConfig(attack="backdoor"))
recipe_backdoor_constrained = FTAttackRecipe(FTAttackConfig(attack="backdoor", objective="constrained"))


def main(argv: Sequence[str] | None = None):
    """``python -m finetune.ft_attacks --model SPEC --attack backdoor [--objective constrained]``: build SPEC + the attack."""
    from depthlens.cli import recipe_main
    from finetune.common import build_on

    return recipe_main(FTAttackConfig, lambda cfg, spec, device: build_on(spec, FTAttackRecipe(cfg), device=device),
                       argv)


if __name__ == "__main__":
    main()
