"""Peer tools side by side with ours, on the same model, data and machine (part of ``make bench``).

1. Export (our venv): fine-tune (or reuse) our run of the study's grammars data on the embedded model, then
   write ``WORK/inputs/``: the base model as a plain Hugging Face folder (float32), the run's final peft
   adapter, ``train.pt``/``test.pt`` (input ids, attention mask, loss labels, ids, classes, encoded with our
   template, in the run's order) and ``meta.json``. Every tool's loss is the same: per example, the mean
   token cross-entropy over the tokens whose label is not -100.
2. Install: each peer into its own throwaway venv ``WORK/venvs/PEER`` (reused once its install stamp is
   there), with a pip constraints file pinning torch 2.13.0 (the CPU wheel on this machine), transformers
   and peft, then what its runner declares (``PIP_REQUIREMENTS``, and ``PIP_NO_DEPS`` with ``--no-deps``);
   every pip failure is recorded with its last lines.
3. Measure: for each method the runner declares (``METHODS``), ``VENV/bin/python
   benchmarks/peers/run_PEER.py --inputs WORK/inputs --out WORK/out/PEER/METHOD --method METHOD`` as a
   child process (``--threads``, default 1): its wall time and peak RSS (``ru_maxrss`` of that child from
   ``wait4``). Our own methods are timed the same way: a fresh ``llm-attr attribute`` process on the run,
   its features and scores deleted first, so our time includes gradient collection like theirs.
4. Judge every ``scores.npy`` (``[n_test, n_train]``, higher = more supportive) with our metrics (accuracy,
   coverage) and its rank correlation with our closest method, and write the "Peer tools" section of
   ``docs/benchmarks.md`` (replacing an earlier one, keeping the rest of the file).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ROOT / "benchmarks" / "peers"
TASK = "../shared/data/paper-datasets/grammars"
# Each timed in its own process, as the peers' methods are: eshampoo is the old ekfac-example (factors of the
# per-example gradient matrices), ekfac the token-level EK-FAC the peers compute; tracin reads every epoch.
OUR_METHODS = ("hessian-free", "datainf", "exact", "eshampoo", "kfac", "ekfac", "tracin", "trackstar")
LDS_SUBSETS = 16  # half-subsets retrained for the LDS column; see --lds-subsets
THREADS = 1  # per child; see --threads
PINS = ("torch==2.13.0", "transformers==5.24.0", "peft==0.21.2")
# pip's noise about this machine's local package folders, left out of recorded pip output
PIP_NOISE = ("WARNING: Location 'file:///",)


PEERS = ("kronfluence", "dattri", "dattri-llm", "bergson")
# what the EK-FAC rows differ in, read from each tool's source (features/kronecker.py says why ours does so)
KFAC_TOKENS = (
    "K-FAC's input covariance A: ours and dattri-llm average it over the tokens that carry a gradient to "
    "the LoRA matrix (each sequence's last token feeds no loss term, so it does not); kronfluence and "
    "Bergson average it over every non-padding token. The damping is the same in all four (0.1 x the mean "
    "eigenvalue per LoRA matrix)."
)


@dataclasses.dataclass(frozen=True)
class Peer:
    """A peer as its runner declares it (module constants, read without importing the runner, whose
    imports only work in the peer's venv): what pip installs, normally and with ``--no-deps``, the methods
    (each run and measured in its own process), and why the install is what it is."""

    name: str
    runner: Path
    requirements: tuple[str, ...] = ()
    no_deps: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    optional_methods: tuple[str, ...] = ()
    install_note: str = ""

    @classmethod
    def read(cls, name: str) -> Peer:
        runner = RUNNERS / f"run_{name.replace('-', '_')}.py"
        if not runner.is_file():
            return cls(name, runner)
        found: dict[str, Any] = {}
        for node in ast.parse(runner.read_text()).body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            if isinstance(target, ast.Name) and node.value is not None:  # type: ignore[union-attr]
                with contextlib.suppress(ValueError):
                    found[target.id] = ast.literal_eval(node.value)  # type: ignore[union-attr]
        return cls(
            name,
            runner,
            tuple(found.get("PIP_REQUIREMENTS", ())),
            tuple(found.get("PIP_NO_DEPS", ())),
            tuple(found.get("METHODS", ())),
            tuple(found.get("OPTIONAL_METHODS", ())),
            str(found.get("INSTALL_NOTE", "")),
        )

    @property
    def version(self) -> str:
        """The peer's pinned version, from its requirement (``name==version``), else empty."""
        for spec in (*self.no_deps, *self.requirements):
            package, _, version = spec.partition("==")
            if package.replace("_", "-").lower() == self.name:
                return version
        return ""

    def plan(self) -> list[list[str]]:
        """The pip install argument lists, in order (the first one is shared by every peer)."""
        steps = [[*PINS, "numpy"]]
        if self.requirements:
            steps.append(list(self.requirements))
        if self.no_deps:
            steps.append(["--no-deps", *self.no_deps])
        return steps


# --------------------------------------------------------------------------------------------- processes


@dataclasses.dataclass
class Measured:
    """One child process: exit status, wall seconds, peak RSS of its largest process (MiB), its log."""

    returncode: int
    seconds: float
    peak_mib: float
    timed_out: bool
    log: Path
    load: tuple[float, float] = (0.0, 0.0)  # the machine's 1-minute load average when it started, ended


def child_env(work: Path, threads: int = THREADS) -> dict[str, str]:
    """The environment of every measured child: ``threads`` threads, no hub, nothing of our venv leaking
    in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str((work / "hf-home").resolve()),
        PYTHONNOUSERSITE="1",
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
    )
    return env


def measure(command: Sequence[str], log: Path, env: dict[str, str], timeout: float) -> Measured:
    """Run ``command`` (output to ``log``) and measure it; killed with its process group after ``timeout``.

    Peak memory is ``ru_maxrss`` of the rusage ``wait4`` returns for this child: the largest resident set
    of the child or of any descendant it waited for, exactly this command's and nothing else's.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    timed_out = threading.Event()
    with log.open("w") as stream:
        stream.write("$ " + " ".join(map(str, command)) + "\n")
        stream.flush()
        start = time.perf_counter()
        process = subprocess.Popen(
            list(map(str, command)),
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

        load_before = os.getloadavg()[0]
        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
    load = (load_before, os.getloadavg()[0])
    return Measured(process.returncode, seconds, usage.ru_maxrss / 1024, timed_out.is_set(), log, load)


def tail(path: Path, lines: int = 12) -> str:
    """The last lines of a log, without pip's notes about this machine's local package folders."""
    if not path.is_file():
        return ""
    kept = [line for line in path.read_text(errors="replace").splitlines() if not line.startswith(PIP_NOISE)]
    return "\n".join(kept[-lines:])


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- 1. export


def run_command(args: argparse.Namespace, run: Path) -> list[str]:
    command = [
        str(Path(sys.executable).parent / "llm-attr"),
        "run",
        "--task",
        args.task,
        "--model",
        args.model,
    ]
    command += ["--epochs", "3", "--max-length", "64", "--train-limit", str(args.train_limit)]
    command += ["--test-limit", str(args.test_limit), "--methods", ",".join(OUR_METHODS), "--out", str(run)]
    return command


def finished(run: Path, args: argparse.Namespace) -> bool:
    """Whether ``run`` holds all 3 epochs of a run made with these options (then ``llm-attr run``, which
    would collect features and score again, is not called; the export checks the data is unchanged)."""
    if not (run / "settings.json").is_file() or not (run / "finetune.json").is_file():
        return False
    if not (run / "adapters" / "epoch-3" / "adapter_config.json").is_file():
        return False
    settings = json.loads((run / "settings.json").read_text())
    expected = {
        ("data", "task"): args.task,
        ("data", "train_limit"): args.train_limit,
        ("data", "test_limit"): args.test_limit,
        ("model", "model"): args.model,
        ("train", "epochs"): 3,
        ("prompt", "max_length"): 64,
    }
    return all(settings.get(stage, {}).get(key) == value for (stage, key), value in expected.items())


def ensure_run(args: argparse.Namespace, work: Path) -> Path:
    """Fine-tune our run (reused when it exists with the same settings); raise with its log's tail."""
    run = work / "run"
    if finished(run, args):
        say(f"run: {run} holds the finished run: reusing it")
        return run
    command = run_command(args, run)
    say(f"run: {' '.join(command)}")
    done = measure(command, work / "logs" / "run.log", child_env(work, args.threads), timeout=6 * 3600)
    if done.returncode != 0:
        raise SystemExit(f"`llm-attr run` failed (exit {done.returncode}):\n{tail(done.log)}")
    return run


def export(run: Path, inputs: Path) -> dict[str, Any]:
    """Write the inputs folder from the run (skipped when ``meta.json`` records the same adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm_attribution.data.templates import collate, encode_examples
    from llm_attribution.models.lora import adapter_fingerprint
    from llm_attribution.models.resolve import load_model
    from llm_attribution.workflows.layout import adapter_dir, saved_epochs
    from llm_attribution.workflows.runs import open_run

    epochs = saved_epochs(run)
    adapter = adapter_dir(run, epochs[-1]) if epochs else None
    if adapter is None:
        raise SystemExit(f"{run} holds no adapter")
    source = {
        "run": str(run.resolve()),
        "adapter": str(adapter.resolve()),
        "adapter_sha256": adapter_fingerprint(adapter),
        "settings": json.loads((run / "settings.json").read_text()),
    }
    meta_path = inputs / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("source") == source:
        say(f"inputs: {inputs} already holds this run's export: reusing it")
        return dict(json.loads(meta_path.read_text()))
    say(f"inputs: exporting {run} to {inputs}")
    if inputs.exists():
        shutil.rmtree(inputs)
    inputs.mkdir(parents=True)
    loaded_run = open_run(run)
    config, task, tokenizer = loaded_run.config, loaded_run.task, loaded_run.tokenizer
    data = json.loads((run / "data.json").read_text())
    if [e.id for e in task.train] != data["train_ids"] or [e.id for e in task.test] != data["test_ids"]:
        raise SystemExit(f"{run}: the task's examples differ from the run's data.json")

    # The base model as our library loads it (the embedded GGUF dequantised), saved as a plain folder.
    # A GGUF-loaded model refuses save_pretrained (it is marked quantised, though its weights are
    # dequantised): its weights go into a plain model made from the same config, without that mark.
    base = load_model(dataclasses.replace(config.model, device="cpu"))
    model_config = copy.deepcopy(base.model.config)
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    plain = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    plain.load_state_dict({k: v.to(torch.float32) for k, v in base.model.state_dict().items()}, strict=True)
    plain.save_pretrained(inputs / "model")
    del plain
    tokenizer_note = "saved"
    try:
        base.tokenizer.save_pretrained(inputs / "model")
    except Exception as error:  # the tiny test model's byte tokenizer: runners never need a tokenizer
        tokenizer_note = f"not saved: {str(error).splitlines()[0]}"
    del base

    shutil.copytree(adapter, inputs / "adapter")
    adapter_config = json.loads((inputs / "adapter" / "adapter_config.json").read_text())
    original_base = adapter_config.get("base_model_name_or_path")
    adapter_config["base_model_name_or_path"] = str((inputs / "model").resolve())
    (inputs / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")

    splits = {}
    for split, examples in (("train", task.train), ("test", task.test)):
        batch = collate(encode_examples(examples, tokenizer, config.prompt), tokenizer.pad_token_id)
        splits[split] = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": batch["labels"],
            "ids": [e.id for e in examples],
            "classes": [e.label for e in examples],
        }
        torch.save(splits[split], inputs / f"{split}.pt")

    # Check: the exported folder, loaded as a peer loads it, gives our model's loss on a few examples.
    n_check = min(4, len(task.train))
    check = {key: splits["train"][key][:n_check] for key in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        ours = [
            float(loaded_run.model(**{k: v[i : i + 1] for k, v in check.items()}).loss)
            for i in range(n_check)
        ]
        del loaded_run
        reloaded = AutoModelForCausalLM.from_pretrained(inputs / "model", dtype=torch.float32)
        peer_model = PeftModel.from_pretrained(reloaded, inputs / "adapter").eval()
        theirs = [
            float(peer_model(**{k: v[i : i + 1] for k, v in check.items()}).loss) for i in range(n_check)
        ]
    difference = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    if difference > 1e-3:
        raise SystemExit(
            f"the exported model's loss differs from ours by {difference:.2e}: {ours} vs {theirs}"
        )

    meta = {
        "source": source,
        "task": task.name,
        "model": config.model.model,
        "n_train": len(task.train),
        "n_test": len(task.test),
        "classes": sorted(set(splits["train"]["classes"]) | set(splits["test"]["classes"])),
        "loss": (
            "per example: mean token cross-entropy over the tokens whose label is not -100, labels shifted "
            "by one as in a Hugging Face causal LM (model(input_ids, attention_mask, labels).loss on a batch "
            "of one example)"
        ),
        "padding": "right; attention_mask 0 and label -100 on padding",
        "lora_target_modules": adapter_config.get("target_modules"),
        "lora_r": adapter_config.get("r"),
        "lora_alpha": adapter_config.get("lora_alpha"),
        "prompt": dataclasses.asdict(config.prompt),
        "adapter_base_model_name_or_path_was": original_base,
        "tokenizer": tokenizer_note,
        "export_check": {
            "train_rows": n_check,
            "our_loss": ours,
            "reloaded_loss": theirs,
            "max_abs_diff": difference,
        },
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --------------------------------------------------------------------------------------------- 2. install


@dataclasses.dataclass
class Installed:
    """A peer's venv: its python when the install worked, else why not (the failing command, pip's last
    lines)."""

    python: Path | None
    error: str = ""
    reused: bool = False


def install(peer: Peer, venvs: Path, base_python: str, env: dict[str, str]) -> Installed:
    venv = venvs / peer.name
    stamp = venv / "peers-install.json"
    plan = peer.plan()
    python = venv / "bin" / "python"
    if not peer.runner.is_file():
        return Installed(None, f"no runner: {peer.runner.relative_to(ROOT)} does not exist")
    if not peer.requirements and not peer.no_deps:
        return Installed(
            None, f"{peer.runner.name} declares nothing to install (PIP_REQUIREMENTS, PIP_NO_DEPS)"
        )
    if stamp.is_file() and json.loads(stamp.read_text()).get("plan") == plan and python.is_file():
        say(f"{peer.name}: reusing {venv}")
        return Installed(python, reused=True)
    if venv.exists():
        shutil.rmtree(venv)
    venvs.mkdir(parents=True, exist_ok=True)
    constraints = venvs / "constraints.txt"
    constraints.write_text("".join(f"{pin}\n" for pin in PINS))
    logs = venvs / "logs"
    steps = [[base_python, "-m", "venv", str(venv)]]
    steps += [
        [str(python), "-m", "pip", "install", "--progress-bar", "off", "-c", str(constraints), *step]
        for step in plan
    ]
    for index, command in enumerate(steps):
        say(f"{peer.name}: {' '.join(command)}")
        done = measure(command, logs / f"{peer.name}-{index}.log", env, timeout=3600)
        if done.returncode != 0:
            shown = "pip install " + " ".join(command[4:]) if index else " ".join(command)
            return Installed(None, f"`{shown}` failed (exit {done.returncode}):\n{tail(done.log)}")
    check = [str(python), "-c", "import torch; print(torch.__version__)"]
    done = measure(check, logs / f"{peer.name}-check.log", env, timeout=600)
    found = tail(done.log, 1)
    if done.returncode != 0 or not found.startswith(PINS[0].partition("==")[2]):
        return Installed(None, f"the venv's torch is not {PINS[0]}:\n{tail(done.log, 6)}")
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, env=env)
    stamp.write_text(json.dumps({"plan": plan, "freeze": freeze.stdout.splitlines()}, indent=2) + "\n")
    return Installed(python)


# --------------------------------------------------------------------------------------------- 3. measure


@dataclasses.dataclass
class Row:
    """One line of the table."""

    tool: str
    version: str
    method: str
    seconds: float | None = None
    peak_mib: float | None = None
    accuracy: float | None = None
    coverage: float | None = None
    agreement: float | None = None
    compared_with: str = ""
    note: str = ""
    load: tuple[float, float] | None = None
    lds: Any = None  # LdsSummary against the run's retrained subsets, where they were measured
    per_test_lds: list[float] | None = None
    per_test_coverage: list[float] | None = None  # for the paired coverage differences


def read_meta(out: Path) -> dict[str, Any]:
    path = out / "meta.json"
    try:
        return dict(json.loads(path.read_text())) if path.is_file() else {}
    except ValueError:
        return {}


def closest_method(method: str) -> str:
    """Which of our methods a peer's method approximates (its rank correlation is taken with that one)."""
    lowered = method.lower()
    if "trackstar" in lowered:
        return "trackstar"
    if "datainf" in lowered:
        return "datainf"
    if any(word in lowered for word in ("grad-dot", "gradient dot", "tracin", "identity", "grad_dot")):
        return "hessian-free"
    if any(word in lowered for word in ("ekfac", "ek-fac")):
        return "ekfac"
    return "exact"


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over test rows of the Spearman correlation of two score matrices' rankings of training."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, axis=1, kind="stable")
        r = np.empty(order.shape, dtype=np.float64)
        np.put_along_axis(
            r, order, np.arange(x.shape[1], dtype=np.float64)[None, :].repeat(len(x), 0), axis=1
        )
        return r - r.mean(axis=1, keepdims=True)

    ra, rb = ranks(a), ranks(b)
    denominator = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    return float(np.mean((ra * rb).sum(axis=1) / np.where(denominator > 0, denominator, 1)))


def judge(
    scores: np.ndarray, labels: tuple[list[str], list[str]], ours: dict[str, np.ndarray], method: str
) -> dict[str, Any]:
    """Accuracy and coverage by our metrics, and the rank correlation with our closest method."""
    from llm_attribution.evaluation.metrics import evaluate

    metrics = evaluate(scores, labels[0], labels[1])
    closest = closest_method(method)
    agreement = rank_agreement(scores, ours[closest]) if closest in ours else None
    return {
        "accuracy": metrics.accuracy,
        "coverage": metrics.coverage,
        "per_test_coverage": [float(c) for c in metrics.per_test_coverage],
        "agreement": agreement,
        "of": closest,
    }


def measure_ours(
    run: Path, work: Path, env: dict[str, str], timeout: float
) -> tuple[dict[str, Measured], dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Each of our methods in a fresh ``llm-attr attribute`` process on the run, its stored features and
    scores deleted first (so each time includes collecting the gradients, as a peer's does): the
    measurements, the score matrices and each process's own stage timings."""
    from safetensors.numpy import load_file

    done: dict[str, Measured] = {}
    scores: dict[str, np.ndarray] = {}
    stages: dict[str, dict[str, float]] = {}
    for method in OUR_METHODS:
        for stale in ("features", "scores"):
            shutil.rmtree(run / stale, ignore_errors=True)
        (run / "results.json").unlink(missing_ok=True)
        command = [str(Path(sys.executable).parent / "llm-attr"), "attribute", "--run", str(run)]
        command += ["--methods", method]
        say(f"ours {method}: {' '.join(command)}")
        done[method] = measure(command, work / "logs" / f"ours-{method}.log", env, timeout)
        if done[method].returncode != 0:
            raise SystemExit(
                f"`llm-attr attribute` failed (exit {done[method].returncode}):\n{tail(done[method].log)}"
            )
        say(f"ours {method}: {done[method].seconds:.0f} s, peak RSS {done[method].peak_mib:.0f} MiB")
        scores[method] = load_file(run / "scores" / f"{method}.safetensors")["scores"]
        results = json.loads((run / "results.json").read_text())
        timings = {k.removesuffix("_s").replace("_", " "): v for k, v in results.get("timings", {}).items()}
        stages[method] = {**timings, method: results["methods"][method]["seconds"]}
    return done, scores, stages


def measure_lds(run: Path, work: Path, env: dict[str, str], subsets: int) -> Any:
    """Retrain the run on ``subsets`` half-subsets of its training set (``llm-attr lds``, resumable, one
    training seed: no noise ceiling) and return its measurements (None with ``subsets`` 0)."""
    if not subsets:
        return None
    from llm_attribution.workflows.lds import lds_measurements

    command = [str(Path(sys.executable).parent / "llm-attr"), "lds", "--run", str(run)]
    # the last method measured is the one whose scores are stored (its LDS here is only lds.json's)
    command += ["--subsets", str(subsets), "--ceiling", "false", "--methods", OUR_METHODS[-1]]
    say(f"lds: {' '.join(command)}")
    done = measure(command, work / "logs" / "lds.log", env, timeout=24 * 3600)
    if done.returncode != 0:
        raise SystemExit(f"`llm-attr lds` failed (exit {done.returncode}):\n{tail(done.log)}")
    seed = int(json.loads((run / "settings.json").read_text())["train"]["seed"])
    return lds_measurements(run, seed)


def lds_of(scores: np.ndarray, measurements: Any) -> Any:
    """The LDS of one score matrix against the retrains, per test example and summarised (or None)."""
    if measurements is None:
        return None
    import torch

    from llm_attribution.evaluation.lds import LdsSummary, lds_per_test

    per_test = lds_per_test(
        torch.from_numpy(scores.astype(np.float64)), measurements.masks, measurements.attributed
    )
    return LdsSummary.of(per_test)


def measure_peer(
    peer: Peer,
    installed: Installed,
    inputs: Path,
    work: Path,
    env: dict[str, str],
    timeout: float,
    optional: bool = False,
) -> list[tuple[str, Measured | None, Path]]:
    """Each of the peer's methods (with ``optional``, its optional ones too) in its own process:
    ``(method, measured or None, out folder)``."""
    results: list[tuple[str, Measured | None, Path]] = []
    for method in (*peer.methods, *(peer.optional_methods if optional else ())) or ("",):
        out = work / "out" / peer.name / method if method else work / "out" / peer.name
        shutil.rmtree(out, ignore_errors=True)  # nothing of an earlier measurement is read back
        if installed.python is None:
            results.append((method, None, out))
            continue
        command = [str(installed.python), str(peer.runner), "--inputs", str(inputs), "--out", str(out)]
        command += ["--method", method] if method else []
        label = f"{peer.name} {method}".strip()
        say(f"{label}: {' '.join(command)}")
        done = measure(command, work / "logs" / f"{label.replace(' ', '-')}.log", env, timeout)
        say(f"{label}: exit {done.returncode} in {done.seconds:.0f} s, peak RSS {done.peak_mib:.0f} MiB")
        results.append((method, done, out))
    return results


def killed_or_exit(done: Measured) -> str:
    """Why a child that left no error.txt ended: the signal that killed it, or its exit status and log."""
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        oom = (
            " (the kernel's out-of-memory killer sends it when memory runs out)" if name == "SIGKILL" else ""
        )
        return f"killed by {name}{oom} at peak RSS {done.peak_mib:.0f} MiB"
    return f"exit {done.returncode} without error.txt; log ends: {tail(done.log, 2)}"


def peer_row(
    peer: Peer,
    installed: Installed,
    method: str,
    done: Measured | None,
    out: Path,
    labels: tuple[list[str], list[str]],
    ours: dict[str, np.ndarray],
) -> Row:
    """The table's line for one method of a peer (the caller adds the machine's load while it ran)."""
    meta = read_meta(out)
    version = str(meta.get("version") or peer.version or "?")
    shown = str(meta.get("method") or method or "—")
    if installed.python is None or done is None:
        return Row(peer.name, version, shown, note=installed.error.splitlines()[0] if installed.error else "")
    if done.timed_out:
        return Row(
            peer.name,
            version,
            shown,
            done.seconds,
            done.peak_mib,
            note=f"killed at the {done.seconds:.0f} s time limit",
        )
    error = out / "error.txt"
    if done.returncode != 0 or not (out / "scores.npy").is_file():
        text = error.read_text().strip() if error.is_file() else ""
        reason = text.splitlines()[0] if text else killed_or_exit(done)
        note = reason if "fail" in reason.lower() or "killed" in reason else f"failed: {reason}"
        return Row(peer.name, version, shown, done.seconds, done.peak_mib, note=note)
    try:
        scores = np.load(out / "scores.npy")
        expected = (len(labels[1]), len(labels[0]))
        if scores.shape != expected:
            raise ValueError(f"scores.npy has shape {scores.shape}, expected [n_test, n_train] = {expected}")
        verdict = judge(scores.astype(np.float64), labels, ours, shown)
    except Exception as failure:
        return Row(peer.name, version, shown, done.seconds, done.peak_mib, note=f"cannot judge: {failure}")
    measured = (done.seconds, done.peak_mib, verdict["accuracy"], verdict["coverage"], verdict["agreement"])
    return Row(
        peer.name,
        version,
        shown,
        *measured,
        compared_with=verdict["of"],
        per_test_coverage=verdict["per_test_coverage"],
    )


# --------------------------------------------------------------------------------------------- 4. report


def machine(threads: int) -> str:
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {memory:.0f} GiB RAM, torch {torch.__version__}, "
        f"{threads} thread(s) per process (`OMP_NUM_THREADS={threads}`), load average "
        f"{os.getloadavg()[0]:.1f} when it finished (other jobs share the machine: times are noisy, memory "
        "is not)"
    )


def cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| tool | version | method | wall s | peak RSS MiB | accuracy | coverage | LDS [95% CI] "
        "| rank corr. with ours | note |",
        "|---|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        corr = "—" if r.agreement is None else f"{r.agreement:.2f} ({r.compared_with})"
        load = f"load {r.load[0]:.1f} → {r.load[1]:.1f}" if r.load else ""
        note = "; ".join(part for part in (load, r.note) if part).replace("\n", " ").replace("|", "\\|")
        lds = "—" if r.lds is None else f"{r.lds.mean:.3f} [{r.lds.low:.2f}, {r.lds.high:.2f}]"
        lines.append(
            f"| {r.tool} | {r.version} | {r.method} | {cell(r.seconds, 0)} | {cell(r.peak_mib, 0)} "
            f"| {cell(r.accuracy)} | {cell(r.coverage)} | {lds} | {corr} | {note} |"
        )
    return lines


def report(
    rows: list[Row], details: list[str], meta: dict[str, Any], command: str, run: str, threads: int
) -> str:
    today = datetime.date.today().isoformat()
    n_classes = len(set(meta["classes"]))
    lines = [
        "## Peer tools side by side",
        "",
        f"Measured by `make bench` (`{command}`) on {today}, on {machine(threads)}.",
        "",
        f"Same model, data and machine for every tool: the study's `{meta['task']}` data, "
        f"{meta['n_train']} training and {meta['n_test']} test examples ({n_classes} classes), the "
        f"`{meta['model']}` model with the LoRA adapter our run fine-tuned (r={meta['lora_r']} on "
        f"{', '.join(meta['lora_target_modules'] or [])}; {run}). Each peer gets that base model as a "
        "plain Hugging Face folder (float32), the adapter, and the examples tokenised by our template; every "
        f"tool's loss is the same, {meta['loss']}. Each peer is installed into its own throwaway venv with "
        f"{', '.join(PINS)} pinned and runs each method in a child process (`benchmarks/peers/run_<peer>.py "
        "--method M`), on the LoRA weights only. Each of our lines is a fresh `llm-attr attribute "
        "--methods M` process on the same run, its stored features and scores deleted first: both sides "
        "include loading the model and computing every gradient (tracin: those of all 3 epochs).",
        "",
        "Wall s: the whole child process (load: the machine's 1-minute load average when it started and "
        "ended; above 1, other jobs shared the 2 cores). Peak RSS: `ru_maxrss` of that child (its largest "
        "process). "
        "Accuracy and coverage: the study's metrics (`llm_attribution.evaluation.metrics.evaluate`, "
        f"coverage k = {meta['n_train'] // max(n_classes, 1)}), every score matrix read as higher = the "
        "training example supports the test output more (each runner turns its peer's scores that way; "
        "see the sign notes below). Rank corr.: the mean over test examples of the Spearman correlation "
        "between the tool's ranking of the training examples and that of our method it approximates (in "
        "brackets). LDS: the linear datamodeling score against the run retrained on random half-subsets "
        "of its training set (`llm-attr lds`, one training seed; see below), the mean over test examples "
        "of the Spearman correlation between a subset's summed scores and minus the test loss after "
        "retraining on it, with a 95% bootstrap interval over test examples.",
        "",
        *table(rows),
        "",
        *details,
    ]
    return "\n".join(lines)


def paired_lines(rows: list[Row], values: Callable[[Row], list[float] | None]) -> list[str]:
    """One line per peer method: ours minus it on the same test examples (``values``: a row's per-test
    values, or None where not measured), with the 95% paired interval."""
    from llm_attribution.evaluation.statistics import paired_difference

    ours = {r.method: r for r in rows if r.tool.startswith("llm-attribution") and values(r) is not None}
    lines = []
    for r in rows:
        mine = ours.get(r.compared_with)
        theirs = values(r)
        if r.tool.startswith("llm-attribution") or mine is None or theirs is None:
            continue
        diff = paired_difference([values(mine)], [theirs])
        verdict = "resolved" if diff.resolved else "not resolved"
        lines.append(
            f"- ours {mine.method} − {r.tool} {r.method}: {diff.mean:+.3f} "
            f"[{diff.low:+.3f}, {diff.high:+.3f}] ({verdict})"
        )
    return lines


def lds_lines(rows: list[Row], retrained: Any, subsets: int) -> list[str]:
    """How the LDS column was measured, and each peer method minus the one of ours it approximates,
    paired on the same test examples."""
    if retrained is None:
        return []
    head = (
        f"LDS: {len(retrained.masks)} random half-subsets of the training set (subset seed 0), each "
        "retrained with the run's settings, initial adapter and seed (`llm-attr lds --run WORK/run "
        f"--subsets {subsets} --ceiling false`); the loss is the one every tool attributes. Ours minus each "
        "peer's method on the same test examples (95% paired interval; resolved when it excludes 0):"
    )
    return [head, "", *paired_lines(rows, lambda r: r.per_test_lds), ""]


def coverage_lines(rows: list[Row]) -> list[str]:
    """Each peer method's coverage against the one of ours it approximates, paired on the same test
    examples (coverage moves in steps of 1/k per test example, so a gap of 0.001 may be noise)."""
    lines = paired_lines(rows, lambda r: r.per_test_coverage)
    if not lines:
        return []
    head = "Coverage, ours minus each peer's method on the same test examples (95% paired interval):"
    return [head, "", *lines, ""]


def seconds_list(stages: dict[str, Any]) -> str:
    return ", ".join(f"{name} {float(value):.0f} s" for name, value in stages.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="docs/benchmarks.md", help="Markdown file to put the section into")
    parser.add_argument("--train-limit", type=int, default=300, help="training examples (the study grid's)")
    parser.add_argument("--test-limit", type=int, default=100, help="test examples")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of: {', '.join(PEERS)}")
    parser.add_argument("--work", default="runs/peers", help="folder for the run, inputs, venvs and outputs")
    parser.add_argument("--task", default=TASK, help="the task our run fine-tunes on")
    parser.add_argument("--model", default="embedded", help="the model (embedded; tiny for quick checks)")
    parser.add_argument("--python", default="python3", help="the python that makes the peers' venvs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one tool's method may run")
    # One thread by default, as benchmarks/scaling.py: on this shared 2-core machine, 2 OpenMP threads run
    # 5-15x slower as soon as another process takes a core (measured: a forward and backward pass of 8
    # examples took 1 s with 1 thread and 2.5-18 s with 2), so 2 threads would measure the neighbours.
    parser.add_argument("--threads", type=int, default=THREADS, help="torch/OpenMP threads per child")
    parser.add_argument(
        "--lds-subsets",
        type=int,
        default=LDS_SUBSETS,
        help="half-subsets retrained for the LDS column (resumable; 0: no LDS)",
    )
    parser.add_argument("--export-only", action="store_true", help="stop after writing WORK/inputs")
    parser.add_argument(
        "--section", default="peers", help="name of the marked section of --out to replace (peers run apart)"
    )
    parser.add_argument(
        "--all-methods", action="store_true", help="also the methods a runner lists as OPTIONAL_METHODS"
    )
    args = parser.parse_args()
    names = [n for n in args.peers.split(",") if n]
    if unknown := sorted(set(names) - set(PEERS)):
        parser.error(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
    work = Path(args.work) if Path(args.work).is_absolute() else ROOT / args.work
    run = ensure_run(args, work)
    inputs = work / "inputs"
    meta = export(run, inputs)
    if args.export_only:
        say(f"inputs written to {inputs}")
        return

    import torch

    from llm_attribution import __version__

    env = child_env(work, args.threads)
    peers = [Peer.read(name) for name in names]
    installs = {peer.name: install(peer, work / "venvs", args.python, env) for peer in peers}
    done_ours, ours, our_stages = measure_ours(run, work, env, args.timeout)
    retrained = measure_lds(run, work, env, args.lds_subsets)
    measured = {
        peer.name: measure_peer(peer, installs[peer.name], inputs, work, env, args.timeout, args.all_methods)
        for peer in peers
    }

    train, test = (torch.load(inputs / f"{split}.pt", weights_only=False) for split in ("train", "test"))
    labels = (list(train["classes"]), list(test["classes"]))
    rows = []
    for method in OUR_METHODS:
        verdict = judge(ours[method].astype(np.float64), labels, ours, method)
        mine = done_ours[method]
        summary = lds_of(ours[method], retrained)
        rows.append(
            Row(
                "llm-attribution (ours)",
                __version__,
                method,
                mine.seconds,
                mine.peak_mib,
                verdict["accuracy"],
                verdict["coverage"],
                load=mine.load,
                lds=summary,
                per_test_lds=None if summary is None else summary.per_test,
                per_test_coverage=verdict["per_test_coverage"],
            )
        )
    stages = [f"- ours {method}: {seconds_list(our_stages[method])}" for method in OUR_METHODS]
    notes = []
    for peer in peers:
        installed = installs[peer.name]
        for method, done, out in measured[peer.name]:
            row = peer_row(peer, installed, method, done, out, labels, ours)
            row.load = done.load if done is not None else None  # the machine's load while it ran
            if row.accuracy is not None:
                row.lds = lds_of(np.load(out / "scores.npy"), retrained)
                row.per_test_lds = None if row.lds is None else row.lds.per_test
            rows.append(row)
            peer_meta = read_meta(out)
            label = f"{peer.name} {peer_meta.get('method') or method}".strip()
            if peer_meta.get("stages"):
                stages.append(f"- {label}: {seconds_list(peer_meta['stages'])}")
            if peer_meta.get("sign_note") and (out / "scores.npy").is_file():
                notes.append(f"- {label}: {peer_meta['sign_note']}")
            error = out / "error.txt"
            if done is not None and done.returncode != 0:
                reason = (
                    error.read_text().split("\n\n")[0].strip() if error.is_file() else killed_or_exit(done)
                )
                notes.append(f"- {label} failed:\n\n  ```\n  {reason}\n  ```")
        steps = [" ".join(step) for step in peer.plan()[1:]]
        install_line = (
            f"- {peer.name} install: `pip install {'`, then `pip install '.join(steps)}`" if steps else ""
        )
        if install_line:
            notes.append(install_line + (f"; {peer.install_note}." if peer.install_note else "."))
        if peer.optional_methods and not args.all_methods:
            notes.append(
                f"- {peer.name}: not measured (`--all-methods` runs them, each its own process): "
                f"{', '.join(peer.optional_methods)}; see {peer.runner.relative_to(ROOT)} for why."
            )
        if installed.error:
            indented = installed.error.replace("\n", "\n  ")
            notes.append(f"- {peer.name} cannot run here:\n\n  ```\n  {indented}\n  ```")
    details = [
        *lds_lines(rows, retrained, args.lds_subsets),
        *coverage_lines(rows),
        KFAC_TOKENS,
        "",
        "Where the time went (seconds per stage, as each runner timed them):",
        "",
        *stages,
        "",
        "Sign conventions, installs and failures:",
        "",
        *notes,
        "",
    ]
    limits = (
        ""
        if (args.train_limit, args.test_limit) == (300, 100)
        else (f" --train-limit {args.train_limit} --test-limit {args.test_limit}")
    )
    flags = "" if names == list(PEERS) else f" --peers {','.join(names)}"
    flags += "" if args.model == "embedded" else f" --model {args.model}"
    flags += "" if args.threads == THREADS else f" --threads {args.threads}"
    flags += " --all-methods" if args.all_methods else ""
    flags += "" if args.section == "peers" else f" --section {args.section}"
    command = f"python benchmarks/peers.py --out {args.out}{limits}{flags}"
    run_line = "`llm-attr " + " ".join(run_command(args, Path("WORK/run"))[1:]) + "`"
    losses = json.loads((run / "finetune.json").read_text())["loss"]["epoch_loss"]
    run_line += f"; mean training loss per epoch {', '.join(f'{loss:.2f}' for loss in losses)}"
    section = report(rows, details, meta, command, run_line, args.threads)
    (work / "rows.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    print(section)
    write_section(Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out, args.section, section)


if __name__ == "__main__":
    main()
