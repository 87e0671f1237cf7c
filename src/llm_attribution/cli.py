"""``llm-attr``: the command line. Thin: parse options (derived from the settings dataclasses), call the
library, print. Every user error is one line on stderr and exit status 2.

Scores everywhere in this tool follow one convention: HIGHER = the training example supports the test
output MORE.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .cli_options import add_options, from_args
from .data.settings import DataSettings
from .data.templates import PromptSettings
from .errors import UserError
from .models.finetune import TrainSettings
from .models.settings import LoraSettings, ModelSettings
from .pipeline import FinetuneConfig, FinetuneReport, finetune_run
from .progress import set_quiet

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


def _finetune_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, DataSettings, "data")
    add_options(parser, ModelSettings, "model")
    add_options(parser, LoraSettings, "LoRA")
    add_options(parser, PromptSettings, "prompt")
    add_options(parser, TrainSettings, "training")


def _finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        data=from_args(DataSettings, args),
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
        print(f"  before:   {before}")
        print(f"  after:    {after}")


def cmd_finetune(args: argparse.Namespace) -> int:
    report = finetune_run(_finetune_config(args), Path(args.out), show=args.show)
    _print_finetune(report)
    return 0


def cmd_pending(args: argparse.Namespace) -> int:
    raise UserError(f"`llm-attr {args.command}` is not implemented yet in this version")


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
    ft.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="N",
        help="print greedy answers for N test prompts before and after fine-tuning",
    )
    _finetune_options(ft)
    _common(ft)
    ft.set_defaults(handler=cmd_finetune)

    for name, text in (
        ("run", "fine-tune, collect features, score and evaluate in one go. " + SCORE_CONVENTION),
        ("attribute", "re-score an existing run with other methods. " + SCORE_CONVENTION),
        ("evaluate", "accuracy and coverage of a score matrix. " + SCORE_CONVENTION),
    ):
        pending = sub.add_parser(name, help=text, description=text)
        _common(pending)
        pending.set_defaults(handler=cmd_pending)
    return parser


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
