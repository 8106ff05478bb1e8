"""What the experiments' reports share: matplotlib figures, markdown tables and number formats.

The training side is :mod:`bnlab.lab.common`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from .runner import Report, RunView


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path) -> None:
    """Write the figure to ``path`` at the lab's resolution and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def style_axes(ax, xlabel: str, ylabel: Optional[str] = None, **legend: Any) -> None:
    """The lab's axes: labels, a light grid, a legend (``legend``: its keyword arguments)."""
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(**legend)


def batch_size_axes(ax, sizes: Sequence[int], title: str) -> None:
    """Test accuracy in percent against the batch size on a log2 axis, each size labelled."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_title(title)
    style_axes(ax, "examples per batch", "test accuracy (%)")


def plot_percent(ax, points: Sequence[tuple[Any, dict]], column: str, *fmt: str, **style) -> None:
    """One line through ``points``, (x, row) pairs: 100 * ``row[column]`` against x."""
    ax.plot([x for x, _ in points], [100 * row[column] for _, row in points], *fmt, **style)


def staged_report(
    summarize: Callable[[RunView], Any],
    plot: Callable[[RunView, Any], None],
    render: Callable[[Any, Any], str],
) -> Callable[[RunView], Report]:
    """An experiment's report in three stages, so that the text cannot disagree with the numbers:
    ``summarize(view)`` computes every number once (an object with ``headline()``, the dict
    written to summary.json), ``plot(view, summary)`` draws the figures and
    ``render(summary, config)`` only formats the summary's numbers as markdown."""

    def report(view: RunView) -> Report:
        summary = summarize(view)
        plot(view, summary)
        return Report(render(summary, view.config), summary.headline())

    return report


def heading(title: str, *paragraphs: str) -> list[str]:
    """A report's first lines: the title, then each paragraph followed by a blank line."""
    lines = [f"# {title}", ""]
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    return lines


def pct(value: Optional[float]) -> str:
    """A fraction as a percentage with one decimal; "-" for None or NaN."""
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.1f}"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return lines


def fmt_lr(lr: float) -> str:
    """A learning rate as reports and job keys write it (shortest form: 0.1, 1e-05)."""
    return f"{lr:g}"
