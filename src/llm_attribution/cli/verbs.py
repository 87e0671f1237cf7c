"""The verb table: every ``llm-attr`` verb, its handler, and the settings dataclasses its options come from.

A verb's options are derived from settings dataclasses (:func:`~.options.add_options`): an option is
declared once, beside the computation it configures, with its default, help and checks. Besides those,
a verb has its I/O arguments (the run folder it reads, the folder it writes, ``--json``), declared here.
Adding a verb is one row here and one handler in :mod:`.commands`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..data.settings import DataSettings
from ..data.templates import PromptSettings
from ..features.gradients import GradientSettings
from ..models.finetune import TrainSettings
from ..models.settings import LoraSettings, ModelSettings
from ..workflows.attribute import AttributeSettings
from ..workflows.counterfactual import CounterfactualSettings
from ..workflows.curvature import CurvatureSettings
from ..workflows.diagnose import IhvpSweepSettings, ParametersSettings, SpectrumSettings
from ..workflows.explain import ExplainSettings
from ..workflows.judge import EvaluateSettings
from ..workflows.lds import LdsSettings
from ..workflows.report.build import ReportSettings
from ..workflows.study import StudySettings
from ..workflows.trace import TraceSettings
from . import commands

SCORE_CONVENTION = commands.SCORE_CONVENTION


@dataclass(frozen=True)
class Argument:
    """An I/O argument of a verb: argparse's own ``add_argument`` flags and keywords."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    """The options of one settings dataclass, under a help-group title, some fields left out."""

    settings: type
    title: str
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verb:
    """One subcommand (``diagnose spectrum`` for a verb of a group)."""

    name: str
    handler: Callable[[argparse.Namespace], int]
    help: str
    description: str
    arguments: tuple[Argument, ...] = ()
    options: tuple[Options, ...] = ()


def _run_folder(help: str = "a run folder made by `llm-attr run` or `finetune`") -> Argument:
    return Argument(("--run",), {"required": True, "help": help})


def _out(help: str) -> Argument:
    return Argument(("--out",), {"required": True, "help": help})


SHOW = Argument(
    ("--show",),
    {
        "type": int,
        "default": 0,
        "metavar": "N",
        "help": "print greedy answers for N test prompts before and after fine-tuning",
    },
)
JSON = Argument(("--json",), {"action": "store_true", "help": "print the result as JSON"})


def _finetune_options(exclude_data: tuple[str, ...] = ()) -> tuple[Options, ...]:
    return (
        Options(DataSettings, "data", exclude_data),
        Options(ModelSettings, "model"),
        Options(LoraSettings, "LoRA"),
        Options(PromptSettings, "prompt"),
        Options(TrainSettings, "training"),
    )


ATTRIBUTION = (Options(AttributeSettings, "attribution"), Options(GradientSettings, "gradients"))
# Checks against retrained models attribute the last epoch: the one a retrain reproduces.
RETRAINED = (Options(AttributeSettings, "attribution", ("epoch",)), Options(GradientSettings, "gradients"))

VERBS: tuple[Verb, ...] = (
    Verb(
        "finetune",
        commands.cmd_finetune,
        "LoRA fine-tune a model on a task, saving an adapter per epoch",
        "LoRA fine-tune a model on a task; an adapter is saved after every epoch.",
        (_out("run folder to write (adapters, loss curve, settings)"), SHOW),
        _finetune_options(),
    ),
    Verb(
        "run",
        commands.cmd_run,
        "fine-tune, collect features, score and evaluate in one go",
        "Fine-tune (or reuse the adapter in --out, or take --adapter), collect per-example gradients, score "
        "every method and evaluate it. " + SCORE_CONVENTION,
        (
            _out("run folder (reused when it holds the same settings)"),
            Argument(
                ("--adapter",),
                {
                    "default": None,
                    "metavar": "PATH",
                    "help": "an existing peft adapter folder to explain instead of fine-tuning",
                },
            ),
            Argument(
                ("--adapter-name",),
                {
                    "default": None,
                    "metavar": "NAME",
                    "help": "with --adapter: the adapter of this name in a folder peft saved several "
                    "adapters into (its subfolder NAME; default: the folder's own adapter)",
                },
            ),
            Argument(
                ("--captured",),
                {
                    "default": None,
                    "metavar": "PATH",
                    "help": "with --adapter: the training gradients the training script captured "
                    "(GradientCaptureCallback or capture_gradients), read instead of collected",
                },
            ),
            SHOW,
        ),
        (*_finetune_options(), *ATTRIBUTION),
    ),
    Verb(
        "attribute",
        commands.cmd_attribute,
        "re-score an existing run without retraining",
        "Re-score an existing run with other methods. " + SCORE_CONVENTION,
        (_run_folder("a run folder made by `llm-attr run`"),),
        ATTRIBUTION,
    ),
    Verb(
        "study",
        commands.cmd_study,
        "the study's grid: tasks x methods x seeds, with intervals (resumable)",
        "Run tasks x methods x fine-tuning seeds into one folder (each cell an ordinary run, reused when "
        "rerun), then report accuracy, coverage (beside its cap), AUC, AUPRC, MRR and P@10 with 95% "
        "intervals that resample seeds and test examples, paired differences between methods, and the "
        "spread over seeds. " + SCORE_CONVENTION,
        (
            _out("study folder (one run folder per task and seed)"),
            Argument(
                ("--judge-only",),
                {
                    "action": "store_true",
                    "help": "run nothing: judge the cells already complete (e.g. while the grid still runs)",
                },
            ),
        ),
        (Options(StudySettings, "study"), *_finetune_options(exclude_data=("task",)), *ATTRIBUTION),
    ),
    Verb(
        "explain",
        commands.cmd_explain,
        "the training examples that most support the model's answer to a new prompt",
        "For one prompt (and the model's own answer, unless --response is given), each method's top training "
        "examples with their scores, labels and text. " + SCORE_CONVENTION,
        (_run_folder(), JSON),
        (Options(ExplainSettings, "explain"),),
    ),
    Verb(
        "trace",
        commands.cmd_trace,
        "the training examples behind the model's own answers to a file of prompts",
        "Generate the run's answers to every prompt (in batches), keep those the behaviour judge labels "
        "--flag (all without it), attribute them with each method, and report per answer its top training "
        "examples, the share of --flag examples among each top-k, and the training examples ranked by "
        "their total support for the kept answers (the list to review or remove). " + SCORE_CONVENTION,
        (_run_folder(), JSON),
        (Options(TraceSettings, "trace"),),
    ),
    Verb(
        "lds",
        commands.cmd_lds,
        "ground truth: does each method predict retraining on random half-subsets? (LDS, resumable)",
        "Linear datamodeling score: retrain the run on --subsets random subsets of exactly "
        "round(fraction x n) training examples (and again with a second seed, for the noise ceiling), "
        "measure every test example's loss, and correlate (Spearman, per test example) each method's "
        "summed scores over a subset with minus the loss. Controls: constant, random and label-oracle "
        "scores. A killed lds continues with the next unfinished subset. " + SCORE_CONVENTION,
        (_run_folder("a run folder made by `llm-attr run` or `finetune`"), JSON),
        (Options(LdsSettings, "lds"), *RETRAINED),
    ),
    Verb(
        "counterfactual",
        commands.cmd_counterfactual,
        "ground truth: remove each method's top-k training examples, retrain, does the behaviour change?",
        "Per test group (one test label): remove the k training examples each method ranks most supportive "
        "of the group, retrain with the run's settings and seed, and measure the group's response-loss "
        "change and behaviour rate (greedy answers judged by the training response they resemble). "
        "Baselines: k random training examples, and k random examples of the group's own class. "
        "Resumable. " + SCORE_CONVENTION,
        (_run_folder("a run folder made by `llm-attr run` or `finetune`"), JSON),
        (Options(CounterfactualSettings, "counterfactual"), *RETRAINED),
    ),
    Verb(
        "diagnose spectrum",
        commands.cmd_diagnose_spectrum,
        "eigenvalues of each block's empirical Fisher against the damping",
        "Per LoRA block: rank and effective rank of the empirical Fisher, its top eigenvalue, the damping, "
        "the share of directions below the damping, and the share of test-gradient energy there (where "
        "(F + lambda I)^-1 acts like I / lambda).",
        (_run_folder("a run folder"),),
        (Options(SpectrumSettings, "spectrum"),),
    ),
    Verb(
        "diagnose ihvp",
        commands.cmd_diagnose_ihvp,
        "iHVP error of DataInf and LiSSA against exact, and rank agreement, swept over damping",
        "At each damping scale: per LoRA block, the relative error of DataInf's and LiSSA's inverse-Fisher "
        "products against exact (same damping), and the mean Spearman correlation over test examples of each "
        "method's scores with Hessian-free's and with exact's. " + SCORE_CONVENTION,
        (_run_folder("a run folder"),),
        (Options(IhvpSweepSettings, "sweep"),),
    ),
    Verb(
        "diagnose convergence",
        commands.cmd_diagnose_convergence,
        "attribution quality and gradient turn at every epoch checkpoint",
        "For every saved epoch: training and test loss, each method's accuracy and coverage, and the mean "
        "cosine between each training example's gradient at this and the previous epoch. " + SCORE_CONVENTION,
        (_run_folder("a run folder with several epoch adapters"),),
        (Options(AttributeSettings, "attribution", ("epoch",)), Options(GradientSettings, "gradients")),
    ),
    Verb(
        "diagnose parameters",
        commands.cmd_diagnose_parameters,
        "||B A|| of the adapters per epoch against test loss and trigger rate",
        "Parameter change (||(alpha/r) B A|| per module, per epoch) against behaviour change (test loss; for "
        "tasks with 'trigger' labels, the rate at which triggered prompts produce their triggered class's "
        "behaviour in greedy generations, each answer judged by the training response it is most like; "
        "control: the rate at which clean prompts do).",
        (_run_folder("a run folder with several epoch adapters"),),
        (Options(ParametersSettings, "parameters"),),
    ),
    Verb(
        "curvature",
        commands.cmd_curvature,
        "reference scores from the true Hessian, Gauss-Newton and full Fisher, by conjugate gradients",
        "For a few test examples spread over the test set: solve (C + lambda I) x = g_test over all LoRA "
        "parameters jointly for C the training loss's Hessian, its Gauss-Newton matrix and the full "
        "empirical Fisher, and score every training example by x . g_train. Writes "
        "RUN/curvature/<kind>.safetensors and RUN/curvature/curvature.json (damping, residuals, "
        "iterations, negative curvature). " + SCORE_CONVENTION,
        (_run_folder(), JSON),
        (Options(CurvatureSettings, "curvature"),),
    ),
    Verb(
        "report",
        commands.cmd_report,
        "report.html (self-contained, plots embedded) and report.md of a study or run folder",
        "Write DIR/report.html and DIR/report.md: the grid with 95% intervals, the diagnostics found in the "
        "runs, the study's 7B figures from its official score files, and top training examples; report.html "
        "opens with an explorer of every test example's, traced and explained answer's top training examples "
        "per method (report.html#test=K selects one). " + SCORE_CONVENTION,
        (),
        (Options(ReportSettings, "report"),),
    ),
    Verb(
        "evaluate",
        commands.cmd_evaluate,
        "accuracy and coverage of any score matrix",
        "The study's accuracy and coverage of a score matrix (rows = test, columns = train). "
        + SCORE_CONVENTION,
        (
            Argument(
                ("--json",), {"action": "store_true", "help": 'print {"accuracy": ..., "coverage": ...}'}
            ),
        ),
        (
            Options(EvaluateSettings, "scores"),
            Options(DataSettings, "data", ("task", "train_limit", "test_limit")),
        ),
    ),
)

GROUPS = {
    "diagnose": (
        "the study's section-4 analyses of a run",
        "Why influence functions fail: analyses of a run's Fisher and gradients.",
    )
}
