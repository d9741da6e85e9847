"""The metrics that see the length shortcut: per-cell, length-balanced and -conflicting accuracy, within-group rank
correlation and post-hoc length calibration, on hand-built pairs."""

import numpy as np
import pytest

from hf_balanced_reward.metrics import length_calibrated, pair_metrics


def block(group, count, right, chosen_length, rejected_length):
    """`count` pairs of one group and length cell, the first `right` of them ranked correctly."""
    return [(group, 1.0 if i < right else -1.0, chosen_length, rejected_length) for i in range(count)]


def test_cell_accuracies_and_their_summaries():
    rows = (block(0, 12, 9, 20, 10) + block(0, 10, 4, 10, 20) + block(0, 2, 1, 10, 10)
            + block(1, 3, 3, 20, 10) + block(1, 10, 5, 10, 20))
    groups, margins, chosen_lengths, rejected_lengths = map(np.array, zip(*rows))
    metrics = pair_metrics(margins, np.zeros(len(rows)), groups, ["A", "B"], chosen_lengths, rejected_lengths)
    assert metrics["accuracy_A_chosen_longer"] == 0.75
    assert metrics["accuracy_A_chosen_shorter"] == 0.4
    assert metrics["accuracy_A_same_length"] == 0.5
    assert metrics["accuracy_B_chosen_longer"] == 1.0
    assert metrics["accuracy_B_chosen_shorter"] == 0.5
    assert "accuracy_B_same_length" not in metrics
    # B's chosen-longer cell has 3 pairs, too few to enter the length-balanced mean
    assert metrics["length_balanced_accuracy"] == pytest.approx((0.75 + 0.4 + 0.5) / 3)
    # against the majority: A's chosen-shorter pairs (A is mostly chosen-longer) and B's chosen-longer ones
    assert metrics["length_conflicting_pairs"] == 13
    assert metrics["length_conflicting_accuracy"] == pytest.approx(7 / 13)


def test_within_group_rank_correlation_is_taken_per_group():
    # group 0 rewards length, group 1 punishes it: pooled they cancel, within each group the bias is total
    lengths_c, lengths_r = np.array([5, 6, 1, 2]), np.array([1, 2, 5, 6])
    chosen = np.array([5.0, 6.0, -1.0, -2.0])
    rejected = np.array([1.0, 2.0, -5.0, -6.0])
    metrics = pair_metrics(chosen, rejected, [0, 0, 1, 1], ["up", "down"], lengths_c, lengths_r)
    assert metrics["reward_length_spearman_up"] == pytest.approx(1.0)
    assert metrics["reward_length_spearman_down"] == pytest.approx(-1.0)
    assert metrics["within_group_length_correlation"] == pytest.approx(1.0)


def test_length_calibration_removes_a_length_trend_fitted_without_labels():
    # reward = quality (chosen 1, rejected 0) + 3 log(1 + length); quality is uncorrelated with length here, so the
    # least-squares slope is exactly 3 and calibration recovers the quality
    chosen_lengths, rejected_lengths = np.array([1, 7, 1, 7]), np.array([7, 1, 7, 1])
    chosen = 1 + 3 * np.log1p(chosen_lengths)
    rejected = 3 * np.log1p(rejected_lengths)
    calibrated_chosen, calibrated_rejected = length_calibrated(chosen, rejected, np.zeros(4, int), chosen_lengths,
                                                               rejected_lengths)
    np.testing.assert_allclose(calibrated_chosen - calibrated_rejected, np.ones(4), atol=1e-12)
    metrics = pair_metrics(chosen, rejected, [0] * 4, ["all"], chosen_lengths, rejected_lengths, calibrate=True)
    assert metrics["accuracy"] == 0.5 and metrics["calibrated_accuracy"] == 1.0
