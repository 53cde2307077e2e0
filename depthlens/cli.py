"""Command lines generated from frozen config dataclasses, and the one error path of every CLI.

Every analysis and recipe has one ``@dataclass(frozen=True)`` config whose docstring has an
``Args:`` section; ``parse_config`` turns its fields into flags (``--max-new-tokens 64``,
``--quick``, ``--no-generate`` for booleans that default to true, comma lists for tuples), with
``--help`` showing every default and the field's description. Values are parsed strictly:
``none`` only where the field may be None, finite numbers only, no empty list items.

Every entry point runs through ``cli_errors``: a ``UsageError`` (a bad flag, value, file or
spec; argparse's own errors included; the model loader's complaints about a spec) prints one
line ``error: ...`` on stderr and exits 2, a ``NonFiniteError`` (a NaN metric) prints one line
and exits 1, ``--debug`` shows the traceback instead, and any other exception is a bug and
keeps its traceback. ``--verbose`` lets libraries' log lines through while a model is built
(``depthlens.infra.verbosity``).

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Config:
    ...     model: str = "tiny-llama"
    ...     seed: int = 0
    >>> parse_config(Config, ["--seed", "3"]).seed
    3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import traceback
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from depthlens.infra.errors import NonFiniteError, UsageError
from depthlens.infra.verbosity import VERBOSE_FLAG, set_verbose

T = TypeVar("T")
NONE_WORDS = ("none", "null")
DEBUG_FLAG = "--debug"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ``UsageError``s: one ``error: ...`` line through ``cli_errors``."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def flag(name: str) -> str:
    """The command-line flag of a config field: ``n_boot`` → ``--n-boot``."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- parsing


def _field_docs(cls) -> dict[str, str]:
    """Field name -> the text of its ``Args:`` line, from ``cls`` and its dataclass bases (the nearest wins)."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if base is not object and dataclasses.is_dataclass(base):
            out.update(_own_field_docs(base))
    return out


def _own_field_docs(cls) -> dict[str, str]:
    doc = cls.__dict__.get("__doc__") or ""
    out: dict[str, str] = {}
    head, _, section = doc.partition("Args:")
    args_indent = len(head.rsplit("\n", 1)[-1])  # the section ends at text indented no deeper than "Args:"
    current = None
    for line in section.splitlines():
        if current and line.strip() and len(line) - len(line.lstrip()) <= args_indent:
            break
        m = re.match(r"\s+([A-Za-z_][A-Za-z0-9_]*):\s*(.*)", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= 8):
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def _base_type(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is_sequence, may be None) for int/float/str/bool, X | None and tuple[X, ...]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        elem, seq, _ = _base_type(args[0])
        return elem, seq, len(args) < len(typing.get_args(tp))
    if origin in (tuple, list, Sequence):
        items = typing.get_args(tp)
        return (items[0] if items else str), True, False
    return tp, False, False


_KIND = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"), str: ("a string", "strings"),
         bool: ("true or false", "booleans")}


def _scalar(elem) -> Callable[[str], Any]:
    def convert(text: str):
        t = text.strip()
        if elem is bool:
            if t.lower() in ("true", "1", "yes"):
                return True
            if t.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        value = elem(t)
        if elem is float and not math.isfinite(value):
            raise ValueError
        return value

    return convert


def _converter(elem, is_seq: bool, optional: bool) -> Callable[[str], Any]:
    scalar = _scalar(elem)
    kind, kinds = _KIND.get(elem, (elem.__name__, elem.__name__ + " values"))
    none_ok = " or 'none'" if optional else ""

    def convert(text: str):
        if text.strip().lower() in NONE_WORDS:
            if optional:
                return None
            raise argparse.ArgumentTypeError(f"'none' is not allowed here; expected {kind}"
                                             f"{' list' if is_seq else ''}")
        if not is_seq:
            try:
                return scalar(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {kind}{none_ok}, got {text!r}") from None
        items = text.split(",")
        if not text.strip() or any(not x.strip() for x in items):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kinds}{none_ok} with no empty item, got {text!r}")
        try:
            return tuple(scalar(x) for x in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kinds}, got {text!r}") from None

    return convert


def _shown(default: Any) -> str:
    if isinstance(default, (tuple, list)):
        return ",".join(str(v) for v in default) or "(empty)"
    return "none" if default is None else str(default)


def build_parser(cls, description: str | None = None, aliases: Mapping[str, str] | None = None) -> ArgumentParser:
    """A parser with one flag per field of the config dataclass ``cls``.

    Flags default to ``argparse.SUPPRESS``, so the parsed namespace holds exactly the flags
    given (``parse_config`` needs that: explicit flags win over ``--quick``); ``--help``
    still shows each field's default. ``aliases`` maps an old flag to a field
    (``{"--aligned": "model"}``).
    """
    aliases = dict(aliases or {})
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    parser = ArgumentParser(
        description=description or (cls.__doc__ or "").split("Args:")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name = flag(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        elem, is_seq, optional = _base_type(hints[f.name])
        helptext = f"{docs.get(f.name, '')} (default: {_shown(default)})".strip().replace("%", "%%")
        names = [name, *(a for a, field_name in aliases.items() if field_name == f.name)]
        if elem is bool and not is_seq:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=helptext)
        else:
            metavar = f"{elem.__name__.upper()},..." if is_seq else elem.__name__.upper()
            parser.add_argument(*names, dest=f.name, metavar=metavar, type=_converter(elem, is_seq, optional),
                                help=helptext)
    return parser


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show the traceback of a user mistake instead of the one-line error."""
    parser.add_argument(DEBUG_FLAG, action="store_true", default=False,
                        help="show the full traceback of an error instead of one line")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: let libraries' log lines (accelerate's checkpoints …) through during a build."""
    parser.add_argument(VERBOSE_FLAG, action="store_true", default=False,
                        help="show every library's log lines during a model build (accelerate's checkpoints …)")


def apply_verbose_flag(ns: dict) -> None:
    """Pop ``--verbose`` from parsed flags and turn verbose builds on when it was given."""
    if ns.pop("verbose", False):
        set_verbose(True)


def config_from(cls: type[T], values: Mapping[str, Any]) -> T:
    """``cls(**values)`` where ``values`` are exactly the flags given; a bad value is a ``UsageError``.

    Configs that take an ``explicit`` init-only argument (``analyses.contract.AnalysisConfig``)
    are told which fields were given, so ``--quick`` never overrides them.
    """
    kwargs = dict(values)
    fields = getattr(cls, "__dataclass_fields__", {})
    if "explicit" in fields and "explicit" not in kwargs:
        kwargs["explicit"] = frozenset(values)
    try:
        return cls(**kwargs)
    except UsageError:
        raise
    except ValueError as err:  # a config's own check of a value given on the command line
        raise UsageError(flagged(str(err), cls)) from err


def flagged(message: str, cls) -> str:
    """``message`` with every field name of config ``cls`` written as the user's flag (``n_harmful`` → ``--n-harmful``).

    A config checks its fields by name; on the command line the user typed the flag, so the
    one error line names that.
    """
    names = sorted(getattr(cls, "__dataclass_fields__", {}), key=len, reverse=True)
    for name in names:
        if "_" in name or len(name) > 2:
            message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", flag(name), message)
        else:
            message = re.sub(rf"^{re.escape(name)}(?= must)", flag(name), message)
    return message


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None,
                 aliases: Mapping[str, str] | None = None) -> T:
    """Parse ``argv`` into an instance of the config dataclass ``cls`` (``--debug`` is accepted and ignored)."""
    parser = build_parser(cls, description, aliases)
    add_debug_flag(parser)
    add_verbose_flag(parser)
    ns = vars(parser.parse_args(argv))
    ns.pop("debug", None)
    apply_verbose_flag(ns)
    return config_from(cls, ns)


# ----------------------------------------------------------------------------- the error path


def _wants_debug(argv: Iterable[str]) -> bool:
    return DEBUG_FLAG in list(argv)


def cli_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point ``main(argv=None)`` in the one error path (see the module docstring)."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None, *args, **kwargs):
        debug = _wants_debug(sys.argv[1:] if argv is None else argv)
        try:
            return main(argv, *args, **kwargs)
        except FileNotFoundError as err:
            if debug or not (vanished := _vanished_cache_entry(err)):
                if not _from_loader(err) or debug:
                    raise
                print(f"error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
            print(f"error: {vanished}", file=sys.stderr)
            raise SystemExit(2) from None
        except (UsageError, NonFiniteError, ValueError) as err:
            usage = isinstance(err, UsageError) or (not isinstance(err, NonFiniteError) and _from_loader(err))
            if debug or not (usage or isinstance(err, NonFiniteError)):
                raise
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2 if usage else 1) from None

    return wrapper


def _vanished_cache_entry(err: FileNotFoundError) -> str | None:
    """One sentence when ``err`` is a file of the cache that disappeared while this run used it."""
    from depthlens.infra.paths import cache_root

    if not err.filename:
        return None
    try:
        root = cache_root().resolve()
        path = Path(err.filename).absolute()
    except (UsageError, OSError):
        return None
    if root not in path.parents:
        return None
    entry = root.joinpath(*path.relative_to(root).parts[:2])
    return (f"cache entry {str(entry)!r} vanished while this run used it ({path.name} is gone): another process "
            "or a clean-up deleted it; run the command again to rebuild it.")


# ----------------------------------------------------------------------------- validation


def _get(obj, name: str):
    return getattr(obj, name)


def require_int(obj, name: str, minimum: int | None = 1, maximum: int | None = None, optional: bool = False) -> None:
    """``obj.name`` is an integer in [minimum, maximum] (or None when ``optional``), else a ``UsageError``."""
    v = _get(obj, name)
    if v is None and optional:
        return
    ok = isinstance(v, int) and not isinstance(v, bool)
    ok = ok and (minimum is None or v >= minimum) and (maximum is None or v <= maximum)
    if not ok:
        rng = " and ".join(s for s in (f">= {minimum}" if minimum is not None else "",
                                       f"<= {maximum}" if maximum is not None else "") if s)
        raise UsageError(f"{flag(name)} must be an integer{' ' + rng if rng else ''}"
                         f"{' (or none)' if optional else ''}, got {v!r}.")


def _finite_in(v, lo, hi, lo_open: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    if lo is not None and (v <= lo if lo_open else v < lo):
        return False
    return hi is None or v <= hi


def _range_text(lo, hi, lo_open: bool) -> str:
    parts = [f"{'>' if lo_open else '>='} {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else ""]
    return " and ".join(p for p in parts if p)


def require_number(obj, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                   optional: bool = False) -> None:
    """``obj.name`` is a finite number in the range (or None when ``optional``), else a ``UsageError``."""
    v = _get(obj, name)
    if (v is None and optional) or _finite_in(v, lo, hi, lo_open):
        return
    rng = _range_text(lo, hi, lo_open)
    raise UsageError(f"{flag(name)} must be a finite number{' ' + rng if rng else ''}, got {v!r}.")


def require_numbers(obj, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                    integer: bool = False, optional: bool = False) -> None:
    """``obj.name`` is a non-empty tuple of finite numbers (integers) in the range, else a ``UsageError``."""
    v = _get(obj, name)
    if v is None and optional:
        return
    kind = "integers" if integer else "finite numbers"
    ok = isinstance(v, (tuple, list)) and len(v) > 0 and all(
        _finite_in(x, lo, hi, lo_open) and (not integer or isinstance(x, int)) for x in v)
    if not ok:
        rng = _range_text(lo, hi, lo_open)
        raise UsageError(f"{flag(name)} must be a non-empty comma list of {kind}{' ' + rng if rng else ''}, "
                         f"got {_shown(v) if isinstance(v, (tuple, list)) else repr(v)!s}.")
    repeated = sorted({x for x in v if list(v).count(x) > 1})
    if repeated:  # a grid value listed twice would be measured twice and counted as independent evidence
        raise UsageError(f"{flag(name)} lists {', '.join(map(str, repeated))} more than once; give each value once.")


def require_choice(obj, name: str, allowed: Collection[str]) -> None:
    v = _get(obj, name)
    if v not in allowed:
        raise UsageError(f"{flag(name)} must be one of {', '.join(allowed)}, got {v!r}.")


def require_choices(obj, name: str, allowed: Collection[str]) -> None:
    """``obj.name`` is a non-empty tuple of known names without repeats."""
    v = _get(obj, name)
    if not isinstance(v, (tuple, list)) or not v or any(x not in allowed for x in v) or len(set(v)) != len(v):
        raise UsageError(f"{flag(name)} must name one or more of {', '.join(allowed)} (no repeats), "
                         f"got {_shown(v) if isinstance(v, (tuple, list)) else repr(v)}.")


def require_text(obj, name: str, optional: bool = False) -> None:
    v = _get(obj, name)
    if v is None and optional:
        return
    if not isinstance(v, str) or not v.strip():
        raise UsageError(f"{flag(name)} must be a non-empty string, got {v!r}.")


OUT_BYTES = 64 << 20
"""Free space ``prepare_out`` asks for: a results.json, its figures, and room to spare."""


def prepare_out(out: str | os.PathLike, flag_name: str = "--out", need_bytes: int = OUT_BYTES) -> Path:
    """Create the output folder and prove it can be written, before any work (``UsageError`` otherwise)."""
    if not str(out).strip():
        raise UsageError(f"{flag_name} must name a folder, got {str(out)!r}.")
    path = Path(out).expanduser()
    long = [p for p in path.parts if len(os.fsencode(p)) > 255]
    if long:
        raise UsageError(f"{flag_name} has a folder name of {len(os.fsencode(long[0]))} bytes; a file system allows "
                         "at most 255 per name.")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag_name} {str(out)!r} is a file; pass a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
        free = shutil.disk_usage(path).free
    except OSError as err:
        raise UsageError(f"{flag_name} {str(out)!r} cannot be written ({err.strerror or err}); "
                         "pass a writable folder.") from None
    if free < need_bytes:  # a results.json and its figures; a full disk would lose the run's work at the end
        raise UsageError(f"{flag_name} {str(out)!r} has {free / 2**20:.0f} MiB free and a run writes up to "
                         f"{need_bytes / 2**20:.0f} MiB there; free some space or pass another folder.")
    return path


# ----------------------------------------------------------------------------- model specs

_SPEC_MODULES = ("depthlens/models/load.py", "depthlens/models/base.py", "depthlens/models/hooked_model.py",
                 "depthlens/models/tiny.py",
                 "depthlens/models/recipes.py", "depthlens/infra/paths.py")


@contextlib.contextmanager
def spec_errors(flag_name: str, spec: str):
    """Turn the model loader's own complaints about a spec into ``UsageError``s naming the flag.

    A ``ValueError`` or ``FileNotFoundError`` raised by the spec resolution itself
    (``depthlens/models/load.py``, ``depthlens/models/recipes.py``: unknown name or recipe suffix, missing
    directory, no config.json) is a user mistake; the same types raised deeper (while a recipe
    trains, say) are not, and keep their traceback.
    """
    try:
        yield
    except (ValueError, FileNotFoundError) as err:  # UsageError included: the loader raises it for a bad spec
        if _from_loader(err):
            raise UsageError(f"{flag_name} {spec!r}: {err}") from err
        raise


def _from_loader(err: BaseException) -> bool:
    """Whether ``err`` was raised by the model loader's own checks (see ``spec_errors``)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and frames[-1].filename.replace("\\", "/").endswith(_SPEC_MODULES)


# ----------------------------------------------------------------------------- recipes


def parse_recipe_args(config_cls, argv: Sequence[str] | None = None, *, default_model: str | None = None,
                      description: str | None = None) -> tuple[Any, str, str | None]:
    """The one parser of recipe command lines: ``(config, model spec, device)`` from ``argv``.

    The flags are the recipe config's (inherited fields included) plus ``--model`` (the spec the
    recipe is applied to), ``--device`` and ``--debug``; a bad value raises ``UsageError``.
    """
    from depthlens.models.specs import ORGANISM

    parser = build_parser(config_cls, description)
    parser.add_argument("--model", default=default_model or ORGANISM,
                        help=f"model spec the recipe is applied to (default: {default_model or ORGANISM})")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: automatic; CUDA runs in bf16)")
    add_debug_flag(parser)
    add_verbose_flag(parser)
    ns = vars(parser.parse_args(argv))
    spec, device = ns.pop("model"), ns.pop("device")
    ns.pop("debug", None)
    apply_verbose_flag(ns)
    if not spec.strip():
        raise UsageError("--model must be a non-empty model spec.")
    check_device(device)
    world, rank = check_launch_env()
    from depthlens.infra.paths import cache_root

    cache_root()  # a bad DEPTHLENS_CACHE is named before any work
    check_recipe_values(config_cls, ns)
    cfg = config_from(config_cls, ns)
    try:  # checks that span several fields (e.g. a LoRA alpha without a rank), where a config has them
        getattr(cfg, "validate", lambda: None)()
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(flagged(str(err), config_cls)) from err
    if rank != 0:  # under accelerate launch only rank 0 logs below WARNING
        logging.getLogger().setLevel(logging.WARNING)
    return cfg, spec, device


_POSITIVE = re.compile(r"^(lr|epochs|batch_size|max_len|.*_tokens|.*_steps_per_.*|eps|.*_eps)$")
_SHARE = re.compile(r"^.*_(share|frac|fraction)$")


def check_recipe_values(config_cls, values: Mapping[str, Any]) -> None:
    """The ranges every recipe shares, checked on the flags given (one ``UsageError`` naming the flag).

    Numbers are finite; ``--seed`` and counts (``--n-…``) are >= 0; learning rates, epochs,
    batch sizes, lengths and token counts are > 0; shares lie in [0, 1]. A recipe's own
    config may check more (its messages are rewritten to name flags, see ``flagged``).
    """
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise UsageError(f"{flag(name)} must be a finite number, got {v!r}.")
        if (name == "seed" or name.startswith("n_")) and v < 0:
            raise UsageError(f"{flag(name)} must be >= 0, got {v!r}.")
        if name == "seed" and v >= 2 ** 63:
            raise UsageError(f"{flag(name)} must be below 2**63, got {v!r}.")
        if _POSITIVE.match(name) and not v > 0:
            raise UsageError(f"{flag(name)} must be > 0, got {v!r}.")
        if _SHARE.match(name) and not 0 <= v <= 1:
            raise UsageError(f"{flag(name)} must lie in [0, 1], got {v!r}.")


def check_device(device, flag_name: str = "--device") -> None:
    """A device string torch knows and this machine has (CUDA visible for ``cuda``), else one ``UsageError``."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"{flag_name} must be cpu, cuda, cuda:N or mps, got {device!r}.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag_name} {device!r} asks for a GPU, but torch sees no CUDA device here; "
                             "use --device cpu (or leave --device out).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag_name} {device!r}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{flag_name} {device!r} asks for Apple's MPS, which this machine does not have; use --device cpu.")


LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def check_launch_env() -> tuple[int, int]:
    """``(world size, rank)`` from the launcher's variables, or one ``UsageError`` naming a variable set oddly.

    ``accelerate launch`` and ``torchrun`` set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and
    ``MASTER_ADDR``; the same variables left in a shell (or set by hand) would make a run wait
    for ranks that never come, or fail deep inside torch.
    """
    values = {}
    for name in LAUNCH_VARS:
        raw = os.environ.get(name)
        if raw is None:
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise UsageError(f"{name}={raw!r} is not an integer; it is set by a launcher (accelerate launch, "
                             f"torchrun): unset it to run one process.") from None
    world, rank = values.get("WORLD_SIZE", 1), values.get("RANK", 0)
    if world < 1:
        raise UsageError(f"WORLD_SIZE={world} must be >= 1; unset it to run one process.")
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} must lie in 0..WORLD_SIZE-1 (WORLD_SIZE={world}); unset both to run one process.")
    if world > 1 and not os.environ.get("MASTER_ADDR"):
        raise UsageError(f"WORLD_SIZE={world} is set but no launcher set MASTER_ADDR, so the other ranks would never "
                         "come; start the run with accelerate launch (or torchrun), or unset WORLD_SIZE.")
    return world, rank


def recipe_main(config_cls, build: Callable[[Any, str, str | None], Any], argv: Sequence[str] | None = None, *,
                default_model: str | None = None, description: str | None = None, label: str = ""):
    """The command line of a recipe: its config's flags plus ``--model`` and ``--device``.

    ``build(cfg, model_spec, device)`` builds (or loads from the cache) the recipe on top of the
    model spec and returns the model; this prints ``<label> ready: <spec> (<checkpoint>)`` and
    returns it. Runs through ``cli_errors`` (one-line errors, ``--debug``).

        >>> def main(argv=None):
        ...     return recipe_main(DeepConfig, lambda cfg, spec, device: build_on(spec, DeepRecipe(cfg),
        ...                        device=device), argv)
    """

    @cli_errors
    def main(argv):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        cfg, spec, device = parse_recipe_args(config_cls, argv, default_model=default_model, description=description)
        with spec_errors("--model", spec):
            model = build(cfg, spec, device)
        print(f"{label + ' ' if label else ''}ready: {model.spec}  ({model.provenance.get('source')})")
        return model

    return main(argv)
