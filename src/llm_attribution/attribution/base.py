"""The attribution interface: methods as small classes behind one ``score``, registered by name.

A gradient method turns per-example gradients into an ``n_test x n_train`` score matrix in which a
HIGHER score means "this training example supports this test output more". Gradients arrive as
:data:`GradientBlocks`, one ``[n, d_block]`` matrix per LoRA matrix (rows = examples), because every
method in the study works block by block (DataInf and the exact inverse are per-matrix approximations).

Most influence methods differ only in what they do to the test gradients before an inner product with
the training gradients (dattri's inner-product attributor): :class:`InnerProductMethod` holds that
shared loop, so a method is a :meth:`InnerProductMethod.transform_test` and a settings dataclass.
RepSim is not a gradient method; it implements :class:`RepresentationMethod` instead, and every method
class says which features it needs through ``kind``.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from ..core.errors import ConfigError, DataError
from ..core.progress import progress
from ..core.settings import option, require_positive
from .grouping import stack_rows, width_groups
from .passes import TrainPasses, row_norms_squared

logger = logging.getLogger(__name__)

GradientBlocks = Mapping[str, torch.Tensor]
"""Block name (one LoRA matrix) -> ``[n_examples, d_block]`` per-example gradients."""

GRADIENT = "gradient"
REPRESENTATION = "representation"

# Modules that register the built-in methods; imported on the first registry lookup.
_BUILTIN_MODULES = ("hessian_free", "datainf", "exact", "ekfac", "lissa", "repsim")


PRODUCT_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MethodSettings:
    """Settings every method shares: how many rows one matrix product handles at a time, and in what
    precision the products with the training gradients run."""

    chunk_size: int = option(
        1024,
        "rows (test or train examples) per matrix product; bounds peak memory to ~chunk^2 + chunk*d "
        "(streamed LiSSA keeps a block's d x d Fisher when d <= chunk, else reads the store every step)",
    )
    product_dtype: str = option(
        "float32",
        "precision of the final products of (transformed) test gradients with training gradients, and of "
        "DataInf's own products: float32, or bfloat16 (inputs rounded to bf16, blocks of equal width "
        "batched, each block's products summed in float32; pays off where bf16 matrix units do: CPUs with "
        "AMX, GPUs; scores good to about 3 digits, so near-ties may swap)",
        choices=tuple(PRODUCT_DTYPES),
    )

    def __post_init__(self) -> None:
        require_positive("chunk_size", self.chunk_size)
        if not isinstance(self.chunk_size, int):
            raise ConfigError(f"--chunk-size must be an integer, got {self.chunk_size!r}")
        if self.product_dtype not in PRODUCT_DTYPES:
            raise ConfigError(
                f"product_dtype must be one of {', '.join(PRODUCT_DTYPES)}, got {self.product_dtype!r}"
            )


@dataclass(frozen=True)
class DampedSettings(MethodSettings):
    """Settings of a method that damps the Fisher: the study's per-block damping
    ``lambda = damping_scale * mean squared training gradient``."""

    damping_scale: float = option(
        0.1, "damping lambda = damping_scale * mean squared training gradient, per block"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("damping_scale", self.damping_scale)


class Method(ABC):
    """What every registered method has: a name, the features it needs, and validated settings."""

    name: ClassVar[str]
    kind: ClassVar[str]
    Settings: ClassVar[type[MethodSettings]] = MethodSettings

    def __init__(self, settings: MethodSettings | None = None) -> None:
        if settings is None:
            settings = self.Settings()
        if not isinstance(settings, self.Settings):
            raise ConfigError(f"{self.name} expects {self.Settings.__name__}, got {type(settings).__name__}")
        self.settings = settings
        self.block_shapes: dict[str, tuple[int, int]] = {}

    def bind_shapes(self, shapes: Mapping[str, tuple[int, int]]) -> Method:
        """Tell the method each gradient block's matrix shape ``(o, i)`` (rows are ``o x i`` matrices
        flattened row-major), for methods that use it (``ekfac-example``); returns the method itself."""
        self.block_shapes = {name: (int(o), int(i)) for name, (o, i) in shapes.items()}
        return self

    @property
    def low_precision(self) -> torch.dtype | None:
        """The dtype products run in when it is below the inputs' (bf16), else None (the inputs' own)."""
        return PRODUCT_DTYPES[self.settings.product_dtype]

    def product(self, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``a @ b^T`` (matrices, or batches of them: ``[B, m, d]`` and ``[B, n, d]`` give ``[B, m, n]``)
        computed in the settings' ``product_dtype``, returned in ``dtype`` (default: ``a``'s)."""
        low = self.low_precision
        out = a @ b.mT if low is None else a.to(low) @ b.to(low).mT
        return out.to(a.dtype if dtype is None else dtype)

    def add_product(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
        """``out += alpha * a @ b^T`` in place (matrices or batches), computed in ``product_dtype``."""
        if self.low_precision is None and a.dtype == b.dtype == out.dtype:
            if out.ndim == 2:
                out.addmm_(a, b.T, alpha=alpha)
            else:
                out.baddbmm_(a, b.mT, alpha=alpha)
        else:
            out.add_(self.product(a, b, dtype=out.dtype), alpha=alpha)

    def chunks(self, n: int) -> Iterator[slice]:
        """Consecutive row slices of at most ``chunk_size`` rows covering ``range(n)``."""
        step = self.settings.chunk_size
        for start in range(0, n, step):
            yield slice(start, min(start + step, n))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"


class AttributionMethod(Method):
    """A gradient-based method: per-example gradients in, score matrix out."""

    kind: ClassVar[str] = GRADIENT

    @abstractmethod
    def score(self, train: GradientBlocks, test: GradientBlocks) -> torch.Tensor:
        """Float32 ``[n_test, n_train]`` scores; HIGHER = the training example supports the test more."""


class InnerProductMethod(AttributionMethod):
    """Score = sum over blocks of ``transform_test(block) . g_train``, in chunks of test rows.

    Blocks whose training gradients are all zero contribute nothing (every inner product with them is
    zero) and are skipped, which also keeps damping ``0`` from dividing by zero.
    """

    @abstractmethod
    def transform_test(
        self, block_name: str, train_block: torch.Tensor, test_block: torch.Tensor
    ) -> torch.Tensor:
        """The test gradients of one block ``[m, d]`` mapped to the vectors dotted with ``train_block`` rows.

        Both inputs share one floating dtype (at least float32); the result has the same shape and dtype.
        Implementations chunk over rows themselves, so per-block work (a factorisation) is done once.
        """

    def transform_test_group(self, group: BlockGroup) -> torch.Tensor:
        """:meth:`transform_test` of a group of blocks of equal width: ``[B, m, d]`` in the compute dtype.

        This default transforms one block at a time; methods whose own products batch over blocks
        override it and use ``group.stacked_train``.
        """
        return torch.stack(
            [self.transform_test(name, group.train[name], group.test[name]) for name in group.names]
        )

    def block_groups(self, train: GradientBlocks, names: Sequence[str]) -> list[list[str]]:
        """The blocks scored together (:func:`~.grouping.width_groups`): equal widths batched when the
        products run in a lower precision (the stacking copy is then the rounding), else one by one."""
        rows = train[names[0]].shape[0]
        widths = {name: train[name].shape[1] for name in names}
        return width_groups(widths, rows, self.settings.chunk_size, batched=self.low_precision is not None)

    def score(self, train: GradientBlocks, test: GradientBlocks) -> torch.Tensor:
        """Float32 ``[n_test, n_train]`` scores; HIGHER = the training example supports the test more."""
        return self.accumulate(train, test)

    def accumulate(
        self,
        train: GradientBlocks,
        test: GradientBlocks,
        partial: PartialScores | None = None,
        after_block: Callable[[PartialScores], None] | None = None,
    ) -> torch.Tensor:
        """:meth:`score`, group of blocks by group from ``partial`` (the sum over the blocks of the first
        groups, as ``after_block`` was given it), so that scoring interrupted after any group resumes there
        with identical results. A partial sum that does not end on a group boundary is not used."""
        names, n_train, n_test = check_blocks(train, test)
        dtype = compute_dtype(train, test)
        device = train[names[0]].device
        stack_dtype = self.low_precision or dtype
        groups = self.block_groups(train, names)
        ends = list(itertools.accumulate(len(group) for group in groups))
        out = torch.zeros(n_test, n_train, dtype=dtype, device=device)
        first = 0
        if (
            partial is not None
            and partial.sum.shape == out.shape
            and partial.sum.dtype == dtype
            and partial.blocks_done in ends
        ):
            out.copy_(partial.sum)
            first = ends.index(partial.blocks_done) + 1
        for index in progress(range(first, len(groups)), desc=self.name, total=len(groups) - first):
            group = BlockGroup.gather(groups[index], train, test, dtype, stack_dtype, device)
            if group is not None:
                self.add_group_product(out, self.transform_test_group(group), group.stacked_train)
            if after_block is not None and index + 1 < len(groups):
                after_block(PartialScores(ends[index], out))
        return out.to(torch.float32)

    def add_group_product(self, out: torch.Tensor, transformed: torch.Tensor, stacked: torch.Tensor) -> None:
        """``out += sum_b transformed_b @ stacked_b^T`` (``[B, m, d]``, ``[B, n, d]``), in chunks of rows
        and, for several blocks, of columns (bounding the ``[B, rows, columns]`` partial products)."""
        if transformed.shape[0] == 1:
            for rows in self.chunks(out.shape[0]):
                self.add_product(out[rows], transformed[0, rows], stacked[0])
            return
        low = transformed.to(stacked.dtype)
        for rows in self.chunks(out.shape[0]):
            for cols in self.chunks(out.shape[1]):
                parts = self.product(low[:, rows], stacked[:, cols])
                out[rows, cols] += parts.sum(dim=0, dtype=out.dtype)

    # ------------------------------------------------------------------ streamed training gradients

    def transform_test_streamed(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """``transform_test`` of every block, with the training gradients read in passes over chunks.

        Blocks whose training gradients are all zero are left out (they score zero). This default gathers
        each block's training rows in memory and calls :meth:`transform_test`; the built-in methods
        override it with passes whose memory does not grow with n_train.
        """
        names, dtype = streamed_blocks(train, test)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for chunk in train:
            for name in names:
                parts[name].append(chunk[name])
        return {
            name: self.transform_test(
                name, torch.cat(parts[name]).to(test[name].device, dtype), test[name].to(dtype=dtype)
            )
            for name in names
        }

    def score_chunk(
        self, transformed: GradientBlocks, chunk: GradientBlocks, n_test: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Float32 ``[n_test, n_chunk]`` scores of one training chunk against transformed test gradients
        (accumulated in ``dtype``); HIGHER = the training example supports the test output more."""
        n_chunk = next(iter(chunk.values())).shape[0]
        device = next(iter(transformed.values())).device if transformed else torch.device("cpu")
        out = torch.zeros(n_test, n_chunk, dtype=dtype, device=device)
        for name, t in transformed.items():  # the training blocks' order, as in score()
            self.add_product(out, t, chunk[name].to(device=device, dtype=dtype))
        return out.to(torch.float32)

    def score_streamed(self, train: TrainPasses, test: GradientBlocks) -> Iterator[torch.Tensor]:
        """Float32 ``[n_test, n_chunk]`` scores, one training chunk at a time (the columns of :meth:`score`);
        HIGHER = the training example supports the test output more."""
        transformed = self.transform_test_streamed(train, test)
        n_test, dtype = next(iter(test.values())).shape[0], train.compute_dtype(test)
        for chunk in train:
            yield self.score_chunk(transformed, chunk, n_test, dtype)


@dataclass(frozen=True)
class BlockGroup:
    """Blocks of equal width scored together, with what every method may need of them."""

    names: tuple[str, ...]
    train: dict[str, torch.Tensor]  # [n, d] per block, compute dtype
    test: dict[str, torch.Tensor]  # [m, d] per block, compute dtype
    stacked_train: torch.Tensor  # [B, n, d] in the product dtype (a view when nothing is converted)
    row_squares: torch.Tensor  # [B, n] squared norms ||g_i||^2 of the training rows, compute dtype

    @classmethod
    def gather(
        cls,
        names: Sequence[str],
        train: GradientBlocks,
        test: GradientBlocks,
        dtype: torch.dtype,
        stack_dtype: torch.dtype,
        device: torch.device,
    ) -> BlockGroup | None:
        """The group's blocks whose training gradients are not all zero (the others contribute nothing
        to any score, and skipping them keeps damping 0 from dividing by zero); None when none is left."""
        g_train = {name: train[name].to(device=device, dtype=dtype) for name in names}
        squares = {name: row_norms_squared(block) for name, block in g_train.items()}
        live = tuple(name for name in names if bool(squares[name].any()))
        if len(live) < len(names):
            logger.debug("all-zero training gradients skipped: %s", sorted(set(names) - set(live)))
        if not live:
            return None
        return cls(
            names=live,
            train={name: g_train[name] for name in live},
            test={name: test[name].to(device=device, dtype=dtype) for name in live},
            stacked_train=stack_rows([g_train[name] for name in live], stack_dtype, device),
            row_squares=torch.stack([squares[name] for name in live]),
        )

    def damping(self, damping_scale: float) -> torch.Tensor:
        """``[B]``: each block's :func:`block_damping`, from the row norms already computed."""
        n, d = self.stacked_train.shape[1:]
        sums = self.row_squares.to(torch.float64).sum(dim=1)
        return (damping_scale * sums / (n * d)).to(self.row_squares.dtype)


@dataclass(frozen=True)
class PartialScores:
    """The score sum over the first ``blocks_done`` blocks in the order of
    :meth:`InnerProductMethod.block_groups` (in the compute dtype), to resume from."""

    blocks_done: int
    sum: torch.Tensor


class RepresentationMethod(Method):
    """A method on fixed-size representations (hidden states) instead of gradients."""

    kind: ClassVar[str] = REPRESENTATION

    @abstractmethod
    def score_representations(self, train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        """Float32 ``[n_test, n_train]`` scores from ``[n, h]`` / ``[m, h]`` representations;
        HIGHER = the training example supports the test output more."""

    def score_chunk(self, chunk: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        """Float32 ``[n_test, n_chunk]`` scores of one chunk of training representations (streamed
        scoring); HIGHER = more supportive. Valid as is for a method that scores each training example
        on its own, as RepSim does; a method whose scores couple training examples must override it."""
        return self.score_representations(chunk, test)


def check_blocks(train: GradientBlocks, test: GradientBlocks) -> tuple[list[str], int, int]:
    """Check that train and test hold the same 2-D blocks of equal widths; ``(names, n_train, n_test)``."""
    if not train:
        raise DataError("no gradient blocks were given")
    if set(train) != set(test):
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise DataError(
            f"train and test gradients cover different blocks (train only: {only_train[:3]}, "
            f"test only: {only_test[:3]})"
        )
    names = list(train)
    n_train = n_test = -1
    for name in names:
        g_train, g_test = train[name], test[name]
        if g_train.ndim != 2 or g_test.ndim != 2:
            raise DataError(
                f"block {name}: expected [examples, dim] matrices, got {tuple(g_train.shape)} "
                f"and {tuple(g_test.shape)}"
            )
        if g_train.shape[1] != g_test.shape[1]:
            raise DataError(f"block {name}: train width {g_train.shape[1]} != test width {g_test.shape[1]}")
        if not (g_train.is_floating_point() and g_test.is_floating_point()):
            raise DataError(f"block {name}: gradients must be floating point")
        if n_train == -1:
            n_train, n_test = g_train.shape[0], g_test.shape[0]
        elif (g_train.shape[0], g_test.shape[0]) != (n_train, n_test):
            raise DataError(
                f"block {name}: {g_train.shape[0]} train / {g_test.shape[0]} test rows, "
                f"other blocks have {n_train} / {n_test}"
            )
    if n_train == 0:
        raise DataError("no training examples (gradient blocks have 0 rows)")
    return names, n_train, n_test


def streamed_blocks(train: TrainPasses, test: GradientBlocks) -> tuple[list[str], torch.dtype]:
    """The blocks a streamed transform works on (training gradients not all zero, as :meth:`score` skips
    the others) and the compute dtype; checks that train and test blocks match."""
    names = train.check_test(test)
    statistics = train.statistics()
    return [name for name in names if statistics[name].nonzero], train.compute_dtype(test)


def compute_dtype(*blocks: GradientBlocks) -> torch.dtype:
    """Float32, or float64 when any input is float64 (half-precision inputs are promoted)."""
    dtype = torch.float32
    for group in blocks:
        for tensor in group.values():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def block_damping(train_block: torch.Tensor, damping_scale: float) -> float:
    """The study's damping ``lambda = damping_scale * mean_i(mean_j g_ij^2)`` over a block's train gradients.

    The official code divides the mean by ``lambda_const_param=10``; ``damping_scale=0.1`` is the same.
    Rows are summed in float64 so that large blocks do not lose precision.
    """
    total = float(row_norms_squared(train_block).to(torch.float64).sum())
    return damping_scale * total / train_block.numel()


# --------------------------------------------------------------------------------------------- registry

M = TypeVar("M", bound=type[Method])
_REGISTRY: dict[str, type[Method]] = {}


def register(cls: M) -> M:
    """Class decorator: make ``cls`` available to :func:`get_method` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    if getattr(cls, "kind", None) not in (GRADIENT, REPRESENTATION):
        raise TypeError(f"{cls.__name__}.kind must be {GRADIENT!r} or {REPRESENTATION!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise TypeError(f"attribution method name {name!r} is used by {existing.__name__} and {cls.__name__}")
    _REGISTRY[name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{module}")


def available_methods() -> tuple[str, ...]:
    """Names of every registered method, sorted."""
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def method_class(name: str) -> type[Method]:
    """The class registered as ``name`` (to read its ``kind`` or ``Settings`` before building it)."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown attribution method {name!r}; known methods: {known}") from None


def get_method(name: str, **options: Any) -> Method:
    """Build the method registered as ``name`` with settings ``options`` (unknown options -> ConfigError)."""
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Settings)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"method {name!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(sorted(fields))}"
        )
    return cls(cls.Settings(**options))
