"""Plots for the report, rendered headless to PNG bytes (matplotlib's Agg backend)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display anywhere this runs; must precede pyplot
import matplotlib.pyplot as plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def grid_figure(tasks: Mapping[str, Mapping[str, Any]], metric: str) -> bytes:
    """Grouped bars, one group per task and one bar per method, with 95% bootstrap intervals."""
    names = list(tasks)
    methods = list(next(iter(tasks.values())))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.4))
    for i, method in enumerate(methods):
        cells = [tasks[t][method][metric] for t in names]
        means = [c["mean"] for c in cells]
        errors = [[c["mean"] - c["ci_low"] for c in cells], [c["ci_high"] - c["mean"] for c in cells]]
        positions = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(names))]
        ax.bar(positions, means, width, yerr=errors, capsize=2, label=method)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, ncol=min(len(methods), 6), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_title(f"{metric} (mean over test examples and seeds, 95% bootstrap interval)")
    return _png(fig)


def interval_bars_figure(
    entries: Mapping[str, Mapping[str, Any]],
    ylabel: str,
    title: str,
    reference: tuple[str, float] | None = None,
) -> bytes:
    """One bar per entry (``mean`` with its ``ci95`` interval), and a dashed line for a reference value."""
    names = list(entries)
    means = [entries[n]["mean"] for n in names]
    low = [entries[n]["mean"] - entries[n]["ci95"][0] for n in names]
    high = [entries[n]["ci95"][1] - entries[n]["mean"] for n in names]
    fig, ax = plt.subplots(figsize=(0.8 * len(names) + 2.5, 3.2))
    ax.bar(range(len(names)), means, yerr=[low, high], capsize=3)
    if reference is not None:
        ax.axhline(reference[1], linestyle="--", color="grey", label=reference[0])
        ax.legend(fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def lines_figure(
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    xlabel: str,
    ylabel: str,
    title: str,
    log: str = "",
) -> bytes:
    """One line per series over ``x`` (``None`` values are skipped); ``log`` names log axes: "x", "xy"."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    if "x" in log:
        ax.set_xscale("log")
    if "y" in log:
        ax.set_yscale("log")
    _lines(ax, x, series, xlabel, ylabel)
    ax.set_title(title)
    return _png(fig)


def _lines(
    ax: Any, x: Sequence[float], series: Mapping[str, Sequence[float | None]], xlabel: str, ylabel: str
) -> None:
    """One line per series over ``x``, skipping ``None`` values, with axis labels and a legend."""
    for name, values in series.items():
        points = [(a, b) for a, b in zip(x, values, strict=True) if b is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


Panel = tuple[str, str, Mapping[str, Sequence[float | None]]]
"""One subplot: its title, its y label, and its lines by name."""


def panels_figure(x: Sequence[float], xlabel: str, panels: Sequence[Panel]) -> bytes:
    """Subplots side by side over the same ``x``, each with its own y scale (``None`` values skipped)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], panels, strict=True):
        _lines(ax, x, series, xlabel, ylabel)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(list(x))
    fig.tight_layout()
    return _png(fig)


def spectrum_figure(blocks: Mapping[str, Mapping[str, float]]) -> bytes:
    """Per block: share of Fisher directions and of test-gradient energy below the damping."""
    names = list(blocks)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(
        range(len(names)),
        [b["share_directions_below_damping"] for b in blocks.values()],
        ".",
        label="directions below damping",
    )
    ax.plot(
        range(len(names)),
        [b["share_test_energy_below_damping"] for b in blocks.values()],
        ".",
        label="test-gradient energy below damping",
    )
    ax.set_xlabel("LoRA block (module order)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Where (F + lambda I)^-1 acts like I / lambda")
    ax.legend(fontsize=7)
    return _png(fig)
