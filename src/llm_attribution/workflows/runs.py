"""A run folder's model: fine-tune it (or reuse the adapters it holds), adopt an adapter trained
elsewhere, or open a finished run at any saved epoch. Each gives a :class:`LoadedRun` (task, model with
its adapter, and where they came from) for the other workflows to attribute, explain or diagnose.

With ``--tuning full`` the run trains the base model's linear weights instead of an adapter; its epoch
folders hold those weights, loaded back onto a freshly loaded base model (:mod:`..models.tuning`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core import distributed
from ..core.errors import ConfigError, RunError
from ..core.settings import from_dict, to_dict
from ..core.storage import file_sha256, read_json, remove_stale_temporaries, write_json_atomic
from ..core.versions import package_versions
from ..data.loaders import load_task
from ..data.schema import Example, TaskData, data_fingerprint
from ..data.settings import DataSettings
from ..data.templates import PromptSettings
from ..features.captured import Capture
from ..models.finetune import LossCurve, TrainSettings, finetune
from ..models.generate import generate_answers
from ..models.lora import (
    adapter_config,
    adapter_fingerprint,
    adapter_folder,
    attach_lora,
    load_adapter,
    recorded_config,
    untracked_modules,
)
from ..models.resolve import LoadedModel, load_model
from ..models.settings import LoraSettings, ModelSettings
from ..models.tuning import FullWeights, TunedWeights, tuned_weights
from .layout import DATA_FILE, FINETUNE_FILE, SETTINGS_FILE, adapter_dir, checkpoints, saved_epochs

log = logging.getLogger(__name__)

STAGES = {
    "data": DataSettings,
    "model": ModelSettings,
    "lora": LoraSettings,
    "prompt": PromptSettings,
    "train": TrainSettings,
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines a fine-tuned adapter."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: to_dict(getattr(self, name)) for name in STAGES}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return cls(**{name: from_dict(stage, data[name]) for name, stage in STAGES.items()})


@dataclass
class LoadedRun:
    """A fine-tuned model ready to explain: the task, the model with its adapter (or, with ``--tuning
    full``, its fine-tuned weights), and where it came from."""

    run: Path
    config: FinetuneConfig
    task: TaskData
    model: PeftModel | PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    base: LoadedModel  # the base model as loaded: its spec, source and device
    adapter: Path  # the epoch's folder: a peft adapter, or the full weights
    epoch: int | None
    captured: Path | None = None  # a training-loop gradient capture read instead of collecting (--captured)

    @property
    def weights(self) -> TunedWeights:
        """The weights the run trained (whose per-example gradients are collected)."""
        return tuned_weights(self.model, self.config.lora)


@dataclass
class FinetuneReport:
    """What :func:`finetune_run` did: where, the loss curve, and answers before/after for a few tests."""

    loaded_run: LoadedRun
    epochs: list[int]
    curve: LossCurve
    reused: bool
    examples: list[Example] = field(default_factory=list)
    answers_before: list[str] = field(default_factory=list)
    answers_after: list[str] = field(default_factory=list)

    @property
    def run(self) -> Path:
        return self.loaded_run.run


def run_settings(
    config: FinetuneConfig, task: TaskData, adapter: Path | None = None, captured: Path | None = None
) -> dict[str, Any]:
    """The settings a run folder records: the config, the data's content, a given adapter, and the
    gradient capture its training features come from."""
    settings: dict[str, Any] = {
        **config.to_dict(),
        # The data's content is part of what produced the adapter: a changed file must not reuse the run.
        "fingerprint": {"train": data_fingerprint(task.train), "test": data_fingerprint(task.test)},
    }
    if adapter is not None:
        settings["adapter"] = {
            "path": str(adapter.resolve()),
            "sha256": adapter_fingerprint(adapter),
            "config": recorded_config(adapter_config(adapter)),
        }
    if captured is not None:
        capture = Capture.open(captured)
        settings["captured"] = {"path": str(capture.path.resolve()), "sha256": capture.sha256()}
    return settings


def check_run_dir(run: Path, settings: dict[str, Any]) -> bool:
    """Check ``run`` is new, empty, or holds a run with the same settings (True then); writes nothing."""
    if run.exists() and not run.is_dir():
        raise RunError(f"--out {run} is a file; give a folder for the run")
    recorded = run / SETTINGS_FILE
    if recorded.is_file():
        previous = read_json(recorded)
        if previous != settings:
            changed = sorted(
                f"{stage}.{key}"
                for stage in set(previous) | set(settings)
                for key in set(previous.get(stage, {})) | set(settings.get(stage, {}))
                if previous.get(stage, {}).get(key) != settings.get(stage, {}).get(key)
            )
            raise RunError(
                f"{run} holds a run made with other settings (differs in {', '.join(changed[:6])}); "
                "use another --out or delete that folder"
            )
        return True
    if run.is_dir() and any(run.iterdir()):
        raise RunError(f"--out {run} is a non-empty folder that is not a run; give a new or empty folder")
    return False


def _start_run(run: Path, settings: dict[str, Any], model: ModelSettings) -> tuple[bool, LoadedModel]:
    # Under torchrun every rank checks the folder before rank 0 writes into it, so all decide alike.
    with distributed.agree():
        existed = check_run_dir(run, settings)
        loaded = load_model(model)  # before anything is written: a bad model leaves no folder behind
    with distributed.agree():
        if existed and distributed.is_main() and (removed := remove_stale_temporaries(run)):
            log.info("%s: removed %d half-written file(s) of an interrupted run", run, removed)
        if not existed and distributed.is_main():
            run.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run / SETTINGS_FILE, settings)
    with distributed.agree():
        if not (run / SETTINGS_FILE).is_file():
            raise RunError(
                f"rank {distributed.rank()} does not see {run / SETTINGS_FILE}: with several nodes, the run "
                "folder must be on a file system that every node shares"
            )
    return existed, loaded


def finetune_run(config: FinetuneConfig, run: Path, show: int = 0) -> FinetuneReport:
    """Load data and model, fine-tune with LoRA, save an adapter per epoch into ``run``.

    ``show`` > 0 generates greedy answers for that many test prompts before and after fine-tuning.
    A run folder that already holds every epoch with the same settings is reused, not retrained.
    """
    with distributed.agree():
        task = load_task(config.data)
    existed, loaded = _start_run(run, run_settings(config, task), config.model)
    examples = _spread(task.test, show if distributed.is_main() else 0)
    before = _answers(loaded.model, loaded.tokenizer, examples, config.prompt)
    last = config.train.epochs
    if existed and saved_epochs(run) == list(range(1, last + 1)) and (run / FINETUNE_FILE).is_file():
        log.info("%s already holds all %d epochs with these settings: reusing them", run, last)
        recorded = read_json(run / FINETUNE_FILE)["loss"]
        curve = LossCurve(recorded["step_loss"], recorded["epoch_loss"], recorded["seconds_per_epoch"])
        model = _load_tuned(loaded.model, config.lora, adapter_dir(run, last))
        reused = True
    else:
        if distributed.is_main():
            write_json_atomic(run / DATA_FILE, _data_record(task))
        torch.manual_seed(config.train.seed)  # seeds the LoRA A initialisation
        full = config.lora.tuning == "full"
        model = loaded.model if full else attach_lora(loaded.model, config.lora)
        weights = tuned_weights(model, config.lora)
        start = time.perf_counter()
        tokenizer, prompt, train = loaded.tokenizer, config.prompt, config.train
        curve = finetune(model, tokenizer, task.train, prompt, train, checkpoints(run), weights=weights)
        with distributed.agree():
            if distributed.is_main():
                write_json_atomic(
                    run / FINETUNE_FILE,
                    {
                        "loss": curve.to_dict(),
                        "seconds": time.perf_counter() - start,
                        "n_train": len(task.train),
                        "device": str(loaded.device),
                        "processes": distributed.world_size(),
                        "model_source": loaded.source,
                        "versions": package_versions(),
                    },
                )
        reused = False
    after = _answers(model, loaded.tokenizer, examples, config.prompt)
    loaded_run = LoadedRun(run, config, task, model, loaded.tokenizer, loaded, adapter_dir(run, last), last)
    return FinetuneReport(loaded_run, saved_epochs(run), curve, reused, list(examples), before, after)


def run_with_adapter(
    config: FinetuneConfig,
    run: Path,
    adapter: Path,
    captured: Path | None = None,
    adapter_name: str | None = None,
) -> LoadedRun:
    """Use an existing peft adapter (trained elsewhere) on ``config.model`` instead of fine-tuning; with
    ``captured``, its training features are those the training script captured (:mod:`.capture`);
    ``adapter_name`` picks one of several adapters saved in one folder."""
    if config.lora.tuning != "lora":
        raise ConfigError("--adapter gives a LoRA adapter; it cannot be combined with --tuning full")
    adapter = adapter_folder(adapter, adapter_name)
    whole = untracked_modules(adapter_config(adapter))
    if whole and distributed.is_main():
        log.warning(
            "the adapter also trains whole modules (modules_to_save: %s): they are loaded, so the model "
            "explained is the trained one, but their gradients are not attributed; scores cover the LoRA "
            "matrices",
            ", ".join(whole),
        )
    with distributed.agree():
        task = load_task(config.data)
        settings = run_settings(config, task, adapter, captured)
    _, loaded = _start_run(run, settings, config.model)
    if distributed.is_main():
        write_json_atomic(run / DATA_FILE, _data_record(task))
    with distributed.agree():
        model = load_adapter(loaded.model, adapter)
    found = Path(settings["captured"]["path"]) if "captured" in settings else None
    return LoadedRun(run, config, task, model, loaded.tokenizer, loaded, adapter, None, found)


def open_run(run: Path, epoch: int | None = None) -> LoadedRun:
    """Reload a finished run: its task, base model and the adapter of ``epoch`` (default: the last)."""
    with distributed.agree():  # under torchrun a rank that cannot load the model stops them all
        return _open_run(run, epoch)


def _open_run(run: Path, epoch: int | None) -> LoadedRun:
    if not (run / SETTINGS_FILE).is_file():
        raise RunError(f"{run} is not a run folder (no {SETTINGS_FILE}); create one with `llm-attr run`")
    settings = read_json(run / SETTINGS_FILE)
    config = FinetuneConfig.from_dict(settings)
    task = load_task(config.data)
    if run_settings(config, task)["fingerprint"] != settings["fingerprint"]:
        raise RunError(f"the data of {run} changed since it was made; make a new run")
    loaded = load_model(config.model)
    if "adapter" in settings:
        adapter, epoch = Path(settings["adapter"]["path"]), None
    else:
        epochs = saved_epochs(run)
        if not epochs:
            raise RunError(f"{run} holds no adapter yet; finish it with `llm-attr run`")
        epoch = epoch or epochs[-1]
        if epoch not in epochs:
            raise RunError(f"{run} has no adapter for epoch {epoch} (it has {', '.join(map(str, epochs))})")
        adapter = adapter_dir(run, epoch)
    model = _load_tuned(loaded.model, config.lora, adapter)
    captured = None
    if "captured" in settings:
        captured = Path(settings["captured"]["path"])
        if not captured.is_file() or file_sha256(captured) != settings["captured"]["sha256"]:
            raise RunError(f"the gradient capture {captured} of {run} is gone or changed; make a new run")
    return LoadedRun(run, config, task, model, loaded.tokenizer, loaded, adapter, epoch, captured)


def select_epoch(loaded_run: LoadedRun, epoch: int | None) -> LoadedRun:
    """The same model with the trained weights of ``epoch`` (loaded in place; no base reload)."""
    if epoch is None or epoch == loaded_run.epoch:
        return loaded_run
    if loaded_run.epoch is None:
        raise RunError("--epoch applies to adapters this tool trained, not to a given --adapter")
    path = adapter_dir(loaded_run.run, epoch)
    if not path.is_dir():
        raise RunError(f"{loaded_run.run} has no adapter for epoch {epoch}")
    loaded_run.weights.load(path)
    loaded_run.model.eval()
    return dataclasses.replace(loaded_run, adapter=path, epoch=epoch)


def run_epochs(run: Path) -> Iterator[LoadedRun]:
    """The run's model at every saved epoch, oldest first (adapter weights swapped in place)."""
    epochs = saved_epochs(run)
    if not epochs:
        raise RunError(f"{run} holds no epoch adapters (it explains an adapter given with --adapter)")
    loaded_run = open_run(run, epochs[0])
    for epoch in epochs:
        loaded_run = select_epoch(loaded_run, epoch)
        yield loaded_run


def _load_tuned(model: PreTrainedModel, settings: LoraSettings, folder: Path) -> PeftModel | PreTrainedModel:
    """The base ``model`` with an epoch's trained weights: its peft adapter, or its full weights in place."""
    if settings.tuning == "lora":
        return load_adapter(model, folder)
    FullWeights(model, settings.full_targets).load(folder)
    model.eval()
    return model


def _spread(examples: Sequence[Example], count: int) -> list[Example]:
    """``count`` examples spread over the list (different classes in a class-sorted split)."""
    if count <= 0:
        return []
    step = max(1, len(examples) // count)
    return list(examples[::step][:count])


def _answers(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prompt: PromptSettings,
) -> list[str]:
    if not examples:
        return []
    return generate_answers(model, tokenizer, [e.prompt for e in examples], prompt)


def _data_record(task: TaskData) -> dict[str, Any]:
    return {"task": task.name, "train_ids": [e.id for e in task.train], "test_ids": [e.id for e in task.test]}


__all__ = [
    "FinetuneConfig",
    "FinetuneReport",
    "LoadedRun",
    "finetune_run",
    "open_run",
    "run_with_adapter",
    "select_epoch",
]
