"""The attribution interface: a method is a small class with one transform, registered by name
(:mod:`.registry`), and the two schedules every gradient method is scored on (in memory and streamed).

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

import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core.errors import ConfigError, DataError
from ..core.progress import progress
from ..core.settings import option, require_positive
from ..data.schema import Example
from ..features.checkpoints import block_epoch
from ..features.kronecker import KroneckerFactors
from ..features.replay import TrainingReplay
from ..models.moments import OptimizerMoments
from .grouping import width_groups
from .passes import BlockStatistics, TrainPasses, block_width, full_row_norms, require_same_blocks

logger = logging.getLogger(__name__)

GradientBlocks = Mapping[str, torch.Tensor]
"""Block name (one LoRA matrix) -> ``[n_examples, d_block]`` per-example gradients."""

TRAIN, TEST = "train", "test"  # the sides of InnerProductMethod.prepare
GRADIENT = "gradient"
REPRESENTATION = "representation"
TEXT = "text"
REPLAY = "replay"

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
    aliases: ClassVar[tuple[str, ...]] = ()  # old names that still select the method
    kind: ClassVar[str]
    summary: ClassVar[str] = ""  # what the method computes, in one line, for --help and the docs
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    # whether scoring needs the training split's token-level Kronecker factors (collected with the features)
    needs_kronecker: ClassVar[bool] = False
    # whether scoring needs the gradients of every saved checkpoint, stacked (features/checkpoints.py)
    needs_checkpoints: ClassVar[bool] = False
    # whether scoring needs AdamW's moment estimates at the checkpoint(s) (models/moments.py)
    needs_moments: ClassVar[bool] = False
    # whether scoring reads the examples' class labels (KNN-Shapley); its proxy metrics then are not
    # comparable with label-blind methods'
    needs_labels: ClassVar[bool] = False

    def __init__(self, settings: MethodSettings | None = None) -> None:
        if settings is None:
            settings = self.Settings()
        if not isinstance(settings, self.Settings):
            raise ConfigError(f"{self.name} expects {self.Settings.__name__}, got {type(settings).__name__}")
        self.settings = settings
        self.block_shapes: dict[str, tuple[int, int]] = {}
        self.kronecker: KroneckerFactors | None = None
        self.learning_rates: dict[int, float] = {}
        self.moments: OptimizerMoments | None = None
        self.train_labels: list[str] = []
        self.test_labels: list[str] = []

    def bind_shapes(self, shapes: Mapping[str, tuple[int, int]]) -> Method:
        """Tell the method each gradient block's matrix shape ``(o, i)`` (rows are ``o x i`` matrices
        flattened row-major), for the Kronecker-factored methods; returns the method itself."""
        self.block_shapes = {name: (int(o), int(i)) for name, (o, i) in shapes.items()}
        return self

    def bind_kronecker(self, factors: KroneckerFactors | None) -> Method:
        """Give the method the training split's token-level Kronecker factors (methods with
        ``needs_kronecker``; the pipeline binds those its features hold); returns the method itself."""
        self.kronecker = factors
        return self

    def bind_learning_rates(self, rates: Mapping[int, float] | None) -> Method:
        """Give a method with ``needs_checkpoints`` each stacked epoch's mean learning rate (the pipeline
        binds those its features hold); returns the method itself."""
        self.learning_rates = {int(e): float(r) for e, r in (rates or {}).items()}
        return self

    def checkpoint_rate(self, block: str) -> float:
        """The bound learning rate of a stacked block's epoch (``epoch-<e>/<block>``), for methods with
        ``needs_checkpoints``; ConfigError for a block of one adapter or an epoch with no rate bound."""
        try:
            epoch = block_epoch(block)
        except ValueError:
            raise ConfigError(
                f"{self.name} needs the gradients of every checkpoint stacked; block {block!r} is of one "
                "adapter"
            ) from None
        if epoch not in self.learning_rates:
            raise ConfigError(f"{self.name}: no learning rate bound for epoch {epoch} (block {block})")
        return self.learning_rates[epoch]

    def bind_labels(self, train: Sequence[str] | None, test: Sequence[str] | None) -> Method:
        """Give a method with ``needs_labels`` the class labels of the training and test rows."""
        if train is None or test is None:
            raise ConfigError(f"{self.name} needs the class labels of the training and test examples")
        self.train_labels, self.test_labels = list(train), list(test)
        return self

    def bind_moments(self, moments: OptimizerMoments | None) -> Method:
        """Give a method with ``needs_moments`` the optimizer's moments of every block its features hold;
        returns the method itself."""
        self.moments = moments
        return self

    @property
    def token_additive(self) -> bool:
        """Whether the scores are linear in the test gradient, so that the scores of a test example's
        per-token gradients sum to its own (per-token attribution); False unless a method says so."""
        return False

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

    def notes(self) -> dict[str, Any]:
        """What the last score matrix's computation says about itself, kept beside the scores and shown
        with the method's name in tables (LiSSA: its depth and whether it converged); empty for most."""
        return {}


class InnerProductMethod(Method):
    """A gradient method: score = sum over blocks of ``transform_test(g_test) . g_train``.

    A method is written once, as :meth:`transform_test` over :class:`~.passes.TrainPasses`; the same code
    then scores in memory (:meth:`score`: the training blocks held, a group of blocks at a time, resumable
    after any group), streamed from the feature store (:meth:`score_streamed`: every block at once, then
    one scoring pass), under torchrun (each rank a slice of the test rows) and for one query.
    Blocks whose training gradients are all zero contribute nothing (every inner product with them is
    zero) and are left out, which also keeps damping ``0`` from dividing by zero.
    """

    kind: ClassVar[str] = GRADIENT
    # Cosine scores: each product divided by the norms, over every block, of the test and the training
    # gradient (applied once the sum over blocks is complete, so it holds on every schedule).
    cosine: ClassVar[bool] = False
    # Whether transform_test approximates a damped inverse-Fisher product (compared with exact's); False
    # for methods with no curvature or another preconditioner (grad-cosine, TracIn, LESS, TrackStar).
    inverse_fisher: ClassVar[bool] = True

    @abstractmethod
    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """The test gradients ``[m, d]`` of every block of ``train`` with non-zero training gradients
        (:func:`live_blocks`), mapped to the vectors dotted with the training rows, in the compute dtype.

        ``train`` is read in passes over its chunks (its statistics -- damping, norms -- come free); the
        passes a method makes and the memory it holds besides are tabled in :mod:`.passes`.
        """

    def prepare(self, rows: GradientBlocks, side: str) -> GradientBlocks:
        """A map of every block of some rows at once, made before anything else sees them: of the test rows
        (``side="test"``) and of each training chunk (``"train"``; the statistics are then of the mapped
        rows). It must treat each row on its own, so that chunking does not change it. Default: none
        (LESS and TrackStar precondition with the optimizer's moments and normalise here)."""
        return rows

    @property
    def token_additive(self) -> bool:
        """Linear in the test gradient unless the scores are cosines or the rows are mapped first."""
        return not self.cosine and not self.prepares

    @property
    def prepares(self) -> bool:
        """Whether the method maps rows in :meth:`prepare` (the passes are then read through it)."""
        return type(self).prepare is not InnerProductMethod.prepare

    def begin_scoring(self) -> None:
        """Called before a score matrix is computed (its transforms may come group by group)."""

    def end_scoring(self, n_blocks: int) -> None:
        """Called once the score matrix is complete, to say what concerns the whole of it (LiSSA:
        which blocks its depth was too short for); ``n_blocks``: how many blocks were scored."""

    def block_groups(self, widths: Mapping[str, int], rows: int) -> list[list[str]]:
        """The blocks scored together (:func:`~.grouping.width_groups`): equal widths batched when the
        products run in a lower precision (the stacking copy is then the rounding), else one by one."""
        return width_groups(widths, rows, self.settings.chunk_size, batched=self.low_precision is not None)

    def score(
        self,
        train: GradientBlocks,
        test: GradientBlocks,
        partial: PartialScores | None = None,
        after_group: Callable[[PartialScores], None] | None = None,
    ) -> torch.Tensor:
        """Float32 ``[n_test, n_train]`` scores of gradients held in memory; HIGHER = the training example
        supports the test more. Group of blocks by group (:meth:`block_groups`), each transformed and
        scored before the next; ``after_group`` is given the running sum after each group but the last,
        and scoring given that sum as ``partial`` resumes there with identical results. A partial sum
        that does not end on a group boundary is not used."""
        if self.prepares:
            train, test = self.prepare(train, TRAIN), self.prepare(test, TEST)
        names, n_train, n_test = check_blocks(train, test)
        dtype = compute_dtype(train, test)
        device = train[names[0]].device
        groups = self.block_groups({name: train[name].shape[1] for name in names}, n_train)
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
        self.begin_scoring()
        for index in progress(range(first, len(groups)), desc=self.name, total=len(groups) - first):
            blocks = {name: train[name].to(device=device, dtype=dtype) for name in groups[index]}
            passes = TrainPasses.from_blocks(blocks, self.settings.chunk_size)
            transformed = self.transform_test(passes, {name: test[name].to(device, dtype) for name in blocks})
            for _ in self.score_columns(transformed, passes, out):
                pass  # each chunk's products are added into its columns of ``out`` in place
            if after_group is not None and index + 1 < len(groups):
                after_group(PartialScores(ends[index], out))
        self.end_scoring(len(names))
        if self.cosine:
            out /= _denominator(full_row_norms(test), full_row_norms(train)).to(device=device, dtype=dtype)
        return out.to(torch.float32)

    def stream(
        self, train: TrainPasses, test: GradientBlocks
    ) -> tuple[dict[str, torch.Tensor], Iterator[torch.Tensor]]:
        """The transformed test gradients (their passes are read now) and, lazily, the float32
        ``[n_test, n_chunk]`` scores of each training chunk in turn (the columns of :meth:`score`, read in
        one more pass); HIGHER = the training example supports the test output more."""
        if self.prepares:
            train, test = train.mapped(lambda chunk: self.prepare(chunk, TRAIN)), self.prepare(test, TEST)
        dtype = train.compute_dtype(test)
        self.begin_scoring()
        transformed = self.transform_test(train, test)
        self.end_scoring(len(train.statistics()))
        first = next(iter(test.values()))
        empty = torch.empty(first.shape[0], 0, dtype=dtype, device=first.device)
        columns = self.score_columns(transformed, train, empty)
        if not self.cosine:
            return transformed, (scores.to(torch.float32) for _, scores in columns)
        denominator = _denominator(full_row_norms(test), train.row_norms())
        return transformed, (
            (scores / denominator[:, cols].to(scores)).to(torch.float32) for cols, scores in columns
        )

    def score_streamed(self, train: TrainPasses, test: GradientBlocks) -> Iterator[torch.Tensor]:
        """The scores of :meth:`stream`, one training chunk at a time."""
        return self.stream(train, test)[1]

    def score_columns(
        self, transformed: GradientBlocks, train: TrainPasses, into: torch.Tensor
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """The scoring pass: per training chunk, its columns and ``into[:, columns]`` plus the products of
        the transformed test gradients with the chunk's rows, summed over blocks (in place, in ``into``'s
        dtype). A zero-width ``into`` starts every chunk from zeros (streamed scoring)."""
        groups = self.block_groups({name: t.shape[1] for name, t in transformed.items()}, train.rows)
        stack_dtype = self.low_precision or into.dtype
        tests = [torch.stack([transformed[name] for name in group]) for group in groups]
        for columns, chunk in train.stacked(groups, stack_dtype, into.device):
            out = (
                into[:, columns]
                if into.shape[1]
                else torch.zeros(
                    into.shape[0], columns.stop - columns.start, dtype=into.dtype, device=into.device
                )
            )
            for test_rows, stacked in zip(tests, chunk, strict=True):
                self.add_group_product(out, test_rows, stacked.rows)
            yield columns, out

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


def _denominator(test_norms: torch.Tensor, train_norms: torch.Tensor) -> torch.Tensor:
    """``|g_test| |g_train|`` for every pair, 1 where a gradient is zero (its products are 0 anyway)."""
    outer = torch.outer(test_norms, train_norms)
    return torch.where(outer > 0, outer, torch.ones_like(outer))


@dataclass(frozen=True)
class PartialScores:
    """The score sum over the first ``blocks_done`` blocks in the order of
    :meth:`InnerProductMethod.block_groups` (in the compute dtype), to resume from."""

    blocks_done: int
    sum: torch.Tensor


class RepresentationMethod(Method):
    """A method on fixed-size representations (hidden states) instead of gradients."""

    kind: ClassVar[str] = REPRESENTATION
    # whether each representation is joined with the gradient of the example's loss with respect to it
    # (RepT's signature) instead of the hidden state alone
    with_gradients: ClassVar[bool] = False
    # whether a training example's tokens can be scored one by one against a test representation (RepT:
    # its signature exists at every token; features/signatures.py), shown by ``explain --tokens``
    training_token_scores: ClassVar[bool] = False

    @abstractmethod
    def score_representations(self, train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        """Float32 ``[n_test, n_train]`` scores from ``[n, h]`` / ``[m, h]`` representations;
        HIGHER = the training example supports the test output more."""

    def score_chunk(self, chunk: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        """Float32 ``[n_test, n_chunk]`` scores of one chunk of training representations (streamed
        scoring); HIGHER = more supportive. Valid as is for a method that scores each training example
        on its own, as RepSim does; a method whose scores couple training examples must override it."""
        return self.score_representations(chunk, test)


class TextMethod(Method):
    """A method on the examples' text (prompt and response), with no model features: a lexical baseline."""

    kind: ClassVar[str] = TEXT

    @abstractmethod
    def score_texts(self, train: Sequence[str], test: Sequence[str]) -> torch.Tensor:
        """Float32 ``[n_test, n_train]`` scores; HIGHER = the training example supports the test output more.
        Scores may depend on the whole training corpus (BM25's IDF), so there is no per-chunk form."""


class ReplayMethod(Method):
    """A method on the fine-tuning run itself rather than on features of its adapter: it replays the
    recorded training trajectory (:class:`~llm_attribution.features.replay.TrainingReplay`), so the
    workflows hand it the replay and the test examples."""

    kind: ClassVar[str] = REPLAY

    @abstractmethod
    def score_replay(self, replay: TrainingReplay, test: Sequence[Example]) -> torch.Tensor:
        """Float32 ``[n_test, n_train]`` scores; HIGHER = the training example supports the test output
        more."""


def check_blocks(train: GradientBlocks, test: GradientBlocks) -> tuple[list[str], int, int]:
    """Check that train and test hold the same 2-D blocks of equal widths; ``(names, n_train, n_test)``."""
    if not train:
        raise DataError("no gradient blocks were given")
    require_same_blocks(train, test)
    names = list(train)
    n_train = n_test = -1
    for name in names:
        g_train, g_test = train[name], test[name]
        width = block_width(name, g_train)
        if block_width(name, g_test) != width:
            raise DataError(f"block {name}: train width {width} != test width {g_test.shape[1]}")
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


def live_blocks(train: TrainPasses, test: GradientBlocks) -> tuple[list[str], torch.dtype]:
    """The blocks a transform works on (training gradients not all zero: the others score zero) and the
    compute dtype; checks that train and test blocks match."""
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
    """The study's damping of one block held in memory (:meth:`~.passes.BlockStatistics.damping`, the
    one formula: ``damping_scale`` x the mean squared training gradient)."""
    return BlockStatistics.of(train_block).damping(damping_scale)
