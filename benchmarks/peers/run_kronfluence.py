"""kronfluence on the exported run: EK-FAC influence (``--method ekfac``, the default) or its ``identity``
strategy, a gradient dot product (``--method identity``), over the LoRA matrices only. Run by
``benchmarks/peers.py`` inside kronfluence's own venv; see ``common.py`` for the contract.

- Tracked modules: the ``nn.Linear`` modules holding LoRA's A and B matrices (``...lora_A.default``,
  ``...lora_B.default``); the base weights are neither tracked nor trained.
- Train loss: the sum over the batch of the contract's per-example loss (mean token cross-entropy over the
  scored tokens), the summed loss kronfluence's docs ask for; measurement: the same loss of the test
  example. ``use_empirical_fisher=True``: the Fisher of the actual labels, as ours (kronfluence's default
  samples labels from the model instead).
- Damping: ``damping_factor=None``, kronfluence's heuristic 0.1 x the mean eigenvalue per module, which is
  ours (0.1 x the mean squared training gradient per LoRA matrix = 0.1 x trace(F) / d).
- Batches of 8 (as our gradient collection); all test gradients are held at once
  (``query_gradient_accumulation_steps``), so the training set is passed over once for the scores.
- Sign: kronfluence scores ``grad f(test)^T (F + damping)^-1 grad L(train)`` with no minus sign: with the
  test loss as the measurement, a positive score means a gradient step on the training example lowers the
  test loss, i.e. it supports the test output. So the scores are used as they are. Checked on every run:
  kronfluence's identity score of (test 0, train 0) must equal the plain dot product of the two loss
  gradients, computed here with autograd.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from common import (
    KEYS,
    POSITIVE,
    Output,
    Stages,
    check_dot,
    gradient_dot,
    load_meta,
    load_model,
    load_split,
    lora_linear_names,
    package_version,
    per_example_loss,
    run_main,
)

# Read by benchmarks/peers.py (without importing this file): kronfluence 1.0.1 requires torchvision, which
# it never imports; the PyPI torchvision wheel does not import beside this CPU torch 2.13.0, and once
# installed, transformers imports it and fails. So kronfluence goes in with --no-deps, plus the rest of its
# requirements (at the versions pip resolved for it beside transformers 5.24.0).
PIP_REQUIREMENTS = [
    "accelerate==1.15.0",
    "einconv==0.1.0",
    "einops==0.8.2",
    "opt-einsum==3.4.0",
    "safetensors==0.8.0",
    "tqdm==4.70.1",
]
PIP_NO_DEPS = ["kronfluence==1.0.1"]
INSTALL_NOTE = (
    "kronfluence installed with `--no-deps` plus its other requirements: it requires torchvision, which it "
    "never imports, and the PyPI torchvision 0.28.0 wheel pip resolves does not import beside this CPU "
    "torch 2.13.0 (`RuntimeError: operator torchvision::nms does not exist`); installed, it breaks "
    "transformers' own import of the model classes"
)
METHODS = ("ekfac", "identity")
BATCH = 8


class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """One example per item, as a dict of 1-D tensors (kronfluence's default collate stacks them)."""

    def __init__(self, split: dict[str, Any]) -> None:
        self.split = split

    def __len__(self) -> int:
        return int(self.split["input_ids"].shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: self.split[key][index] for key in KEYS}


def make_task(modules: list[str]) -> Any:
    from kronfluence.task import Task

    class ContractTask(Task):
        def compute_train_loss(
            self, batch: Any, model: torch.nn.Module, sample: bool = False
        ) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            if sample:  # the true Fisher: labels drawn from the model (not used: empirical Fisher)
                with torch.no_grad():
                    drawn = torch.distributions.Categorical(logits=logits[:, :-1].float()).sample()
                labels = labels.clone()
                labels[:, 1:] = torch.where(labels[:, 1:] != -100, drawn, labels[:, 1:])
            return per_example_loss(logits, labels).sum()

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return per_example_loss(logits, batch["labels"]).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return modules

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["attention_mask"]

    return ContractTask()


def body(inputs: Path, method: str, stages: Stages) -> Output:
    with stages("import"):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

    with stages("load"):
        meta = load_meta(inputs)
        train, test = load_split(inputs, "train"), load_split(inputs, "test")
        model = load_model(inputs)
        modules = lora_linear_names(model)
    with stages("sign check"):  # before prepare_model, which takes the weights' gradients away
        dot = gradient_dot(model, train, test)
    with stages("load"):
        task = make_task(modules)
        model = prepare_model(model=model, task=task)
    folder = tempfile.TemporaryDirectory(prefix="kronfluence-")
    analyzer = Analyzer(
        analysis_name="peers", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=folder.name
    )

    def scores(strategy: str, **indices: list[int]) -> Any:
        with stages("factors" if not indices else "sign check"):
            analyzer.fit_all_factors(
                factors_name=strategy,
                dataset=Rows(train),
                per_device_batch_size=BATCH,
                factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=True),
            )
        name = strategy + ("-check" if indices else "")
        with stages("scores" if not indices else "sign check"):
            analyzer.compute_pairwise_scores(
                scores_name=name,
                factors_name=strategy,
                query_dataset=Rows(test),
                train_dataset=Rows(train),
                per_device_query_batch_size=BATCH,
                per_device_train_batch_size=BATCH,
                score_args=ScoreArguments(
                    damping_factor=None, query_gradient_accumulation_steps=-(-meta["n_test"] // BATCH)
                ),
                **indices,
            )
            return analyzer.load_pairwise_scores(scores_name=name)["all_modules"].float().numpy()

    matrix = scores(method)
    check = matrix if method == "identity" else scores("identity", query_indices=[0], train_indices=[0])
    check_dot(float(check[0, 0]), dot, "kronfluence's identity score")
    folder.cleanup()
    if method == "ekfac":
        what = "EK-FAC influence"
        formula = "grad(test loss)^T (F_EK-FAC + damping)^-1 grad(train loss)"
        extra = " Empirical Fisher; damping 0.1 x the mean eigenvalue per module, as ours."
    else:
        what, formula, extra = "identity (gradient dot)", "grad(test loss) . grad(train loss)", ""
    return Output(
        scores=matrix,
        meta={
            "peer": "kronfluence",
            "version": package_version("kronfluence"),
            "method": what,
            "sign_note": (
                f"kronfluence's pairwise score is {formula}, {POSITIVE}; used as is. Checked: its identity "
                f"score of (test 0, train 0) equals the plain gradient dot product ({dot:.4g}).{extra} "
                f"{len(modules)} LoRA Linear modules tracked."
            ),
        },
    )


if __name__ == "__main__":
    run_main(__doc__.splitlines()[0], METHODS, body)
