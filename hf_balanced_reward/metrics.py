"""Metrics of a reward model on pairs, computed from exact counts (never a mean of batch means).

One function, `pair_metrics`, serves both `trainer.evaluate()` and the `evaluate` command, so they agree.
"""

import math
import re

import numpy as np
from scipy.stats import spearmanr

from .balancing import LENGTH_CELLS, LONGER, SHORTER, length_cells

CALIBRATION_BINS = 10
MIN_CELL_PAIRS = 10  # a length cell enters the length-balanced mean only with at least this many pairs


def metric_name(group: str) -> str:
    """A group name usable in a metric key: 'anthropic-hh-rlhf' -> 'anthropic_hh_rlhf'."""
    return re.sub(r"\W+", "_", str(group)).strip("_") or "group"


def wilson_interval(successes: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson score): sound near 0 and 1 and for small counts."""
    if count == 0:
        return 0.0, 1.0
    p = successes / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def calibration(margins: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> tuple[float, list[dict]]:
    """Is a Bradley-Terry model as sure as it is right? Confidence against accuracy, in bins.

    Every pair in the data says "chosen wins", so the label cannot be set against sigmoid(margin) directly. Instead,
    the model's confidence in the response it ranks higher is sigmoid(|margin|) (0.5 to 1), and it is right when
    that response is the chosen one. Returns the expected calibration error (pair-weighted |confidence - accuracy|
    over bins of equal width) and the bins that hold pairs.
    """
    confidence = 1 / (1 + np.exp(-np.abs(margins)))
    edges = np.linspace(0.5, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = index == b
        if not members.any():
            continue
        mean_confidence, accuracy = float(confidence[members].mean()), float(correct[members].mean())
        ece += members.sum() / len(margins) * abs(mean_confidence - accuracy)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "pairs": int(members.sum()),
                      "confidence": mean_confidence, "accuracy": accuracy})
    return float(ece), table


def pair_metrics(chosen, rejected, group_ids, group_names, chosen_lengths=None, rejected_lengths=None,
                 calibrate: bool = False) -> dict:
    """Accuracy (with its 95% interval), ties, margin and reward statistics, per-group, balanced and worst-group
    accuracy and calibration error. Given response lengths in tokens, also the length-shortcut metrics of
    `length_metrics`, the accuracy of always preferring the longer response and the correlation of reward with
    length; with `calibrate`, the same after post-hoc length calibration. A pair is correct when the chosen reward
    is strictly higher.
    """
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    group_ids = np.asarray(group_ids).astype(np.int64).reshape(-1)
    correct = chosen > rejected
    rewards = np.concatenate([chosen, rejected])
    low, high = wilson_interval(float(correct.sum()), len(correct))
    metrics = {
        "pairs": len(correct),
        "accuracy": float(correct.mean()),
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "ties": int((chosen == rejected).sum()),
        "margin": float((chosen - rejected).mean()),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        # trl.RewardTrainer's names (it averages per-batch extremes; these are the whole set's)
        "min_reward": float(rewards.min()),
        "mean_reward": float(rewards.mean()),
        "max_reward": float(rewards.max()),
        "chosen_reward_mean": float(chosen.mean()),
        "chosen_reward_std": float(chosen.std()),
        "rejected_reward_mean": float(rejected.mean()),
        "rejected_reward_std": float(rejected.std()),
        "calibration_error": calibration(chosen - rejected, correct)[0],
    }
    group_accuracy = {}
    for group_id in np.unique(group_ids):
        group_accuracy[group_names[group_id]] = float(correct[group_ids == group_id].mean())
    if len(group_names) > 1:  # per-group names only when there are groups
        for group, accuracy in group_accuracy.items():
            metrics[f"accuracy_{metric_name(group)}"] = accuracy
    metrics["balanced_accuracy"] = float(np.mean(list(group_accuracy.values())))
    metrics["worst_group_accuracy"] = float(min(group_accuracy.values()))
    if chosen_lengths is not None and rejected_lengths is not None:
        chosen_lengths = np.asarray(chosen_lengths, dtype=np.float64).reshape(-1)
        rejected_lengths = np.asarray(rejected_lengths, dtype=np.float64).reshape(-1)
        # "Always prefer the longer response"; a pair of equal lengths is a coin flip, counted as half right.
        longer_wins = (chosen_lengths > rejected_lengths) + 0.5 * (chosen_lengths == rejected_lengths)
        metrics["length_baseline_accuracy"] = float(longer_wins.mean())
        lengths = np.concatenate([chosen_lengths, rejected_lengths])
        if rewards.std() > 0 and lengths.std() > 0:
            metrics["reward_length_correlation"] = float(np.corrcoef(rewards, lengths)[0, 1])
        metrics.update(length_metrics(chosen, rejected, group_ids, group_names, chosen_lengths, rejected_lengths))
        if calibrate:
            calibrated = length_calibrated(chosen, rejected, group_ids, chosen_lengths, rejected_lengths)
            metrics["calibrated_accuracy"] = float((calibrated[0] > calibrated[1]).mean())
            shortcut = length_metrics(*calibrated, group_ids, group_names, chosen_lengths, rejected_lengths)
            for key in ("length_balanced_accuracy", "length_conflicting_accuracy", "within_group_length_correlation"):
                if key in shortcut:
                    metrics[f"calibrated_{key}"] = shortcut[key]
    return metrics


def length_metrics(chosen, rejected, group_ids, group_names, chosen_lengths, rejected_lengths) -> dict:
    """Does the model rank by length? Accuracy per unit (group x length cell), and three summaries:

    - `length_balanced_accuracy`: mean accuracy over the chosen-longer and chosen-shorter cells that hold at least
      MIN_CELL_PAIRS pairs; a model that only follows length scores about 0.5 here;
    - `length_conflicting_accuracy`: accuracy over the pairs whose length direction goes against their group's
      majority (the pairs a length-biased model gets wrong), with `length_conflicting_pairs`;
    - `within_group_length_correlation`: mean over groups of |Spearman rank correlation| of reward with response
      length, over all responses of the group (the sign of the bias may differ by group, so it is not pooled).
    """
    cells = length_cells(chosen_lengths, rejected_lengths)
    correct = chosen > rejected
    metrics, balanced, conflicting, correlations = {}, [], np.zeros(len(correct), bool), []
    for group_id in np.unique(group_ids):
        in_group = group_ids == group_id
        name = metric_name(group_names[group_id])
        for cell, cell_name in enumerate(LENGTH_CELLS):
            members = in_group & (cells == cell)
            if members.any():
                metrics[f"accuracy_{name}_{cell_name}"] = float(correct[members].mean())
                if cell != 2 and members.sum() >= MIN_CELL_PAIRS:
                    balanced.append(float(correct[members].mean()))
        longer, shorter = (in_group & (cells == LONGER)).sum(), (in_group & (cells == SHORTER)).sum()
        if longer != shorter:
            conflicting |= in_group & (cells == (SHORTER if longer > shorter else LONGER))
        rewards = np.concatenate([chosen[in_group], rejected[in_group]])
        lengths = np.concatenate([chosen_lengths[in_group], rejected_lengths[in_group]])
        if rewards.std() > 0 and lengths.std() > 0:
            rho = float(spearmanr(rewards, lengths).statistic)
            metrics[f"reward_length_spearman_{name}"] = rho
            correlations.append(abs(rho))
    if balanced:
        metrics["length_balanced_accuracy"] = float(np.mean(balanced))
    if conflicting.any():
        metrics["length_conflicting_accuracy"] = float(correct[conflicting].mean())
        metrics["length_conflicting_pairs"] = int(conflicting.sum())
    if correlations:
        metrics["within_group_length_correlation"] = float(np.mean(correlations))
    return metrics


def length_calibrated(chosen, rejected, group_ids, chosen_lengths, rejected_lengths) -> tuple[np.ndarray, np.ndarray]:
    """Post-hoc length calibration (Huang et al. 2024): per group, fit reward = a + b * log(1 + length) by least
    squares over all the group's responses, labels unused, and subtract b * log(1 + length) from every reward."""
    chosen, rejected = chosen.copy(), rejected.copy()
    for group_id in np.unique(group_ids):
        in_group = group_ids == group_id
        log_lengths = np.log1p(np.concatenate([chosen_lengths[in_group], rejected_lengths[in_group]]))
        rewards = np.concatenate([chosen[in_group], rejected[in_group]])
        if log_lengths.std() == 0:
            continue
        slope = np.polyfit(log_lengths, rewards, 1)[0]
        chosen[in_group] -= slope * np.log1p(chosen_lengths[in_group])
        rejected[in_group] -= slope * np.log1p(rejected_lengths[in_group])
    return chosen, rejected
