"""``docs/benchmarks.md`` is written by several scripts, each owning one section between its own markers,
so that one script's rerun leaves the others' measurements as they are."""

from __future__ import annotations

import argparse
from pathlib import Path

TITLE = "# Benchmarks\n"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between ``name``'s markers in ``path``: replaced where they are, else appended."""
    begin, end = markers(name)
    section = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.is_file() else TITLE
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def command_line(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reproduces a run of ``script``: its options that differ from the defaults
    (``--out`` left out: where the section goes does not change what it says)."""
    defaults = parser.parse_args([])
    changed = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k != "out" and v != getattr(defaults, k)
    ]
    return " ".join([f"python benchmarks/{script}", *changed])
