"""Peer runner: Bergson (EleutherAI, PyPI ``bergson``) on the harness's inputs.

Called as ``<venv>/bin/python benchmarks/peers/run_bergson.py --inputs DIR --out OUT`` in a throwaway venv;
it never imports ``llm_attribution``. ``DIR`` holds ``model/``, ``adapter/``, ``train.pt``, ``test.pt`` and
``meta.json``; the runner writes ``OUT/scores.npy`` (float32 ``[n_test, n_train]``, higher = the training
example supports the test output more) and ``OUT/meta.json``, or ``OUT/error.txt`` and exits 1.

Install recipe (the harness reads the two constants below): a venv with a constraints file holding
``torch==2.13.0``, then ``pip install -c constraints.txt torch==2.13.0 transformers==5.24.0 peft==0.21.2
numpy``, then ``pip install -c constraints.txt`` the ``PIP_REQUIREMENTS`` list, then ``pip install -c
constraints.txt --no-deps`` the ``PIP_NO_DEPS`` list (Bergson itself). Bergson declares torchvision,
torchaudio, bitsandbytes and torchopt as dependencies. torchopt is imported (by ``bergson.magic``, which
``bergson.cli.commands`` and hence the EK-FAC pipeline import) and is installed: its 0.7.3 wheel, built for
an older torch, imports beside torch 2.13.0 (its C++ ops are not used here). torchvision and torchaudio are
imported nowhere in Bergson, and bitsandbytes only through transformers' ``BitsAndBytesConfig`` for
``precision`` int4/int8, which is not used; so all three are left out. Installing them would not be
harmless: PyPI's torchvision does not import beside the local torch 2.13.0 CPU build ("operator
torchvision::nms does not exist"), and transformers imports an installed torchvision on some code paths.
``pip check`` then reports the three missing; that is expected.

What runs is Bergson's own pipeline, in process (world size 1, so no process is spawned; Gloo is never
needed): the same functions its CLI calls. The inputs are written as a pre-tokenized ``datasets`` folder
(``input_ids`` and ``labels`` with each example's padding removed) and the adapter is copied with
``base_model_name_or_path`` pointing at ``DIR/model``, which is how Bergson's ``setup_model_and_peft`` finds
the base of a PEFT adapter; it then tracks exactly the ``lora_A`` / ``lora_B`` modules.

Methods (``--method``):

* ``grad-dot`` (default): ``bergson build`` on the test set (the query index), then ``bergson score`` of the
  training set against it, unprojected (``projection_dim=0``), no preconditioner, no unit normalisation,
  fp32: ``<g_train, g_test>`` over the LoRA parameters. This is our ``hessian-free`` method, exactly.
* ``ekfac``: ``bergson ekfac`` (``hessian_pipeline``): KFAC factors with eigenvalue correction (EK-FAC) fit
  on the training set with the dataset labels (the empirical Fisher, as ours), the damped inverse
  ``1 / (lambda + c * mean(lambda))`` with ``c = DAMPING`` (0.1, Bergson's default and our ``exact``
  method's 0.1 x mean squared gradient) applied to every query gradient, then scored against the raw
  training gradients. The closest Bergson has to our inverse-Fisher methods; it has no DataInf.
* ``trackstar``: ``bergson trackstar`` (its ``trackstar`` pipeline): every LoRA matrix's gradient randomly
  projected (Bergson's TrackStar default ``projection_dim`` 16), a dense autocorrelation matrix of the
  projected training gradients per module as the Fisher correction, applied two-sided (``R^-1/2`` to query
  and training gradients, damped inverse with the same ``c`` 0.1), and unit norms: a cosine of corrected,
  projected gradients. ``unit_normalize`` is set (Bergson's ``PreprocessConfig`` defaults it off, which
  would make the correction one-sided and the score not a cosine, unlike TrackStar). Its mixing of the
  query set's autocorrelation into the training set's is turned off (``mix_hessians=False``, the option
  Bergson gives for a query set drawn like the training set and too small for its own estimate: our test
  split is 100 examples of the same distribution, and the mixing's default aims at 1000 downweighted
  components of a 65K-dimensional projection), and every example is used for the autocorrelation
  (``stats_sample_size=None``). No optimizer second moments enter (the adapter folder carries no optimizer
  state, and Bergson's TrackStar pipeline reads none); ours divides by them and is unprojected, with no
  Fisher correction: the two share the cosine and the name, not the preconditioner.

Sign: Bergson's scores for these methods have ``higher_is_better=True`` (its ScoreConfig): a positive score
is a proponent, i.e. a gradient step on the training example lowers the query's loss. That is already our
convention: the scores are written unchanged.

Loss: ``loss_reduction="mean"`` gives, per example, the mean token cross-entropy over positions whose next
label is not -100 (Bergson's default, "sum", would weight long examples more). Bergson calls the model
without an attention mask on right-padded batches; with causal attention and padding only at the end, the
real positions see exactly what they would unpadded, so the loss is the contract's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Output, Stages, run_main

PEER = "bergson"
# Bergson's own dependencies, less torchvision, torchaudio and bitsandbytes (see the docstring); the
# versions pip resolved beside transformers 5.24.0 when this was tested. torchopt brings optree and graphviz.
PIP_REQUIREMENTS = [
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "jinja2==3.1.6",
    "jaxtyping==0.3.11",
    "ml_dtypes==0.7.0",
    "natsort==8.4.0",
    "scipy==1.17.1",
    "petname==2.9",
    "pyarrow==26.0.1",
    "pyyaml==6.0.4",
    "simple-parsing==0.1.9",
    "huggingface-hub==2.4.0",
    "torchopt==0.7.3",
]
# Bergson itself, without its declared dependencies (pip would otherwise pull torchvision and torchaudio).
PIP_NO_DEPS = ["bergson==2.5.1"]
INSTALL_NOTE = (
    "bergson with --no-deps: its declared torchvision, torchaudio and bitsandbytes are never imported on "
    "these paths, and PyPI's torchvision does not import beside the local torch 2.13.0 CPU build; its other "
    "dependencies, torchopt included (the EK-FAC pipeline imports it), are installed normally"
)
METHODS = ("grad-dot", "ekfac", "trackstar")
TRACKSTAR_PROJECTION = 16  # Bergson's TrackstarIndexConfig default
BATCH_SIZE = 8  # examples per forward/backward pass
DAMPING = 0.1  # ekfac: damping relative to the mean eigenvalue, as ours
SIGN_NOTE = (
    "Bergson's scores (higher_is_better=True) are <g_train, g_test> (grad-dot), <g_train, H^-1 g_test> "
    "(EK-FAC) or the cosine of R^-1/2-corrected projected gradients (TrackStar) over loss gradients: "
    "positive = proponent = a step on the training example lowers the test loss. Same sign as ours; "
    "written unchanged."
)


def run(args: argparse.Namespace, work: Path, stages: dict[str, float]) -> Output:
    start = time.perf_counter()
    import bergson
    import numpy as np
    import torch
    from bergson.build import build
    from bergson.config.config import DataConfig, IndexConfig, PreprocessConfig, ScoreConfig
    from bergson.data import load_scores
    from bergson.score.score import score_dataset
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer

    stages["import"] = time.perf_counter() - start

    start = time.perf_counter()
    inputs = args.inputs.resolve()
    train = torch.load(inputs / "train.pt", weights_only=False)
    test = torch.load(inputs / "test.pt", weights_only=False)
    n_train, n_test = len(train["ids"]), len(test["ids"])
    adapter = work / "adapter"
    shutil.copytree(inputs / "adapter", adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(inputs / "model")
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    train_path = write_dataset(Dataset, train, work / "train.hf")
    test_path = write_dataset(Dataset, test, work / "test.hf")
    longest = int(max(train["attention_mask"].sum(1).max(), test["attention_mask"].sum(1).max()))
    # Bergson refuses a token batch larger than the model's context (tokenizer or position limit).
    limit = min(
        getattr(AutoConfig.from_pretrained(inputs / "model"), "max_position_embeddings", None) or 2**31,
        getattr(AutoTokenizer.from_pretrained(inputs / "model"), "model_max_length", None) or 2**31,
    )
    token_batch = min(limit, longest * args.batch_size)
    stages["prepare"] = time.perf_counter() - start

    def index_cfg(run_path: Path, data: str) -> IndexConfig:
        return IndexConfig(
            run_path=str(run_path),
            model=str(adapter),
            tokenizer=str(inputs / "model"),
            precision="fp32",
            data=DataConfig(dataset=data),
            projection_dim=0,
            loss_reduction="mean",
            token_batch_size=token_batch,
            max_batch_size=args.batch_size,
            overwrite=True,
        )

    options: dict[str, Any] = {
        "batch_size": args.batch_size,
        "token_batch_size": token_batch,
        "projection_dim": 0,
        "loss_reduction": "mean",
        "precision": "fp32",
    }
    score_cfg = ScoreConfig(precision="fp32", score="individual")
    if args.method == "grad-dot":
        start = time.perf_counter()
        build(index_cfg(work / "query", test_path), PreprocessConfig())
        stages["build_query_index"] = time.perf_counter() - start
        start = time.perf_counter()
        score_cfg.query_path = str(work / "query")
        score_dataset(index_cfg(work / "scores", train_path), score_cfg, PreprocessConfig())
        stages["score_train"] = time.perf_counter() - start
        scores_dir = work / "scores"
        method = "build (test set, unprojected) + score (train set): LoRA gradient dot product"
    elif args.method == "trackstar":
        from bergson.cli.trackstar import trackstar
        from bergson.config.config import InversionConfig, QuerySetConfig, TrackstarConfig

        start = time.perf_counter()
        config = index_cfg(work / "trackstar", train_path)
        config.projection_dim = TRACKSTAR_PROJECTION
        preprocess = PreprocessConfig(
            unit_normalize=True,
            inversion_cfg=InversionConfig(inversion="damped_inverse", damping_factor=args.damping),
        )
        trackstar(
            config,
            TrackstarConfig(
                query=QuerySetConfig(dataset=test_path, aggregation="none"),
                preprocess_cfg=preprocess,
                score_cfg=score_cfg,
                mix_hessians=False,
                stats_sample_size=None,
            ),
        )
        stages["trackstar_pipeline"] = time.perf_counter() - start
        scores_dir = work / "trackstar" / "scores"
        options.update(
            projection_dim=TRACKSTAR_PROJECTION,
            hessian="autocorrelation, two-sided R^-1/2",
            unit_normalize=True,
            mix_hessians=False,
            damping_factor=args.damping,
        )
        method = (
            f"trackstar pipeline (projection {TRACKSTAR_PROJECTION}, autocorrelation R^-1/2 both sides, "
            f"c={args.damping}, unit norm, no query mixing; no optimizer moments)"
        )
    else:
        from bergson.config.config import (
            HessianConfig,
            HessianPipelineConfig,
            InversionConfig,
            QuerySetConfig,
        )
        from bergson.hessians.pipeline import hessian_pipeline

        start = time.perf_counter()
        hessian_cfg = HessianConfig(method="kfac", ev_correction=True, use_dataset_labels=True)
        inversion = InversionConfig(inversion="damped_inverse", damping_factor=args.damping)
        hessian_pipeline(
            index_cfg(work / "ekfac", train_path),
            hessian_cfg,
            score_cfg,
            PreprocessConfig(),
            HessianPipelineConfig(
                query=QuerySetConfig(dataset=test_path, aggregation="none"), inversion_cfg=inversion
            ),
        )
        stages["ekfac_pipeline"] = time.perf_counter() - start
        scores_dir = work / "ekfac" / "scores"
        options.update(hessian="kfac + ev_correction", use_dataset_labels=True, damping_factor=args.damping)
        method = (
            f"ekfac pipeline (KFAC + eigenvalue correction, damped_inverse c={args.damping}, dataset labels)"
        )

    start = time.perf_counter()
    stored = load_scores(scores_dir)
    if not stored.is_written():
        raise RuntimeError(f"Bergson left unwritten cells in {scores_dir / 'scores.bin'}")
    matrix = np.asarray(stored[:], dtype=np.float64)  # [n_train, n_test], rows in dataset order
    if matrix.shape != (n_train, n_test):
        raise RuntimeError(f"Bergson wrote scores of shape {matrix.shape}, expected {(n_train, n_test)}")
    scores = np.ascontiguousarray(matrix.T).astype(np.float32)
    stages["read scores"] = time.perf_counter() - start
    return Output(
        scores,
        {
            "peer": PEER,
            "version": bergson.__version__,
            "method": method,
            "method_key": args.method,
            "sign_note": SIGN_NOTE,
            "options": options,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    )


def write_dataset(dataset_cls: Any, data: dict[str, Any], path: Path) -> str:
    """The examples as Bergson's pre-tokenized input: ``input_ids`` and ``labels`` without padding."""
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for ids, mask, labels in zip(data["input_ids"], data["attention_mask"], data["labels"], strict=True):
        keep = mask.bool()
        rows["input_ids"].append(ids[keep].tolist())
        rows["labels"].append(labels[keep].tolist())
    dataset_cls.from_dict(rows).save_to_disk(str(path))
    return str(path)


def body(inputs: Path, method: str, stages: Stages) -> Output:
    """The harness's entry (via ``common.run_main``): Bergson, in a scratch folder removed after."""
    args = argparse.Namespace(inputs=inputs, method=method, batch_size=BATCH_SIZE, damping=DAMPING)
    with tempfile.TemporaryDirectory(prefix="bergson-") as work:
        return run(args, Path(work).resolve(), stages.seconds)


if __name__ == "__main__":
    run_main(__doc__.splitlines()[0], METHODS, body)
