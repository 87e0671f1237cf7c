"""Names of the files and folders in a run folder, declared once.

```
RUN/
  settings.json        every setting that produced the run (compared before anything is reused)
  data.json            the train and test example ids the run used, in order
  finetune.json        loss curve (per step and per epoch), timings, versions
  train_state.pt       optimizer, schedule and random states after the last finished epoch (for resuming)
  adapters/epoch-1/    peft adapter (adapter_model.safetensors + adapter_config.json) after epoch 1
  adapters/epoch-2/    ...
```
"""

from __future__ import annotations

from pathlib import Path

from ..models.finetune import Checkpoints

SETTINGS_FILE = "settings.json"
DATA_FILE = "data.json"
FINETUNE_FILE = "finetune.json"
ADAPTERS_DIR = "adapters"
TRAIN_STATE_FILE = "train_state.pt"


def adapter_dir(run: Path, epoch: int) -> Path:
    return run / ADAPTERS_DIR / f"epoch-{epoch}"


def saved_epochs(run: Path) -> list[int]:
    """Epochs whose adapter is complete on disk, ascending."""
    root = run / ADAPTERS_DIR
    if not root.is_dir():
        return []
    epochs = []
    for child in root.iterdir():
        name = child.name
        if name.startswith("epoch-") and name[6:].isdigit() and (child / "adapter_config.json").is_file():
            epochs.append(int(name[6:]))
    return sorted(epochs)


def final_adapter(run: Path) -> Path | None:
    """The adapter of the last saved epoch, or None when the run has none."""
    epochs = saved_epochs(run)
    return adapter_dir(run, epochs[-1]) if epochs else None


def checkpoints(run: Path) -> Checkpoints:
    """Where fine-tuning a run saves its epoch adapters and its training state."""
    return Checkpoints(adapter=lambda epoch: adapter_dir(run, epoch), state=run / TRAIN_STATE_FILE)
