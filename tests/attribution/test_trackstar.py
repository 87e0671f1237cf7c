"""TrackStar's optional projection against the brute-force one: the explicit Kronecker product of each
block's factors applied to the second-moment-normalised gradient, then the cosine; and the projected
scores approach the unprojected ones as the dimension grows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_attribution.attribution.base import InnerProductMethod
from llm_attribution.attribution.passes import TrainPasses
from llm_attribution.attribution.registry import get_method
from llm_attribution.core.errors import ConfigError
from llm_attribution.features.projection import KroneckerProjector
from llm_attribution.models.moments import OptimizerMoments

SHAPES = {"a": (4, 24), "b": (16, 4), "c": (3, 5)}  # a rank side on either axis, and a small block


def _setup(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], OptimizerMoments]:
    gen = torch.Generator().manual_seed(seed)
    widths = {name: o * i for name, (o, i) in SHAPES.items()}
    train = {k: torch.randn(40, w, generator=gen, dtype=torch.float64) for k, w in widths.items()}
    test = {k: torch.randn(5, w, generator=gen, dtype=torch.float64) for k, w in widths.items()}
    second = {
        k: torch.rand(w, generator=gen, dtype=torch.float64).float() * 2 + 0.1 for k, w in widths.items()
    }
    first = {k: torch.zeros(w) for k, w in widths.items()}
    moments = OptimizerMoments(first, second, {k: 7 for k in widths}, 0.9, 0.999, 1e-8)
    return train, test, moments


def _trackstar(moments: OptimizerMoments, **options: object) -> InnerProductMethod:
    method = get_method("trackstar", **options)
    assert isinstance(method, InnerProductMethod)
    method.bind_moments(moments).bind_shapes(SHAPES)
    return method


def _brute_force(train, test, moments, dim: int | None, seed: int = 0) -> torch.Tensor:  # type: ignore[no-untyped-def]
    projector = KroneckerProjector(dim, seed) if dim is not None else None
    sides = []
    for rows in (test, train):
        parts = []
        for name, (o, i) in SHAPES.items():
            scale = (moments.second[name].double() / (1 - moments.beta2**7)).sqrt() + moments.eps
            g = rows[name] / scale
            if projector is not None:
                block = projector.block(name, o, i)
                p_out = torch.eye(o) if block.out is None else block.out
                p_in = torch.eye(i) if block.inp is None else block.inp
                g = g @ torch.kron(p_out, p_in).double().T  # vec(P_out G P_in^T) for row-major vec
            parts.append(g)
        sides.append(F.normalize(torch.cat(parts, dim=1), dim=1))
    return sides[0] @ sides[1].T


@pytest.mark.parametrize("dim", [None, 8, 32, 500])
def test_projected_scores_equal_the_explicit_projection(dim: int | None) -> None:
    train, test, moments = _setup(0)
    method = _trackstar(moments, projection_dim=dim)
    got = method.score(train, test).double()
    torch.testing.assert_close(got, _brute_force(train, test, moments, dim), rtol=1e-5, atol=1e-6)
    streamed = torch.cat(list(method.score_streamed(TrainPasses.from_blocks(train, 16), test)), dim=1)
    torch.testing.assert_close(streamed.double(), got, rtol=1e-5, atol=1e-6)


def test_a_dimension_covering_every_block_is_the_unprojected_score() -> None:
    train, test, moments = _setup(1)
    whole = _trackstar(moments).score(train, test)
    torch.testing.assert_close(_trackstar(moments, projection_dim=96).score(train, test), whole)


def test_projection_error_shrinks_as_the_dimension_grows() -> None:
    train, test, moments = _setup(2)
    whole = _trackstar(moments).score(train, test).double()
    errors = []
    for dim in (4, 16, 64):
        # averaged over projection seeds, so one lucky draw cannot order the errors
        err = [
            float(
                (_trackstar(moments, projection_dim=dim, projection_seed=s).score(train, test) - whole).norm()
            )
            for s in range(6)
        ]
        errors.append(sum(err) / len(err))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0]


def test_a_bad_projection_dimension_is_refused() -> None:
    with pytest.raises(ConfigError, match="projection_dim"):
        get_method("trackstar", projection_dim=0)
