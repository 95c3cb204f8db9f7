"""Pictures a person can read without the README: labelled image grids and the trade-off plot.

Grids name every row (the model) and column (prompt set, prompt, seed) and show each image at least
``MIN_CELL_PIXELS`` wide (small images are enlarged without smoothing, so pixels stay pixels). The
trade-off plot keeps its legend outside the axes and moves point labels apart so none overlaps another.
"""

import textwrap
from typing import List, Optional, Sequence, Tuple

import numpy as np


MIN_CELL_PIXELS = 128
MAX_CELL_PIXELS = 256
DPI = 100


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cell_pixels(image_size: int) -> int:
    """How wide one image is drawn: its own size, kept between MIN_CELL_PIXELS and MAX_CELL_PIXELS."""
    return int(min(max(image_size, MIN_CELL_PIXELS), MAX_CELL_PIXELS))


def labelled_grid(
    rows: Sequence[Sequence], row_labels: Sequence[str], column_labels: Sequence[str], title: Optional[str] = None
):
    """A matplotlib figure of PIL images, one row per ``row_labels`` entry and one column per ``column_labels`` entry.

    Returns ``(figure, axes)``; ``axes[r][c]`` shows ``rows[r][c]`` (an empty cell where a row is short).
    """
    plt = pyplot()
    num_rows, num_columns = len(rows), max(len(column_labels), max(len(r) for r in rows))
    cell = cell_pixels(max(image.size[0] for row in rows for image in row)) / DPI
    label_width = 0.3 + 0.085 * min(max(len(label) for label in row_labels), 28)
    width = label_width + num_columns * (cell + 0.08)
    # A title wraps to the picture's width (about 8 px a character at its size).
    title_lines = textwrap.wrap(title, max(30, int(width * DPI / 8))) if title else []
    header = 0.5 + 0.1 + 0.2 * len(title_lines)
    figure, axes = plt.subplots(
        num_rows, num_columns, squeeze=False, dpi=DPI, figsize=(width, header + num_rows * (cell + 0.08))
    )
    for r, row in enumerate(rows):
        for c in range(num_columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                ax.imshow(np.asarray(row[c].convert("RGB")), interpolation="nearest")
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(
            textwrap.fill(row_labels[r], 28), rotation=0, ha="right", va="center", fontsize=9, labelpad=6
        )
    for c, label in enumerate(column_labels):
        axes[0][c].set_title(label, fontsize=7.5)
    if title_lines:
        figure.suptitle("\n".join(title_lines), fontsize=10)
    figure.subplots_adjust(
        left=label_width / figure.get_figwidth(),
        right=0.995,
        bottom=0.01,
        top=1 - header / figure.get_figheight(),
        wspace=0.05,
        hspace=0.05,
    )
    return figure, axes


def save_labelled_grid(path: str, rows, row_labels, column_labels, title: Optional[str] = None) -> str:
    figure, _ = labelled_grid(rows, row_labels, column_labels, title)
    figure.savefig(path, dpi=DPI)
    pyplot().close(figure)
    return path


def column_label(prompt: str, seed: Optional[int] = None, prompt_set: Optional[str] = None, width: int = 22) -> str:
    """A grid column's header: the prompt set, the prompt (wrapped, at most two lines) and the seed."""
    lines = textwrap.wrap(prompt, width) or [""]
    if len(lines) > 2:
        lines = [lines[0], lines[1][: width - 1] + "…"]
    head = [f"[{prompt_set}]"] if prompt_set else []
    tail = [f"seed {seed}"] if seed is not None else []
    return "\n".join(head + lines + tail)


# --------------------------------------------------------------------------------------------------
# The trade-off plot
# --------------------------------------------------------------------------------------------------


def spread_labels(values: Sequence[float], min_gap: float, upper: float = np.inf) -> List[float]:
    """Positions as close as possible to ``values``, every two at least ``min_gap`` apart, order kept,
    and none above ``upper`` unless the labels need more room than there is."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = [float(v) for v in values]
    previous = -np.inf
    for i in order:  # push up what sits too close above its neighbour
        placed[i] = max(placed[i], previous + min_gap)
        previous = placed[i]
    ceiling = upper
    for i in reversed(order):  # then pull down what went past the top, keeping the gaps
        placed[i] = min(placed[i], ceiling)
        ceiling = placed[i] - min_gap
    return placed


def tradeoff_figure(
    points: Sequence[Tuple[str, str, float, float]], title: str, xlabel: str = "prior preservation (1 − LPIPS)"
):
    """Defense success rate (y) against prior preservation (x): colour = model, marker = attack.

    ``points`` are ``(model, attack, x, y)``. One label per model, in its colour, to the right of the axes
    at the height of its points' mean, moved apart from the others; the legend (markers = attacks) sits
    below the axes, so neither covers data. Returns ``(figure, axes, legend, labels)``.
    """
    plt = pyplot()
    from matplotlib.lines import Line2D

    attacks = list(dict.fromkeys(p[1] for p in points))
    models = list(dict.fromkeys(p[0] for p in points))
    markers = {a: ("o", "^", "s", "D", "v", "P")[i % 6] for i, a in enumerate(attacks)}
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    figure, axes = plt.subplots(figsize=(8.5, 4.6), dpi=120)
    xs = [p[2] for p in points]
    span = max(max(xs) - min(xs), 0.05)
    # Models with equal preservation (often several at 1.00) would hide each other: each model's points are
    # nudged sideways by a fixed share of the axis, said under the axis.
    nudge = 0.012 * span
    offsets = {m: (i - (len(models) - 1) / 2) * nudge for i, m in enumerate(models)}
    for model, attack, x, y in points:
        axes.scatter(
            [x + offsets[model]], [y], marker=markers[attack], color=colours[model], s=60, alpha=0.85, zorder=3
        )
    # Prior preservation is at most 1: no empty room past it.
    axes.set_xlim(min(xs) - 0.1 * span, min(max(xs) + 0.1 * span, 1.0 + 0.02 * span))
    axes.set_ylim(-0.05, 1.05)
    centres = [float(np.mean([y for m, _, _, y in points if m == model])) for model in models]
    heights = spread_labels(centres, min_gap=0.075, upper=1.05)
    labels = []
    for model, height in zip(models, heights):
        labels.append(
            axes.text(
                1.02,
                (height + 0.05) / 1.1,
                f"● {model}",
                transform=axes.transAxes,
                fontsize=8,
                color=colours[model],
                va="center",
                ha="left",
                clip_on=False,
            )
        )
    handles = [Line2D([], [], linestyle="", marker=markers[a], color="gray", label=a) for a in attacks]
    legend = axes.legend(
        handles=handles,
        title="attack / prompt set",
        fontsize=8,
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(0.0, -0.13),
        ncol=min(len(attacks), 4),
        frameon=False,
    )
    axes.set_xlabel(
        f"{xlabel}; models nudged apart by up to ±{max(abs(o) for o in offsets.values()):.3f} to stay visible"
        if len(models) > 1
        else xlabel,
        fontsize=8,
    )
    axes.set_ylabel("defense success rate")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    figure.subplots_adjust(left=0.09, right=0.74, top=0.92, bottom=0.25)
    return figure, axes, legend, labels
