"""The torch.distributed helpers: no-ops in one process, and in a real 2-process gloo group the row split,
the row gather (uneven and empty shares) and the error agreement that keeps ranks from hanging."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest
import torch
import torch.multiprocessing as mp

from llm_attribution.core import distributed
from llm_attribution.core.errors import ConfigError, DataError, RunError


def test_single_process_helpers_are_no_ops(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_from_env(use_cuda=False)
    assert (distributed.active(), distributed.world_size(), distributed.rank()) == (False, 1, 0)
    assert distributed.is_main() and distributed.my_rows(7) == slice(0, 7)
    rows = torch.arange(6.0).reshape(3, 2)
    assert distributed.all_gather_rows(rows) is rows
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(DataError), distributed.agree():
        raise DataError("a single process raises its own error")
    written = []
    distributed.on_main(written.append, "once")
    assert written == ["once"]


def test_a_stray_rank_without_world_size_is_rank_zero(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "3")
    assert distributed.requested_rank() == 0


def test_bad_timeout_is_a_user_error(monkeypatch) -> None:
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match="LLM_ATTR_DIST_TIMEOUT"):
        distributed.timeout()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed.timeout().total_seconds() == 90


def test_two_gloo_processes_split_gather_and_agree_on_errors() -> None:
    # a failed check in a worker fails the test; a broken agreement times out (60 s) instead of hanging
    mp.spawn(_worker, args=(_free_port(), "60", _checks), nprocs=2, join=True)


def test_a_rank_that_never_arrives_is_a_one_line_error_not_a_hang() -> None:
    mp.spawn(_worker, args=(_free_port(), "3", _absent), nprocs=2, join=True)


def _absent(rank: int) -> None:
    if rank == 1:
        time.sleep(6)  # never joins the collective below
        return
    start = time.perf_counter()
    with pytest.raises(RunError, match=r"another process is stuck or gone.*LLM_ATTR_DIST_TIMEOUT, now 3 s"):
        distributed.all_reduce_sum(torch.ones(1))
    assert time.perf_counter() - start < 5.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, port: int, timeout: str, checks: Callable[[int], None]) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            distributed.TIMEOUT_ENV: timeout,
        }
    )
    assert distributed.init_from_env(use_cuda=False)
    try:
        checks(rank)
    finally:
        distributed.shutdown()


def _checks(rank: int) -> None:
    assert distributed.active() and distributed.rank() == rank and distributed.world_size() == 2
    # contiguous shares in rank order, differing by at most one row; an empty share when n < ranks
    assert distributed.my_rows(5) == [slice(0, 3), slice(3, 5)][rank]
    assert distributed.my_rows(1) == [slice(0, 1), slice(1, 1)][rank]

    full = torch.arange(15.0).reshape(5, 3)
    assert torch.equal(distributed.all_gather_rows(full[distributed.my_rows(5)]), full)
    assert torch.equal(distributed.all_gather_rows(full[:1] if rank == 0 else None), full[:1])
    total = distributed.all_reduce_sum(torch.tensor([rank + 1.0]))
    assert float(total) == 3.0
    assert distributed.broadcast_object(f"from {rank}") == "from 0"
    assert distributed.all_gather_object(rank * 10) == [0, 10]

    with distributed.agree():  # nobody fails: nothing raised
        pass
    # rank 1 fails alone: it raises its own error, rank 0 names rank 1 and its message (one line)
    try:
        with distributed.agree():
            if rank == 1:
                raise DataError("example x has no token to score")
    except RunError as exc:
        assert rank == 0 and str(exc) == "rank 1: example x has no token to score"
    except DataError:
        assert rank == 1
    else:
        raise AssertionError("agree() let a failure on rank 1 pass")
    # rank 0 fails alone: rank 1 stops quietly
    try:
        with distributed.agree():
            if rank == 0:
                raise DataError("rank 0 says no")
    except distributed.PeerFailed:
        assert rank == 1
    except DataError:
        assert rank == 0
    # a bug (not a user error) on rank 1 is named with its type on rank 0
    try:
        with distributed.agree():
            if rank == 1:
                raise KeyError("oops")
    except RunError as exc:
        assert rank == 0 and str(exc).startswith("rank 1 failed with KeyError")
    except KeyError:
        assert rank == 1
    _check_sharded_features()
    # on_main runs on rank 0 only, and every rank hears when it fails
    written: list[str] = []
    distributed.on_main(written.append, "once")
    assert written == (["once"] if rank == 0 else [])
    with pytest.raises((OSError, distributed.PeerFailed)):
        distributed.on_main(_fail_to_write)


def _check_sharded_features() -> None:
    """Features and scores split over the ranks come back whole and in order, also with an empty share."""
    from llm_attribution.data.schema import Example
    from llm_attribution.features.gradients import Features
    from llm_attribution.features.ranks import collect_on_ranks, score_on_ranks

    def collect(examples) -> Features:  # a feature that says which example and which block it belongs to
        index = torch.tensor([float(e.prompt) for e in examples])
        blocks = {"b": index[:, None] * torch.tensor([1.0, 2.0]), "a": index[:, None] * 3}
        shapes = {"b": (1, 2), "a": (1, 1)}
        return Features([e.id for e in examples], blocks, index[:, None] + 0.5, index / 10, shapes)

    for n in (1, 3):  # 1 example: rank 1 has none
        examples = [Example(f"e{i}", str(i), "r", "l") for i in range(n)]
        gathered, expected = collect_on_ranks(examples, collect), collect(examples)
        assert gathered.ids == expected.ids and list(gathered.blocks) == ["b", "a"]
        assert all(torch.equal(gathered.blocks[k], expected.blocks[k]) for k in expected.blocks)
        assert torch.equal(gathered.representations, expected.representations)
        assert torch.equal(gathered.losses, expected.losses)
        assert gathered.shapes == {"b": (1, 2), "a": (1, 1)}
        scores = score_on_ranks(lambda test: test.blocks["a"] @ torch.ones(1, 4), expected)
        assert torch.equal(scores, expected.blocks["a"] @ torch.ones(1, 4))


def _fail_to_write() -> None:
    raise OSError("disk full")
