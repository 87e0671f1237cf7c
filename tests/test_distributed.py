"""The torch.distributed helpers: no-ops in one process, and in a real 2-process gloo group the row split,
the row gather (uneven and empty shares) and the error agreement that keeps ranks from hanging."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from llm_attribution import distributed
from llm_attribution.errors import ConfigError, DataError, RunError


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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=2, join=True)  # a failed check in a worker fails the test


def _worker(rank: int, port: int) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            distributed.TIMEOUT_ENV: "60",  # a broken agreement fails the test instead of hanging it
        }
    )
    assert distributed.init_from_env(use_cuda=False)
    try:
        _checks(rank)
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
    # on_main runs on rank 0 only, and every rank hears when it fails
    written: list[str] = []
    distributed.on_main(written.append, "once")
    assert written == (["once"] if rank == 0 else [])
    with pytest.raises((OSError, distributed.PeerFailed)):
        distributed.on_main(_fail_to_write)


def _fail_to_write() -> None:
    raise OSError("disk full")
