"""Metrics of a reward model on pairs, computed from exact counts (never a mean of batch means).

One function, `pair_metrics`, serves both `trainer.evaluate()` and the `evaluate` command, so they agree.
"""

import math
import re

import numpy as np

CALIBRATION_BINS = 10


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


def pair_metrics(chosen, rejected, group_ids, group_names, chosen_lengths=None, rejected_lengths=None) -> dict:
    """Accuracy (with its 95% interval), ties, margin and reward statistics, per-group, balanced and worst-group
    accuracy, calibration error and, given response lengths in tokens, the accuracy of always preferring the longer
    response and the correlation of reward with length. A pair is correct when the chosen reward is strictly higher.
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
        "chosen_reward_mean": float(chosen.mean()),
        "chosen_reward_std": float(chosen.std()),
        "rejected_reward_mean": float(rejected.mean()),
        "rejected_reward_std": float(rejected.std()),
        "calibration_error": calibration(chosen - rejected, correct)[0],
    }
    group_accuracy = {}
    for group_id in np.unique(group_ids):
        group_accuracy[group_names[group_id]] = float(correct[group_ids == group_id].mean())
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
    return metrics
