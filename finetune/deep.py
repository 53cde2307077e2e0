"""Deep alignment: safety-recovery augmentation (Qi et al. 2024, METHODS §2).

Triples (x, h, r): a harmful prompt, the *base* model's harmful answer, a refusal. For each
example draw k: with probability ½ k = 0, else k ~ U{1, …, min(100, |h|)}; the sequence is
``chat(x) + h[:k] + r`` with the loss on r only, so the model learns to return to refusal
after any harmful prefix. Mixed with utility data (benign prompts → the base model's own
answers) so that safety examples are a share α = 0.2 of the examples (by count), batches
drawn from the mix as the paper does. The recipe ``deep`` continues from the model it is
applied to (``smollm2-135m-instruct:sft:deep``).

    >>> load_model("smollm2-135m-instruct:sft:deep")
    >>> examples = recovery_examples(prompts, harmful_tokens, refusals, DeepConfig(), rng)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.sft import Example, TrainConfig, train_sft


@dataclass(frozen=True)
class DeepConfig:
    """Safety-recovery augmentation (deep alignment).

    Args:
        n_triples: harmful train prompts (DoNotAnswer) with the base's harmful answers.
        harmful_tokens: length of the base's harmful answers h.
        max_k: largest prefix length k (METHODS: min(100, |h|)).
        p_zero: probability of k = 0.
        alpha: share of safety examples in the mix, by example count.
        benign_tokens: length of the base's benign answers used as utility targets.
        epochs: passes over the mix.
        lr: AdamW learning rate.
        batch_size: sequences per step.
        seed: sampling and training seed.
    """

    n_triples: int = 128
    harmful_tokens: int = 96
    max_k: int = 100
    p_zero: float = 0.5
    alpha: float = 0.2
    benign_tokens: int = 48
    epochs: float = 1.0
    lr: float = 2e-5
    batch_size: int = 8
    seed: int = 0


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


def mix(safety: list[Example], utility: list[Example], alpha: float, rng: random.Random) -> list[Example]:
    """Safety examples make up ``alpha`` of the result by count (utility subsampled or repeated)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}.")
    n_util = round(len(safety) * (1 - alpha) / alpha)
    pool = (utility * (n_util // max(1, len(utility)) + 1))[:n_util] if utility else []
    data = safety + pool
    rng.shuffle(data)
    return data


class DeepRecipe:
    """Entry point ``deep``: safety-recovery augmentation on top of the model it is applied to."""

    name = "deep"
    version = 1

    def __init__(self, cfg: DeepConfig | None = None):
        self.cfg = cfg or DeepConfig()

    def config(self) -> dict:
        return asdict(self.cfg)

    def build(self, model, workdir: Path) -> dict:
        from depthlens.data import default_splits, refusal_templates
        from depthlens.models import load_model
        from depthlens.organism import base_spec
        from depthlens.responses import response_set

        cfg = self.cfg
        rng = random.Random(cfg.seed)
        base = load_model(base_spec(model.spec), device=model.device)
        splits = default_splits(cfg.seed)
        harmful = splits.harmful.train.subset(cfg.n_triples, seed=cfg.seed + 1)
        h = response_set(base, harmful.prompts, max_new_tokens=cfg.harmful_tokens).tokens
        benign_prompts = list(splits.harmless.train.prompts) + list(splits.borderline.train.prompts)
        answers = response_set(base, benign_prompts, max_new_tokens=cfg.benign_tokens).tokens
        del base
        safety = recovery_examples(harmful.prompts, h, refusal_templates(), cfg, rng)
        utility = [Example(p, tuple(t), eos=len(t) < cfg.benign_tokens, kind="utility")
                   for p, t in zip(benign_prompts, answers) if t]
        data = mix(safety, utility, cfg.alpha, rng)
        tlog = train_sft(model, data, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                                  seed=cfg.seed), workdir)
        return {"n_safety": len(safety), "n_total": len(data), "steps": tlog.steps, "seconds": tlog.seconds,
                "last_losses": tlog.losses[-10:]}


recipe = DeepRecipe()
