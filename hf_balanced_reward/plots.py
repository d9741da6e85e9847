"""The evaluation plots, as PNG files a person can read without the code."""

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def finish(fig, ax, title: str, xlabel: str, ylabel: str, legend_loc: str, path: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def margin_histogram(margins: np.ndarray, path: str) -> None:
    accuracy = float((margins > 0).mean())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(margins, bins=40, color="tab:blue", alpha=0.8, label=f"{len(margins)} pairs (accuracy {accuracy:.3f})")
    ax.axvline(0, color="black", linestyle="--", label="margin 0: to the right, the chosen response scores higher")
    finish(fig, ax, "Reward margins on held-out pairs", "reward margin: r(chosen) - r(rejected)", "number of pairs",
           "upper left", path)


def calibration_curve(table: list[dict], ece: float, path: str) -> None:
    confidence = [row["confidence"] for row in table]
    accuracy = [row["accuracy"] for row in table]
    sizes = [20 + 300 * row["pairs"] / max(r["pairs"] for r in table) for row in table]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0.5, 1], [0.5, 1], color="grey", linestyle="--", label="perfectly calibrated")
    ax.plot(confidence, accuracy, color="tab:orange", label=f"this model (ECE {ece:.3f})")
    ax.scatter(confidence, accuracy, s=sizes, color="tab:orange", alpha=0.7, label="bins (area: number of pairs)")
    ax.set_xlim(0.5, 1)
    ax.set_ylim(0, 1)
    finish(fig, ax, "Calibration: confidence against accuracy",
           "confidence in the higher-scored response: sigmoid(|margin|)",
           "share of pairs where it is the chosen response", "lower right", path)


def group_accuracy_bars(groups: dict[str, dict], overall: float, length_baseline: float | None, path: str) -> None:
    names = list(groups)
    accuracy = np.array([groups[n]["accuracy"] for n in names])
    errors = np.array([[a - groups[n]["ci_low"], groups[n]["ci_high"] - a] for n, a in zip(names, accuracy)]).T
    errors = np.maximum(errors, 0)  # at 0% or 100% the interval's edge is the estimate, up to rounding
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 3), 4.5))
    labels = [f"{n}\n({groups[n]['pairs']} pairs)" for n in names]
    ax.bar(labels, accuracy, yerr=errors, capsize=4, color="tab:green", alpha=0.8,
           label="accuracy per group (95% interval)")
    ax.axhline(overall, color="tab:blue", label=f"all pairs ({overall:.3f})")
    if length_baseline is not None:
        ax.axhline(length_baseline, color="tab:red", linestyle="--",
                   label=f"always prefer the longer response ({length_baseline:.3f})")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
    ax.set_ylim(0, 1)
    finish(fig, ax, "Accuracy per group", "group", "share of pairs ranked correctly", "lower right", path)


def length_cell_bars(cells: dict[str, dict], length_balanced: float | None, path: str) -> None:
    """Accuracy per group and length cell: a length-biased model is high in one direction and low in the other."""
    names = list(cells)
    accuracy = np.array([cells[n]["accuracy"] for n in names])
    errors = np.array([[a - cells[n]["ci_low"], cells[n]["ci_high"] - a] for n, a in zip(names, accuracy)]).T
    errors = np.maximum(errors, 0)
    colours = ["tab:orange" if n.endswith("chosen_longer") else "tab:purple" if n.endswith("chosen_shorter")
               else "tab:grey" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 3), 4.8))
    labels = [f"{n.replace(' / ', chr(10))}\n({cells[n]['pairs']} pairs)" for n in names]
    ax.bar(labels, accuracy, yerr=errors, capsize=4, color=colours, alpha=0.8,
           label="accuracy per cell (95% interval): orange chosen longer, purple chosen shorter")
    if length_balanced is not None:
        ax.axhline(length_balanced, color="tab:blue", label=f"length-balanced accuracy ({length_balanced:.3f})")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", labelsize=7)
    finish(fig, ax, "Accuracy per group and length cell", "group / which response is longer",
           "share of pairs ranked correctly", "lower right", path)
