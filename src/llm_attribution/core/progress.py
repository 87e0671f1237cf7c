"""One progress-bar format for every long loop, with one off switch.

Bars go to stderr, and are off when ``--quiet`` is given, when ``LLM_ATTR_QUIET=1`` is set, or when
stderr is not a terminal (so logs and CI output stay clean).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

BAR_FORMAT = "{desc:<18} {percentage:3.0f}% |{bar:24}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar of this process off (``True``) or back to automatic (``False``)."""
    global _quiet
    _quiet = quiet


def bars_enabled() -> bool:
    """Whether bars are shown: not quiet, not disabled by the environment, and stderr is a terminal."""
    if _quiet or os.environ.get("LLM_ATTR_QUIET", "") not in ("", "0"):
        return False
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``iterable`` behind a progress bar labelled ``desc`` (or silently when bars are off)."""
    if not bars_enabled():
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, bar_format=BAR_FORMAT, file=sys.stderr, leave=False)


class ProgressBar:
    """A manually advanced bar (for loops whose unit is not one item, e.g. optimisation steps)."""

    def __init__(self, total: int, desc: str) -> None:
        self._bar = (
            tqdm(total=total, desc=desc, bar_format=BAR_FORMAT, file=sys.stderr, leave=False)
            if bars_enabled()
            else None
        )

    def update(self, n: int = 1, **postfix: float | str) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
