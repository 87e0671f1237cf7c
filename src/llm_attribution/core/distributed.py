"""Several processes under ``torchrun``: process-group set-up from the environment, and the few collectives
the pipeline needs (a status agreement, an all-reduce, a row gather, an object broadcast).

``torchrun`` starts one process per GPU (or per CPU share) and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_from_env` joins the group when
``WORLD_SIZE`` > 1: gloo for CPU tensors, plus NCCL for CUDA tensors when a GPU is used. Without
``WORLD_SIZE`` (or with 1) nothing is initialised and every helper here is a no-op, so a single process
behaves exactly as before.

Rules that keep several processes from hanging:

- Every collective has a timeout (``LLM_ATTR_DIST_TIMEOUT`` seconds, default 1800): a rank that never
  arrives turns into an error on the others, not a wait for ever.
- Work that one rank may fail at on its own (its slice of examples, its GPU, a file only rank 0 writes)
  runs inside :func:`agree`. Every rank then learns of the failure at the same point, with no other
  collective pending, and stops; rank 0 reports it as one line (only rank 0 prints user errors).
- A rank that dies outright (killed, segfault) is noticed by ``torchrun``, which stops the others.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, RunError, UserError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "LLM_ATTR_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class PeerFailed(UserError):
    """Another rank failed; rank 0 reports why, so this rank exits quietly (status 2)."""


def requested_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def requested_rank() -> int:
    """``RANK`` as set by ``torchrun`` (0 in a single process); valid before :func:`init_from_env`."""
    return _env_int("RANK", 0) if requested_world_size() > 1 else 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer") from None


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def local_rank() -> int:
    """This process's index on its node (its GPU), from ``LOCAL_RANK``; 0 in a single process."""
    return _env_int("LOCAL_RANK", 0) if active() else 0


def is_main() -> bool:
    """Rank 0: the process that logs, shows progress bars and writes results."""
    return rank() == 0


def timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text}")
    return datetime.timedelta(seconds=seconds)


def init_from_env(use_cuda: bool) -> bool:
    """Join the process group ``torchrun`` describes; False (and nothing done) for a single process.

    ``use_cuda``: the model will run on GPUs, so CUDA tensors get NCCL and this process takes the GPU of
    its ``LOCAL_RANK``. CPU tensors (status flags, gathered features) always go through gloo.
    """
    if active():
        return True
    size = requested_world_size()
    if size <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run without torchrun")
    backend = "gloo"
    if use_cuda:
        local, gpus = _env_int("LOCAL_RANK", 0), torch.cuda.device_count()
        if local >= gpus:
            raise ConfigError(
                f"LOCAL_RANK {local} but only {gpus} GPU(s) are visible: use --nproc-per-node <= {gpus}, "
                "or --device cpu"
            )
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend=backend, timeout=timeout())
    except Exception as exc:  # rendezvous failures come as RuntimeError, DistStoreError, TimeoutError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"cannot join the torch.distributed group ({backend}): {first}") from None
    log.info("torch.distributed: %d processes (%s)", size, backend)
    return True


SHUTDOWN_WAIT_S = 30.0


def shutdown() -> None:
    """Leave the group together: gloo aborts the process ("terminate called without an active exception")
    when one rank tears its connections down while another is still destroying its own, so every rank
    first waits for the others, at most ``SHUTDOWN_WAIT_S`` (a rank that is gone does not hold us)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            wait = datetime.timedelta(seconds=min(SHUTDOWN_WAIT_S, timeout().total_seconds()))
            with contextlib.suppress(RuntimeError):
                dist.monitored_barrier(timeout=wait)
        dist.destroy_process_group()


@contextlib.contextmanager
def _exchange(what: str) -> Iterator[None]:
    """A failed collective (gloo and NCCL raise RuntimeError on a timeout or a lost peer) as one line."""
    try:
        yield
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(
            f"rank {rank()}: the processes could not {what} ({first}); another process is stuck or gone "
            f"(each wait is bounded by {TIMEOUT_ENV}, now {timeout().total_seconds():.0f} s)"
        ) from None


def my_rows(n: int) -> slice:
    """This rank's contiguous share of ``range(n)``: shares differ by at most one row, rank order."""
    size, me = world_size(), rank()
    base, extra = divmod(n, size)
    start = me * base + min(me, extra)
    return slice(start, start + base + (1 if me < extra else 0))


@contextlib.contextmanager
def agree() -> Iterator[None]:
    """Run the block on every rank, then make every rank fail if any rank failed in it.

    The block must contain no collective: all ranks then reach the status all-reduce at the end together.
    Each failing rank raises its own error; a rank that did not fail raises :class:`PeerFailed`, except
    rank 0, which raises a :class:`RunError` naming the failing rank and its message. Only rank 0 prints
    user errors (the CLI's rule), so the user reads one line; a bug (not a :class:`UserError`) keeps its
    traceback on the rank where it happened.
    """
    if not active():
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as exc:
        error = exc
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    with _exchange("agree on the outcome of a stage"):
        dist.all_reduce(failed)
    if int(failed) == 0:
        return
    described = None if error is None else (type(error).__name__, str(error), isinstance(error, UserError))
    reports = all_gather_object(described)
    if error is not None:
        raise error
    if not is_main():
        raise PeerFailed("another rank failed; rank 0 reports why")
    first = next(r for r, report in enumerate(reports) if report is not None)
    kind, message, user = reports[first]
    raise RunError(f"rank {first}: {message}" if user else f"rank {first} failed with {kind}: {message}")


def on_main(write: Callable[..., object], *args: Any) -> None:
    """``write(*args)`` on rank 0 only (files are written once); every rank waits and learns if it failed."""
    with agree():
        if is_main():
            write(*args)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (every rank ends with the same bytes); returned for chaining."""
    if active():
        with _exchange("sum a tensor"):
            dist.all_reduce(tensor)
    return tensor


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` with rank 0's, in place; returned for chaining."""
    if active():
        with _exchange("broadcast a tensor"):
            dist.broadcast(tensor, src=0)
    return tensor


def all_gather_rows(local: torch.Tensor | None) -> torch.Tensor:
    """Concatenate every rank's ``[rows, width]`` float32 rows in rank order; ``None`` = no rows here.

    At least one rank must hold rows (they give the width); shares may differ in size.
    """
    if not active():
        if local is None:
            raise ValueError("all_gather_rows needs rows in a single process")
        return local
    size, me = world_size(), rank()
    meta = torch.zeros(size + 1, dtype=torch.int64)
    if local is not None:
        meta[me], meta[size] = local.shape[0], local.shape[1]
    with _exchange("gather rows"):
        dist.all_reduce(meta, op=dist.ReduceOp.MAX)
    counts, width = meta[:size].tolist(), int(meta[size])
    longest = max(counts)
    padded = torch.zeros(longest, width, dtype=torch.float32)
    if local is not None:
        padded[: local.shape[0]] = local.to(torch.float32)
    received = [torch.empty_like(padded) for _ in range(size)]
    with _exchange("gather rows"):
        dist.all_gather(received, padded)
    return torch.cat([part[:count] for part, count in zip(received, counts, strict=True)])


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (pickled), in rank order."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    with _exchange("gather objects"):
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    with _exchange("broadcast an object"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


PARALLEL_COMMANDS = ("finetune", "run", "attribute", "study")


@contextlib.contextmanager
def launched(command: str, device: str) -> Iterator[None]:
    """The process group of a CLI command started by ``torchrun`` (nothing for one process).

    Ranks other than 0 print nothing on stdout. ``device`` is the ``--device`` asked for: anything but
    ``cpu`` uses the GPUs when there are some.
    """
    if requested_world_size() <= 1:
        yield
        return
    if command not in PARALLEL_COMMANDS:
        raise ConfigError(
            f"llm-attr {command} runs in one process; start it without torchrun "
            f"(several processes serve: {', '.join(PARALLEL_COMMANDS)})"
        )
    init_from_env(use_cuda=device != "cpu" and torch.cuda.is_available())
    try:
        if is_main():
            yield
        else:
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                yield
    finally:
        shutdown()
