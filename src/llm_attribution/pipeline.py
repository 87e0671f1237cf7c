"""The pipeline as library calls: the CLI and the Python API both go through these functions."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data.loaders import load_task
from .data.schema import Example, TaskData
from .data.settings import DataSettings
from .data.templates import PromptSettings
from .errors import RunError
from .models.finetune import LossCurve, TrainSettings, finetune
from .models.generate import generate_answers
from .models.lora import attach_lora, load_adapter
from .models.resolve import load_model
from .models.settings import LoraSettings, ModelSettings
from .run_layout import DATA_FILE, FINETUNE_FILE, SETTINGS_FILE, adapter_dir, saved_epochs
from .settings import to_dict
from .storage import read_json, write_json_atomic
from .versions import package_versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines a fine-tuned adapter."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: to_dict(getattr(self, name)) for name in ("data", "model", "lora", "prompt", "train")}


@dataclass
class FinetuneReport:
    """What :func:`finetune_run` did: where, the loss curve, and answers before/after for a few tests."""

    run: Path
    epochs: list[int]
    curve: LossCurve
    reused: bool
    examples: list[Example] = field(default_factory=list)
    answers_before: list[str] = field(default_factory=list)
    answers_after: list[str] = field(default_factory=list)


def data_fingerprint(examples: Sequence[Example]) -> str:
    """SHA-256 over ids, prompts, responses and labels: any change to the data changes it."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.id, e.prompt, e.response, e.label]).encode())
    return digest.hexdigest()


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


def finetune_run(config: FinetuneConfig, run: Path, show: int = 0) -> FinetuneReport:
    """Load data and model, fine-tune with LoRA, save an adapter per epoch into ``run``.

    ``show`` > 0 generates greedy answers for that many test prompts before and after fine-tuning.
    A run folder that already holds every epoch with the same settings is reused, not retrained.
    """
    task = load_task(config.data)
    # The data's content is part of what produced the adapter: a changed file must not reuse the run.
    settings = {
        **config.to_dict(),
        "fingerprint": {"train": data_fingerprint(task.train), "test": data_fingerprint(task.test)},
    }
    existed = check_run_dir(run, settings)
    loaded = load_model(config.model)  # before anything is written: a bad model leaves no folder behind
    if not existed:
        run.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run / SETTINGS_FILE, settings)
    examples = _spread(task.test, show)
    before = _answers(loaded.model, loaded.tokenizer, examples, config.prompt)
    done = saved_epochs(run)
    if existed and done == list(range(1, config.train.epochs + 1)) and (run / FINETUNE_FILE).is_file():
        log.info("%s already holds all %d epochs with these settings: reusing them", run, config.train.epochs)
        recorded = read_json(run / FINETUNE_FILE)["loss"]
        curve = LossCurve(recorded["step_loss"], recorded["epoch_loss"], recorded["seconds_per_epoch"])
        model = load_adapter(loaded.model, adapter_dir(run, config.train.epochs))
        reused = True
    else:
        write_json_atomic(run / DATA_FILE, _data_record(task))
        torch.manual_seed(config.train.seed)  # seeds the LoRA A initialisation
        model = attach_lora(loaded.model, config.lora)
        start = time.perf_counter()
        curve = finetune(model, loaded.tokenizer, task.train, config.prompt, config.train, run)
        write_json_atomic(
            run / FINETUNE_FILE,
            {
                "loss": curve.to_dict(),
                "seconds": time.perf_counter() - start,
                "n_train": len(task.train),
                "device": str(loaded.device),
                "model_source": loaded.source,
                "versions": package_versions(),
            },
        )
        reused = False
    after = _answers(model, loaded.tokenizer, examples, config.prompt)
    return FinetuneReport(run, saved_epochs(run), curve, reused, list(examples), before, after)


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
    return {
        "task": task.name,
        "train_ids": [e.id for e in task.train],
        "test_ids": [e.id for e in task.test],
    }
