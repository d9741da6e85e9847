"""Metrics of a reward model on pairs, computed from exact counts (never a mean of batch means)."""

import re

import numpy as np


def metric_name(group: str) -> str:
    """A group name usable in a metric key: 'anthropic-hh-rlhf' -> 'anthropic_hh_rlhf'."""
    return re.sub(r"\W+", "_", str(group)).strip("_") or "group"


def pair_metrics(chosen, rejected, group_ids, group_names) -> dict[str, float]:
    """Accuracy, margin and reward statistics over all pairs, plus accuracy per group, balanced and worst-group.

    A pair is correct when the chosen reward is strictly higher; ties count as wrong.
    """
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    group_ids = np.asarray(group_ids).astype(np.int64).reshape(-1)
    correct = chosen > rejected
    rewards = np.concatenate([chosen, rejected])
    metrics = {
        "accuracy": float(correct.mean()),
        "margin": float((chosen - rejected).mean()),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "chosen_reward_mean": float(chosen.mean()),
        "rejected_reward_mean": float(rejected.mean()),
    }
    group_accuracy = {}
    for group_id in np.unique(group_ids):
        group_accuracy[group_names[group_id]] = float(correct[group_ids == group_id].mean())
    for group, accuracy in group_accuracy.items():
        metrics[f"accuracy_{metric_name(group)}"] = accuracy
    metrics["balanced_accuracy"] = float(np.mean(list(group_accuracy.values())))
    metrics["worst_group_accuracy"] = float(min(group_accuracy.values()))
    return metrics
