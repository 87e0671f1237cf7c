"""Settings of the data stage: which task, how its fields map, and how it is subsampled."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.settings import option, require, require_positive


@dataclass(frozen=True)
class DataSettings:
    """Where the examples come from and which of them a run uses."""

    task: str = option(
        "grammars",
        "a built-in task (grammars, math, backdoor), a dataset folder (Hugging Face save_to_disk, "
        "or a folder of train/test .jsonl/.csv files), a .jsonl/.csv file, or a hub dataset id",
    )
    prompt_field: str = option("auto", "field holding the prompt (auto: 'prompt' or the study's 'prompts')")
    response_field: str = option("response", "field holding the response")
    label_field: str = option(
        "auto", "field holding the class label (auto: 'label' or the study's 'variation')"
    )
    id_field: str = option(
        "auto", "field holding a stable example id (auto: 'id' if present, else split-index)"
    )
    train_split: str = option("train", "name of the training split")
    test_split: str = option("test", "name of the test split")
    test_fraction: float = option(
        0.1, "share of examples held out as the test split when the data has a single split"
    )
    train_limit: int | None = option(
        None, "use at most this many training examples (stratified by label, seeded)"
    )
    test_limit: int | None = option(None, "use at most this many test examples (stratified by label, seeded)")
    data_seed: int = option(0, "seed for built-in task generation, splitting and subsampling")

    def __post_init__(self) -> None:
        require(bool(self.task.strip()), "--task must not be empty")
        require(
            0.0 < self.test_fraction < 1.0, f"--test-fraction must be in (0, 1), got {self.test_fraction!r}"
        )
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None:
                require_positive(name, value)
