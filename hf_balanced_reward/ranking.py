"""Metrics of a reward model on ranked lists, from exact counts over the whole evaluation set (never batch means).

`ranking_metrics(rewards, ranks, mask)` takes the lists padded to one K with a mask (as the listwise losses do), or
ragged Python lists without a mask. Ranks: 1 is best, equal ranks are ties. Every mean says over how many lists or
pairs it was taken (`*_lists`, `pairs`, `tied_pairs`); a mean over nothing is left out rather than reported as 0.
"""

import numpy as np
from scipy.stats import kendalltau, spearmanr

from .metrics import metric_name

# A labelled tie is matched when the two rewards are within this many reward (Bradley-Terry log-odds) units: the
# model then prefers neither completion at more than sigmoid(0.5) = 62% to 38%.
TIE_TOLERANCE = 0.5


def padded(rewards, ranks, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rewards, ranks, mask) as [N, K] arrays: ragged lists (mask None) are padded to the longest."""
    if mask is not None:
        rewards, ranks, mask = np.asarray(rewards, np.float64), np.asarray(ranks, np.float64), np.asarray(mask, bool)
        if not rewards.shape == ranks.shape == mask.shape or rewards.ndim != 2:
            raise ValueError(f"rewards, ranks and mask must be [lists, K] of one shape; got {rewards.shape}, "
                             f"{ranks.shape}, {mask.shape}.")
        return rewards, ranks, mask
    if len(rewards) != len(ranks):
        raise ValueError(f"got {len(rewards)} lists of rewards and {len(ranks)} lists of ranks; give one per list.")
    width = max((len(r) for r in rewards), default=0)
    out = np.zeros((len(rewards), width)), np.zeros((len(rewards), width)), np.zeros((len(rewards), width), bool)
    for n, (reward, rank) in enumerate(zip(rewards, ranks)):
        if len(reward) != len(rank):
            raise ValueError(f"list {n} has {len(reward)} rewards and {len(rank)} ranks; give one rank per reward.")
        out[0][n, : len(reward)], out[1][n, : len(rank)], out[2][n, : len(reward)] = reward, rank, True
    return out


def ranking_metrics(rewards, ranks, mask=None, tie_tolerance: float = TIE_TOLERANCE) -> dict:
    """Ranking quality of `rewards` against labelled `ranks`, over lists of K >= 2 completions:

    - `pairwise_accuracy`: over every pair of completions with different ranks in every list (`pairs` of them,
      `pairs_correct` right), the share where the better-ranked one has the strictly higher reward. A list of K
      gives up to K(K-1)/2 pairs, so long lists weigh more here. Pairs tied in the labels are left out and
      counted as `tied_pairs`.
    - `kendall_tau`, `spearman_rho`: per list (Kendall's tau-b and Spearman's rho of rewards against the ranking,
      both correcting for ties), averaged over the lists where they are defined (`kendall_lists`,
      `spearman_lists`): a list whose labels or rewards are all equal has no correlation and is left out.
    - `top1_accuracy`: over the lists whose completions are not all ranked best (`top1_lists`), the share where
      every completion holding the highest reward is ranked best (several tied for best in the labels: any of
      them will do; several holding the highest reward: all of them must be best).
    - `tie_accuracy`: over labelled tied pairs, the share whose rewards are within `tie_tolerance` reward units
      (default 0.5: the model prefers neither at more than 62% to 38% under Bradley-Terry). Because that depends
      on the reward scale, the scale-free `tie_reward_gap` / `decisive_reward_gap` (mean |r_i - r_j| over tied and
      over decisive pairs) come with it: a model that has learnt the ties has the first well below the second.
    """
    rewards, ranks, mask = padded(rewards, ranks, mask)
    lists = pairs = correct = tied = within = top1_lists = top1_correct = 0
    taus, rhos, tie_gaps, decisive_gaps = [], [], [], []
    for reward, rank in ((rewards[n][mask[n]], ranks[n][mask[n]]) for n in range(len(rewards))):
        if len(reward) < 2:
            continue
        lists += 1
        first, second = np.triu_indices(len(reward), k=1)
        gap = reward[first] - reward[second]
        order = np.sign(rank[second] - rank[first])  # +1: first is better ranked; 0: tied labels
        decisive = order != 0
        pairs += int(decisive.sum())
        correct += int((order[decisive] * gap[decisive] > 0).sum())
        decisive_gaps.extend(np.abs(gap[decisive]))
        tied += int((~decisive).sum())
        within += int((np.abs(gap[~decisive]) <= tie_tolerance).sum())
        tie_gaps.extend(np.abs(gap[~decisive]))
        if np.ptp(rank) > 0 and np.ptp(reward) > 0:
            taus.append(float(kendalltau(reward, -rank).statistic))
            rhos.append(float(spearmanr(reward, -rank).statistic))
        best = rank == rank.min()
        if not best.all():
            top1_lists += 1
            top1_correct += int(best[reward == reward.max()].all())
    metrics = {"lists": lists, "pairs": pairs, "pairs_correct": correct, "tied_pairs": tied,
               "kendall_lists": len(taus), "spearman_lists": len(rhos), "top1_lists": top1_lists,
               "top1_correct": top1_correct}
    if pairs:
        metrics["pairwise_accuracy"] = correct / pairs
        metrics["decisive_reward_gap"] = float(np.mean(decisive_gaps))
    if taus:
        metrics["kendall_tau"] = float(np.mean(taus))
        metrics["spearman_rho"] = float(np.mean(rhos))
    if top1_lists:
        metrics["top1_accuracy"] = top1_correct / top1_lists
    if tied:
        metrics.update(tie_accuracy=within / tied, ties_within_tolerance=within, tie_tolerance=float(tie_tolerance),
                       tie_reward_gap=float(np.mean(tie_gaps)))
    return metrics


def list_metrics(rewards, ranks, mask, group_ids, group_names) -> dict:
    """`ranking_metrics` over an evaluation set of lists, as `trainer.evaluate()` reports them: plus `accuracy` (the
    pairwise accuracy, under the name pair evaluations use, so `metric_for_best_model: accuracy` means the same) and,
    with several groups, `accuracy_<group>` per group."""
    rewards, ranks, mask = padded(rewards, ranks, mask)
    metrics = ranking_metrics(rewards, ranks, mask)
    if "pairwise_accuracy" in metrics:
        metrics["accuracy"] = metrics["pairwise_accuracy"]
    group_ids = np.asarray(group_ids).reshape(-1)
    if len(group_names) > 1:
        for group_id in np.unique(group_ids):
            chosen = group_ids == group_id
            in_group = ranking_metrics(rewards[chosen], ranks[chosen], mask[chosen])
            if "pairwise_accuracy" in in_group:
                metrics[f"accuracy_{metric_name(group_names[group_id])}"] = in_group["pairwise_accuracy"]
    return metrics
