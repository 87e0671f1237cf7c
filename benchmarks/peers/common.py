"""What the peer runners share: reading the exported inputs, the contract's loss, writing the outputs.

The runners run inside each peer's own throwaway venv, so this module imports only torch, transformers,
peft and numpy (never ``llm_attribution``). The contract, written by ``benchmarks/peers.py``:

- ``INPUTS/model/``: the base model as a plain Hugging Face folder (float32), with its tokenizer;
- ``INPUTS/adapter/``: the fine-tuned peft LoRA adapter;
- ``INPUTS/train.pt``, ``INPUTS/test.pt``: ``{"input_ids", "attention_mask", "labels"`` (LongTensor
  ``[n, L]``, right-padded, labels -100 where the loss ignores a token), ``"ids"``, ``"classes"}``;
- ``INPUTS/meta.json``: n_train, n_test, classes, the loss in words, the LoRA target modules.

A runner is called as ``python run_PEER.py --inputs INPUTS --out OUT [--method M]`` and writes
``OUT/scores.npy`` (float32 ``[n_test, n_train]``, HIGHER = the training example supports the test output
more) and ``OUT/meta.json`` (``peer``, ``version``, ``method``, ``sign_note``, ``stages``: seconds per
stage), or ``OUT/error.txt`` (first line: the reason) and then exits non-zero. Module constants the
harness reads without importing the runner: ``PIP_REQUIREMENTS`` and ``PIP_NO_DEPS`` (what to install
into the peer's venv, normally and with ``--no-deps``), ``METHODS`` (each is run and measured in its own
process) and optionally ``INSTALL_NOTE`` (why the install is what it is).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100
KEYS = ("input_ids", "attention_mask", "labels")
POSITIVE = "positive = a gradient step on the training example lowers the test loss, i.e. it supports it"


class Stages:
    """Seconds per named stage of a runner, in the order they first ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            print(f"stage {name}: {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)


@dataclass
class Output:
    """What a runner's body returns: the score matrix (any orientation the body has turned into
    ``[n_test, n_train]``) and the meta fields besides ``stages``."""

    scores: Any
    meta: dict[str, Any]


def load_split(inputs: Path, split: str) -> dict[str, Any]:
    """``train`` or ``test``: the padded tensors, ids and classes, in the order scores must follow."""
    data: dict[str, Any] = torch.load(inputs / f"{split}.pt", weights_only=False)
    return data


def load_meta(inputs: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((inputs / "meta.json").read_text())
    return meta


def load_model(inputs: Path) -> Any:
    """The fine-tuned model: base in float32 with the peft adapter, eval mode, only LoRA weights trainable."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(inputs / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, inputs / "adapter", is_trainable=True)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    model.eval()  # no LoRA dropout: every tool sees the same deterministic model
    return model


def lora_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules holding the LoRA matrices (``...lora_A.default`` and
    ``...lora_B.default``)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (".lora_A." in name or ".lora_B." in name)
    ]


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The contract's loss for each row of a batch: mean cross-entropy over the row's scored tokens
    (labels shifted by one, as in a Hugging Face causal LM)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counted = (shift_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counted


def gradient_dot(model: torch.nn.Module, train: dict[str, Any], test: dict[str, Any]) -> float:
    """The plain dot product of the LoRA gradients of the contract loss of test example 0 and training
    example 0: what a gradient-dot score of that pair must equal, sign included."""

    def gradient(split: dict[str, Any]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        rows = {key: split[key][:1] for key in KEYS}
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        per_example_loss(logits, rows["labels"]).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    dot = float(gradient(test) @ gradient(train))
    model.zero_grad(set_to_none=True)
    return dot


def check_dot(peer_score: float, dot: float, what: str) -> None:
    if abs(peer_score - dot) > 1e-3 * max(abs(dot), 1e-6):
        raise RuntimeError(f"sign check: {what} {peer_score:.6g} != the gradient dot product {dot:.6g}")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def checked(scores: Any, shape: tuple[int, int]) -> np.ndarray:
    """``scores`` as float32 ``[n_test, n_train]``, refusing a wrong shape or non-finite values."""
    array = np.asarray(scores, dtype=np.float32)
    if array.shape != shape:
        raise ValueError(f"the peer's scores have shape {array.shape}, expected [n_test, n_train] = {shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"the peer's scores hold {int((~np.isfinite(array)).sum())} non-finite values")
    return array


def run_main(description: str, methods: Sequence[str], body: Callable[[Path, str, Stages], Output]) -> None:
    """Parse the arguments, run ``body(inputs, method, stages)`` and write its output; on any failure write
    ``error.txt`` (first line: the reason; then the traceback) and exit 1."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--inputs", required=True, type=Path, help="folder written by benchmarks/peers.py")
    parser.add_argument("--out", required=True, type=Path, help="folder for scores.npy and meta.json")
    parser.add_argument("--method", choices=methods, default=methods[0], help="default: %(default)s")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("scores.npy", "meta.json", "error.txt"):
        (args.out / stale).unlink(missing_ok=True)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(variable, "1")  # every input is local: no runner ever asks a hub
    stages = Stages()
    try:
        meta = load_meta(args.inputs)
        output = body(args.inputs, args.method, stages)
        scores = checked(output.scores, (meta["n_test"], meta["n_train"]))
    except BaseException as error:  # whatever it is, the reason goes to error.txt
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        (args.out / "error.txt").write_text(reason + "\n\n" + traceback.format_exc())
        print(f"error: {reason}", file=sys.stderr)
        sys.exit(1)
    np.save(args.out / "scores.npy", scores)
    (args.out / "meta.json").write_text(
        json.dumps({**output.meta, "stages": stages.seconds}, indent=2) + "\n"
    )
