"""Retrain a run's model on other sets of its training examples, many at once, resumably.

Ground truth (``lds``, ``counterfactual``) is a list of :class:`RetrainJob`: which training rows, which
seed, and the file its measurements go to. Each job fine-tunes the run's initial weights (a LoRA
adapter, or with ``--tuning full`` the base's linear layers) on those rows with the run's settings
(:class:`~llm_attribution.models.retrain.Retrainer`), then measures every test
example's losses (and, if asked, greedy answers to some test prompts) and writes them to its file in one
atomic write. A job whose file exists is done: a killed command continues with the next unfinished job,
and a job killed mid-way resumes from its last saved training step.

Jobs run in this process, in ``workers`` spawned processes (each with its own model and a share of the
CPU threads), or under ``torchrun`` one job at a time per rank (each rank trains alone, not data-parallel).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..core import distributed
from ..core.errors import RunError
from ..core.pause import pause_point
from ..core.progress import ProgressBar, set_quiet
from ..core.storage import read_json, write_bytes_atomic
from ..data.loaders import load_task
from ..data.schema import TaskData
from ..features.losses import example_losses
from ..models import finetune as finetune_module
from ..models.generate import generate_answers
from ..models.resolve import LoadedModel, load_model
from ..models.retrain import Retrainer
from .layout import SETTINGS_FILE
from .runs import FinetuneConfig, run_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainJob:
    """One retrain: the training rows it keeps, its seed, and where its measurements go."""

    seed: int
    rows: tuple[int, ...]  # indices into the run's training set, in the run's order
    out: Path  # the result file (written once, atomically, when the job is done)
    work: Path  # the training state while the job runs
    answer_rows: tuple[int, ...] = ()  # test examples whose greedy answers are generated after training
    answer_tokens: int = 16  # new tokens per answer (the behaviour judge reads the opening words)


@dataclass(frozen=True)
class RetrainResult:
    """What one retrain measured, read back from its file."""

    rows: torch.Tensor  # int64 training rows kept
    attributed: torch.Tensor  # [n_test] loss the run attributes, after retraining
    response: torch.Tensor  # [n_test] response-only loss
    seconds: float  # the whole job: retrain plus measurements
    answers: dict[int, str]  # test row -> greedy answer (only the job's answer_rows)


def read_result(path: Path) -> RetrainResult:
    """A finished job's measurements."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        return RetrainResult(
            rows=handle.get_tensor("rows"),
            attributed=handle.get_tensor("attributed"),
            response=handle.get_tensor("response"),
            seconds=float(meta.get("seconds", "nan")),
            answers={int(k): v for k, v in json.loads(meta.get("answers", "{}")).items()},
        )


class _Context:
    """A run's config, data and base model in one process, with a retrainer per seed."""

    def __init__(self, run: Path) -> None:
        settings = read_json(run / SETTINGS_FILE)
        if "adapter" in settings:
            raise RunError(
                f"{run} explains an adapter trained elsewhere: retraining needs a run this tool trained"
            )
        self.config = FinetuneConfig.from_dict(settings)
        self.task: TaskData = load_task(self.config.data)
        if run_settings(self.config, self.task)["fingerprint"] != settings["fingerprint"]:
            raise RunError(f"the data of {run} changed since it was made; make a new run")
        self.loaded: LoadedModel = load_model(self.config.model)
        self._retrainers: dict[int, Retrainer] = {}

    def retrainer(self, seed: int) -> Retrainer:
        if seed not in self._retrainers:
            self._retrainers[seed] = Retrainer(
                self.loaded.model, self.loaded.tokenizer, self.config.lora, seed
            )
        return self._retrainers[seed]

    def do(self, job: RetrainJob) -> float:
        start = time.perf_counter()
        retrainer = self.retrainer(job.seed)
        train = dataclasses.replace(self.config.train, seed=job.seed)
        examples = [self.task.train[i] for i in job.rows]
        with _quiet_epochs():
            curve = retrainer.train(examples, self.config.prompt, train, job.work)
        losses = example_losses(retrainer.model, self.loaded.tokenizer, self.task.test, self.config.prompt)
        answers: dict[int, str] = {}
        if job.answer_rows:
            prompts = [self.task.test[i].prompt for i in job.answer_rows]
            generated = generate_answers(
                retrainer.model, self.loaded.tokenizer, prompts, self.config.prompt, job.answer_tokens
            )
            answers = dict(zip(job.answer_rows, generated, strict=True))
        seconds = time.perf_counter() - start
        tensors = {
            "rows": torch.tensor(job.rows, dtype=torch.int64),
            "attributed": losses.attributed,
            "response": losses.response,
        }
        metadata = {
            "seconds": repr(seconds),
            "final_train_loss": repr(curve.epochs[-1]),
            "answers": json.dumps({str(k): v for k, v in answers.items()}),
        }
        pause_point("retrain-result")
        write_bytes_atomic(job.out, save(tensors, metadata))
        return seconds


@contextlib.contextmanager
def _quiet_epochs() -> Iterator[None]:
    """Hide fine-tuning's per-epoch log lines: dozens of retrains would bury the command's own output."""
    logger = logging.getLogger(finetune_module.__name__)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


_WORKER: _Context | None = None


def _init_worker(run: str, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    set_quiet(True)  # one bar, the parent's: workers' bars would interleave
    _WORKER = _Context(Path(run))


def _work(job: RetrainJob) -> float:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.do(job)


def retrain_all(run: Path, jobs: Sequence[RetrainJob], workers: int = 1, desc: str = "retraining") -> None:
    """Do every job whose result file is missing; returns when all are done (under torchrun, on all ranks)."""
    with distributed.agree():  # every rank lists the same pending jobs before any rank writes one
        pending = [job for job in jobs if not job.out.is_file()]
    if pending:
        _retrain(run, pending, len(jobs), workers, desc)
    with distributed.agree():
        if distributed.is_main():
            for folder in {job.work.parent for job in jobs}:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # the work folder, once no retrain is under way in it


def _retrain(run: Path, pending: Sequence[RetrainJob], total: int, workers: int, desc: str) -> None:
    if distributed.active():
        mine = pending[distributed.rank() :: distributed.world_size()]
        with distributed.agree():
            context = _Context(run) if mine else None
            with ProgressBar(len(mine), f"{desc} (rank {distributed.rank()})") as bar:
                for job in mine:
                    assert context is not None
                    context.do(job)
                    bar.update(1)
        return
    log.info("%s: %d of %d retrains to do", desc, len(pending), total)
    if workers <= 1 or len(pending) == 1:
        context = _Context(run)
        with ProgressBar(len(pending), desc) as bar:
            for job in pending:
                context.do(job)
                bar.update(1)
        return
    threads = max(1, torch.get_num_threads() // workers)
    spawn = multiprocessing.get_context("spawn")  # fork would share torch's thread pools and locks
    with (
        ProcessPoolExecutor(
            max_workers=min(workers, len(pending)),
            mp_context=spawn,
            initializer=_init_worker,
            initargs=(str(run), threads),
        ) as pool,
        ProgressBar(len(pending), f"{desc} ({workers} workers)") as bar,
    ):
        futures = [pool.submit(_work, job) for job in pending]
        try:
            for future in as_completed(futures):
                future.result()  # a worker's error stops the command here, with its own message
                bar.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # finish the retrains under way, start no more
            raise
