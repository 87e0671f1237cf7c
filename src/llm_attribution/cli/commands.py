"""The handlers behind each ``llm-attr`` subcommand: call the library, print what it found.

Scores everywhere follow one convention: HIGHER = the training example supports the test output MORE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..api import attribute, evaluate
from ..core import distributed
from ..core.errors import ConfigError, UserError
from ..data.settings import DataSettings
from ..data.templates import PromptSettings
from ..evaluation.grid import noted_name, paired_markdown, study_markdown
from ..features.gradients import GradientSettings
from ..models.finetune import TrainSettings
from ..models.settings import LoraSettings, ModelSettings
from ..workflows.attribute import AttributeSettings, attribute_run
from ..workflows.counterfactual import CounterfactualSettings, counterfactual_lines, run_counterfactual
from ..workflows.curvature import CurvatureSettings, curvature_run
from ..workflows.diagnose import (
    IhvpSweepSettings,
    ParametersSettings,
    SpectrumSettings,
    diagnose_convergence,
    diagnose_ihvp,
    diagnose_parameters,
    diagnose_spectrum,
)
from ..workflows.explain import ExplainSettings, explain, format_explanation
from ..workflows.judge import EvaluateSettings
from ..workflows.layout import (
    COUNTERFACTUAL_FILE,
    LDS_FILE,
    RESULTS_FILE,
    STUDY_FILE,
    counterfactual_dir,
    lds_dir,
)
from ..workflows.lds import LdsSettings, lds_lines, run_lds
from ..workflows.report.build import ReportSettings, build_report, write_report
from ..workflows.runs import FinetuneConfig, FinetuneReport, finetune_run, run_with_adapter, select_epoch
from ..workflows.study import StudySettings, run_study
from ..workflows.trace import TraceSettings, format_trace, trace
from .options import from_args

SCORE_CONVENTION = "Scores: higher = the training example supports the test output more."


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


@contextlib.contextmanager
def _removed_on_user_error(folder: Path) -> Iterator[None]:
    """Delete ``folder`` when this command created it and then failed on the user's input (a NaN loss, say).

    Such a run cannot be resumed (the same settings fail the same way; other settings need a new folder),
    so it would only be partial output. A folder that existed before is left as it was found; a crash or
    kill (not a user error) keeps everything, for resuming.
    """
    created = not folder.exists()
    try:
        yield
    except UserError:
        # Under torchrun only rank 0 deletes: another rank's error must not pull the folder out from under
        # rank 0 while it writes.
        if created and folder.is_dir() and distributed.requested_rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def cmd_finetune(args: argparse.Namespace) -> int:
    with _removed_on_user_error(Path(args.out)):
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
    for name, row in record["methods"].items():
        if noted_name(name, row.get("notes")) != name:  # what a row's name alone would overstate
            print(f"{name}: {noted_name(name, row.get('notes'))}")
    print(SCORE_CONVENTION)


def _first_k(record: dict[str, Any]) -> int:
    return next(iter(record["methods"].values()))["k"] if record["methods"] else 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _finetune_config(args)
    attribute = from_args(AttributeSettings, args)
    gradients = from_args(GradientSettings, args)
    run = Path(args.out)
    with _removed_on_user_error(run):
        if (args.captured or args.adapter_name) and not args.adapter:
            given = "--captured" if args.captured else "--adapter-name"
            raise ConfigError(f"{given} goes with --adapter: the adapter the training script saved")
        if args.adapter:
            captured = Path(args.captured) if args.captured else None
            loaded_run = run_with_adapter(config, run, Path(args.adapter), captured, args.adapter_name)
        else:
            report = finetune_run(config, run, show=args.show)
            _print_finetune(report)
            loaded_run = report.loaded_run
        loaded_run = select_epoch(loaded_run, attribute.epoch)
        record = attribute_run(loaded_run, attribute, config.prompt, gradients, config.model)
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
    record = run_study(
        study, config, attribute, from_args(GradientSettings, args), out, judge_only=args.judge_only
    )
    if record["missing_cells"]:
        print(f"not yet run (left out of the table): {', '.join(record['missing_cells'])}")
    print(study_markdown(record))
    print()
    print(paired_markdown(record))
    print(SCORE_CONVENTION)
    print(f"study: {out / STUDY_FILE}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    explanation = explain(Path(args.run), from_args(ExplainSettings, args))
    if args.json:
        print(json.dumps(explanation.to_dict(), indent=2))
    else:
        print(format_explanation(explanation))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    result = trace(Path(args.run), from_args(TraceSettings, args))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_trace(result))
        print(SCORE_CONVENTION)
    return 0


def _ground_truth(
    args: argparse.Namespace,
    workflow: Callable[..., dict[str, Any]],
    settings: type,
    lines: Callable[[dict[str, Any]], list[str]],
    written: Path,
) -> int:
    """Run a retraining check (its own settings, then which methods and gradients) and print its table."""
    run = Path(args.run)
    record = workflow(
        run, from_args(settings, args), from_args(AttributeSettings, args), from_args(GradientSettings, args)
    )
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print("\n".join(lines(record)))
    print(f"{args.command}: {written}")
    return 0


def cmd_lds(args: argparse.Namespace) -> int:
    return _ground_truth(args, run_lds, LdsSettings, lds_lines, lds_dir(Path(args.run)) / LDS_FILE)


def cmd_counterfactual(args: argparse.Namespace) -> int:
    written = counterfactual_dir(Path(args.run)) / COUNTERFACTUAL_FILE
    return _ground_truth(args, run_counterfactual, CounterfactualSettings, counterfactual_lines, written)


def cmd_diagnose_spectrum(args: argparse.Namespace) -> int:
    per_block, summary, path = diagnose_spectrum(Path(args.run), from_args(SpectrumSettings, args))
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
    print(f"spectrum: {path}")
    return 0


def cmd_diagnose_ihvp(args: argparse.Namespace) -> int:
    settings = from_args(IhvpSweepSettings, args)
    points, path = diagnose_ihvp(Path(args.run), settings)
    names = list(settings.methods)
    columns = (  # (title, width, format, value of a point)
        *((f"{n} err", 14, ".3g", lambda p, n=n: p.relative_error[n]) for n in names),
        *((f"{n} err(span)", 20, ".3g", lambda p, n=n: p.relative_error_in_span[n]) for n in names),
        *(
            (f"{n} rho(HF)", 16, ".3f", lambda p, n=n: p.rank_correlation_vs_hessian_free[n])
            for n in [*names, "exact"]
        ),
        *((f"{n} rho(exact)", 19, ".3f", lambda p, n=n: p.rank_correlation_vs_exact[n]) for n in names),
    )
    print(f"{'damping':>8}  " + "  ".join(f"{title:>{width}}" for title, width, _, _ in columns))
    for point in points:
        cells = "  ".join(f"{value(point):>{width}{fmt}}" for _, width, fmt, value in columns)
        print(f"{point.damping_scale:>8.3g}  " + cells)
    judged = [*points[0].quality] if points and points[0].quality else []
    if judged:
        measures = list(points[0].quality[judged[0]])
        print("\nwhat the damping does to the answers (" + ", ".join(measures) + "):")
        print(f"{'damping':>8}  " + "  ".join(f"{n:>22}" for n in judged))
        for point in points:
            cells = "  ".join(
                " / ".join(f"{point.quality[n][m]:.3f}" for m in measures).rjust(22) for n in judged
            )
            print(f"{point.damping_scale:>8.3g}  {cells}")
    print("err: median over blocks of ||approx - exact|| / ||exact||; err(span): the same inside the span of")
    print(
        "the block's training gradients (the part that moves scores); rho: mean Spearman over test examples"
    )
    print(f"ihvp: {path}")
    return 0


def cmd_diagnose_convergence(args: argparse.Namespace) -> int:
    settings = from_args(AttributeSettings, args)
    rows, path = diagnose_convergence(Path(args.run), settings, from_args(GradientSettings, args))
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
    print(f"convergence: {path}")
    return 0


def cmd_diagnose_parameters(args: argparse.Namespace) -> int:
    rows, path = diagnose_parameters(Path(args.run), from_args(ParametersSettings, args))
    print("epoch  ||BA|| (all modules)  test loss  trigger rate  clean control")
    for row in rows:
        trig = "" if row.trigger_rate is None else f"{row.trigger_rate:.2f}"
        ctrl = "" if row.clean_control_rate is None else f"{row.clean_control_rate:.2f}"
        print(
            f"{row.epoch:>5}  {row.update_norm_total:>20.4f}  {row.test_loss:>9.4f}  {trig:>12}  {ctrl:>13}"
        )
    print(f"parameters: {path}")
    return 0


def cmd_curvature(args: argparse.Namespace) -> int:
    result = curvature_run(Path(args.run), from_args(CurvatureSettings, args))
    if args.json:
        print(json.dumps(result.record, indent=2))
        return 0
    print(f"{len(result.record['test_rows'])} test examples, {result.record['parameters']} LoRA parameters")
    print(f"{'kind':<13} {'lambda':>10} {'max residual':>12} {'max iters':>9} {'negative':>8} {'seconds':>8}")
    for kind, row in result.record["kinds"].items():
        print(
            f"{kind:<13} {row['damping']['lambda']:>10.3g} {max(row['relative_residual']):>12.2e} "
            f"{max(row['iterations']):>9} {sum(row['negative_curvature']):>8} {row['seconds']:>8.1f}"
        )
    print("residual: ||(C + lambda I) x - g_test|| / ||g_test||; negative: tests whose CG met p^T A p <= 0")
    print(SCORE_CONVENTION)
    print(f"curvature: {result.path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    settings = from_args(ReportSettings, args)
    folder = Path(settings.folder)
    report = build_report(
        folder, Path(settings.official_scores), Path(settings.data_root), examples=settings.examples
    )
    html_path, md_path = write_report(report, folder)
    print(f"report: {html_path}\nreport: {md_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    settings = from_args(EvaluateSettings, args)
    metrics = evaluate(
        settings.scores, from_args(DataSettings, args, task=settings.data), settings.scores_format
    )
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
