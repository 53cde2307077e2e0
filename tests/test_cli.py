from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import pytest

from depthlens.cli import build_parser, parse_config


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """A config.

    Args:
        share: harmful share, e.g. 25 % of the examples (a literal percent sign).
        layers: layers to use.
    """

    share: float = 0.25
    layers: tuple[int, ...] = (1, 2)


def test_help_shows_a_percent_sign_in_a_field_doc():
    text = build_parser(_Cfg).format_help()
    assert "25 % of the examples" in text
    assert parse_config(_Cfg, ["--share", "0.5", "--layers", "3,4"]) == _Cfg(0.5, (3, 4))


def _config_classes():
    out = []
    for pkg in ("analyses", "finetune", "probes"):
        for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
            mod = importlib.import_module(f"{pkg}.{info.name}")
            for obj in vars(mod).values():
                if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == mod.__name__ \
                        and obj.__name__.endswith("Config"):
                    out.append(obj)
    return out


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_command_line_config_formats_its_help(cls):
    """``python -m <module> --help`` must print, not crash (a % in a docstring once broke three)."""
    assert build_parser(cls).format_help().startswith("usage:")


# ------------------------------------------------------------------ strict values, --quick, the error path


@dataclasses.dataclass(frozen=True)
class _Strict:
    """Args:
        seed: an int that may not be none.
        n: an optional count.
        sigma: a float.
        layers: an optional list.
        kinds: a list of names.
    """

    seed: int = 0
    n: int | None = None
    sigma: float = 0.5
    layers: tuple[int, ...] | None = None
    kinds: tuple[str, ...] = ("a", "b")


@pytest.mark.parametrize("argv, words", [
    (["--seed", "none"], ["--seed", "'none' is not allowed"]),
    (["--seed", "1.5"], ["--seed", "expected an integer", "'1.5'"]),
    (["--sigma", "nan"], ["--sigma", "expected a finite number", "'nan'"]),
    (["--sigma", "inf"], ["--sigma", "'inf'"]),
    (["--layers", ","], ["--layers", "no empty item", "','"]),
    (["--layers", "1,,2"], ["--layers", "no empty item"]),
    (["--kinds", ""], ["--kinds", "no empty item", "''"]),
    (["--nope", "1"], ["unrecognized arguments: --nope"]),
])
def test_bad_values_are_one_usage_error_naming_the_flag(argv, words):
    from depthlens.infra.errors import UsageError

    with pytest.raises(UsageError) as err:
        parse_config(_Strict, argv)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_none_only_where_a_field_may_be_none_and_defaults_in_help():
    cfg = parse_config(_Strict, ["--n", "none", "--layers", "none", "--kinds", "x", "--sigma", "1e-3"])
    assert cfg == _Strict(n=None, layers=None, kinds=("x",), sigma=1e-3)
    assert parse_config(_Strict, ["--layers", "3, 1"]).layers == (3, 1)
    text = build_parser(_Strict).format_help()
    assert "(default: a,b)" in text and "(default: 0.5)" in text and "(default: none)" in text


def test_quick_fills_only_the_fields_not_given():
    from analyses.evaluate import EvalConfig

    quick = parse_config(EvalConfig, ["--quick"])
    assert (quick.n_harmful, quick.max_new_tokens) == (32, 32)
    # an explicit flag wins, even when it repeats the default (64 is the default of --max-new-tokens)
    mine = parse_config(EvalConfig, ["--quick", "--max-new-tokens", "64", "--n-harmful", "100"])
    assert (mine.max_new_tokens, mine.n_harmful, mine.n_harmless) == (64, 100, 32)
    # in Python, the fields left at their default count as not given
    api = EvalConfig(quick=True, n_harmful=5)
    assert (api.n_harmful, api.n_harmless, api.max_new_tokens) == (5, 32, 32)
    assert dataclasses.asdict(api)["n_harmless"] == 32 and "explicit" not in dataclasses.asdict(api)


def test_cli_errors_one_line_exit_2_debug_traceback_and_bugs_untouched(capsys):
    from depthlens.cli import cli_errors
    from depthlens.infra.errors import NonFiniteError, UsageError

    @cli_errors
    def main(argv=None):
        kind = argv[0]
        if kind == "usage":
            raise UsageError("--n must be >= 1, got 0.")
        if kind == "nan":
            raise NonFiniteError("metrics.x is NaN")
        raise KeyError("a bug")

    for argv, code, line in ((["usage"], 2, "error: --n must be >= 1, got 0.\n"), (["nan"], 1, "error: metrics.x is NaN\n")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == code and capsys.readouterr().err == line
    with pytest.raises(UsageError):
        main(["usage", "--debug"])
    with pytest.raises(KeyError):
        main(["bug"])


def test_loader_complaints_become_usage_errors_naming_the_flag():
    from depthlens.cli import spec_errors
    from depthlens.infra.errors import UsageError
    from depthlens.models import load_model

    with pytest.raises(UsageError, match="--base 'tiny-llama:nope': Unknown recipe suffix 'nope'"), \
            spec_errors("--base", "tiny-llama:nope"):
        load_model("tiny-llama:nope")
    with pytest.raises(ValueError) as err, spec_errors("--model", "x"):   # a ValueError raised elsewhere stays
        int("x")
    assert not isinstance(err.value, UsageError)


def test_recipe_main_adds_model_and_device_and_the_error_path(capsys):
    from depthlens.cli import recipe_main

    seen = {}

    class _Model:
        spec, provenance = "tiny-llama:toy", {"source": "/cache/toy"}

    def build(cfg, spec, device):
        seen.update(cfg=cfg, spec=spec, device=device)
        return _Model()

    model = recipe_main(_Strict, build, ["--model", "tiny-llama", "--device", "cpu", "--seed", "3"], label="toy")
    assert isinstance(model, _Model) and seen == {"cfg": _Strict(seed=3), "spec": "tiny-llama", "device": "cpu"}
    assert "toy ready: tiny-llama:toy  (/cache/toy)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        recipe_main(_Strict, build, ["--seed", "-"])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: argument --seed: expected an integer")
