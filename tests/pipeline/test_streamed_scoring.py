"""Streamed scoring on the tiny model: training features read shard by shard from the feature store,
score files written column block by column block, equal to the in-memory scores for every method."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import weakref

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llm_attribution.attribution.base import REPLAY
from llm_attribution.attribution.registry import available_methods, get_method, method_class
from llm_attribution.core.errors import RunError
from llm_attribution.data.templates import PromptSettings
from llm_attribution.evaluation.metrics import evaluate
from llm_attribution.evaluation.score_files import read_scores
from llm_attribution.features.checkpoints import stack_checkpoints
from llm_attribution.features.gradients import GradientSettings, collect_features
from llm_attribution.features.kronecker import KroneckerFactors
from llm_attribution.features.ranks import slice_features
from llm_attribution.features.store import FeatureStore
from llm_attribution.models.lora import attach_lora
from llm_attribution.models.moments import OptimizerMoments
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from llm_attribution.scoring.engine import (
    MethodResult,
    ScoringJob,
    score_features,
    score_streamed,
    stream_scores,
)
from llm_attribution.scoring.score_file import ScoreFile, evaluate_file
from llm_attribution.scoring.store import ScoreStore
from llm_attribution.scoring.train_features import TrainFeatures
from tests.helpers import run_cli, tiny_run_args, toy_task

STREAMED_TOL = 1e-5  # float32 scores: the same algebra, summed in another order
PROMPT = PromptSettings(max_length=40)
SHARD = 5  # 23 training examples: 4 full shards and a partial one

# Every registered method with its defaults, and the streamed forms the defaults do not reach on these
# 256-wide blocks: LiSSA with one pass per step (blocks wider than chunk_size) and with mini-batches, and
# exact through Woodbury (n_train < d) and through the d x d system.
# methods on one adapter's features (those that read the trajectory or the optimizer have their own test;
# magic reads no features at all: tests/pipeline/test_magic.py streams it)
FEATURE_METHODS = [name for name in available_methods() if method_class(name).kind != REPLAY]
ADAPTER_METHODS = [
    name
    for name in FEATURE_METHODS
    if not (method_class(name).needs_checkpoints or method_class(name).needs_moments)
]
TRAJECTORY_METHODS = sorted(set(FEATURE_METHODS) - set(ADAPTER_METHODS))
VARIANTS = {
    **{name: {} for name in ADAPTER_METHODS},
    "lissa:passes": {"chunk_size": 64, "depth": 15},
    "lissa:mini-batches": {"batch_size": 6, "depth": 15},
    "exact:dense": {"solver": "dense"},
    "exact:capped": {"woodbury_max_rows": 10},
}


def stream_methods(
    methods, train, test, folder, train_labels, test_labels, train_ids
) -> dict[str, MethodResult]:  # type: ignore[no-untyped-def]
    """The engine's streamed schedule on these methods, their scores kept in ``folder``."""
    job = ScoringJob(methods, ScoreStore(folder), {}, train_ids, test.ids, train_labels, test_labels)
    results, _ = score_streamed(job, lambda: (train, test))
    return results


def held_features(features, chunk_size: int) -> TrainFeatures:  # type: ignore[no-untyped-def]
    """Row slices of features held in memory, as passes."""
    starts = range(0, len(features.ids), chunk_size)
    return TrainFeatures(
        lambda: (slice_features(features, slice(s, s + chunk_size)) for s in starts),
        len(starts),
        len(features.ids),
    )


@pytest.fixture(scope="module")
def tiny_features(tmp_path_factory):
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings())
    with torch.no_grad():  # a trained-looking adapter: lora_B non-zero, so every block has gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    task = toy_task(n_train=23, n_test=5)
    stored = {}
    for projection in (None, 32):
        settings = GradientSettings(gradient_batch_size=8, projection_dim=projection)

        def collect(chunk, settings=settings, kronecker=None):
            return collect_features(model, loaded.tokenizer, chunk, PROMPT, settings, kronecker=kronecker)

        run = tmp_path_factory.mktemp(f"run-{projection}")
        store = FeatureStore(run, "train", {"projection": projection}, shard_size=SHARD)
        factors = KroneckerFactors()  # kfac and ekfac read the training split's token-level factors
        store.ensure(task.train, functools.partial(collect, kronecker=factors))
        store.put_kronecker(factors)
        stored[projection] = (store, collect(task.test))
    return task, stored


@pytest.mark.parametrize("projection", [None, 32])
def test_streamed_scores_equal_in_memory_scores_for_every_method(tiny_features, tmp_path, projection) -> None:
    task, stored = tiny_features
    store, test = stored[projection]
    in_memory_train = store.load(task.train)
    in_memory_train.kronecker = store.stored_kronecker()
    methods = {variant: get_method(variant.split(":")[0], **options) for variant, options in VARIANTS.items()}
    train = TrainFeatures.from_store(store, task.train, store.stored_kronecker())
    train_labels, test_labels = [e.label for e in task.train], [e.label for e in task.test]
    results = stream_methods(
        methods, train, test, tmp_path, train_labels, test_labels, [e.id for e in task.train]
    )
    for variant, method in methods.items():
        expected = score_features(method, in_memory_train, test)
        got = read_scores(results[variant].path)
        assert got.shape == expected.shape == (5, 23), variant
        assert float((got - expected).norm() / expected.norm()) < STREAMED_TOL, variant
        whole = evaluate(got, train_labels, test_labels)
        assert np.array_equal(results[variant].metrics.per_test_coverage, whole.per_test_coverage), variant
        assert results[variant].metrics.accuracy == whole.accuracy


def _moments(features, seed: int) -> OptimizerMoments:  # type: ignore[no-untyped-def]
    """Random AdamW moments of the features' blocks (second moments positive), as a run saves them."""
    generator = torch.Generator().manual_seed(seed)
    first = {name: 1e-3 * torch.randn(b.shape[1], generator=generator) for name, b in features.blocks.items()}
    second = {name: 1e-6 * torch.rand(b.shape[1], generator=generator) for name, b in features.blocks.items()}
    return OptimizerMoments(first, second, dict.fromkeys(first, 7), 0.9, 0.999, 1e-8)


def test_trajectory_methods_stream_chunk_by_chunk(tiny_features, tmp_path) -> None:
    """TracIn, LESS and TrackStar read the stacked checkpoints and the moments through every training chunk:
    streamed (two "epochs" of 5 shards read side by side) equals in memory."""
    task, stored = tiny_features
    store, test = stored[None]
    memory = store.load(task.train)
    memory.moments = _moments(memory, 0)
    test.moments = memory.moments
    streamed = dataclasses.replace(TrainFeatures.from_store(store, task.train), moments=memory.moments)
    rates = {1: 2e-3, 2: 5e-4}
    stacked_memory = stack_checkpoints({1: memory, 2: memory}, rates)
    stacked_test = stack_checkpoints({1: test, 2: test}, rates)
    stacked_streamed = TrainFeatures.stacked({1: streamed, 2: streamed}, rates)
    assert stacked_streamed.chunks == 5
    labels = [e.label for e in task.train], [e.label for e in task.test]
    for name in TRAJECTORY_METHODS:
        method = get_method(name)
        on = (
            (stacked_memory, stacked_streamed, stacked_test)
            if method.needs_checkpoints
            else (memory, streamed, test)
        )
        expected = score_features(method, on[0], on[2])
        results = stream_methods(
            {name: method}, on[1], on[2], tmp_path / name, *labels, [e.id for e in task.train]
        )
        got = read_scores(results[name].path)
        assert float((got - expected).norm() / expected.norm()) < STREAMED_TOL, name


def test_score_file_carries_ids_and_is_judged_in_row_blocks(tiny_features, tmp_path, monkeypatch) -> None:
    task, stored = tiny_features
    store, test = stored[32]
    results = stream_methods(
        {"hessian-free": get_method("hessian-free")},
        TrainFeatures.from_store(store, task.train),
        test,
        tmp_path,
        [e.label for e in task.train],
        [e.label for e in task.test],
        [e.id for e in task.train],
    )
    path = results["hessian-free"].path
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["train_ids"]) == [e.id for e in task.train]
    assert json.loads(metadata["test_ids"]) == [e.id for e in task.test]
    assert "higher" in metadata["convention"]
    # judged two test rows at a time: the same metrics as judging the matrix whole
    monkeypatch.setattr("llm_attribution.scoring.score_file.EVALUATION_BYTES", 2 * 4 * 23)
    labels = ([e.label for e in task.train], [e.label for e in task.test])
    blocked, whole = evaluate_file(path, *labels), evaluate(read_scores(path), *labels)
    assert np.array_equal(blocked.per_test_hit, whole.per_test_hit) and blocked.coverage == whole.coverage


def test_an_incomplete_score_file_is_never_left_behind(tmp_path) -> None:
    path = tmp_path / "scores.safetensors"
    with (
        pytest.raises(RunError, match="2 training columns scored, 3 expected"),
        ScoreFile(path, 2, 3, {}) as out,
    ):
        out.write_columns(0, torch.ones(2, 2))
    with pytest.raises(ValueError, match="boom"), ScoreFile(path, 2, 3, {}) as out:
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with ScoreFile(path, 2, 3, {"method": "x"}) as out:
        out.write_columns(2, torch.tensor([[5.0], [6.0]]))
        out.write_columns(0, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(read_scores(path), torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 6.0]]))


def test_stream_scores_in_memory_for_a_few_test_rows(tiny_features) -> None:
    task, stored = tiny_features
    store, test = stored[None]
    method = get_method("datainf")
    in_memory = store.load(task.train)
    expected = score_features(method, in_memory, test)
    for train in (TrainFeatures.from_store(store, task.train), held_features(in_memory, 4)):
        got = stream_scores(method, train, test)
        assert float((got - expected).norm() / expected.norm()) < STREAMED_TOL


def test_run_with_projection_dim_stores_projected_features_under_their_own_key(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    methods = ["--methods", "hessian-free,exact,repsim"]
    argv = [
        "run",
        *tiny_run_args(train=20, test=4, epochs=1),
        *methods,
        "--projection-dim",
        "16",
        "--stream",
        "1",
    ]
    code, _, err = run_cli([*argv, "--out", str(run)], capsys)
    assert code == 0, err
    [folder] = (run / "features").glob("train-*")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["fingerprint"]["projection"] == {"kind": "kronecker-gaussian", "dim": 16, "seed": 0}
    shard = load_file(str(next(folder.glob("shard-*.safetensors"))))
    assert max(v.shape[1] for k, v in shard.items() if not k.startswith("__")) == 16
    results = json.loads((run / "results.json").read_text())
    assert read_scores(run / results["methods"]["exact"]["scores"]).shape == (4, 20)
    # another projection is other features: computed under another key, the first store kept
    attribute = ["attribute", "--run", str(run), "--methods", "hessian-free", "--quiet"]
    code, _, err = run_cli([*attribute, "--projection-dim", "8"], capsys)
    assert code == 0, err
    assert len(list((run / "features").glob("train-*"))) == 2


def _tracked(train: TrainFeatures) -> tuple[TrainFeatures, list[int]]:
    """``train`` whose passes count how many chunks are alive (any block tensor still referenced) at once."""
    alive: dict[int, int] = {}
    peak = [0]

    def release(token: int) -> None:
        alive[token] -= 1
        if not alive[token]:
            del alive[token]

    def passes():
        for token, features in enumerate(train.passes()):
            alive[token] = len(features.blocks)
            for block in features.blocks.values():
                weakref.finalize(block, release, token)
            peak[0] = max(peak[0], len(alive))
            yield features

    return TrainFeatures(passes, train.chunks, train.rows), peak


@pytest.mark.parametrize(
    ("variant", "flat"),
    [
        ("hessian-free", True),
        ("datainf", True),
        ("lissa:short", True),  # d x d Fisher accumulated in one pass
        ("lissa:passes", True),  # one pass per step
        ("exact:dense", True),  # G^T G accumulated in one pass
        ("lissa-study", True),
        ("repsim", True),
        ("exact", False),  # n_train < d: Woodbury gathers the block's rows (n x d, bounded by d x d)
        ("lissa:mini-batches", False),  # random rows: gathered
    ],
)
def test_streamed_methods_hold_one_training_chunk_at_a_time(tiny_features, tmp_path, variant, flat) -> None:
    """Memory independent of n_train, checked structurally: a flat method never keeps more than the chunk
    it is reading and the one it just finished; the gathering forms keep every chunk."""
    task, stored = tiny_features
    store, test = stored[None]
    train, peak = _tracked(TrainFeatures.from_store(store, task.train))
    options = {"depth": 10} if variant == "lissa:short" else VARIANTS[variant]
    method = get_method(variant.split(":")[0], **options)
    labels = [e.label for e in task.train], [e.label for e in task.test]
    stream_methods({variant: method}, train, test, tmp_path, *labels, [e.id for e in task.train])
    assert peak[0] <= 2 if flat else peak[0] == train.chunks == 5


def test_streamed_run_equals_the_in_memory_run(tmp_path, capsys) -> None:
    """`--stream` through the CLI: the same score files (to float rounding) and metrics as in memory."""
    methods = ",".join(
        (
            "hessian-free,grad-cosine,datainf,lissa,exact,ekfac-example,kfac,ekfac",
            "astra,tracin,less,trackstar,repsim,rept,knn-shapley,bm25",
        )
    )
    run = tmp_path / "run"
    code, _, err = run_cli(
        ["run", *tiny_run_args(train=20, test=4, epochs=1), "--methods", methods, "--out", str(run)], capsys
    )
    assert code == 0, err
    streamed = shutil.copytree(run, tmp_path / "streamed")
    shutil.rmtree(streamed / "scores")  # nothing cached: every method is scored again, streamed
    code, _, err = run_cli(
        ["attribute", "--run", str(streamed), "--methods", methods, "--stream", "true", "--quiet"], capsys
    )
    assert code == 0, err
    in_memory = json.loads((run / "results.json").read_text())["methods"]
    rows = json.loads((streamed / "results.json").read_text())["methods"]
    for name in methods.split(","):
        expected = read_scores(run / in_memory[name]["scores"])
        got = read_scores(streamed / rows[name]["scores"])
        assert float((got - expected).norm() / expected.norm()) < STREAMED_TOL, name
        assert rows[name]["accuracy"] == in_memory[name]["accuracy"], name
        assert rows[name]["coverage"] == in_memory[name]["coverage"], name
    # scored again with nothing changed: every streamed file is reused (checked, not rewritten)
    written = {path.name: path.stat().st_mtime_ns for path in (streamed / "scores").glob("*.safetensors")}
    code, _, err = run_cli(
        ["attribute", "--run", str(streamed), "--methods", methods, "--stream", "true", "--quiet"], capsys
    )
    assert code == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in (streamed / "scores").glob("*.safetensors")} == written
    assert (
        json.loads((streamed / "results.json").read_text())["methods"]["exact"]["accuracy"]
        == rows["exact"]["accuracy"]
    )
    for name in ("datainf", "lissa"):  # the iHVP comparison, from float32 transforms instead of float64
        for key in ("median", "max"):
            expected_error = in_memory[name]["ihvp_relative_error_vs_exact"][key]
            assert rows[name]["ihvp_relative_error_vs_exact"][key] == pytest.approx(expected_error, rel=1e-3)
            in_span = in_memory[name]["ihvp_relative_error_vs_exact_in_span"][
                key
            ]  # Gram of rows vs of a pass
            assert rows[name]["ihvp_relative_error_vs_exact_in_span"][key] == pytest.approx(in_span, rel=1e-3)
