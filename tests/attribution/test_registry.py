"""The method registry: names, kinds, options, and errors a user can act on."""

from __future__ import annotations

import dataclasses

import pytest

from llm_attribution.attribution.base import InnerProductMethod, RepresentationMethod
from llm_attribution.attribution.registry import available_methods, get_method, method_class, register
from llm_attribution.core.errors import ConfigError

ALL = ("datainf", "exact", "hessian-free", "lissa", "lissa-study", "repsim")


def test_every_method_is_registered_with_its_kind() -> None:
    assert set(ALL) <= set(available_methods())
    for name in ALL:
        method = get_method(name)
        assert method.name == name
        expected = RepresentationMethod if name == "repsim" else InnerProductMethod
        assert isinstance(method, expected)
        assert method.kind == ("representation" if name == "repsim" else "gradient")
        assert dataclasses.is_dataclass(method.settings)
        with pytest.raises(dataclasses.FrozenInstanceError):
            method.settings.chunk_size = 2  # type: ignore[misc]


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown attribution method 'influence'.*datainf.*hessian-free"):
        get_method("influence")
    with pytest.raises(ConfigError):
        method_class("nope")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("datainf", {"depth": 3}, "no option"),
        ("datainf", {"damping_scale": 0.0}, "damping-scale"),
        ("hessian-free", {"chunk_size": 0}, "chunk-size"),
        ("exact", {"solver": "qr"}, "solver"),
        ("lissa", {"scale": -1.0}, "scale"),
        ("lissa", {"depth": 0}, "depth"),
        ("lissa", {"batch_size": 0}, "batch-size"),
        ("lissa-study", {"depth": 2.5}, "depth"),
    ],
)
def test_bad_options_are_config_errors(name: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_method(name, **options)


def test_duplicate_names_are_refused() -> None:
    taken = method_class("datainf")

    class Impostor(InnerProductMethod):
        name = "datainf"

        def transform_test(self, train, test):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    with pytest.raises(TypeError, match="datainf"):
        register(Impostor)
    assert method_class("datainf") is taken


def test_every_method_says_what_it_computes_in_the_help() -> None:
    from llm_attribution.attribution.registry import available_methods, method_class
    from llm_attribution.cli.main import build_parser

    assert all(method_class(name).summary for name in available_methods())
    run_help = next(
        action.choices["run"].format_help()
        for action in build_parser()._actions
        if getattr(action, "choices", None) and "run" in action.choices
    )
    flat = " ".join(run_help.split())
    assert "exact: the exact damped inverse of the block-diagonal, per-example empirical Fisher" in flat
    assert "not a Hessian" in flat
