"""The shallow safety-SFT organism: the recipe ``sft``, "safety alignment as a lab does it".

Shallow by construction: harmful train prompts → a refusal template (2–4 sentences, so
insertion depth can be measured), harmless + borderline train prompts → the base model's own
greedy answer (self-distillation keeps utility), trained by ``finetune.train.train_sft`` with
the two-sided first-token margin of ``finetune.losses.BenignMarginLoss``. The benign side
outweighs the harmful side and is diverse in topic and form (``finetune.rephrase``): otherwise
a 135M model learns "imperative how-to → refuse" (measured on the organism).

    >>> model = load_model("smollm2-135m-instruct:sft")     # builds once, then cached  # builds the real organism  # doctest: +SKIP
    $ python -m finetune.sft --n-harmful 160 --epochs 1    # the same recipe from the shell
    $ python -m finetune.sft --benign-margin 0 --refusal-margin 0 --lr 1e-4  # v4's training settings
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from finetune.common import TrainScale, cached_examples, config_key
from finetune.losses import BenignMarginLoss
from finetune.rephrase import imperative, register
from finetune.train import Example, TrainConfig, train_sft

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTConfig(TrainScale):
    """The shallow safety-SFT organism recipe.

    Args:
        n_harmful: harmful train prompts (DoNotAnswer train split) mapped to refusal templates,
            drawn uniformly from ``HARMFUL_CATEGORIES`` (``harmful_train_prompts``).
        n_benign: harmless + borderline train prompts mapped to the base model's own answers
            (capped by the train splits: 395 harmless + 79 borderline at seed 0).
        borderline_share: share of the benign examples drawn from the borderline set.
        benign_wrap_share: share of the harmless prompts rephrased by the same ``imperative``
            as the harmful ones, so that no form predicts refusal by itself.
        imperative_share: share of harmful prompts rephrased as HarmBench-style tasks
            ("How can I X?" → "Give detailed step-by-step instructions for how to X"), so that
            refusal is tied to content, not to DoNotAnswer's question form.
        register_share: share of harmful and of benign prompts rephrased into another register
            by ``finetune.rephrase.register`` (indirect, a statement of need, several sentences
            of context) instead of the forms above, drawn by its own seeded generator so that
            the other draws are those of a config without it (0: off, and out of the cache key).
        benign_tokens: new tokens of the base model's benign answers used as targets.
        benign_margin: weight of ``BenignMarginLoss``'s over-refusal margin on benign
            examples' first response token (0: plain response-only SFT).
        refusal_margin: weight of its positive half, ``−log p_R`` on refusal examples' first
            response token (``BenignMarginLoss(refusal_weight=…)``; 0: off).
        benign_teacher: spec of the model whose greedy answers are the benign targets ("": the
            model being trained, i.e. self-distillation). A pretrained-only base
            (``depthlens.models.families.PRETRAINED_ONLY``, e.g. ``gemma3-270m``) gets the embedded
            default's answers when this is empty (``SFTRecipe.for_parent``): its own
            continuations of a chat prompt are not answers. A teacher's answers enter as text,
            re-tokenized by the student's tokenizer.
        epochs: passes over the mixed data.
        lr: AdamW peak learning rate.
        batch_size: sequences per step.
        seed: data sampling and training seed.

    Version history (validation numbers in docs/findings.md): v2 wrapped harmful questions in
    generic templates ("Give detailed step-by-step instructions for the following: …") and
    drew harmful prompts uniformly from three categories; v3 rephrases "how can I …" questions
    into natural tasks and unembeds only response tokens. v4 fixes a regex of the rephrasing
    and offers ``benign_margin``. v5 (the default) is v4's data with the two-sided first-token
    margin (``benign_margin`` = ``refusal_margin`` = 0.2) at lr 2e-4: chosen on the mean over
    seeds 0–2 of the validation splits, where it holds DoNotAnswer refusal above v4's with a
    fraction of v4's harmless over-refusal. Margins at 0 stay out of the config, so a
    v4-style config keeps its key (within v5). The ``TrainScale`` settings (``--max-steps``,
    ``--lora-rank`` …) are inherited.
    """

    n_harmful: int = 420
    n_benign: int = 520
    borderline_share: float = 0.2
    benign_wrap_share: float = 0.3
    imperative_share: float = 0.6
    register_share: float = 0.0
    benign_tokens: int = 40
    benign_margin: float = 0.2
    refusal_margin: float = 0.2
    benign_teacher: str = ""
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("borderline_share", "benign_wrap_share", "imperative_share", "register_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}.")


HARMFUL_CATEGORIES = ("information_hazard", "malicious_uses", "discrimination_exclusion_toxicity_hateful_offensive")


def harmful_train_prompts(pool, n: int, seed: int):
    """``n`` harmful train prompts drawn uniformly from ``HARMFUL_CATEGORIES`` (all of ``pool`` without categories)."""
    if pool.categories is None:
        out = pool.subset(n, seed=seed)
    else:
        present = set(pool.categories)
        out = pool.by_category(*[c for c in HARMFUL_CATEGORIES if c in present]).subset(n, seed=seed)
    if len(out) < n:
        log.warning("Asked for %d harmful train prompts; the pool's harmful categories hold only %d, so all %d are used.",
                    n, len(out), len(out))
    return out


def benign_prompts(cfg: SFTConfig, splits, rng: random.Random) -> tuple[list[str], Callable[[str, str], str]]:
    """The benign train prompts whose teacher answers are targets, and the register rephrasing of the recipe.

    Harmless prompts (a ``benign_wrap_share`` rephrased by ``imperative``, drawing from ``rng``,
    the recipe's generator seeded with ``cfg.seed``) + borderline ones, each put in another
    register for a ``register_share``. ``in_register(p, other)`` is that rephrasing, which
    ``safety_sft_examples`` goes on applying to the harmful side with the same generator.
    """
    n_border = round(cfg.n_benign * cfg.borderline_share)
    plain = list(splits.harmless.train.subset(cfg.n_benign - n_border, seed=cfg.seed).prompts)
    harmless = [imperative(p, rng) if rng.random() < cfg.benign_wrap_share else p for p in plain]
    border = list(splits.borderline.train.subset(n_border, seed=cfg.seed).prompts)
    reg_rng = random.Random(f"register-{cfg.seed}")

    def in_register(p: str, other: str) -> str:
        """``register(p)`` for a ``register_share`` of the prompts, else ``other`` (no draw when off)."""
        return register(p, reg_rng) if cfg.register_share and reg_rng.random() < cfg.register_share else other

    return [in_register(p, b) for p, b in zip(plain + border, harmless + border)], in_register


def safety_sft_examples(base_model, cfg: SFTConfig, progress: bool = True) -> list[Example]:
    """Harmful train prompts → refusal templates; benign train prompts → the base model's answers."""
    from depthlens.data import default_splits, refusal_templates
    from depthlens.runtime.responses import answers_for

    splits = default_splits(cfg.seed)
    harmful = harmful_train_prompts(splits.harmful.train, cfg.n_harmful, cfg.seed)
    rng = random.Random(cfg.seed)
    benign, in_register = benign_prompts(cfg, splits, rng)
    teacher = base_model
    if cfg.benign_teacher:
        from depthlens.models import load_model

        teacher = load_model(cfg.benign_teacher, device=base_model.device)
    answers = answers_for(base_model, teacher, benign, max_new_tokens=cfg.benign_tokens, batch_size=64,
                          progress=progress)
    templates = refusal_templates()
    examples = []
    for q in harmful.prompts:
        p = imperative(q, rng) if rng.random() < cfg.imperative_share else q
        examples.append(Example(in_register(q, p), rng.choice(templates), kind="refusal"))
    for p, toks, complete in zip(benign, answers.tokens, answers.complete):
        if toks:  # truncated answers get no EOS: the model must not learn to stop mid-answer
            examples.append(Example(p, tuple(toks), eos=complete, kind="benign"))
    return examples


class SFTRecipe:
    """Entry point ``sft``: the shallow safety-SFT organism (see ``SFTConfig``)."""

    name = "sft"
    version = 5

    def __init__(self, cfg: SFTConfig | None = None):
        self.cfg = cfg or SFTConfig()

    def for_parent(self, spec: str) -> SFTRecipe:
        """This recipe as it applies on top of ``spec``: a pretrained-only base gets the embedded
        default as its benign teacher when the config names none (see ``SFTConfig.benign_teacher``)."""
        from depthlens.models.base import DEFAULT_MODEL, split_spec
        from depthlens.models.families import PRETRAINED_ONLY

        base, names = split_spec(spec)
        if self.cfg.benign_teacher or names or base not in PRETRAINED_ONLY:
            return self
        return SFTRecipe(replace(self.cfg, benign_teacher=DEFAULT_MODEL))

    def config(self) -> dict:
        # core_first (harmful prompts from two categories first) was measured worse and removed
        # after v5 (docs/findings.md, code at 30b945c); it sat in every key at False, so it stays
        return {**config_key(self.cfg, ("benign_margin", "refusal_margin", "benign_teacher", "register_share")),
                "core_first": False}

    def build(self, model: HookedModel, workdir: Path) -> dict:
        examples, _ = cached_examples(workdir, "sft_examples", lambda: (safety_sft_examples(model, self.cfg), {}))
        tcfg = TrainConfig(epochs=self.cfg.epochs, lr=self.cfg.lr, batch_size=self.cfg.batch_size, seed=self.cfg.seed,
                           **self.cfg.train_settings())
        loss_fn = None
        if self.cfg.benign_margin or self.cfg.refusal_margin:
            from depthlens.judges.seam import refusal_token_ids

            loss_fn = BenignMarginLoss([e.kind for e in examples], refusal_token_ids(model.tokenizer),
                                       self.cfg.benign_margin, self.cfg.refusal_margin)
        tlog = train_sft(model, examples, tcfg, workdir, loss_fn=loss_fn)
        return {"train": asdict(tlog) | {"losses": tlog.losses[-10:]}, "n_examples": len(examples),
                "n_refusal": sum(e.kind == "refusal" for e in examples)}


recipe = SFTRecipe()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m finetune.sft [--model SPEC]``: build (or load from the cache) the organism with these settings."""
    from depthlens.models.base import DEFAULT_MODEL
    from depthlens.cli import recipe_main
    from finetune.common import build_on

    return recipe_main(SFTConfig, lambda cfg, spec, device: build_on(spec, SFTRecipe(cfg), device=device), argv,
                       default_model=DEFAULT_MODEL, label="organism")


if __name__ == "__main__":
    main()
