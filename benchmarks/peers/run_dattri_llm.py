"""Peer runner: dattri-llm (TRAIS Lab, PyPI ``dattri-llm``) on the harness's inputs.

Called as ``<venv>/bin/python benchmarks/peers/run_dattri_llm.py --inputs DIR --out OUT`` in a throwaway
venv; it never imports ``llm_attribution``. ``DIR`` holds ``model/``, ``adapter/``, ``train.pt``, ``test.pt``
and ``meta.json``; the runner writes ``OUT/scores.npy`` (float32 ``[n_test, n_train]``, higher = the
training example supports the test output more) and ``OUT/meta.json``, or ``OUT/error.txt`` and exits 1.

Install recipe (the harness reads the two constants below): a venv with a constraints file holding
``torch==2.13.0``, then ``pip install -c constraints.txt torch==2.13.0 transformers==5.24.0 peft==0.21.2
numpy`` plus ``PIP_REQUIREMENTS``. dattri-llm's core needs only torch and tqdm; its live ``attribute()``
path imports ``transformers`` (present). The optional ``dattri`` package is needed only for capture-time
random projection, which these methods do not use, so it is not installed. Nothing needs ``--no-deps``.

Methods (``--method``):

* ``grad-dot`` (default): ``TracInAttributor`` at the one (final) checkpoint with ``normalized_grad=False``,
  i.e. the plain inner product of per-example LoRA gradients, ``<g_test, g_train>``. This is the same
  quantity as our ``hessian-free`` method, with no projection (dattri-llm keeps each gradient exactly, as the
  (activation, output-gradient) factors its hooks capture), so it should agree with a brute-force
  grad-dot to float precision.
* ``ekfac``: ``EKFACAttributor``: ``g_test^T (F_ekfac + lambda I)^-1 g_train`` per LoRA matrix, with the
  EK-FAC Fisher fit on the training gradients and ``relative_damping`` (lambda = ``DAMPING`` x the
  layer's mean corrected eigenvalue), the analogue of our ``exact`` method's damping (0.1 x the mean squared
  training gradient per block). The closest dattri-llm has to our inverse-Fisher methods; it has no
  DataInf or LiSSA.

Sign: dattri-llm scores are inner products of loss gradients (TracIn) or of a loss gradient with a
preconditioned one (EK-FAC); a positive score means a gradient step on the training example lowers the
test loss, i.e. the example supports the test output. That is already our convention: no sign change.

Loss: per example, the mean token cross-entropy over positions whose label is not -100 (HF causal-LM
shift). The runner's ``loss_func`` returns the *sum over the batch* of those per-example means, so each
per-example gradient dattri-llm captures is exactly the gradient of that example's own loss, for any batch
size. Gradients are over the LoRA parameters only: the adapter is loaded trainable and everything else is
frozen, and dattri-llm hooks only trainable layers (``lora_A`` / ``lora_B``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Output, Stages, run_main

PEER = "dattri-llm"
PIP_REQUIREMENTS = ["dattri-llm==0.1.0"]
PIP_NO_DEPS: list[str] = []
INSTALL_NOTE = (
    "dattri-llm's core needs only torch and tqdm, and its live attribute() path transformers (pinned for "
    "every peer); the optional dattri package (capture-time random projection) is not needed for these "
    "unprojected methods and is not installed"
)
METHODS = ("grad-dot", "ekfac")
BATCH_SIZE = 8  # examples per forward/backward pass
DAMPING = 0.1  # ekfac: damping relative to the mean eigenvalue, as ours
SIGN_NOTE = (
    "dattri-llm's score is <g_test, g_train> (TracIn) or g_test^T F^-1 g_train (EK-FAC) over loss "
    "gradients: positive = a step on the training example lowers the test loss = supports. "
    "Same sign as ours; written unchanged."
)


def run(args: argparse.Namespace, workdir: Path, stages: dict[str, float]) -> Output:
    start = time.perf_counter()
    import dattri_llm
    import numpy as np
    import torch
    import torch.nn.functional as F
    from dattri_llm import AttributionArguments, AttributionTask, EKFACAttributor, TracInAttributor
    from dattri_llm.utils.hashing import hash_batch
    from peft import PeftModel
    from torch.utils.data import Dataset
    from transformers import AutoModelForCausalLM

    stages["import"] = time.perf_counter() - start

    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(args.inputs / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.inputs / "adapter", is_trainable=True)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_A" in name or "lora_B" in name)
    model.eval()  # no LoRA dropout: the gradient of the loss as defined
    train = torch.load(args.inputs / "train.pt", weights_only=False)
    test = torch.load(args.inputs / "test.pt", weights_only=False)
    stages["load"] = time.perf_counter() - start

    class Examples(Dataset):
        def __init__(self, data: dict[str, Any]) -> None:
            self.data = data

        def __len__(self) -> int:
            return len(self.data["ids"])

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {key: self.data[key][i] for key in ("input_ids", "attention_mask", "labels")}

    def loss_func(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Columns after the batch's last real token are cut, as a collator padding per batch would (the
        # examples arrive right-padded to the longest of the whole set); the row hashes ignore padding.
        mask = batch["attention_mask"]
        width = int(((mask > 0) * torch.arange(1, mask.shape[1] + 1, device=mask.device)).max())
        ids, mask, labels = (batch[key][:, :width] for key in ("input_ids", "attention_mask", "labels"))
        # labels stay out of the model call: the hashes that key dattri-llm's rows are of the model inputs.
        logits = net(input_ids=ids, attention_mask=mask).logits
        labels = labels[:, 1:]
        tokens = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        per_example = tokens.sum(dim=1) / (labels != -100).sum(dim=1).clamp_min(1)
        return per_example.sum()

    attribution_args = AttributionArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        max_grad_norm=None,  # no clipping of anything
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=False,
        seed=0,
    )
    task = AttributionTask(loss_func, model)
    start = time.perf_counter()
    options: dict[str, Any] = {"batch_size": args.batch_size}
    if args.method == "grad-dot":
        score = TracInAttributor(attribution_args, task=task).attribute(
            Examples(train), Examples(test), normalized_grad=False
        )
        method = "TracInAttributor (single checkpoint, normalized_grad=False) = LoRA gradient dot product"
    else:
        score = EKFACAttributor(attribution_args, task=task).attribute(
            Examples(train), Examples(test), damping=args.damping, relative_damping=True
        )
        options.update(damping=args.damping, relative_damping=True)
        method = f"EKFACAttributor (damping {args.damping} x mean corrected eigenvalue per layer)"
    stages["attribute"] = time.perf_counter() - start

    start = time.perf_counter()
    matrix = score.scores.detach().to(torch.float64)  # [n_train rows, n_test]
    rows = reorder(list(score.row_train_ids), hash_batch(keys(train), len(train["ids"])), "train")
    cols = reorder(list(score.test_ids), hash_batch(keys(test), len(test["ids"])), "test")
    scores = matrix[rows][:, cols].T.contiguous().numpy().astype(np.float32)
    stages["read scores"] = time.perf_counter() - start
    return Output(
        scores,
        {
            "peer": PEER,
            "version": dattri_llm.__version__,
            "method": method,
            "method_key": args.method,
            "sign_note": SIGN_NOTE,
            "options": options,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    )


def keys(data: dict[str, Any]) -> dict[str, Any]:
    """The fields the model is called with, which dattri-llm hashes into each row's id."""
    return {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}


def reorder(got: list[str], expected: list[str], side: str) -> list[int]:
    """Indices into dattri-llm's rows (content hashes) that put them in our order."""
    if len(got) != len(expected):
        raise RuntimeError(f"dattri-llm returned {len(got)} {side} rows for {len(expected)} {side} examples")
    if got == expected:
        return list(range(len(got)))
    if len(set(got)) != len(got) or set(got) != set(expected):
        raise RuntimeError(f"dattri-llm's {side} row ids do not match the {side} examples' content hashes")
    position = {h: i for i, h in enumerate(got)}
    return [position[h] for h in expected]


def body(inputs: Path, method: str, stages: Stages) -> Output:
    """The harness's entry (via ``common.run_main``): dattri-llm, in a scratch folder removed after."""
    args = argparse.Namespace(inputs=inputs, method=method, batch_size=BATCH_SIZE, damping=DAMPING)
    with tempfile.TemporaryDirectory(prefix="dattri-llm-") as work:
        return run(args, Path(work).resolve(), stages.seconds)


if __name__ == "__main__":
    run_main(__doc__.splitlines()[0], METHODS, body)
