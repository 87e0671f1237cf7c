"""Names of the files and folders in a run folder and a study folder, declared once.

```
RUN/
  settings.json        every setting that produced the run (compared before anything is reused)
  data.json            the train and test example ids the run used, in order
  finetune.json        loss curve (per step and per epoch), timings, versions
  train_state.pt       optimizer, schedule and random states after the last saved step (for resuming)
  adapters/epoch-1/    peft adapter (adapter_model.safetensors + adapter_config.json) after epoch 1, or
                       with --tuning full the trained weights (full_weights.safetensors + full_config.json),
                       and AdamW's moments at that point (optimizer_moments.safetensors; LESS, TrackStar)
  adapters/epoch-2/    ...
  features/            the feature store (llm_attribution.features.store): one folder per split and key
  scores/              the score store (llm_attribution.scoring.store): one matrix per method
  results.json         per method: accuracy, coverage, seconds, settings, iHVP comparison
  diagnostics/         spectrum.json, ihvp.json, convergence.json, parameters.json
  lds/                 ground truth by retraining on random half-subsets (llm-attr lds):
    settings.json        the subset fraction and seeds every subset file was made with
    seed-<s>/subset-<i>.safetensors   each test example's losses after retraining on subset i with seed s
    work/                the training state of retrains under way (removed when each is done)
    lds.json             per method and control: LDS with its interval; the noise ceiling
  counterfactual/      remove each method's top-k, retrain (llm-attr counterfactual):
    group-<g>/<source>-k<k>.safetensors   the test losses and answers after that removal
    counterfactual.json  per group, source and k: loss change and behaviour rate
  curvature/           <kind>.safetensors (scores, test_rows) per curvature, and curvature.json
  report.html, report.md
STUDY/
  study.json           the judged grid
  <task>/seed-<s>/     one RUN folder per cell
```
"""

from __future__ import annotations

from pathlib import Path

from ..models.finetune import Checkpoints
from ..models.tuning import is_checkpoint

SETTINGS_FILE = "settings.json"
DATA_FILE = "data.json"
FINETUNE_FILE = "finetune.json"
ADAPTERS_DIR = "adapters"
TRAIN_STATE_FILE = "train_state.pt"
FEATURES_DIR = "features"
SCORES_DIR = "scores"
RESULTS_FILE = "results.json"
DIAGNOSTICS_DIR = "diagnostics"
CURVATURE_DIR = "curvature"
CURVATURE_FILE = "curvature.json"
STUDY_FILE = "study.json"
CELL_FILE = "cell.json"  # a study cell's per-test metrics, judged without its scores (study_cells)
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
LDS_DIR = "lds"
LDS_FILE = "lds.json"
COUNTERFACTUAL_DIR = "counterfactual"
COUNTERFACTUAL_FILE = "counterfactual.json"
EXPLANATIONS_DIR = "explanations"  # every answer `explain` ranked, one JSON each (the report shows them)
TRACES_DIR = "traces"  # every `trace` of the run, one JSON each (the report's explorer shows them)


def explanation_file(run: Path, key: str) -> Path:
    """Where the explanation with content key ``key`` (a hash of the query and methods) is kept."""
    return run / EXPLANATIONS_DIR / f"{key}.json"


def adapter_dir(run: Path, epoch: int) -> Path:
    return run / ADAPTERS_DIR / f"epoch-{epoch}"


def features_dir(run: Path) -> Path:
    return run / FEATURES_DIR


def scores_dir(run: Path) -> Path:
    return run / SCORES_DIR


def diagnostic_file(run: Path, name: str) -> Path:
    """``RUN/diagnostics/<name>.json`` (name: spectrum, ihvp, convergence or parameters)."""
    return run / DIAGNOSTICS_DIR / f"{name}.json"


def lds_dir(run: Path) -> Path:
    return run / LDS_DIR


def lds_subset_file(run: Path, seed: int, index: int) -> Path:
    """The test losses of the model retrained with ``seed`` on LDS subset ``index``."""
    return run / LDS_DIR / f"seed-{seed}" / f"subset-{index:04d}.safetensors"


def lds_work_dir(run: Path, seed: int, index: int) -> Path:
    """Where a retrain under way keeps its training state (resumable mid-way; removed when done)."""
    return run / LDS_DIR / "work" / f"seed-{seed}-subset-{index:04d}"


def counterfactual_dir(run: Path) -> Path:
    return run / COUNTERFACTUAL_DIR


def counterfactual_file(run: Path, group: int, source: str, k: int) -> Path:
    """The test losses (and answers) of the model retrained without ``source``'s top ``k`` for ``group``."""
    return run / COUNTERFACTUAL_DIR / f"group-{group}" / f"{source}-k{k}.safetensors"


def counterfactual_work_dir(run: Path, group: int, source: str, k: int) -> Path:
    return run / COUNTERFACTUAL_DIR / "work" / f"group-{group}-{source}-k{k}"


def curvature_file(run: Path) -> Path:
    """``RUN/curvature/curvature.json``: settings, damping, residuals and timings of the curvature solves."""
    return run / CURVATURE_DIR / CURVATURE_FILE


def curvature_scores_file(run: Path, kind: str) -> Path:
    """``RUN/curvature/<kind>.safetensors`` (kind: hessian, gauss-newton or fisher)."""
    return run / CURVATURE_DIR / f"{kind}.safetensors"


def study_cell(study: Path, task: str, seed: int) -> Path:
    """The run folder of one (task, seed) cell of a study."""
    return study / task / f"seed-{seed}"


def saved_epochs(run: Path) -> list[int]:
    """Epochs whose adapter (or full weights) is complete on disk, ascending."""
    root = run / ADAPTERS_DIR
    if not root.is_dir():
        return []
    epochs = []
    for child in root.iterdir():
        name = child.name
        if name.startswith("epoch-") and name[6:].isdigit() and is_checkpoint(child):
            epochs.append(int(name[6:]))
    return sorted(epochs)


def checkpoints(run: Path) -> Checkpoints:
    """Where fine-tuning a run saves its epoch adapters and its training state."""
    return Checkpoints(adapter=lambda epoch: adapter_dir(run, epoch), state=run / TRAIN_STATE_FILE)
