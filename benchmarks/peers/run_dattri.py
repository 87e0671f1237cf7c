"""dattri on the exported run: its DataInf attributor (``--method datainf``, the default) or its TracIn
attributor on one checkpoint, a gradient dot product (``--method grad-dot``), over the LoRA matrices only.
Run by ``benchmarks/peers.py`` inside dattri's own venv; see ``common.py`` for the contract.

- dattri works on ``torch.func`` functional losses of a parameter dict: the loss takes the LoRA
  parameters (the model's only trainable ones) and one example, and returns the contract's loss (mean
  token cross-entropy over the scored tokens); dattri vmaps its gradient over each batch. The model gets
  the 4-D causal and padding mask ready-made (``full_mask``; checked on every run to give the loss the 2-D
  mask gives), because transformers' own mask building does not go through ``vmap``.
- DataInf's "layers" are dattri's: one per module holding parameters, so one per LoRA matrix, as ours.
  dattri takes one damping (``regularization``) for every layer, default 0.0, which divides by zero;
  we give it ours averaged over the LoRA parameters: 0.1 x the mean squared training gradient, computed
  from the training gradients dattri caches (ours has one per LoRA matrix: 0.1 x that matrix's mean).
- Batches: dattri recomputes the test gradients (and DataInf its transform of them) for every training
  batch, so the training batch should be large, but a vmapped backward pass over a batch takes memory
  (measured here: peak RSS 4.8 GB at 16 examples, 8.2 GB at 32). ``TRAIN_BATCH`` 32 keeps the run near
  8 GB on this shared 24 GB machine; test batches (``TEST_BATCH``) change memory, not work.
- Everything runs under ``torch.no_grad()``: dattri's per-example gradients come from ``torch.func.grad``,
  which ignores an outer ``no_grad``, but without one the gradients it caches keep the autograd graph of
  their batch alive (the LoRA parameters it differentiates require grad): measured, RSS grew by about
  2.5 GB per training batch of 16 and the kernel killed the run at 20 GB.
- Sign: dattri's inner-product attributors return ``g_train^T H^-1 g_test`` (shape [n_train, n_test]) with
  no minus sign, the test loss as target: positive = a gradient step on the training example lowers the
  test loss (supports it). So the scores are transposed and used as they are (checked on every run:
  TracIn with weight 1 must equal the plain gradient dot product on one pair). TracIn's default random
  projection of the gradients (to 512 numbers) is switched off, so it is the exact gradient dot product.
"""

from __future__ import annotations

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
    package_version,
    per_example_loss,
    run_main,
)

# Read by benchmarks/peers.py (without importing this file): dattri's own requirements are light (numpy,
# scipy, pyyaml, tqdm, pretty_midi) and it does not require torch, so the plain install is kept.
PIP_REQUIREMENTS = ["dattri==0.3.0"]
PIP_NO_DEPS: list[str] = []
METHODS = ("datainf",)
# Not measured by default: dattri's TracIn costs as much as its DataInf here (~15 minutes at 300 x 100).
OPTIONAL_METHODS = ("grad-dot",)
TRAIN_BATCH = 32
TEST_BATCH = 8
DAMPING_SCALE = 0.1


def loader(split: dict[str, Any], batch_size: int) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    data = torch.utils.data.TensorDataset(*(split[key] for key in KEYS))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def full_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The causal and padding mask ``[b, 1, L, L]`` (True = attend) that transformers builds from the 2-D
    mask. Given ready-made, transformers skips building it, whose check "is there any padding?" is
    data-dependent control flow, which ``torch.func.vmap`` (dattri's per-example gradients) refuses."""
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None, :, :] & attention_mask.bool()[:, None, None, :]


def body(inputs: Path, method: str, stages: Stages) -> Output:
    with stages("import"):
        from dattri.algorithm import IFAttributorDataInf, TracInAttributor
        from dattri.task import AttributionTask

    with stages("load"):
        meta = load_meta(inputs)
        train, test = load_split(inputs, "train"), load_split(inputs, "test")
        model = load_model(inputs)

    def loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # one example: [1, L] each from the inner-product attributors, [L] from TracIn (dattri vmaps)
        input_ids, attention_mask, labels = (x if x.dim() == 2 else x.unsqueeze(0) for x in data)
        logits = torch.func.functional_call(
            model,
            params,
            args=(),
            kwargs={"input_ids": input_ids, "attention_mask": full_mask(attention_mask)},
        ).logits
        return per_example_loss(logits, labels).sum()

    with stages("sign check"):
        dot = gradient_dot(model, train, test)
        with torch.no_grad():
            rows = tuple(train[key][:1] for key in KEYS)
            given = float(loss(dict(model.named_parameters()), rows))
            logits = model(input_ids=rows[0], attention_mask=rows[1]).logits
            expected = float(per_example_loss(logits, rows[2]).sum())
        if abs(given - expected) > 1e-5 * abs(expected):
            raise RuntimeError(
                f"mask check: loss with the 4-D mask {given:.6g} != with the 2-D mask {expected:.6g}"
            )

    task = AttributionTask(
        loss_func=loss,
        model=model,
        checkpoints=[{}],  # the model already holds the fine-tuned weights
        checkpoints_load_func=lambda model, checkpoint: model,
    )
    train_batch, test_batch = min(TRAIN_BATCH, meta["n_train"]), min(TEST_BATCH, meta["n_test"])

    def tracin(train_rows: dict[str, Any], test_rows: dict[str, Any]) -> Any:
        attributor = TracInAttributor(
            task=task, weight_list=torch.ones(1), normalized_grad=False, device="cpu"
        )
        attributor.projector_kwargs = None  # its default projects gradients to 512 numbers: we want the dot
        with torch.no_grad():
            return attributor.attribute(
                loader(train_rows, train_batch), loader(test_rows, test_batch)
            ).T.numpy()

    if method == "datainf":
        with stages("cache"), torch.no_grad():
            attributor = IFAttributorDataInf(task=task, device="cpu", regularization=1.0)
            attributor.cache(loader(train, train_batch))
            cached = attributor._cached_train_reps[0]  # [n_train, n_params]: the training gradients it keeps
            damping = DAMPING_SCALE * float(cached.detach().double().square().mean())
            attributor.regularization = damping
        with stages("attribute"), torch.no_grad():
            scores = attributor.attribute(loader(train, train_batch), loader(test, test_batch)).T.numpy()
        with stages("sign check"):
            first = {key: value[:1] for key, value in train.items() if key in KEYS}
            check = tracin(first, {key: value[:1] for key, value in test.items() if key in KEYS})
        what = "DataInf"
        formula = "g_train^T H_DataInf^-1 g_test"
        extra = (
            f" One damping for all LoRA matrices (dattri's `regularization`, default 0.0, which divides by "
            f"zero): {damping:.3g} = 0.1 x the mean squared training gradient over all of them (ours: 0.1 x "
            "the mean per matrix)."
        )
    else:
        with stages("attribute"):
            scores = check = tracin(train, test)
        what, formula, extra = "TracIn, 1 checkpoint, weight 1 (gradient dot)", "g_train . g_test", ""
    check_dot(float(check[0, 0]), dot, "dattri's TracIn score")
    return Output(
        scores=scores,
        meta={
            "peer": "dattri",
            "version": package_version("dattri"),
            "method": what,
            "sign_note": (
                f"dattri returns {formula} as [n_train, n_test], {POSITIVE}; transposed, used as is. "
                f"Checked: its TracIn score (weight 1, no projection) of (test 0, train 0) equals the plain "
                f"gradient dot product ({dot:.4g}).{extra}"
            ),
        },
    )


if __name__ == "__main__":
    run_main(__doc__.splitlines()[0], METHODS + OPTIONAL_METHODS, body)
