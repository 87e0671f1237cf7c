"""``llm-attr``: the command line. Thin: parse options (derived from the settings dataclasses), call the
library, print. Every user error is one line on stderr and exit status 2.

Scores everywhere in this tool follow one convention: HIGHER = the training example supports the test
output MORE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .api import attribute, collect, evaluate
from .cli_options import add_options, from_args
from .data.settings import DataSettings
from .data.templates import PromptSettings
from .diagnostics.convergence import convergence
from .diagnostics.parameters import parameters_vs_behaviour
from .diagnostics.spectrum import spectra, summarize_spectra
from .errors import UserError
from .evaluation.score_files import FORMATS
from .evaluation.study import STUDY_FILE, StudySettings, run_study, study_markdown
from .explain import explain, format_explanation
from .features.gradients import GradientSettings
from .models.finetune import TrainSettings
from .models.settings import LoraSettings, ModelSettings
from .pipeline import FinetuneConfig, FinetuneReport, explain_adapter, finetune_run, select_epoch
from .progress import set_quiet
from .report.build import build_report, write_report
from .scoring import RESULTS_FILE, STUDY_METHODS, AttributeSettings, attribute_explained
from .storage import write_json_atomic

SCORE_CONVENTION = "Scores: higher = the training example supports the test output more."
EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (not usage + message) and exits 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USER_ERROR)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no log lines")
    parser.add_argument("--verbose", action="store_true", help="log debugging details")


def _finetune_options(parser: argparse.ArgumentParser, exclude_data: tuple[str, ...] = ()) -> None:
    add_options(parser, DataSettings, "data", exclude=exclude_data)
    add_options(parser, ModelSettings, "model")
    add_options(parser, LoraSettings, "LoRA")
    add_options(parser, PromptSettings, "prompt")
    add_options(parser, TrainSettings, "training")


def _finetune_config(args: argparse.Namespace, **data_overrides: Any) -> FinetuneConfig:
    return FinetuneConfig(
        data=from_args(DataSettings, args, **data_overrides),
        model=from_args(ModelSettings, args),
        lora=from_args(LoraSettings, args),
        prompt=from_args(PromptSettings, args),
        train=from_args(TrainSettings, args),
    )


def _print_finetune(report: FinetuneReport) -> None:
    curve = report.curve
    state = "reused (same settings)" if report.reused else "trained"
    print(f"run: {report.run}  [{state}]")
    print("epoch  mean train loss  seconds")
    for epoch, (loss, seconds) in enumerate(zip(curve.epochs, curve.seconds_per_epoch, strict=True), 1):
        print(f"{epoch:>5}  {loss:>15.4f}  {seconds:>7.1f}")
    if len(curve.epochs) > 1:
        trend = "fell" if curve.epochs[-1] < curve.epochs[0] else "did NOT fall"
        print(f"loss {trend}: {curve.epochs[0]:.4f} -> {curve.epochs[-1]:.4f}")
    print(f"adapters: {', '.join(f'epoch-{e}' for e in report.epochs)} in {report.run / 'adapters'}")
    for example, before, after in zip(
        report.examples, report.answers_before, report.answers_after, strict=True
    ):
        print(f"\n[{example.label}] {example.prompt}")
        print(f"  expected: {example.response}")
        print(f"  before:   {_one_line(before)}")
        print(f"  after:    {_one_line(after)}")


def _one_line(text: str, width: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def cmd_finetune(args: argparse.Namespace) -> int:
    report = finetune_run(_finetune_config(args), Path(args.out), show=args.show)
    _print_finetune(report)
    return 0


def _print_methods(record: dict[str, Any]) -> None:
    print(
        f"\ntask {record['task']}: {record['n_train']} train, {record['n_test']} test, "
        f"{record['n_classes']} classes; coverage k = {_first_k(record)}"
    )
    print("method          accuracy  coverage  seconds")
    for name, row in record["methods"].items():
        print(f"{name:<14}  {row['accuracy']:>8.3f}  {row['coverage']:>8.3f}  {row['seconds']:>7.2f}")
    print(SCORE_CONVENTION)


def _first_k(record: dict[str, Any]) -> int:
    return next(iter(record["methods"].values()))["k"] if record["methods"] else 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _finetune_config(args)
    attribute = from_args(AttributeSettings, args)
    gradients = from_args(GradientSettings, args)
    run = Path(args.out)
    if args.adapter:
        explained = explain_adapter(config, run, Path(args.adapter))
    else:
        report = finetune_run(config, run, show=args.show)
        _print_finetune(report)
        explained = report.explained
    explained = select_epoch(explained, attribute.epoch)
    record = attribute_explained(explained, attribute, config.prompt, gradients, config.model)
    _print_methods(record)
    print(f"results: {run / RESULTS_FILE}")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    settings = from_args(AttributeSettings, args)
    record = attribute(
        args.run, settings.methods, settings.method_options, settings.epoch, from_args(GradientSettings, args)
    )
    _print_methods(record)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    study = from_args(StudySettings, args)
    attribute = from_args(AttributeSettings, args)
    config = _finetune_config(args, task=study.tasks[0])
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the study")
    record = run_study(study, config, attribute, from_args(GradientSettings, args), out)
    print(study_markdown(record))
    print(SCORE_CONVENTION)
    print(f"study: {out / STUDY_FILE}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    explanation = explain(
        Path(args.run), args.prompt, args.response, methods=args.methods, top=args.top, epoch=args.epoch
    )
    if args.json:
        print(json.dumps(explanation.to_dict(), indent=2))
    else:
        print(format_explanation(explanation))
    return 0


def cmd_diagnose_spectrum(args: argparse.Namespace) -> int:
    run = Path(args.run)
    train, test = collect(run, epoch=args.epoch)
    per_block = spectra(train.blocks, test.blocks, damping_scale=args.damping_scale)
    summary = summarize_spectra(per_block)
    record = {
        "summary": summary,
        "damping_scale": args.damping_scale,
        "epoch": args.epoch,
        "blocks": {name: dataclasses.asdict(s) for name, s in per_block.items()},
    }
    write_json_atomic(run / "diagnostics" / "spectrum.json", record)
    print(
        f"{'block':<40} {'n':>5} {'d':>6} {'rank':>5} {'eff.rank':>8} {'top eig':>10} {'damping':>10} "
        f"{'dirs<damp':>9} {'test energy<damp':>16}"
    )
    for name, s in per_block.items():
        print(
            f"{name:<40} {s.n:>5} {s.d:>6} {s.rank:>5} {s.effective_rank:>8.1f} {s.top_eigenvalue:>10.3g} "
            f"{s.damping:>10.3g} {s.share_directions_below_damping:>9.3f} "
            f"{s.share_test_energy_below_damping:>16.3f}"
        )
    print(
        "median over blocks: " + ", ".join(f"{k.removeprefix('median_')} {v:.4g}" for k, v in summary.items())
    )
    print(f"spectrum: {run / 'diagnostics' / 'spectrum.json'}")
    return 0


def cmd_diagnose_convergence(args: argparse.Namespace) -> int:
    run = Path(args.run)
    settings = from_args(AttributeSettings, args)
    rows = convergence(run, settings, from_args(GradientSettings, args))
    write_json_atomic(run / "diagnostics" / "convergence.json", {"epochs": [row.__dict__ for row in rows]})
    methods = list(settings.methods)
    print(
        "epoch  train loss  test loss  grad cos(prev)  " + "  ".join(f"{m + ' acc/cov':>22}" for m in methods)
    )
    for row in rows:
        cos = "" if row.gradient_cosine_with_previous is None else f"{row.gradient_cosine_with_previous:.3f}"
        train_loss = "" if row.train_loss is None else f"{row.train_loss:.4f}"
        cells = "  ".join(
            f"{row.methods[m]['accuracy']:>10.3f}/{row.methods[m]['coverage']:<11.3f}" for m in methods
        )
        print(f"{row.epoch:>5}  {train_loss:>10}  {row.test_loss:>9.4f}  {cos:>14}  {cells}")
    print(f"convergence: {run / 'diagnostics' / 'convergence.json'}")
    return 0


def cmd_diagnose_parameters(args: argparse.Namespace) -> int:
    run = Path(args.run)
    rows = parameters_vs_behaviour(run, max_generations=args.generations)
    write_json_atomic(run / "diagnostics" / "parameters.json", {"epochs": [row.__dict__ for row in rows]})
    print("epoch  ||BA|| (all modules)  test loss  trigger rate  clean control")
    for row in rows:
        trig = "" if row.trigger_rate is None else f"{row.trigger_rate:.2f}"
        ctrl = "" if row.clean_control_rate is None else f"{row.clean_control_rate:.2f}"
        print(
            f"{row.epoch:>5}  {row.update_norm_total:>20.4f}  {row.test_loss:>9.4f}  {trig:>12}  {ctrl:>13}"
        )
    print(f"parameters: {run / 'diagnostics' / 'parameters.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    report = build_report(folder, Path(args.official_scores), Path(args.data_root))
    html_path, md_path = write_report(report, folder)
    print(f"report: {html_path}\nreport: {md_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate(args.scores, from_args(DataSettings, args, task=args.data), args.scores_format)
    result = {
        "accuracy": metrics.accuracy,
        "coverage": metrics.coverage,
        "k": metrics.k,
        "n_test": len(metrics.per_test_hit),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"accuracy {metrics.accuracy:.4f}  coverage {metrics.coverage:.4f}  (k = {metrics.k}, "
            f"{result['n_test']} test examples)"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="llm-attr",
        description="Which fine-tuning examples made this LLM do that? " + SCORE_CONVENTION,
    )
    parser.add_argument("--version", action="version", version=f"llm-attr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    ft = sub.add_parser(
        "finetune",
        help="LoRA fine-tune a model on a task, saving an adapter per epoch",
        description="LoRA fine-tune a model on a task; an adapter is saved after every epoch.",
    )
    ft.add_argument("--out", required=True, help="run folder to write (adapters, loss curve, settings)")
    _show_option(ft)
    _finetune_options(ft)
    _common(ft)
    ft.set_defaults(handler=cmd_finetune)

    run = sub.add_parser(
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
    _common(run)
    run.set_defaults(handler=cmd_run)

    attr = sub.add_parser(
        "attribute",
        help="re-score an existing run without retraining",
        description="Re-score an existing run with other methods. " + SCORE_CONVENTION,
    )
    attr.add_argument("--run", required=True, help="a run folder made by `llm-attr run`")
    add_options(attr, AttributeSettings, "attribution")
    add_options(attr, GradientSettings, "gradients")
    _common(attr)
    attr.set_defaults(handler=cmd_attribute)

    st = sub.add_parser(
        "study",
        help="the study's grid: tasks x methods x seeds, with intervals (resumable)",
        description="Run tasks x methods x fine-tuning seeds into one folder (each cell an ordinary run, "
        "reused when rerun), then report accuracy, coverage, AUC, AUPRC, MRR and P@10 with 95%% bootstrap "
        "intervals over test examples and the spread over seeds. " + SCORE_CONVENTION,
    )
    st.add_argument("--out", required=True, help="study folder (one run folder per task and seed)")
    add_options(st, StudySettings, "study")
    _finetune_options(st, exclude_data=("task",))
    add_options(st, AttributeSettings, "attribution")
    add_options(st, GradientSettings, "gradients")
    _common(st)
    st.set_defaults(handler=cmd_study)

    ex = sub.add_parser(
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
    _common(ex)
    ex.set_defaults(handler=cmd_explain)

    diag = sub.add_parser(
        "diagnose",
        help="the study's section-4 analyses of a run",
        description="Why influence functions fail: analyses of a run's Fisher and gradients.",
    )
    diag_sub = diag.add_subparsers(dest="diagnostic", required=True, parser_class=OneLineParser)
    spec = diag_sub.add_parser(
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
        "--damping-scale", type=float, default=0.1, help="damping = scale x mean squared gradient"
    )
    _common(spec)
    spec.set_defaults(handler=cmd_diagnose_spectrum)

    conv = diag_sub.add_parser(
        "convergence",
        help="attribution quality and gradient turn at every epoch checkpoint",
        description="For every saved epoch: training and test loss, each method's accuracy and coverage, and "
        "the mean cosine between each training example's gradient at this and the previous epoch. "
        + SCORE_CONVENTION,
    )
    conv.add_argument("--run", required=True, help="a run folder with several epoch adapters")
    add_options(conv, AttributeSettings, "attribution", exclude=("epoch",))
    add_options(conv, GradientSettings, "gradients")
    _common(conv)
    conv.set_defaults(handler=cmd_diagnose_convergence)

    par = diag_sub.add_parser(
        "parameters",
        help="||B A|| of the adapters per epoch against test loss and trigger rate",
        description="Parameter change (||(alpha/r) B A|| per module, per epoch) against behaviour change "
        "(test loss; for tasks with 'trigger' labels, the rate at which triggered prompts produce the target "
        "response in greedy generations, with clean prompts as control).",
    )
    par.add_argument("--run", required=True, help="a run folder with several epoch adapters")
    par.add_argument(
        "--generations",
        type=_positive_int,
        default=20,
        help="test prompts generated per group and epoch (default: %(default)s)",
    )
    _common(par)
    par.set_defaults(handler=cmd_diagnose_parameters)

    rep = sub.add_parser(
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
        "--data-root",
        default="../shared/data/paper-datasets",
        help="the study's datasets, for the official scores' labels (default: %(default)s)",
    )
    _common(rep)
    rep.set_defaults(handler=cmd_report)

    ev = sub.add_parser(
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
    _common(ev)
    ev.set_defaults(handler=cmd_evaluate)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


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


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
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
    set_quiet(args.quiet)
    _configure_logging(args)
    _quiet_third_party()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UserError as exc:
        sys.stderr.write(f"llm-attr {args.command}: error: {exc}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("llm-attr: interrupted\n")
        return 130


def _quiet_third_party() -> None:
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
