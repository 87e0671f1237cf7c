"""Training gradients streamed chunk by chunk, so that scoring memory does not grow with n_train.

A :class:`TrainPasses` is re-iterable: each iteration is one pass over the training gradients in row
order, chunk by chunk (the feature store's shards, or row slices of blocks in memory). The test gradients
stay in memory. A gradient method maps them with a few passes
(:meth:`~llm_attribution.attribution.base.InnerProductMethod.transform_test_streamed`), then one more pass
scores every training chunk against the mapped test gradients. Passes before the scoring pass, and what
each built-in method holds besides one chunk and the ``m`` test gradients (``d``: a block's width):

=================  =========================================  =============================================
method             passes                                     memory per block
=================  =========================================  =============================================
hessian-free       statistics                                 --
datainf            statistics, Sherman-Morrison sum           ``m x d`` accumulator
exact              statistics, then ``G^T G`` (``d x d``),    ``d x d``; Woodbury: ``n x d`` rows and
                   or the rows when Woodbury applies          ``n x n`` (only while ``n < d``)
lissa, -study      statistics, then ``F`` (``d x d``) when    ``d x d``, else ``m x d`` iterates
                   ``d <= chunk_size``, else one per step     (lissa's mini-batches: rows gathered)
repsim             --                                         --
=================  =========================================  =============================================

The statistics pass (per-block damping, norms, validation) is done once and shared by every method
that scores with the same :class:`TrainPasses`. LiSSA on blocks wider than ``chunk_size`` reads the
training gradients once per recursion step (``depth`` passes); projecting gradients
(``--projection-dim``) makes blocks narrow enough for its one-pass form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..core.errors import DataError
from ..core.progress import progress

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
        """The study's ``lambda = damping_scale * mean squared entry`` (as ``block_damping``)."""
        return damping_scale * self.sum_squares / (self.rows * self.width)


class TrainPasses:
    """Training gradients as repeatable passes over chunks; the statistics pass is made once and kept.

    ``passes()`` must start a new pass over the same rows in the same order at every call.
    """

    def __init__(
        self, passes: Callable[[], Iterable[Blocks]], chunks: int | None = None, desc: str = "train chunks"
    ) -> None:
        self._passes = passes
        self._chunks = chunks
        self._desc = desc
        self._statistics: dict[str, BlockStatistics] | None = None
        self._dtype = torch.float32
        self.count = 0  # passes started, for cost accounting

    @classmethod
    def from_blocks(cls, blocks: Blocks, chunk_size: int) -> TrainPasses:
        """Row slices of blocks held in memory (for the API and for checks against the in-memory path)."""
        rows = next(iter(blocks.values())).shape[0] if blocks else 0
        starts = range(0, rows, chunk_size)
        return cls(
            lambda: ({k: v[s : s + chunk_size] for k, v in blocks.items()} for s in starts), len(starts)
        )

    def __iter__(self) -> Iterator[Blocks]:
        self.count += 1
        return iter(progress(self._passes(), desc=self._desc, total=self._chunks))

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
        rows = 0
        widths: dict[str, int] = {}
        sums: dict[str, float] = {}
        maxima: dict[str, float] = {}
        for chunk in self:
            if not widths:
                if not chunk:
                    raise DataError("no gradient blocks were given")
                widths = {name: _width(name, block) for name, block in chunk.items()}
                sums = dict.fromkeys(widths, 0.0)
                maxima = dict.fromkeys(widths, 0.0)
            if set(chunk) != set(widths):
                raise DataError("training gradient chunks cover different blocks")
            size = next(iter(chunk.values())).shape[0]
            for name, block in chunk.items():
                if _width(name, block) != widths[name] or block.shape[0] != size:
                    raise DataError(f"block {name}: training chunks of inconsistent shapes")
                self._dtype = torch.promote_types(self._dtype, block.dtype)
                if size:
                    squares = row_norms_squared(block).to(torch.float64)  # as block_damping
                    sums[name] += float(squares.sum())
                    maxima[name] = max(maxima[name], float(squares.max()))
            rows += size
        if rows <= 0:
            raise DataError("no training examples (gradient blocks have 0 rows)")
        return {name: BlockStatistics(rows, widths[name], sums[name], maxima[name]) for name in widths}

    def check_test(self, test: Blocks) -> list[str]:
        """Check that ``test`` has the training blocks, of equal widths; the block names in order."""
        statistics = self.statistics()
        if set(statistics) != set(test):
            only_train = sorted(set(statistics) - set(test))
            only_test = sorted(set(test) - set(statistics))
            raise DataError(
                f"train and test gradients cover different blocks (train only: {only_train[:3]}, "
                f"test only: {only_test[:3]})"
            )
        sizes = {block.shape[0] for block in test.values()}
        for name, stats in statistics.items():
            if _width(name, test[name]) != stats.width:
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


def row_norms_squared(block: torch.Tensor) -> torch.Tensor:
    """``[n]`` squared norms of a block's rows (one fast read; each row summed in the block's dtype)."""
    return torch.linalg.vector_norm(block, dim=1).square()


def _width(name: str, block: torch.Tensor) -> int:
    if block.ndim != 2 or not block.is_floating_point():
        raise DataError(f"block {name}: expected a floating [examples, dim] matrix, got {tuple(block.shape)}")
    return int(block.shape[1])


class FisherProducts:
    """``F h = (1/n) G^T G h`` for several blocks at once.

    Blocks no wider than ``dense_width`` get their ``d x d`` Fisher accumulated (float64) in one pass, so
    each product is a small matrix product (``d x d`` is then no more than one chunk of ``d``-wide rows);
    wider blocks are multiplied by one pass over the training chunks per call.
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
            if statistics[name].width <= dense_width
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
