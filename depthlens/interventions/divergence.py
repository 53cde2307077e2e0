"""Per-position KL divergence between two models on the same teacher-forced responses.

Qi et al. (2024) read shallow alignment off ``KL_k = Σ_v π_a(v|x,y<k) (log π_a − log π_b)``:
an aligned model that differs from its base only on the first response tokens. Both models
must share the tokenizer. Sequences are processed in chunks so only one chunk's full
next-token distributions (``[len, vocab]`` per sequence) are alive at a time.

    >>> from depthlens.models.load import load_model
    >>> model = load_model("tiny-llama")
    >>> responses = [model.tokenizer("Sure, here is how")["input_ids"]]
    >>> kl = per_position_kl(model, model, ["How do I bake bread?"], responses, n_positions=4, n_boot=10)
    >>> kl.mean.tolist()                          # a model against itself: 0 at every position
    [0.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from depthlens.data.chat import build_chat
from depthlens.infra.errors import UsageError
from depthlens.runtime.forward import token_logprobs
from depthlens.stats import bootstrap_mean


@dataclass
class PositionKL:
    """KL per response position: mean over examples with a 95% bootstrap interval.

    ``values[i, k]`` is NaN where example i's response is shorter than k + 1 tokens.
    """

    values: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: np.ndarray

    def records(self, label: str) -> list[dict]:
        """Rows ``{set, position (1-based), kl, lo, hi, n}`` for results tables, positions with data only."""
        return [{"set": label, "position": k + 1, "kl": float(m), "lo": float(a), "hi": float(b), "n": int(n)}
                for k, (m, a, b, n) in enumerate(zip(self.mean, self.lo, self.hi, self.n)) if n > 0]


def per_position_kl(aligned, base, prompts: Sequence[str], responses: Sequence[Sequence[int]], *,
                    n_positions: int = 64, chunk: int = 16, n_boot: int = 1000, seed: int = 0) -> PositionKL:
    """KL(aligned ‖ base) at each of the first ``n_positions`` response tokens, with bootstrap intervals.

    Both models are teacher-forced on the same ``responses`` (token ids, e.g. the aligned
    model's own answers); the interval resamples examples (``depthlens.stats.bootstrap_mean``).
    """
    if len(prompts) != len(responses):
        raise UsageError(f"Got {len(prompts)} prompts but {len(responses)} responses; they must pair up.")
    if aligned.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise UsageError("Per-position KL needs two models with the same tokenizer.")
    seqs = [build_chat(aligned.tokenizer, p, [list(r)[:n_positions]]) for p, r in zip(prompts, responses) if len(r)]
    values = np.full((len(seqs), n_positions), np.nan)
    for s in range(0, len(seqs), chunk):
        part = seqs[s:s + chunk]
        starts = [q.prompt_len for q in part]
        la = token_logprobs(aligned, part, start=starts, full_dist=True, batch_size=chunk)
        lb = token_logprobs(base, part, start=starts, full_dist=True, batch_size=chunk)
        for i, (a, b) in enumerate(zip(la, lb)):
            kl = (a.exp() * (a - b)).sum(-1).clamp(min=0.0)
            values[s + i, : len(kl)] = kl.numpy()
    n = (~np.isnan(values)).sum(0)
    mean = np.nanmean(np.where(n > 0, values, 0.0), axis=0)  # 0, not NaN, where no response is that long
    ci = bootstrap_mean(values, n_boot, seed, skip_nan=True)  # resamples examples; NaN: response too short
    return PositionKL(values=values, mean=mean, lo=np.asarray(ci.lo), hi=np.asarray(ci.hi), n=n)

