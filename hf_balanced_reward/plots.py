"""The evaluation plots, as PNG files a person can read without the code.

Each function saves one figure and returns it (closed, but its axes and legend can still be read, as the tests do).
Legends sit below the axes, where they cannot cover a bar or a point; lines that may coincide carry their values
as text at the right edge, spread apart so that none hides another.
"""

import textwrap

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from matplotlib.patches import Patch  # noqa: E402

from .balancing import SAME_LENGTH_TOLERANCE  # noqa: E402
from .metrics import MIN_CELL_PAIRS, metric_name  # noqa: E402

# A calibration bin with fewer pairs than this is drawn hollow: its accuracy is too uncertain to read as a point.
MIN_BIN_PAIRS = 10
CELL_COLOURS = {"chosen_longer": "tab:orange", "chosen_shorter": "tab:purple", "same_length": "tab:grey"}
CELL_LABELS = {
    "chosen_longer": "chosen response longer",
    "chosen_shorter": "chosen response shorter",
    "same_length": f"same length (within {SAME_LENGTH_TOLERANCE:.0%})",
}


def pairs_text(n: int) -> str:
    return f"{n} pair" if n == 1 else f"{n} pairs"


def finish(fig: Figure, ax, title: str, xlabel: str, ylabel: str, path: str, columns: int = 2,
           hatched: tuple[str, ...] = ()) -> Figure:
    """Title, axis labels, the legend below the axes (outside them: it covers nothing), saved to `path`. `hatched`:
    legend entries for what a hatched bar means."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Patch(facecolor="white", edgecolor="dimgrey", hatch="///", label=extra) for extra in hatched]
    labels += list(hatched)
    if handles:
        fig.legend(handles, [textwrap.fill(label, 48) for label in labels], loc="outside lower center",
                   ncols=min(columns, len(handles)), fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def reference_lines(ax, lines: list[tuple[float, str, str, dict]]) -> None:
    """Horizontal lines (value, short name, legend label, style), each with its short name and value written at the
    right edge of the axes. Lines that may lie on top of each other get different dashes and widths, and their
    texts are spread apart, a thin leader joining a moved text to its line."""
    for value, _, label, style in lines:
        ax.axhline(value, label=label, **style)
    transform = ax.get_yaxis_transform()  # x in axes fractions, y in data
    previous = None
    for value, name, _, style in sorted(lines, key=lambda line: line[0]):
        y = value if previous is None else max(value, previous + 0.06)  # at least one line of text apart
        previous = y
        ax.annotate(f"{name} {value:.3f}", xy=(1, value), xycoords=transform, xytext=(1.02, y), textcoords=transform,
                    va="center", fontsize=7, color=style["color"], annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", color=style["color"], linewidth=0.6) if y != value else None)


def margin_histogram(margins: np.ndarray, path: str) -> Figure:
    margins = np.asarray(margins, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    if len(margins):
        accuracy = float((margins > 0).mean())
        ax.hist(margins, bins=40, color="tab:blue", alpha=0.8,
                label=f"{pairs_text(len(margins))} (accuracy {accuracy:.3f})")
    ax.axvline(0, color="black", linestyle="--", label="margin 0: to the right, the chosen response scores higher")
    return finish(fig, ax, "Reward margins on held-out pairs", "reward margin: r(chosen) - r(rejected)",
                  "number of pairs", path, columns=1)


def calibration_curve(table: list[dict], ece: float, path: str) -> Figure:
    """Confidence against accuracy per bin, each bin's pair count written beside it; a bin of fewer than
    `MIN_BIN_PAIRS` pairs is a hollow marker (too few pairs to judge its accuracy)."""
    fig, ax = plt.subplots(figsize=(6, 6.5), layout="constrained")
    ax.plot([0.5, 1], [0.5, 1], color="grey", linestyle="--", label="perfectly calibrated")
    pairs = np.array([row["pairs"] for row in table], dtype=int)
    if table:
        confidence = np.array([row["confidence"] for row in table])
        accuracy = np.array([row["accuracy"] for row in table])
        sizes = 40 + 300 * pairs / pairs.max()
        enough = pairs >= MIN_BIN_PAIRS
        if enough.any():  # the curve joins only the bins with enough pairs to read
            ax.plot(confidence[enough], accuracy[enough], color="tab:orange", linewidth=1, alpha=0.7)
            ax.scatter(confidence[enough], accuracy[enough], s=sizes[enough], color="tab:orange", alpha=0.8,
                       label=f"this model: bins of {MIN_BIN_PAIRS}+ pairs (area and number: pairs in the bin)")
        if not enough.all():
            ax.scatter(confidence[~enough], accuracy[~enough], s=sizes[~enough], facecolors="none",
                       edgecolors="tab:orange", linewidths=1.5,
                       label=f"hollow: bins of fewer than {MIN_BIN_PAIRS} pairs, too few to judge")
        for x, y, n in zip(confidence, accuracy, pairs):
            ax.annotate(str(n), (x, y), xytext=(8, 6), textcoords="offset points", fontsize=7, color="tab:brown")
    else:
        ax.text(0.75, 0.5, "no pairs", ha="center", color="grey")
    ax.set_xlim(0.5, 1)
    ax.set_ylim(0, 1.05)
    title = f"Calibration: confidence against accuracy\n(ECE {ece:.3f} over {pairs_text(pairs.sum())})"
    return finish(fig, ax, title,
                  "confidence in the higher-scored response: sigmoid(|margin|)",
                  "share of pairs where it is the chosen response", path, columns=1)


def interval_errors(rows: dict[str, dict], names: list[str]) -> np.ndarray:
    accuracy = np.array([rows[n]["accuracy"] for n in names])
    errors = np.array([[a - rows[n]["ci_low"], rows[n]["ci_high"] - a] for n, a in zip(names, accuracy)]).T
    return np.maximum(errors.reshape(2, len(names)), 0)  # at 0% or 100% the interval's edge is the estimate


def bar_values(ax, positions, rows: dict[str, dict], names: list[str]) -> None:
    """Each bar's accuracy written above its interval."""
    for x, name in zip(positions, names):
        top = max(rows[name]["ci_high"], rows[name]["accuracy"])
        ax.text(x, top + 0.015, f"{rows[name]['accuracy']:.2f}", ha="center", va="bottom", fontsize=7)


def group_accuracy_bars(groups: dict[str, dict], overall: float, length_baseline: float | None, path: str) -> Figure:
    names = list(groups)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(names) + 4), 5.5), layout="constrained")
    positions = np.arange(len(names))
    ax.bar(positions, [groups[n]["accuracy"] for n in names], yerr=interval_errors(groups, names), capsize=4,
           color="tab:green", alpha=0.8, label="accuracy per group (bar: 95% interval)")
    bar_values(ax, positions, groups, names)
    ax.set_xticks(positions, [f"{n}\n({pairs_text(groups[n]['pairs'])})" for n in names])
    lines = [(overall, "all pairs", f"all pairs: this model's accuracy ({overall:.3f})",
              dict(color="tab:blue", linewidth=3, alpha=0.6))]
    if length_baseline is not None:
        same = ", the same as this model's" if abs(length_baseline - overall) < 0.0005 else ""
        lines.append((length_baseline, "always longer", f"always prefer the longer response ({length_baseline:.3f}"
                      f"{same})", dict(color="tab:red", linestyle=(0, (4, 3)), linewidth=1.5)))
    lines.append((0.5, "chance", "chance (0.5)", dict(color="grey", linestyle=":", linewidth=1.2)))
    reference_lines(ax, lines)
    ax.set_ylim(0, 1.1)
    ax.set_yticks(np.linspace(0, 1, 6))
    return finish(fig, ax, "Accuracy per group", "group", "share of pairs ranked correctly", path)


def length_cell_bars(cells: dict[str, dict], length_balanced: float | None, path: str) -> Figure:
    """Accuracy per group and length cell: a length-biased model is high in one direction and low in the other.
    One colour per cell kind, each in the legend (same-length pairs too); a cell left out of the length-balanced mean
    (same length, or fewer than `metrics.MIN_CELL_PAIRS` pairs) is hatched."""
    names = list(cells)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(names) + 4), 5.8), layout="constrained")
    positions = np.arange(len(names))
    kinds = [next((k for k in CELL_COLOURS if n.endswith(k)), "same_length") for n in names]
    for kind, colour in CELL_COLOURS.items():
        members = [i for i, k in enumerate(kinds) if k == kind]
        if members:
            bars = ax.bar(positions[members], [cells[names[i]]["accuracy"] for i in members],
                          yerr=interval_errors(cells, [names[i] for i in members]), capsize=4, color=colour,
                          alpha=0.8, label=CELL_LABELS[kind])
            for i, bar in zip(members, bars):
                if kind == "same_length" or cells[names[i]]["pairs"] < MIN_CELL_PAIRS:
                    bar.set_hatch("///")
    bar_values(ax, positions, cells, names)
    group_names = [n.rsplit(" / ", 1)[0] for n in names]
    kind_names = [CELL_LABELS[k].split(" (")[0].replace("response ", "") for k in kinds]
    ax.set_xticks(positions, [f"{g}\n{k}\n({pairs_text(cells[n]['pairs'])})"
                              for g, k, n in zip(group_names, kind_names, names)], fontsize=7)
    lines = []
    if length_balanced is not None:
        lines.append((length_balanced, "length-balanced", f"length-balanced accuracy ({length_balanced:.3f}): the "
                      f"mean of the plain longer and shorter bars", dict(color="tab:blue", linewidth=3, alpha=0.6)))
    lines.append((0.5, "chance", "chance (0.5)", dict(color="grey", linestyle=":", linewidth=1.2)))
    reference_lines(ax, lines)
    ax.set_ylim(0, 1.1)
    ax.set_yticks(np.linspace(0, 1, 6))
    hatched = any(p.get_hatch() for p in ax.patches)
    return finish(fig, ax, "Accuracy per group and length cell (bar: 95% interval)", "group / which response is longer",
                  "share of pairs ranked correctly", path, columns=2,
                  hatched=(f"hatched: not in the length-balanced mean (same length, or under {MIN_CELL_PAIRS} pairs)",)
                  if hatched else ())


def attribute_scatter(predicted: np.ndarray, expert: np.ndarray, names: list[str], metrics: dict, path: str
                      ) -> Figure:
    """A multi-attribute model's predicted score against the expert score, one panel per attribute, each response
    once; the panel's title gives its Pearson and Spearman (`attribute_training.evaluation_metrics`). Expert
    scores are often a few discrete values: the points are jittered sideways (by at most a quarter of the smallest
    gap between two of them) so that equal ones do not hide each other."""
    columns = min(len(names), 4)
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.2 * rows + 0.6), layout="constrained",
                             squeeze=False)
    jitter = np.random.default_rng(0)
    for a, name in enumerate(names):
        ax = axes[a // columns][a % columns]
        scored = np.isfinite(expert[:, a])
        x, y = expert[scored, a], predicted[scored, a]
        levels = np.unique(x)
        spread = np.diff(levels).min() / 4 if len(levels) > 1 else 0.0
        ax.scatter(x + jitter.uniform(-spread, spread, len(x)), y, s=8, alpha=0.5, color="tab:blue")
        key = metric_name(name)
        pearson, spearman = metrics.get(f"pearson_{key}", np.nan), metrics.get(f"spearman_{key}", np.nan)
        ax.set_title(f"{name} ({len(x)} responses)\nPearson {pearson:.3f}, Spearman {spearman:.3f}", fontsize=9)
        ax.set_xlabel("expert score", fontsize=8)
        ax.set_ylabel("predicted (head output)", fontsize=8)
    for a in range(len(names), rows * columns):
        axes[a // columns][a % columns].set_visible(False)
    fig.suptitle("Predicted against expert score, per attribute (each response once)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
