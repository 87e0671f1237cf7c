"""``llm-attr``: the command line. Thin: parse options (derived from the settings dataclasses), call the
library, print. Every user error is one line on stderr and exit status 2.

Scores everywhere in this tool follow one convention: HIGHER = the training example supports the test
output MORE.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .. import __version__
from ..attribution.registry import method_summaries
from ..core import distributed
from ..core.errors import UserError
from ..core.progress import set_quiet
from .options import add_options
from .verbs import GROUPS, SCORE_CONVENTION, VERBS

EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (not usage + message) and exits 2."""

    def error(self, message: str) -> NoReturn:
        if distributed.requested_rank() == 0:  # under torchrun every rank parses; one line is enough
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb in :data:`~.verbs.VERBS`."""
    parser = OneLineParser(
        prog="llm-attr",
        description="Which fine-tuning examples made this LLM do that? " + SCORE_CONVENTION,
    )
    parser.add_argument("--version", action="version", version=f"llm-attr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    groups: dict[str, argparse._SubParsersAction] = {}  # type: ignore[type-arg]
    for verb in VERBS:
        group, _, name = verb.name.rpartition(" ")
        parent = sub
        if group:
            if group not in groups:
                help_text, description = GROUPS[group]
                grouped = sub.add_parser(group, help=help_text, description=description)
                groups[group] = grouped.add_subparsers(
                    dest=f"{group}_verb", required=True, parser_class=OneLineParser
                )
            parent = groups[group]
        takes_methods = any(
            "methods" in {f.name for f in dataclasses.fields(options.settings)} for options in verb.options
        )
        command: argparse.ArgumentParser = parent.add_parser(
            name,
            help=verb.help,
            description=verb.description,
            epilog=f"methods -- {method_summaries()}" if takes_methods else None,
        )
        command.add_argument("--quiet", action="store_true", help="no progress bars and no log lines")
        command.add_argument("--verbose", action="store_true", help="log debugging details")
        for argument in verb.arguments:
            command.add_argument(*argument.flags, **argument.options)
        for options in verb.options:
            add_options(command, options.settings, options.title, exclude=options.exclude)
        command.set_defaults(handler=verb.handler)
    return parser


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
