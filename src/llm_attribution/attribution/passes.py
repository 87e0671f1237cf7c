"""Training gradients as repeatable passes over chunks: the one form every gradient method reads.

A :class:`TrainPasses` is re-iterable: each iteration is one pass over the training gradients in row
order, chunk by chunk. The chunks are the feature store's shards when scoring is streamed, or row slices
of blocks held in memory (:meth:`TrainPasses.from_blocks`; then a pass costs no I/O). The test gradients
stay in memory. A gradient method maps them with a few passes
(:meth:`~llm_attribution.attribution.base.InnerProductMethod.transform_test`), then one more pass scores
every training chunk against the mapped test gradients. Passes before the scoring pass, and what each
built-in method holds besides one chunk and the ``m`` test gradients (``d``: a block's width):

=================  =========================================  =============================================
method             passes                                     memory per block
=================  =========================================  =============================================
hessian-free       statistics                                 --
datainf            statistics, Sherman-Morrison sum           ``m x d`` accumulator
exact              statistics, then ``G^T G`` (``d x d``),    ``d x d``; Woodbury: ``n x d`` rows and
                   or the rows when Woodbury applies          ``n x n`` (only while ``n < d``)
lissa, -study      statistics, then ``F`` (``d x d``) when    ``d x d``, else ``m x d`` iterates
                   streamed and ``d <= chunk_size``, else     (lissa's mini-batches: rows gathered)
                   one per step
eshampoo           statistics, factors, eigenvalues           ``o x o``, ``i x i`` and ``o x i``
kfac               statistics (token-level factors given)     ``o x o``, ``i x i`` and ``o x i``
ekfac              statistics, eigenvalues                    ``o x o``, ``i x i`` and ``o x i``
grad-cosine        statistics (its row norms too)             --
repsim, bm25       --                                         --
=================  =========================================  =============================================

The statistics pass (per-block damping, norms, validation) is done once and shared by every method
that scores with the same :class:`TrainPasses`. LiSSA on streamed blocks wider than ``chunk_size`` reads
the training gradients once per recursion step (``depth`` passes); projecting gradients
(``--projection-dim``) makes blocks narrow enough for its one-pass form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import DataError
from ..core.progress import progress
from .grouping import stack_rows

Blocks = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class BlockStatistics:
    """What one pass learns about a block's training gradients."""

    rows: int
    width: int
    sum_squares: float  # float64 sum of every squared entry
    max_row_squares: float  # the largest squared row norm

    @property
    def nonzero(self) -> bool:
        """Whether any training gradient of the block is non-zero (otherwise it contributes nothing)."""
        return self.sum_squares > 0.0

    def damping(self, damping_scale: float) -> float:
        """The study's ``lambda = damping_scale * mean_i(mean_j g_ij^2)`` over the block's training
        gradients. The official code divides the mean by ``lambda_const_param=10``; ``damping_scale=0.1``
        is the same. Squares are summed in float64 so that large blocks do not lose precision."""
        return damping_scale * self.sum_squares / (self.rows * self.width)

    @classmethod
    def of(cls, block: torch.Tensor) -> BlockStatistics:
        """The statistics of one block held in memory (as one pass over it would find them)."""
        squares = row_norms_squared(block).to(torch.float64)
        rows = int(block.shape[0])
        top = float(squares.max()) if rows else 0.0
        return cls(rows, block_width("block", block), float(squares.sum()), top)


class TrainPasses:
    """Training gradients as repeatable passes over chunks; the statistics pass is made once and kept.

    ``passes()`` must start a new pass over the same rows in the same order at every call.
    """

    def __init__(
        self,
        passes: Callable[[], Iterable[Blocks]],
        chunks: int | None = None,
        desc: str | None = "train chunks",
        held: Blocks | None = None,
    ) -> None:
        self._passes = passes
        self._chunks = chunks
        self._desc = desc
        self._statistics: dict[str, BlockStatistics] | None = None
        self._row_squares: dict[str, torch.Tensor] = {}  # held blocks only: their n squared row norms
        self._row_norms: torch.Tensor | None = None  # float64 [n]: each row's norm over every block
        self._stacked: dict[tuple[Any, ...], list[tuple[slice, list[StackedChunk]]]] = {}
        self._dtype = torch.float32
        self.held = held  # the blocks themselves when they are in memory (a pass then costs no I/O)
        self.held_chunk_size = 1  # the rows per chunk of held blocks (set by from_blocks)
        self.count = 0  # passes started, for cost accounting

    @classmethod
    def from_blocks(cls, blocks: Blocks, chunk_size: int, desc: str | None = None) -> TrainPasses:
        """Row slices of blocks held in memory: the in-memory path is this, with no progress bar."""
        rows = next(iter(blocks.values())).shape[0] if blocks else 0
        starts = range(0, rows, chunk_size)
        passes = cls(
            lambda: ({k: v[s : s + chunk_size] for k, v in blocks.items()} for s in starts),
            len(starts),
            desc,
            held=blocks,
        )
        passes.held_chunk_size = chunk_size
        return passes

    def mapped(self, rows: Callable[[Blocks], Blocks]) -> TrainPasses:
        """The same passes with every chunk read through ``rows`` (a map of each row on its own); blocks
        held in memory are mapped once."""
        if self.held is not None:
            return TrainPasses.from_blocks(rows(self.held), self.held_chunk_size, self._desc)
        return TrainPasses(lambda: (rows(chunk) for chunk in self._passes()), self._chunks, self._desc)

    def __iter__(self) -> Iterator[Blocks]:
        self.count += 1
        if self._desc is None:
            return iter(self._passes())
        return iter(progress(self._passes(), desc=self._desc, total=self._chunks))

    def stacked(
        self, groups: Sequence[Sequence[str]], dtype: torch.dtype, device: torch.device
    ) -> Iterator[tuple[slice, list[StackedChunk]]]:
        """One pass: each chunk's training rows (columns of the score matrix) and one :class:`StackedChunk`
        per group of equal-width blocks, the rows in ``dtype`` (the copy that rounding to bf16 needs
        anyway; a view when nothing is converted). Held blocks are stacked once and kept, so a method's
        own products and the scoring pass share the copy."""
        key = (tuple(map(tuple, groups)), dtype, device)
        if key in self._stacked:
            self.count += 1
            yield from self._stacked[key]
            return
        kept: list[tuple[slice, list[StackedChunk]]] = []
        start = 0
        for chunk in self:
            columns = slice(start, start + next(iter(chunk.values())).shape[0])
            stacked = [
                StackedChunk(columns, chunk, tuple(group), dtype, device, self._row_squares)
                for group in groups
            ]
            if self.held is not None:
                kept.append((columns, stacked))
            yield columns, stacked
            start = columns.stop
        if self.held is not None:
            self._stacked[key] = kept

    def statistics(self) -> dict[str, BlockStatistics]:
        """Per block (in the chunks' block order): rows, width, sum of squares, largest row norm."""
        if self._statistics is None:
            self._statistics = self._compute_statistics()
        return self._statistics

    @property
    def rows(self) -> int:
        return next(iter(self.statistics().values())).rows

    @property
    def dtype(self) -> torch.dtype:
        """The promoted dtype of the training gradients (at least float32)."""
        self.statistics()
        return self._dtype

    def _compute_statistics(self) -> dict[str, BlockStatistics]:
        if self.held is not None:
            return self._held_statistics(self.held)
        rows = 0
        widths: dict[str, int] = {}
        sums: dict[str, float] = {}
        maxima: dict[str, float] = {}
        totals: list[torch.Tensor] = []  # per chunk, each row's squared norm over every block
        for chunk in self:
            if not widths:
                if not chunk:
                    raise DataError("no gradient blocks were given")
                widths = {name: block_width(name, block) for name, block in chunk.items()}
                sums = dict.fromkeys(widths, 0.0)
                maxima = dict.fromkeys(widths, 0.0)
            if set(chunk) != set(widths):
                raise DataError("training gradient chunks cover different blocks")
            size = next(iter(chunk.values())).shape[0]
            chunk_total = torch.zeros(size, dtype=torch.float64)
            for name, block in chunk.items():
                if block_width(name, block) != widths[name] or block.shape[0] != size:
                    raise DataError(f"block {name}: training chunks of inconsistent shapes")
                self._dtype = torch.promote_types(self._dtype, block.dtype)
                if size:
                    squares = row_norms_squared(block)
                    chunk_total += squares.to(device="cpu", dtype=torch.float64)
                    total, top = _square_sum_and_max(squares)
                    sums[name] += total
                    maxima[name] = max(maxima[name], top)
            totals.append(chunk_total)
            rows += size
        if rows <= 0:
            raise DataError("no training examples (gradient blocks have 0 rows)")
        self._row_norms = torch.cat(totals).sqrt()
        return {name: BlockStatistics(rows, widths[name], sums[name], maxima[name]) for name in widths}

    def _held_statistics(self, blocks: Blocks) -> dict[str, BlockStatistics]:
        """The statistics of blocks held in memory, each read once as a whole (no pass machinery: the
        in-memory path computes them once per group of blocks), their row norms kept."""
        if not blocks:
            raise DataError("no gradient blocks were given")
        rows = next(iter(blocks.values())).shape[0]
        if rows <= 0:
            raise DataError("no training examples (gradient blocks have 0 rows)")
        statistics = {}
        for name, block in blocks.items():
            width = block_width(name, block)
            if block.shape[0] != rows:
                raise DataError(f"block {name}: {block.shape[0]} training rows, other blocks have {rows}")
            self._dtype = torch.promote_types(self._dtype, block.dtype)
            squares = self._row_squares[name] = row_norms_squared(block)
            statistics[name] = BlockStatistics(rows, width, *_square_sum_and_max(squares))
        self._row_norms = full_row_norms(blocks)
        return statistics

    def row_norms(self) -> torch.Tensor:
        """Float64 ``[n]`` (on the CPU): each training row's norm over every block (statistics pass)."""
        self.statistics()
        assert self._row_norms is not None
        return self._row_norms

    def check_test(self, test: Blocks) -> list[str]:
        """Check that ``test`` has the training blocks, of equal widths; the block names in order."""
        statistics = self.statistics()
        require_same_blocks(statistics, test)
        sizes = {block.shape[0] for block in test.values()}
        for name, stats in statistics.items():
            if block_width(name, test[name]) != stats.width:
                raise DataError(
                    f"block {name}: train width {stats.width} != test width {test[name].shape[1]}"
                )
        if len(sizes) > 1:
            raise DataError("test gradient blocks have different numbers of rows")
        return list(statistics)

    def compute_dtype(self, test: Blocks) -> torch.dtype:
        """Float32, or float64 when any training or test block is float64 (as the in-memory path)."""
        dtype = self.dtype
        for block in test.values():
            dtype = torch.promote_types(dtype, block.dtype)
        return dtype


def _square_sum_and_max(squares: torch.Tensor) -> tuple[float, float]:
    """The float64 sum (as block_damping) and the largest of a block's squared row norms, read at once."""
    wide = squares.to(torch.float64)
    total, top = torch.stack((wide.sum(), wide.max())).tolist()
    return float(total), float(top)


class StackedChunk:
    """One chunk of a group of equal-width blocks, stacked ``[B, c, d]`` (:meth:`TrainPasses.stacked`)."""

    def __init__(
        self,
        columns: slice,
        chunk: Blocks,
        names: tuple[str, ...],
        dtype: torch.dtype,
        device: torch.device,
        kept_squares: Mapping[str, torch.Tensor],
    ) -> None:
        self.names = names
        self.rows = stack_rows([chunk[name] for name in names], dtype, device)
        # No reference back to the passes: the passes keep their held chunks, and a cycle would leave
        # every group's stacked copy to the cyclic collector instead of freeing it when scored.
        self._chunk, self._device, self._kept = chunk, device, kept_squares
        self.columns = columns

    @functools.cached_property
    def squares(self) -> torch.Tensor:
        """``[B, c]`` squared row norms, in the blocks' own dtype (not the stacked copy's)."""
        return torch.stack(
            [
                (
                    self._kept[name][self.columns]
                    if name in self._kept
                    else row_norms_squared(self._chunk[name])
                ).to(self._device)
                for name in self.names
            ]
        )


def require_same_blocks(train: Iterable[str], test: Iterable[str]) -> None:
    """Raise :class:`DataError` unless the training and test gradients cover the same blocks."""
    train_names, test_names = set(train), set(test)
    if train_names != test_names:
        only_train, only_test = sorted(train_names - test_names), sorted(test_names - train_names)
        raise DataError(
            f"train and test gradients cover different blocks (train only: {only_train[:3]}, "
            f"test only: {only_test[:3]})"
        )


def gather_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """A block's training rows from its chunks, in order: the one chunk itself when there is one (blocks
    held in memory are not copied), else their concatenation."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def full_row_norms(blocks: Blocks) -> torch.Tensor:
    """Float64 ``[n]`` (on the CPU): each row's norm over all of ``blocks`` together."""
    total = sum(row_norms_squared(block).to(device="cpu", dtype=torch.float64) for block in blocks.values())
    return torch.as_tensor(total, dtype=torch.float64).sqrt()


def row_norms_squared(block: torch.Tensor) -> torch.Tensor:
    """``[n]`` squared norms of a block's rows (one fast read; each row summed in the block's dtype)."""
    return torch.linalg.vector_norm(block, dim=1).square()


def block_width(name: str, block: torch.Tensor) -> int:
    """The width of a block's ``[examples, dim]`` floating matrix (a :class:`DataError` otherwise)."""
    if block.ndim != 2 or not block.is_floating_point():
        raise DataError(f"block {name}: expected a floating [examples, dim] matrix, got {tuple(block.shape)}")
    return int(block.shape[1])


class FisherProducts:
    """``F h = (1/n) G^T G h`` for several blocks at once.

    Streamed blocks no wider than ``dense_width`` get their ``d x d`` Fisher accumulated (float64) in one
    pass, so each product is a small matrix product (``d x d`` is then no more than one chunk of
    ``d``-wide rows) instead of a pass over the store; wider blocks, and blocks held in memory (where a
    pass is free and ``(h G^T) G`` is what the products were computed as before streaming existed), are
    multiplied by one pass over the training chunks per call.
    """

    def __init__(
        self, train: TrainPasses, names: list[str], dense_width: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.train = train
        statistics = train.statistics()
        self.rows = train.rows
        self.dense = {
            name: torch.zeros(
                statistics[name].width, statistics[name].width, dtype=torch.float64, device=device
            )
            for name in names
            if statistics[name].width <= dense_width and train.held is None
        }
        if self.dense:
            for chunk in train:
                for name, fisher in self.dense.items():
                    g = chunk[name].to(device=device, dtype=torch.float64)
                    fisher.addmm_(g.T, g)
        # Summed in float64, applied in the compute dtype (as the in-memory products are computed).
        self.dense = {name: (fisher / self.rows).to(dtype) for name, fisher in self.dense.items()}

    def __call__(self, h: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{block: F_block h_block}`` for every block of ``h`` (rows of ``h`` are vectors)."""
        out = {name: v @ self.dense[name] for name, v in h.items() if name in self.dense}
        streamed = {name: v for name, v in h.items() if name not in self.dense}
        if streamed:
            sums = {name: torch.zeros_like(v) for name, v in streamed.items()}
            for chunk in self.train:
                for name, v in streamed.items():
                    g = chunk[name].to(device=v.device, dtype=v.dtype)
                    sums[name].addmm_(v @ g.T, g)
            out.update({name: total / self.rows for name, total in sums.items()})
        return {name: out[name] for name in h}
