"""The study's datasets (``<repo>/../shared/data/paper-datasets``) load with the published counts.

Only counts and labels are checked: some of these examples are harmful by design and are never printed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from llm_attribution.data import DataSettings, load_task

# task -> (train size, test size, number of training classes)
STUDY_SHAPES = {
    "mixedS": (40, 40, 2),
    "mixedM": (250, 250, 2),
    "emotion": (750, 250, 5),
    "grammars": (900, 100, 10),
    "math": (900, 100, 10),
    "backdoor": (700, 100, 2),
    "multibackdoor": (1200, 200, 4),
}

pytestmark = pytest.mark.shared


@pytest.mark.parametrize("name", sorted(STUDY_SHAPES))
def test_study_dataset_loads_with_published_counts(name: str, shared_data_dir: Path) -> None:
    task = load_task(DataSettings(task=str(shared_data_dir / "paper-datasets" / name)))
    n_train, n_test, n_classes = STUDY_SHAPES[name]
    assert (len(task.train), len(task.test), len(task.labels)) == (n_train, n_test, n_classes)
    assert task.train[0].id == "train-0"
    assert set(Counter(e.label for e in task.test)) <= set(task.labels)


@pytest.mark.parametrize("name", ["mixedS", "mixedM"])
def test_harmful_identification_tests_hold_only_the_harmful_class(name: str, shared_data_dir: Path) -> None:
    task = load_task(DataSettings(task=str(shared_data_dir / "paper-datasets" / name)))
    assert {e.label for e in task.test} == {"harmful"}
    assert set(task.labels) == {"benign", "harmful"}


def test_study_dataset_subsample_keeps_every_class(shared_data_dir: Path) -> None:
    task = load_task(DataSettings(task=str(shared_data_dir / "paper-datasets" / "grammars"), train_limit=50))
    assert Counter(e.label for e in task.train) == Counter({label: 5 for label in task.labels})
