"""Plumbing shared by the fine-tuning recipes: build on any spec, cache keys, cached examples, CLI.

Every recipe runs on the model ``depthlens.recipes.build_or_load`` hands it: CUDA in bf16
when a GPU is present (``finetune.train.train_sft`` then runs under bf16 autocast), CPU in fp32 otherwise;
seeded by its config; with a progress bar; cached by the hash of its parent and config; and
resumable (its training state and the examples it built are kept in the recipe's
``workdir`` until the step completes).

Multi-GPU. The recipes here are single-process on purpose: the embedded default (135M)
fits one device many times over. For a larger Hugging Face model use Hugging Face
``accelerate`` (the standard engine; do not write another):

- first-order recipes (``sft``, ``deep*``, ``constrained``, ``hft*``): wrap the model, the
  AdamW optimizer and a ``DataLoader`` over ``tokenize_examples(...)`` batches with
  ``accelerator = Accelerator(mixed_precision="bf16")`` →
  ``model, opt, dl = accelerator.prepare(model.hf, opt, dl)``, call
  ``accelerator.backward(loss)`` instead of ``loss.backward()``, save with
  ``accelerator.save_state(workdir)``, and start with
  ``accelerate launch --num_processes N --mixed_precision bf16 your_script.py`` (DDP), or
  with an FSDP config (``accelerate config`` → FSDP, ``FULL_SHARD``) when the weights and
  AdamW states do not fit on one GPU. The loss functions (``response_loss``,
  ``constrained_loss``) are plain functions of logits and work unchanged under both.
- zeroth-order (``zo``): data-parallel MeZO needs no gradient communication at all. Every
  rank holds the full (restricted) weights, evaluates L₊/L₋ on its own shard of the batch,
  and ``accelerator.reduce(torch.tensor([L₊, L₋]), "mean")`` averages two scalars; since z
  is regenerated from the shared step seed, every rank applies the identical update. Under
  FSDP the per-tensor seeds must be derived from the *unsharded* parameter index (and each
  rank must draw the slice of z of its shard), or the ranks perturb different directions.

    >>> model = build_on("smollm2-135m-instruct:sft", DeepRecipe(DeepConfig(alpha=0.3)))
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from depthlens.results import atomic_write_json
from finetune.train import Example

log = logging.getLogger(__name__)


def build_on(spec: str, recipe, device=None, dtype=None):
    """Apply ``recipe`` (an object) on top of ``spec`` (which may carry recipe suffixes), cached."""
    from depthlens.models import split_spec
    from depthlens.recipes import build_or_load

    base, names = split_spec(spec)
    return build_or_load(base, [*names, recipe], device=device, dtype=dtype)


def config_key(cfg, added: Sequence[str]) -> dict:
    """``asdict(cfg)`` without the ``added`` fields that are 0: options added later keep old cache keys when off."""
    out = asdict(cfg)
    for name in added:
        if not out[name]:
            del out[name]
    return out


def _to_json(ex: Example) -> dict:
    d = asdict(ex)
    for k in ("response", "prefix"):
        if isinstance(d[k], (tuple, list)):
            d[k] = {"ids": list(d[k])}
    return d


def _from_json(d: dict) -> Example:
    d = dict(d)
    for k in ("response", "prefix"):
        if isinstance(d[k], dict):
            d[k] = tuple(d[k]["ids"])
    return Example(**d)


def cached_examples(workdir: Path | None, name: str, make: Callable[[], tuple[list[Example], dict]]):
    """``make()`` once per build: (examples, info) are kept in ``workdir`` so a resumed build skips it."""
    path = Path(workdir) / f"{name}.json" if workdir is not None else None
    if path is not None and path.exists():
        data = json.loads(path.read_text())
        log.info("Reusing the %d examples of an interrupted build (%s)", len(data["examples"]), path)
        return [_from_json(d) for d in data["examples"]], data["info"]
    examples, info = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"examples": [_to_json(e) for e in examples], "info": info})
    return examples, info


def kind_counts(examples) -> dict[str, int]:
    """How many examples of each kind (the part of ``kind`` before a colon)."""
    out: dict[str, int] = {}
    for e in examples:
        k = e.kind.split(":")[0]
        out[k] = out.get(k, 0) + 1
    return out


def parse_recipe_cli(cls, argv=None, default_model: str | None = None, description: str | None = None):
    """Flags of the recipe config ``cls`` plus ``--model`` (the spec to build on) and ``--device``.

    Returns ``(cfg, model_spec, device)``.
    """
    from depthlens.cli import build_parser
    from depthlens.organism import ORGANISM

    parser = build_parser(cls, description)
    parser.add_argument("--model", default=default_model or ORGANISM, help="model spec the recipe is applied to")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: automatic; CUDA runs in bf16)")
    ns = vars(parser.parse_args(argv))
    spec, device = ns.pop("model"), ns.pop("device")
    return cls(**ns), spec, device
