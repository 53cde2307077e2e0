"""The contract every analysis follows: a validated config, a typed result, one generated ``main``.

- ``AnalysisConfig``: base of the frozen config dataclasses. ``__post_init__`` resolves
  ``--quick`` in one place (the class's ``QUICK`` values replace the fields the caller did not
  set: on the command line exactly the flags not given, in Python the fields left at their
  default) and then validates every field (``validate``), so a wrong value fails before any
  work with one sentence naming the flag (``depthlens.infra.errors.UsageError``).
- ``AnalysisResult``: base of the typed results, a ``RunRecord`` (what ``results.json``
  holds) with typed accessors for the headline numbers and a ``summary()`` for the console.
- ``make_main(Config, run)``: the ``main(argv=None)`` of an analysis: parse the flags, check
  that ``--out`` can be written, ``run(cfg)``, write ``results.json`` (first, atomically), build
  the figures and print the summary; errors go through ``depthlens.cli.cli_errors``.
- ``load``, ``load_with_base``, ``check_layers``, ``prompts_or``: model loading that turns a bad
  spec or NaN weights into one-line errors (a model with the base it is measured against),
  layer checks against the loaded model, and ``--harmful FILE``-style prompt sets.

    >>> @dataclass(frozen=True)
    ... class Config(AnalysisConfig):
    ...     QUICK: ClassVar = {"n": 4}
    ...     model: str = "tiny-llama"; n: int = 16; quick: bool = False
    ...     def validate(self): require_int(self, "n")
    >>> main = make_main(Config, run)        # run(cfg, model=None): the analysis's own  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, InitVar, dataclass
from pathlib import Path
from typing import Any, ClassVar, TYPE_CHECKING

import torch

from depthlens.cli import (check_device, check_launch_env, cli_errors, flag, parse_config, prepare_out, require_int,
                           require_text, spec_errors)
from depthlens.infra.errors import UsageError
from depthlens.infra.paths import cache_root
from depthlens.infra.results import RunRecord, start_stamp

if TYPE_CHECKING:
    from depthlens.models.hooked_model import HookedModel

log = logging.getLogger(__name__)

PROMPT_FLAGS = ("harmful", "harmless", "borderline")


# ----------------------------------------------------------------------------- configs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


@dataclass(frozen=True)
class AnalysisConfig:
    """Base of analysis configs: ``QUICK`` resolved once, then ``validate()`` (see the module docstring).

    ``explicit`` (keyword only, not a field): the names of the fields the caller set; the
    generated command line passes the flags given, so ``--quick --n-boot 50`` keeps 50 even
    where 50 is the default. Left out, fields that differ from their default count as set.
    """

    QUICK: ClassVar[Mapping[str, Any]] = {}
    _: KW_ONLY
    explicit: InitVar[frozenset[str] | None] = None

    def __post_init__(self, explicit: frozenset[str] | None) -> None:
        if getattr(self, "quick", False):
            fields = {f.name: f for f in dataclasses.fields(self)}
            unknown = set(self.QUICK) - set(fields)
            if unknown:
                raise TypeError(f"{type(self).__name__}.QUICK names unknown fields {sorted(unknown)}.")
            given = explicit if explicit is not None else {
                n for n, f in fields.items() if getattr(self, n) != _default(f)}
            for name, value in self.QUICK.items():
                if name not in given:
                    object.__setattr__(self, name, value)
        self._validate_common()
        self.validate()

    def validate(self) -> None:
        """Check every field of the subclass; raise ``UsageError`` naming the flag."""

    def _validate_common(self) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        for name in ("model", "out"):
            if name in names:
                require_text(self, name)
        if "seed" in names:
            require_int(self, "seed", minimum=0)
            if self.seed >= 2 ** 63:
                raise UsageError(f"--seed must be below 2**63, got {self.seed}.")
        if "batch_size" in names:
            require_int(self, "batch_size")
        if "device" in names:
            check_device(self.device)
        check_launch_env()
        cache_root()  # a bad DEPTHLENS_CACHE is named before any work
        seen: dict[str, str] = {}
        for name in PROMPT_FLAGS:
            if name in names and getattr(self, name) is not None:
                digest = read_prompt_file(getattr(self, name), flag(name)).source.get("sha256")
                if digest in seen:  # one set in two roles: every contrast between them is 0 by construction
                    raise UsageError(f"{seen[digest]} and {flag(name)} name the same prompts "
                                     f"({str(getattr(self, name))!r}); give each role its own file.")
                seen[digest] = flag(name)
        if "judge" in names:
            check_judge_flag(self.judge)


def check_judge_flag(judge: str | None, flag_name: str = "--judge") -> None:
    """A judge id that names no judge is a ``UsageError`` naming the flag (nothing is loaded)."""
    from depthlens.judges import check_judge

    try:
        check_judge(judge)
    except ValueError as err:
        raise UsageError(f"{flag_name}: {err}") from None


def judge_fields(judge: str | None, models: Sequence[str], prompt_ids: Sequence[str], seed: int = 0) -> dict:
    """What a record says about its continuation judge: ``judge`` (full id) and ``judge_validation``
    (held-out accuracy with interval, labels sha256, ``extrapolated``; ``depthlens.judges.accuracy.judge_validation``)."""
    from depthlens.judges import judge_id, judge_validation

    return {"judge": judge_id(judge),
            "judge_validation": judge_validation(judge, models=models, prompt_ids=prompt_ids, seed=seed)}


def read_prompt_file(path: str, flag_name: str):
    """The ``PromptSet`` of a .txt/.jsonl/.csv prompt file (``depthlens.data.load_prompts``), or a ``UsageError``."""
    from depthlens.data import load_prompts

    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise UsageError(f"{flag_name} must name a .txt, .jsonl or .csv file of prompts, got {path!r}.")
    try:
        return load_prompts(Path(path).expanduser())
    except (ValueError, OSError) as err:
        raise UsageError(f"{flag_name} {str(path)!r}: {err}") from err


def prompts_or(path: str | None, default, flag_name: str):
    """The prompts of file ``path`` if given (``--harmful FILE``), else ``default`` (a ``PromptSet``,
    or a function returning one: the harmful split is only built when no file replaces it)."""
    if path is not None:
        return read_prompt_file(path, flag_name)
    return default() if callable(default) else default


def prompt_files(cfg) -> dict:
    """Path, sha256 and size of each prompt file the config names (for the record's provenance)."""
    out = {}
    for name in PROMPT_FLAGS:
        path = getattr(cfg, name, None)
        if path is not None:
            ps = read_prompt_file(path, flag(name))
            out[name] = {"path": str(path), "sha256": ps.source.get("sha256"), "n": len(ps)}
    return out


# ----------------------------------------------------------------------------- models


def check_weights(model: HookedModel, flag_name: str = "--model") -> None:
    """A model whose weights hold NaN or inf cannot give a measurement: ``UsageError`` naming a tensor."""
    for name, p in model.hf.named_parameters():
        if not torch.isfinite(p).all():
            raise UsageError(f"{flag_name} {model.spec!r}: the weights hold NaN or infinite values "
                             f"(first in {name.replace('._original_component', '')}); fix or rebuild the checkpoint.")


def load(spec: str, device: str | None = None, *, flag_name: str = "--model", model=None):
    """``model`` if given (checked), else ``load_model(spec)`` with a bad spec as a one-line ``UsageError``."""
    from depthlens.models import load_model

    if model is None:
        with spec_errors(flag_name, spec):
            model = load_model(spec, device=device)
    check_weights(model, flag_name)
    return model


def load_with_base(cfg, model=None) -> tuple:
    """``(model, base)``: ``cfg.model`` (or the loaded ``model``) and the base it is measured
    against, ``cfg.base`` where the config has one and sets it, else the model whose answers
    are its reference (``depthlens.models.specs.reference_spec``: the spec without recipe
    suffixes, or the embedded default for a pretrained-only base); one object when both are
    the same spec."""
    from depthlens.models.specs import reference_spec

    model = load(cfg.model, cfg.device, model=model)
    base_name = getattr(cfg, "base", None) or reference_spec(cfg.model)
    base = model if base_name == cfg.model else load(base_name, cfg.device, flag_name="--base")
    return model, base


def check_spec(spec: str, flag_name: str = "--model") -> None:
    """Fail fast on a spec whose recipe suffixes are unknown, before any model is loaded."""
    from depthlens.models.base import split_spec
    from depthlens.models.recipes import get_recipe

    with spec_errors(flag_name, spec):
        for name in split_spec(spec)[1]:
            get_recipe(name)


def check_layers(model: HookedModel, layers: Sequence[int] | None, flag_name: str = "--layers") -> list[int] | None:
    """``layers`` checked against the loaded model (``UsageError`` naming the flag), or None."""
    if layers is None:
        return None
    bad = [l for l in layers if not (isinstance(l, int) and 0 <= l < model.n_layers)]
    if bad:
        raise UsageError(f"{flag_name} {','.join(map(str, bad))}: {model.spec!r} has layers 0..{model.n_layers - 1}.")
    return list(layers)


# ----------------------------------------------------------------------------- results


@dataclass
class Summary:
    """What the console shows after a run: a title line and a table."""

    title: str
    rows: list[dict]
    columns: list[str] | None = None


@dataclass
class AnalysisResult(RunRecord):
    """Base of the typed results: a ``RunRecord`` plus typed accessors and ``summary()``."""

    def summary(self) -> Summary:
        return Summary(title=f"{self.analysis} of {self.model}", rows=[])

    def keep_files(self, run_dir: Path) -> None:
        """Copy into the run directory what it keeps beside ``results.json`` (nothing by default)."""

    def record(self) -> RunRecord:
        """The plain record (what ``results.json`` holds and ``read_run`` returns)."""
        return RunRecord(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunRecord)})


def fmt(value: float | None, spec: str = ".3f") -> str:
    """A number for a summary line; "n/a" where it was not measured."""
    return "n/a" if value is None else format(value, spec)


def make_main(config_cls: type, run: Callable[..., AnalysisResult], *,
              parse: Callable[[type, Sequence[str] | None], Any] = parse_config) -> Callable:
    """The ``main(argv=None) -> Path`` of an analysis (see the module docstring)."""
    from analyses.common import finish, setup_logging

    @cli_errors
    def main(argv: Sequence[str] | None = None) -> Path:
        setup_logging()
        cfg = parse(config_cls, argv)
        prepare_out(cfg.out)
        started = start_stamp()  # the code this run runs, before it can change under it
        result = run(cfg)
        result.started = started
        path = finish(result, cfg.out)
        result.keep_files(path.parent)
        return path

    main.__doc__ = f"Command line of {config_cls.__module__}: flags from ``{config_cls.__name__}``; returns the results.json path."
    return main


