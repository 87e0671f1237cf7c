"""``llm-attr``: the command line. Thin: parse options (derived from the settings dataclasses), call the
library, print. Every user error is one line on stderr and exit status 2.

Scores everywhere in this tool follow one convention: HIGHER = the training example supports the test
output MORE.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .. import __version__
from ..core import distributed
from ..core.errors import UserError
from ..core.progress import set_quiet
from ..data.settings import DataSettings
from ..data.templates import PromptSettings
from ..diagnostics.ihvp import SWEPT_METHODS
from ..evaluation.score_files import FORMATS
from ..features.gradients import GradientSettings
from ..models.finetune import TrainSettings
from ..models.settings import LoraSettings, ModelSettings
from ..workflows.attribute import STUDY_METHODS, AttributeSettings
from ..workflows.study import StudySettings
from .commands import (
    SCORE_CONVENTION,
    cmd_attribute,
    cmd_diagnose_convergence,
    cmd_diagnose_ihvp,
    cmd_diagnose_parameters,
    cmd_diagnose_spectrum,
    cmd_evaluate,
    cmd_explain,
    cmd_finetune,
    cmd_report,
    cmd_run,
    cmd_study,
)
from .options import add_options

EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (not usage + message) and exits 2."""

    def error(self, message: str) -> NoReturn:
        if distributed.requested_rank() == 0:  # under torchrun every rank parses; one line is enough
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USER_ERROR)


def _command(
    parent: argparse._SubParsersAction,  # type: ignore[type-arg]
    handler: Callable[[argparse.Namespace], int],
    name: str,
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand with the options every command has and its handler."""
    parser: argparse.ArgumentParser = parent.add_parser(name, help=help, description=description)
    _common(parser)
    parser.set_defaults(handler=handler)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no log lines")
    parser.add_argument("--verbose", action="store_true", help="log debugging details")


def _finetune_options(parser: argparse.ArgumentParser, exclude_data: tuple[str, ...] = ()) -> None:
    add_options(parser, DataSettings, "data", exclude=exclude_data)
    add_options(parser, ModelSettings, "model")
    add_options(parser, LoraSettings, "LoRA")
    add_options(parser, PromptSettings, "prompt")
    add_options(parser, TrainSettings, "training")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="llm-attr",
        description="Which fine-tuning examples made this LLM do that? " + SCORE_CONVENTION,
    )
    parser.add_argument("--version", action="version", version=f"llm-attr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    ft = _command(
        sub,
        cmd_finetune,
        "finetune",
        help="LoRA fine-tune a model on a task, saving an adapter per epoch",
        description="LoRA fine-tune a model on a task; an adapter is saved after every epoch.",
    )
    ft.add_argument("--out", required=True, help="run folder to write (adapters, loss curve, settings)")
    _show_option(ft)
    _finetune_options(ft)

    run = _command(
        sub,
        cmd_run,
        "run",
        help="fine-tune, collect features, score and evaluate in one go",
        description="Fine-tune (or reuse the adapter in --out, or take --adapter), collect per-example "
        "gradients, score every method and evaluate it. " + SCORE_CONVENTION,
    )
    run.add_argument("--out", required=True, help="run folder (reused when it holds the same settings)")
    run.add_argument(
        "--adapter",
        default=None,
        metavar="PATH",
        help="an existing peft adapter folder to explain instead of fine-tuning",
    )
    _show_option(run)
    _finetune_options(run)
    add_options(run, AttributeSettings, "attribution")
    add_options(run, GradientSettings, "gradients")

    attr = _command(
        sub,
        cmd_attribute,
        "attribute",
        help="re-score an existing run without retraining",
        description="Re-score an existing run with other methods. " + SCORE_CONVENTION,
    )
    attr.add_argument("--run", required=True, help="a run folder made by `llm-attr run`")
    add_options(attr, AttributeSettings, "attribution")
    add_options(attr, GradientSettings, "gradients")

    st = _command(
        sub,
        cmd_study,
        "study",
        help="the study's grid: tasks x methods x seeds, with intervals (resumable)",
        description="Run tasks x methods x fine-tuning seeds into one folder (each cell an ordinary run, "
        "reused when rerun), then report accuracy, coverage, AUC, AUPRC, MRR and P@10 with 95%% bootstrap "
        "intervals over test examples and the spread over seeds. " + SCORE_CONVENTION,
    )
    st.add_argument("--out", required=True, help="study folder (one run folder per task and seed)")
    st.add_argument(
        "--judge-only",
        action="store_true",
        help="run nothing: judge the cells already complete (e.g. while the grid is still running)",
    )
    add_options(st, StudySettings, "study")
    _finetune_options(st, exclude_data=("task",))
    add_options(st, AttributeSettings, "attribution")
    add_options(st, GradientSettings, "gradients")

    ex = _command(
        sub,
        cmd_explain,
        "explain",
        help="the training examples that most support the model's answer to a new prompt",
        description="For one prompt (and the model's own answer, unless --response is given), each method's "
        "top training examples with their scores, labels and text. " + SCORE_CONVENTION,
    )
    ex.add_argument("--run", required=True, help="a run folder made by `llm-attr run` or `finetune`")
    ex.add_argument("--prompt", required=True, help="the prompt to explain")
    ex.add_argument(
        "--response", default=None, help="the answer to explain (default: the model's greedy answer)"
    )
    ex.add_argument("--top", type=_positive_int, default=10, help="training examples shown per method")
    ex.add_argument(
        "--methods",
        type=_method_list,
        default=STUDY_METHODS,
        metavar="LIST",
        help="comma-separated methods (default: %(default)s)",
    )
    ex.add_argument(
        "--epoch", type=_positive_int, default=None, help="the adapter of this epoch (default: last)"
    )
    ex.add_argument("--json", action="store_true", help="print the rankings as JSON")

    diag = sub.add_parser(
        "diagnose",
        help="the study's section-4 analyses of a run",
        description="Why influence functions fail: analyses of a run's Fisher and gradients.",
    )
    diag_sub = diag.add_subparsers(dest="diagnostic", required=True, parser_class=OneLineParser)
    spec = _command(
        diag_sub,
        cmd_diagnose_spectrum,
        "spectrum",
        help="eigenvalues of each block's empirical Fisher against the damping",
        description="Per LoRA block: rank and effective rank of the empirical Fisher, its top eigenvalue, "
        "the damping, the share of directions below the damping, and the share of test-gradient energy there "
        "(where (F + lambda I)^-1 acts like I / lambda).",
    )
    spec.add_argument("--run", required=True, help="a run folder")
    spec.add_argument(
        "--epoch", type=_positive_int, default=None, help="the adapter of this epoch (default: last)"
    )
    spec.add_argument(
        "--damping-scale",
        type=_positive_float,
        default=0.1,
        help="damping = scale x mean squared gradient (> 0)",
    )

    ihvp = _command(
        diag_sub,
        cmd_diagnose_ihvp,
        "ihvp",
        help="iHVP error of DataInf and LiSSA against exact, and rank agreement, swept over damping",
        description="At each damping scale: per LoRA block, the relative error of DataInf's and LiSSA's "
        "inverse-Fisher products against exact (same damping), and the mean Spearman correlation over test "
        "examples of each method's scores with Hessian-free's and with exact's. " + SCORE_CONVENTION,
    )
    ihvp.add_argument("--run", required=True, help="a run folder")
    ihvp.add_argument(
        "--epoch", type=_positive_int, default=None, help="the adapter of this epoch (default: last)"
    )
    ihvp.add_argument(
        "--damping-scales",
        type=_positive_floats,
        default=(1e-3, 1e-2, 1e-1, 1.0, 10.0),
        help="comma-separated positive scales; damping = scale x mean squared gradient, per block "
        "(default: 0.001,0.01,0.1,1,10)",
    )
    ihvp.add_argument(
        "--methods",
        type=_sweep_methods,
        default=SWEPT_METHODS,
        help="approximations compared with exact: datainf, lissa, lissa-study (default: datainf,lissa)",
    )
    ihvp.add_argument(
        "--method-options",
        default="",
        help="comma-separated method.option=value besides the damping, e.g. lissa.depth=500",
    )
    ihvp.add_argument(
        "--max-test", type=_positive_int, default=20, help="test gradients per block for the iHVP error"
    )

    conv = _command(
        diag_sub,
        cmd_diagnose_convergence,
        "convergence",
        help="attribution quality and gradient turn at every epoch checkpoint",
        description="For every saved epoch: training and test loss, each method's accuracy and coverage, and "
        "the mean cosine between each training example's gradient at this and the previous epoch. "
        + SCORE_CONVENTION,
    )
    conv.add_argument("--run", required=True, help="a run folder with several epoch adapters")
    add_options(conv, AttributeSettings, "attribution", exclude=("epoch",))
    add_options(conv, GradientSettings, "gradients")

    par = _command(
        diag_sub,
        cmd_diagnose_parameters,
        "parameters",
        help="||B A|| of the adapters per epoch against test loss and trigger rate",
        description="Parameter change (||(alpha/r) B A|| per module, per epoch) against behaviour change "
        "(test loss; for tasks with 'trigger' labels, the rate at which triggered prompts produce their "
        "triggered class's behaviour in greedy generations, each answer judged by the training response it "
        "is most like; control: the rate at which clean prompts do).",
    )
    par.add_argument("--run", required=True, help="a run folder with several epoch adapters")
    par.add_argument(
        "--generations",
        type=_positive_int,
        default=20,
        help="test prompts generated per group and epoch (default: %(default)s)",
    )

    rep = _command(
        sub,
        cmd_report,
        "report",
        help="report.html (self-contained, plots embedded) and report.md of a study or run folder",
        description="Write DIR/report.html and DIR/report.md: the grid with 95%% intervals, the diagnostics "
        "found in the runs, the study's 7B figures from its official score files, and top training examples. "
        + SCORE_CONVENTION,
    )
    rep.add_argument(
        "folder", metavar="DIR", help="a study folder (study.json) or a run folder (results.json)"
    )
    rep.add_argument(
        "--official-scores",
        default="../shared/data/official-scores",
        help="the study's official score files, shown beside ours when present (default: %(default)s)",
    )
    rep.add_argument(
        "--examples",
        type=int,
        default=3,
        metavar="N",
        help="test examples whose top training examples are shown (0: none) (default: %(default)s)",
    )
    rep.add_argument(
        "--data-root",
        default="../shared/data/paper-datasets",
        help="the study's datasets, for the official scores' labels (default: %(default)s)",
    )

    ev = _command(
        sub,
        cmd_evaluate,
        "evaluate",
        help="accuracy and coverage of any score matrix",
        description="The study's accuracy and coverage of a score matrix (rows = test, columns = "
        "train). " + SCORE_CONVENTION,
    )
    ev.add_argument(
        "--scores", required=True, help="scores file: .safetensors (a run's), .npy, .csv, or official CSV"
    )
    ev.add_argument(
        "--data", required=True, help="the dataset the scores are about (same as --task elsewhere)"
    )
    ev.add_argument(
        "--scores-format",
        choices=FORMATS,
        default="ours",
        help="ours: higher = more supportive; official: the study's CSV, lower = more influential",
    )
    ev.add_argument("--json", action="store_true", help='print {"accuracy": ..., "coverage": ...} as JSON')
    add_options(ev, DataSettings, "data", exclude=("task", "train_limit", "test_limit"))
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_floats(text: str) -> tuple[float, ...]:
    values = tuple(_positive_float(part) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return values


def _sweep_methods(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(names) - {"datainf", "lissa", "lissa-study"})
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"the sweep compares datainf, lissa or lissa-study with exact; got {text!r}"
        )
    return names


def _method_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        AttributeSettings(methods=names)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def _show_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="N",
        help="print greedy answers for N test prompts before and after fine-tuning",
    )


def _configure_logging(args: argparse.Namespace, main_rank: bool) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    if not main_rank:
        level = logging.ERROR  # under torchrun only rank 0 logs
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("llm_attribution")
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter (weight-loading bars, hub notices) would bury our one-line errors.
    for noisy in ("transformers", "peft", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llm-attr``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    main_rank = distributed.requested_rank() == 0
    set_quiet(args.quiet or not main_rank)
    _configure_logging(args, main_rank)
    _quiet_third_party(main_rank)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        with distributed.launched(args.command, getattr(args, "device", "auto")):
            return handler(args)
    except UserError as exc:
        if main_rank:  # under torchrun every failure reaches rank 0 (distributed.agree)
            sys.stderr.write(f"llm-attr {args.command}: error: {exc}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("llm-attr: interrupted\n")
        return 130


def _quiet_third_party(main_rank: bool) -> None:
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not main_rank:
        warnings.simplefilter("ignore")  # rank 0 shows the warnings; the other ranks would repeat them
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
