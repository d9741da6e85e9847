"""Metrics of a reward model on ranked lists (and on any evaluation set, `reward_metrics`), from exact counts over the
whole evaluation set (never batch means).

`ranking_metrics(rewards, ranks, mask)` takes the lists padded to one K with a mask (as the listwise losses do), or
ragged Python lists without a mask. Ranks: 1 is best, equal ranks are ties. Every mean says over how many lists or
pairs it was taken (`*_lists`, `pairs`, `tied_pairs`); a mean over nothing is left out rather than reported as 0.
"""

import numpy as np
from scipy.stats import kendalltau, spearmanr

from transformers import EvalPrediction

from .metrics import pair_metrics

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


def decisive_pairs(rewards, ranks, mask, *per_completion) -> tuple:
    """The pairs with different ranks of every list, better-ranked first: (chosen rewards, rejected rewards, the list
    index of each pair, then each `per_completion` array [N, K] as (of chosen, of rejected)). A K = 2 list ranked
    (1, 2) gives its one pair."""
    first, second = np.triu_indices(rewards.shape[1], k=1)
    order = np.sign(ranks[:, second] - ranks[:, first])  # +1: first is better ranked; 0: tied labels
    decisive = mask[:, first] & mask[:, second] & (order != 0)
    better, worse = np.where(order > 0, first, second)[decisive], np.where(order > 0, second, first)[decisive]
    rows = np.nonzero(decisive)[0]
    sides = [(values[rows, better], values[rows, worse]) for values in (rewards, *per_completion)]
    return (*sides[0], rows, *sides[1:])


def reward_metrics(rewards, losses, group_ids, ranks, mask, response_lengths, group_names,
                   user_compute_metrics=None) -> dict:
    """What `trainer.evaluate()` reports on rows of K completions (a pair is K = 2): `metrics.pair_metrics` over every
    decisive pair (accuracy, per group, length metrics, calibration), plus `ranking_metrics` when a row has more than
    two completions or a labelled tie, and `loss`, the mean per-row loss, every row weighed once on any number of
    processes and batch sizes. A user's `compute_metrics` gets `(chosen, rejected)` rewards of a set of pairs, and
    `rewards` with `(ranks, mask)` of any other set."""
    rewards, ranks, mask = padded(rewards, ranks, mask)
    chosen, rejected, rows, (chosen_lengths, rejected_lengths) = decisive_pairs(
        rewards, ranks, mask, np.asarray(response_lengths))
    group_ids = np.asarray(group_ids).reshape(-1)
    metrics = pair_metrics(chosen, rejected, group_ids[rows], group_names, chosen_lengths, rejected_lengths) \
        if len(rows) else {}
    pairs_only = rewards.shape[1] == 2 and len(rows) == len(rewards)
    if not pairs_only:
        metrics.update(ranking_metrics(rewards, ranks, mask))
    metrics["loss"] = float(np.mean(losses))
    if user_compute_metrics is not None:
        prediction = EvalPrediction(predictions=(chosen, rejected), label_ids=group_ids) if pairs_only else \
            EvalPrediction(predictions=rewards, label_ids=(ranks, mask))
        metrics.update(user_compute_metrics(prediction))
    return metrics
