"""An lm-evaluation-harness model over a depthlens model spec: any lm-eval task on any organism.

``DepthlensLM`` implements lm-eval's ``LM`` interface (``loglikelihood``,
``loglikelihood_rolling``, ``generate_until``, chat templating) on a loaded ``HookedModel``:
a spec with its recipe chain (``smollm2-135m-instruct:sft:deep-anchored``) is built or read from
the cache by ``depthlens.models.load_model``, and TransformerLens hooks given as ``fwd_hooks``
are active in every forward (as PyTorch hooks on ``model.plain()`` where the hook point has a
module equivalent, else through the bridge). Scoring follows lm-eval's Hugging Face model:
trailing spaces of the context move to the continuation, the continuation's tokens are those of
``context + continuation`` after the context's, an empty context is preceded by the EOS token,
and long inputs keep their last ``max_length`` tokens. Registered as lm-eval model ``depthlens``
(``lm_eval --model depthlens --model_args spec=tiny-llama``).

    >>> lm = DepthlensLM(spec="tiny-llama")
    >>> from lm_eval.api.instance import Instance
    >>> req = Instance("loglikelihood", {}, ("The sky is", " blue"), 0)
    >>> logp, greedy = lm.loglikelihood([req])[0]; logp < 0
    True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from depthlens.data.chat import ChatSequence, encode, length_batches
from depthlens.runtime.hooks import hooks_active, plain_hooks

log = logging.getLogger(__name__)


@register_model("depthlens")
class DepthlensLM(LM):
    """lm-eval's ``LM`` over a depthlens model (``model``, or ``spec`` loaded on ``device``/``dtype``).

    Args:
        spec: a depthlens model spec (recipe suffixes allowed), loaded when ``model`` is None.
        model: an already loaded ``HookedModel``.
        device, dtype: where and how ``spec`` is loaded.
        batch_size: sequences per forward pass.
        max_length: context window used (default: the model's).
        max_gen_toks: default new-token budget of ``generate_until``.
        fwd_hooks: TransformerLens hooks ``(name, fn)`` active in every forward.
    """

    def __init__(self, spec: str | None = None, model=None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 16, max_length: int | None = None, max_gen_toks: int = 256,
                 fwd_hooks: Sequence = ()):
        super().__init__()
        if model is None:
            if not spec:
                raise ValueError("DepthlensLM needs a model spec (spec=...) or a loaded model.")
            from depthlens.models import load_model

            model = load_model(spec, device=device, dtype=dtype)
        self.model = model
        self.tok = model.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        ctx = getattr(model.hf.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or ctx)
        self.max_gen_toks = int(max_gen_toks)
        self.fwd_hooks = list(fwd_hooks)
        self._bridge = False        # hooks without a plain-module equivalent run through the bridge
        if self.fwd_hooks:
            from depthlens.infra.errors import UsageError

            try:
                with plain_hooks(model, self.fwd_hooks):
                    pass
            except UsageError:
                self._bridge = True
        self.prefix_id = self.tok.eos_token_id if self.tok.bos_token_id is None else self.tok.bos_token_id

    # ------------------------------------------------------------------ forward

    def _logits(self, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """Logits of a right-padded batch, with ``fwd_hooks`` active."""
        if self._bridge:
            with hooks_active(self.model, self.fwd_hooks):
                return self.model.bridge(ids, attention_mask=att).float()
        with plain_hooks(self.model, self.fwd_hooks):
            return self.model.plain()(input_ids=ids, attention_mask=att).logits.float()

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum log-prob of each continuation after its context, and whether it is the greedy one."""
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        seqs = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in pairs]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        for idx in length_batches([len(s) for s in seqs], self.batch_size):
            width = max(len(seqs[i]) - 1 for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                s = seqs[i][:-1]
                ids[r, :len(s)] = torch.tensor(s)
                att[r, :len(s)] = 1
            logp = F.log_softmax(self._logits(ids.to(self.model.device), att.to(self.model.device)), dim=-1).cpu()
            for r, i in enumerate(idx):
                n_cont = len(pairs[i][1])
                end = len(seqs[i]) - 1
                rows = logp[r, end - n_cont:end]
                target = torch.tensor(seqs[i][-n_cont:])
                lp = float(rows.gather(1, target[:, None]).sum())
                out[i] = (lp, bool((rows.argmax(-1) == target).all()))
        return out

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            return [self.prefix_id], encode(self.tok, continuation)
        whole, ctx = encode(self.tok, context + continuation), encode(self.tok, context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ the LM interface

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*req.args[:2]) for req in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = encode(self.tok, req.args[0])
            pairs, start = [], 0
            while start < len(ids):       # disjoint windows, each predicted from up to max_length tokens before it
                end = min(len(ids), start + self.max_length)
                ctx = ([self.prefix_id] + ids)[max(0, end - self.max_length):start + 1] if start else [self.prefix_id]
                pairs.append((ctx, ids[start:end]))
                start = end
            out.append(sum(lp for lp, _ in self._score(pairs)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from depthlens.runtime.generation import generate

        out: list[str] = [""] * len(requests)
        groups: dict = {}
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 1.0) or 0) > 0
            key = (n, sample, float(kwargs.get("temperature", 1.0) or 1.0), float(kwargs.get("top_p", 1.0) or 1.0),
                   int(kwargs.get("top_k", 0) or 0))
            groups.setdefault(key, []).append((i, context, until))
        for (n, sample, temp, top_p, top_k), items in groups.items():
            seqs = []
            for _, context, _ in items:
                ids = encode(self.tok, context)[-(self.max_length - n):] or [self.prefix_id]
                seqs.append(ChatSequence(ids=tuple(ids), prompt_len=len(ids), user=context))
            gen = generate(self.model, seqs, max_new_tokens=n, batch_size=self.batch_size, do_sample=sample,
                           temperature=temp, top_p=top_p, top_k=top_k, fwd_hooks=self.fwd_hooks, progress=False)
            for (i, _, until), text in zip(items, gen.texts):
                cut = min([text.find(u) for u in until if u and u in text], default=len(text))
                out[i] = text[:cut]
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.spec)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tok, "chat_template", None) if chat_template else None
