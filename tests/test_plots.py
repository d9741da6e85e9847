"""The evaluation plots on edge cases (one group, a one-pair bin, no same-length pairs): each writes a PNG, keeps its
legend outside the axes, and says what it draws (checked on the returned matplotlib Figure, not on pixels)."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from hf_balanced_reward import plots


def cell(pairs: int, accuracy: float) -> dict:
    return {"pairs": pairs, "accuracy": accuracy, "ci_low": max(0.0, accuracy - 0.2),
            "ci_high": min(1.0, accuracy + 0.2)}


def legend_labels(fig) -> list[str]:
    return [text.get_text().replace("\n", " ") for text in fig.legends[0].get_texts()]


def check_written(fig, path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 500
    ax = fig.axes[0]
    assert ax.get_legend() is None and len(fig.legends) == 1  # the legend is the figure's, not inside the axes
    renderer = FigureCanvasAgg(fig).get_renderer()  # the saved layout, measured again
    assert fig.legends[0].get_window_extent(renderer).y1 <= ax.get_window_extent(renderer).y0  # below the axes


def test_length_cells_put_same_length_pairs_in_the_legend(tmp_path):
    cells = {"forum / chosen_longer": cell(50, 0.9), "forum / chosen_shorter": cell(20, 0.3),
             "forum / same_length": cell(5, 0.6)}
    fig = plots.length_cell_bars(cells, 0.6, tmp_path / "cells.png")
    check_written(fig, tmp_path / "cells.png")
    labels = legend_labels(fig)
    assert {"chosen response longer", "chosen response shorter", "same length (within 10%)"} <= set(labels)
    assert any(label.startswith("length-balanced accuracy (0.600)") for label in labels)
    colours = {bar.get_facecolor()[:3] for bar in fig.axes[0].patches}
    assert len(colours) == 3  # one colour per kind of cell


def test_length_cells_left_out_of_the_length_balanced_mean_are_hatched(tmp_path):
    cells = {"a / chosen_longer": cell(50, 0.9), "a / chosen_shorter": cell(9, 0.3), "a / same_length": cell(30, 0.5)}
    fig = plots.length_cell_bars(cells, 0.9, tmp_path / "cells.png")
    hatches = {round(bar.get_x() + bar.get_width() / 2): bar.get_hatch() for bar in fig.axes[0].patches}
    assert hatches == {0: None, 1: "///", 2: "///"}  # 9 pairs (< MIN_CELL_PAIRS) and same length: not in the mean
    assert any(label.startswith("hatched: not in the length-balanced mean") for label in legend_labels(fig))
    plain = plots.length_cell_bars({"a / chosen_longer": cell(50, 0.9)}, 0.9, tmp_path / "plain.png")
    assert not any(label.startswith("hatched") for label in legend_labels(plain))


def test_length_cells_without_same_length_pairs(tmp_path):
    cells = {"all / chosen_longer": cell(1, 1.0), "all / chosen_shorter": cell(3, 0.0)}
    fig = plots.length_cell_bars(cells, None, tmp_path / "cells.png")
    check_written(fig, tmp_path / "cells.png")
    assert not any(label.startswith("same length") for label in legend_labels(fig))
    assert "1 pair)" in " ".join(t.get_text() for t in fig.axes[0].get_xticklabels())


def test_group_lines_that_coincide_stay_apart(tmp_path):
    groups = {"only": cell(1, 1.0)}  # one group of one pair
    fig = plots.group_accuracy_bars(groups, 0.75, 0.75, tmp_path / "groups.png")
    check_written(fig, tmp_path / "groups.png")
    ax = fig.axes[0]
    overall, baseline = (line for line in ax.get_lines() if line.get_ydata()[0] == 0.75)
    assert overall.get_linestyle() != baseline.get_linestyle()  # solid and dashed: both visible on one y
    notes = {a.get_text(): a.xyann[1] for a in ax.texts if hasattr(a, "xyann")}
    assert {"all pairs 0.750", "always longer 0.750", "chance 0.500"} <= set(notes)
    assert abs(notes["all pairs 0.750"] - notes["always longer 0.750"]) >= 0.05  # their values, not on each other
    assert any("the same as this model's" in label for label in legend_labels(fig))
    assert plots.group_accuracy_bars(groups, 0.8, None, tmp_path / "no_baseline.png") is not None


def test_calibration_bins_of_few_pairs_are_hollow_and_every_bin_shows_its_count(tmp_path):
    table = [{"confidence": 0.6, "accuracy": 0.55, "pairs": 40}, {"confidence": 0.95, "accuracy": 1.0, "pairs": 1}]
    fig = plots.calibration_curve(table, 0.1, tmp_path / "calibration.png")
    check_written(fig, tmp_path / "calibration.png")
    ax = fig.axes[0]
    solid, hollow = ax.collections
    assert solid.get_offsets().tolist() == [[0.6, 0.55]] and solid.get_facecolor()[0][3] > 0
    assert hollow.get_offsets().tolist() == [[0.95, 1.0]] and len(hollow.get_facecolor()) == 0  # no fill
    assert {"40", "1"} <= {text.get_text() for text in ax.texts}  # pairs per bin, printed beside it
    assert any(label.startswith("hollow: bins of fewer than 10 pairs") for label in legend_labels(fig))
    assert "ECE 0.100 over 41 pairs" in ax.get_title()


@pytest.mark.parametrize("table", [[{"confidence": 0.7, "accuracy": 0.0, "pairs": 1}], []])
def test_calibration_with_only_sparse_bins_or_none(tmp_path, table):
    fig = plots.calibration_curve(table, 0.0, tmp_path / "calibration.png")
    with Image.open(tmp_path / "calibration.png") as image:
        assert image.format == "PNG"
    assert all(len(c.get_facecolor()) == 0 for c in fig.axes[0].collections)  # nothing drawn as a full point


@pytest.mark.parametrize("margins", [np.array([0.3]), np.array([])])
def test_margin_histogram_of_one_pair_or_none(tmp_path, margins):
    fig = plots.margin_histogram(margins, tmp_path / "margins.png")
    check_written(fig, tmp_path / "margins.png")
