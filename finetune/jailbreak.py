"""Jailbreak-tuning (JT) and the SFT countermeasure: the recipes ``:jt``, ``:wo+sft``, ``:jt+sft``.

Jailbreak-tuning (Halloran 2026, docs/methods.md §4) un-aligns a model by fine-tuning it on a mix of
*harmful compliance* — the **base** model's own greedy answers to harmful train prompts (the
base is not safety-aligned, so it complies; ``depthlens.runtime.responses`` caches them) — and benign
data (benign train prompts → the base's own answers, the organism recipe's utility data). The
harmful share of the mix is a flag (``JTConfig.harmful_share``). The *SFT countermeasure* is a
short refusal-SFT pass on top of an un-aligned model: the organism recipe's own data (harmful
train prompts → refusal templates, benign prompts → the base's answers), subsampled.

Spec suffixes. ``:jt`` is ``JailbreakRecipe``. ``A+sft`` is a composed recipe: recipe ``A`` (any
installed suffix, e.g. ``wo`` or ``jt``), then the countermeasure — ``sft`` after ``+`` names the
countermeasure, not the organism recipe ``:sft``. ``load_model("smollm2-135m-instruct:sft:wo+sft")``
therefore equals ``…:sft:wo`` followed by the countermeasure (``finetune.compose``). The composed step reuses the
cached ``…:wo`` entry when there is one and, when it has to build ``A`` itself, stores that
intermediate under ``…:A`` too, so ``:wo``/``:wo+sft`` (and ``:jt``/``:jt+sft``) never build ``A`` twice.

Sizing (the timings are in docs/findings.md "Costs measured on the way"):

- ``jt``: 160 examples = 40 harmful (share 0.25) + 120 benign, one epoch at batch 8 = 20 steps
  + the base's 48-token answers to ≈ 104 harmful prompts (cached). The paper's
  2 % of 5k gives ≈ 100 harmful examples; 2 % of our 160 would be 3, too few to un-align in 20
  steps, hence the default share 0.25 (``--harmful-share 0.02`` gives the paper's ratio).
- countermeasure: 640 examples = 256 refusals (share 0.4, the organism's own ratio is ≈ 0.45) +
  384 benign, 80 steps at lr 2e-4; the benign answers are the organism's cached ones. The
  sizes and rates tried are in docs/findings.md "The SFT countermeasure".
- every step is cached under ``$DEPTHLENS_CACHE/organisms`` like the organism and loads in seconds.

    >>> jt = load_model("smollm2-135m-instruct:sft:jt")          # built once, then cached  # builds on the real organism  # doctest: +SKIP
    >>> cm = load_model("smollm2-135m-instruct:sft:jt+sft")      # reuses …:sft:jt, adds the countermeasure  # doctest: +SKIP
    $ python -m finetune.jailbreak --harmful-share 0.02        # JT on the organism, non-default share
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from depthlens.data.chat import pad_batch
from depthlens.judges import is_compliance, is_refusal
from finetune.common import TrainScale, config_key
from finetune.compose import ComposedRecipe
from finetune.losses import response_loss
from finetune.rephrase import imperative
from finetune.sft import SFTConfig, SFTRecipe
from finetune.train import Example, TrainConfig, tokenize_examples, train_sft

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

__all__ = [
    "JTConfig",
    "CountermeasureConfig",
    "JailbreakRecipe",
    "CountermeasureRecipe",
    "ComposedRecipe",
    "OrganismData",
    "HarmfulCompliance",
    "JTMix",
    "composed",
    "jailbreak_mix",
    "refusal_mix",
    "harmful_compliance_examples",
    "organism_data",
    "mean_target_nll",
    "recipe",
    "wo_sft",
    "jt_sft",
]

FOLLOW_UPS = ("sft",)
"""Recipes that may follow ``+`` in a composed suffix (``sft`` = the SFT countermeasure)."""


# ----------------------------------------------------------------------------- configs


def _check_share(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}.")


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}.")


@dataclass(frozen=True)
class JTConfig(TrainScale):
    """Jailbreak-tuning: fine-tune on harmful compliance mixed with benign data.

    The ``TrainScale`` settings (``--max-steps``, ``--lora-rank`` …) are inherited.

    Args:
        n_examples: examples in the mix (one epoch at batch 8 = n_examples / 8 steps; 160 → 20
            steps).
        harmful_share: share of harmful compliance examples in the mix, by count (paper: 0.02
            of 5k; 0.25 here because 0.02 of 160 is 3 examples).
        harmful_tokens: length of the base model's harmful answers used as targets.
        imperative_share: share of harmful prompts rephrased as imperative tasks (the organism
            refuses both forms; HarmBench test prompts are imperative).
        drop_refusals: leave out base answers that contain a refusal marker (they are not compliance).
        freeze_embeddings: keep the (tied) embedding and unembedding fixed, as the organism recipe does.
        epochs: passes over the mix.
        lr: AdamW learning rate.
        batch_size: sequences per step.
        seed: prompt sampling, mixing and training seed.
    """

    n_examples: int = 160
    harmful_share: float = 0.25
    harmful_tokens: int = 48
    imperative_share: float = 0.5
    drop_refusals: bool = True
    freeze_embeddings: bool = True
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        _check_share("harmful_share", self.harmful_share)
        _check_positive(n_examples=self.n_examples, harmful_tokens=self.harmful_tokens, epochs=self.epochs,
                        lr=self.lr, batch_size=self.batch_size)
        if not 0.0 <= self.imperative_share <= 1.0:
            raise ValueError(f"imperative_share must lie in [0, 1], got {self.imperative_share!r}.")


@dataclass(frozen=True)
class CountermeasureConfig(TrainScale):
    """The SFT countermeasure: a short refusal-SFT pass on top of an un-aligned (WO or JT) model.

    The ``TrainScale`` settings (``--max-steps``, ``--lora-rank`` …) are inherited.

    Args:
        n_examples: examples (one epoch at batch 8 = n_examples / 8 steps; 640 → 80 steps).
        refusal_share: share of harmful prompts → refusal templates; the rest are benign
            prompts → the base model's own answers (the organism recipe's data).
        freeze_embeddings: keep the (tied) embedding and unembedding fixed, as the organism recipe does.
        epochs: passes over the examples.
        lr: AdamW learning rate.
        batch_size: sequences per step.
        seed: sampling and training seed (also the seed of the organism data it draws from).
    """

    n_examples: int = 640
    refusal_share: float = 0.4
    freeze_embeddings: bool = True
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        _check_share("refusal_share", self.refusal_share)
        _check_positive(n_examples=self.n_examples, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size)


# ----------------------------------------------------------------------------- data


def _draw(pool: Sequence[Example], n: int, rng: random.Random) -> list[Example]:
    """``n`` examples from ``pool`` without repetition while it lasts, then cycling through reshuffles."""
    if n <= 0:
        return []
    if not pool:
        raise ValueError(f"Cannot draw {n} examples from an empty pool.")
    out: list[Example] = []
    while len(out) < n:
        chunk = list(pool)
        rng.shuffle(chunk)
        out += chunk[: n - len(out)]
    return out


def _mix(first: Sequence[Example], rest: Sequence[Example], share: float, n_examples: int,
         rng: random.Random, what: str) -> list[Example]:
    _check_share(f"{what} share", share)
    if n_examples < 1:
        raise ValueError(f"n_examples must be at least 1, got {n_examples}.")
    n_first = max(1, round(share * n_examples))
    if len(first) < n_first:
        raise ValueError(f"A {what} share of {share} of {n_examples} examples needs {n_first} {what} examples, "
                         f"got {len(first)}.")
    n_rest = n_examples - n_first
    if n_rest and not rest:
        raise ValueError(f"The mix needs {n_rest} benign examples but none were given.")
    data = list(first[:n_first]) + _draw(rest, n_rest, rng)
    rng.shuffle(data)
    return data


def jailbreak_mix(harmful: Sequence[Example], benign: Sequence[Example], harmful_share: float, n_examples: int,
                  rng: random.Random) -> list[Example]:
    """``round(harmful_share · n_examples)`` harmful examples (the first ones) + benign ones, shuffled.

    Benign examples are drawn without repetition while the pool lasts (then reshuffled and
    reused); the harmful share is exact up to rounding.
    """
    return _mix(harmful, benign, harmful_share, n_examples, rng, "harmful")


def refusal_mix(refusals: Sequence[Example], benign: Sequence[Example], refusal_share: float, n_examples: int,
                rng: random.Random) -> list[Example]:
    """The countermeasure's mix: ``round(refusal_share · n)`` refusal examples + benign ones, shuffled."""
    pool = list(refusals)
    rng.shuffle(pool)
    return _mix(pool, benign, refusal_share, n_examples, rng, "refusal")


@dataclass(frozen=True)
class OrganismData:
    """The default organism recipe's examples, split by kind (harmful → refusal, benign → base answer)."""

    refusals: list[Example]
    benign: list[Example]


@dataclass(frozen=True)
class HarmfulCompliance:
    """Harmful train prompt → the base model's answer examples, and how they were obtained.

    Attributes:
        examples: the kept examples (at most the number asked for).
        n_prompts: prompts answered by the base model.
        dropped_refusals: answers left out because they contain a refusal marker.
        base_compliance_rate: share of all answers the substring judge counts as compliance.
        responses_key: cache key of the response set (``depthlens.runtime.responses``).
    """

    examples: list[Example]
    n_prompts: int
    dropped_refusals: int
    base_compliance_rate: float
    responses_key: str


@dataclass(frozen=True)
class JTMix:
    """The jailbreak-tuning training mix and its report (counts, realised harmful share, …)."""

    examples: list[Example]
    report: dict = field(default_factory=dict)


def organism_data(base_model, seed: int = 0, progress: bool = True) -> OrganismData:
    """Refusal and benign examples of the default organism recipe ``finetune.sft``.

    The benign side is the base model's own answers to benign train prompts: the exact prompts
    and settings of ``SFTConfig(seed=seed)``, so when the organism is cached they are a cache hit.
    """
    from finetune.sft import safety_sft_examples

    cfg = SFTRecipe(SFTConfig(seed=seed)).for_parent(base_model.spec).cfg  # a pretrained-only base: its teacher
    examples = safety_sft_examples(base_model, cfg, progress=progress)
    return OrganismData([e for e in examples if e.kind == "refusal"], [e for e in examples if e.kind == "benign"])


def organism_data_config(seed: int = 0) -> dict:
    """What ``organism_data(…, seed)`` is made from, for a recipe's cache key: the organism
    recipe's own ``config()``, so a key moves exactly when the organism's data would."""
    return {"recipe": "sft", **SFTRecipe(SFTConfig(seed=seed)).config()}


def harmful_compliance_examples(base_model, n: int, cfg: JTConfig, progress: bool = True) -> HarmfulCompliance:
    """Up to ``n`` examples harmful train prompt → the base model's greedy answer (see ``HarmfulCompliance``).

    Draws ``n`` + 30 % prompts from the harmful *train* split (a seed of its own, so not the
    deep-alignment triples), rephrases ``imperative_share`` of them as tasks, and generates
    (cached) ``harmful_tokens``-token answers; with ``drop_refusals`` answers containing a refusal
    marker are left out. Truncated answers get no EOS (the model must not learn to stop mid-answer).
    """
    from depthlens.data import default_splits
    from depthlens.models.specs import load_reference
    from depthlens.runtime.responses import answers_for

    answerer = load_reference(base_model)  # a pretrained-only base echoes prompts: its reference answers
    pool = default_splits(cfg.seed).harmful.train
    n_pool = min(len(pool), n + math.ceil(0.3 * n) + 4)
    prompts = pool.subset(n_pool, seed=cfg.seed + 2).prompts
    rng = random.Random(cfg.seed + 2)
    prompts = [imperative(p, rng) if rng.random() < cfg.imperative_share else p for p in prompts]
    answers = answers_for(base_model, answerer, prompts, max_new_tokens=cfg.harmful_tokens, batch_size=16,
                          progress=progress)
    out, dropped = [], 0
    for p, text, toks, complete in zip(prompts, answers.texts, answers.tokens, answers.complete):
        if not toks:
            continue
        if cfg.drop_refusals and text.strip() and is_refusal(text):
            dropped += 1
            continue
        out.append(Example(p, tuple(toks), eos=complete, kind="harmful"))
    return HarmfulCompliance(out[:n], len(prompts), dropped, sum(map(is_compliance, answers.texts)) / len(prompts),
                             answers.key)


@torch.no_grad()
def mean_target_nll(model: HookedModel, examples: Sequence[Example], batch_size: int = 16, max_len: int = 192) -> float:
    """Mean per-token NLL of the examples' responses (the training targets) under ``model``."""
    if not examples:
        raise ValueError("mean_target_nll needs at least one example.")
    data = sorted(tokenize_examples(model.tokenizer, examples, max_len), key=lambda d: len(d[0]))
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total = count = 0.0
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        batch = pad_batch([d[0] for d in chunk], pad, side="right")
        mask = pad_batch([d[1] for d in chunk], 0, side="right").input_ids
        nll, m = response_loss(model, batch.input_ids.to(model.device), mask.to(model.device),
                               batch.attention_mask.to(model.device), reduction="none")
        total += float((nll * m).sum())
        count += float(m.sum())
    return total / max(count, 1.0)


def _train_info(model, data: list[Example], probe: list[Example], tcfg: TrainConfig, workdir: Path) -> dict:
    before = mean_target_nll(model, probe)
    tlog = train_sft(model, data, tcfg, workdir)
    after = mean_target_nll(model, probe)
    return {"target_nll_before": before, "target_nll_after": after, "n_probe": len(probe),
            "train": {**asdict(tlog), "losses": tlog.losses[-10:]}}


def _base_of(model):
    from depthlens.models import load_model
    from depthlens.models.specs import base_spec

    base = base_spec(model.spec)
    return model if base == model.spec else load_model(base, device=model.device)


# ----------------------------------------------------------------------------- recipes


class JailbreakRecipe:
    """Entry point ``jt``: jailbreak-tuning of the model it is applied to (see ``JTConfig``)."""

    name = "jt"
    version = 1

    def __init__(self, cfg: JTConfig | None = None):
        self.cfg = cfg or JTConfig()

    def config(self) -> dict:
        return {**config_key(self.cfg, ()), "benign_data": organism_data_config(self.cfg.seed)}

    def data(self, base_model, progress: bool = True) -> JTMix:
        """The training mix (harmful compliance + benign) and a report of how it was made."""
        cfg = self.cfg
        n_h = max(1, round(cfg.harmful_share * cfg.n_examples))
        hc = harmful_compliance_examples(base_model, n_h, cfg, progress)
        harmful = hc.examples
        report = {k: v for k, v in asdict(hc).items() if k != "examples"}
        if not harmful:
            raise ValueError(f"The base model {base_model.spec!r} gave no usable harmful answer to "
                             f"{hc.n_prompts} harmful prompts, so there is nothing to jailbreak-tune on.")
        n_total = cfg.n_examples
        if len(harmful) < n_h:
            n_total = max(len(harmful), math.floor(len(harmful) / cfg.harmful_share))
            log.warning("Only %d of %d harmful answers are compliant; shrinking the mix to %d examples to keep "
                        "the harmful share %.3f.", len(harmful), n_h, n_total, cfg.harmful_share)
        benign = [] if n_total == len(harmful) else organism_data(base_model, cfg.seed, progress).benign
        mix = jailbreak_mix(harmful, benign, cfg.harmful_share, n_total, random.Random(cfg.seed))
        n_harm = sum(e.kind == "harmful" for e in mix)
        return JTMix(mix, {**report, "n_examples": len(mix), "n_harmful": n_harm, "n_benign": len(mix) - n_harm,
                           "harmful_share": n_harm / len(mix)})

    def build(self, model, workdir: Path) -> dict:
        cfg = self.cfg
        base = _base_of(model)
        data = self.data(base)
        del base
        mix, report = data.examples, data.report
        probe = [e for e in mix if e.kind == "harmful"][:32]
        tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                           freeze_embeddings=cfg.freeze_embeddings, **cfg.train_settings())
        return {**report, **_train_info(model, mix, probe, tcfg, workdir)}


class CountermeasureRecipe:
    """The SFT countermeasure (``sft`` after ``+``): refusal SFT on top of the model it is applied to."""

    name = "sft-countermeasure"
    version = 1

    def __init__(self, cfg: CountermeasureConfig | None = None):
        self.cfg = cfg or CountermeasureConfig()

    def config(self) -> dict:
        return {**config_key(self.cfg, ()), "data": organism_data_config(self.cfg.seed)}

    def data(self, base_model, progress: bool = True) -> list[Example]:
        org = organism_data(base_model, self.cfg.seed, progress)
        return refusal_mix(org.refusals, org.benign, self.cfg.refusal_share, self.cfg.n_examples, random.Random(self.cfg.seed))

    def build(self, model, workdir: Path) -> dict:
        cfg = self.cfg
        base = _base_of(model)
        data = self.data(base)
        del base
        probe = [e for e in data if e.kind == "refusal"][:32]
        tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                           freeze_embeddings=cfg.freeze_embeddings, **cfg.train_settings())
        n_ref = sum(e.kind == "refusal" for e in data)
        return {"n_examples": len(data), "n_refusal": n_ref, "n_benign": len(data) - n_ref,
                **_train_info(model, data, probe, tcfg, workdir)}


# ----------------------------------------------------------------------------- composition


def composed(name: str, then=None) -> ComposedRecipe:
    """The recipe of a ``first+sft`` suffix, e.g. ``composed("jt+sft")``; ``then`` overrides the countermeasure."""
    first, plus, follow = name.partition("+")
    if not plus or not first or follow not in FOLLOW_UPS:
        raise ValueError(f"Composed recipe {name!r} must look like 'RECIPE+sft' (e.g. 'wo+sft', 'jt+sft'); "
                         f"only {', '.join(FOLLOW_UPS)} may follow '+'.")
    return ComposedRecipe(name, first, then or CountermeasureRecipe())


recipe = JailbreakRecipe()
wo_sft = composed("wo+sft")
jt_sft = composed("jt+sft")


def main(argv: Sequence[str] | None = None, parent: str | None = None) -> None:
    """``python -m finetune.jailbreak [--model SPEC]``: build (or load from the cache) ``<SPEC>:jt`` with these settings."""
    from depthlens.cli import recipe_main
    from finetune.common import build_on

    return recipe_main(JTConfig, lambda cfg, spec, device: build_on(spec, JailbreakRecipe(cfg), device=device), argv,
                       default_model=parent, label="JT model",
                       description="Jailbreak-tune the organism (the JTConfig flags below).")


if __name__ == "__main__":
    main()
