"""Per-pair preference losses and the group weights of the balanced loss.

A loss is a plain function `(chosen_rewards, rejected_rewards, margin=None, **options) -> per-pair loss [B]`.
The trainer calls it in fp32 and then does one weighted reduction, `sum(w_i * loss_i) / B`, where `w_i` multiplies
the group weight (balanced loss only) and the pair's own `weight` column. Add a loss by adding an entry to `LOSSES`
or by passing `loss_fn=` to the trainer; options of a loss are its keyword parameters, set with `loss_kwargs`.
"""

import torch
import torch.nn.functional as F


def bradley_terry(chosen_rewards, rejected_rewards, margin=None):
    """-log sigmoid(r_c - r_r - m): the Bradley-Terry negative log-likelihood, with an optional per-pair margin m."""
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


def hinge(chosen_rewards, rejected_rewards, margin=None, hinge_margin=1.0):
    """max(0, hinge_margin + m - (r_c - r_r)): zero once chosen leads rejected by the margin, linear before.

    `hinge_margin` is the fixed margin (default 1.0); the optional per-pair `margin` column is added to it.
    """
    required = hinge_margin if margin is None else hinge_margin + margin
    return F.relu(required - (chosen_rewards - rejected_rewards))


def balanced(chosen_rewards, rejected_rewards, margin=None, method="inverse_frequency", dro_step_size=0.01):
    """Bradley-Terry per pair; the trainer weights pairs so that every group counts equally.

    Groups come from `group_column`, or from the length relation of the pair (chosen longer / shorter / same).
    `method="inverse_frequency"` weights each pair by N / (G * n_g), so each of the G groups carries 1/G of the
    objective whatever its size n_g. `method="group_dro"` starts there and moves weight towards the groups with
    the highest loss: q_g <- q_g * exp(dro_step_size * loss_g), renormalised after every optimizer step (online
    worst-group optimisation, Sagawa et al. 2020). The options are read by the trainer's reduction.
    """
    return bradley_terry(chosen_rewards, rejected_rewards, margin)


LOSSES = {"bradley_terry": bradley_terry, "hinge": hinge, "balanced": balanced}

BALANCE_METHODS = ("inverse_frequency", "group_dro")


def group_pair_weights(group_ids: torch.Tensor, group_sizes: torch.Tensor, group_mix: torch.Tensor) -> torch.Tensor:
    """Per-pair weights w_i = q_g * N / n_g for pairs of group g.

    `group_sizes` holds n_g over the whole training set (N = their sum) and `group_mix` the mixture q (sums to 1).
    On a uniformly drawn batch, mean(w_i * loss_i) is then an unbiased estimate of sum_g q_g * mean_g(loss); with
    q uniform, every group counts 1/G. Groups absent from the training set (n_g = 0) get weight 1.
    """
    sizes = group_sizes[group_ids].float()
    total = group_sizes.sum().float()
    weights = group_mix[group_ids] * total / sizes.clamp(min=1)
    return torch.where(sizes > 0, weights, torch.ones_like(weights))


def group_dro_update(group_mix: torch.Tensor, group_loss_sum: torch.Tensor, group_count: torch.Tensor, step_size):
    """One exponentiated-gradient step on the group mixture q from the groups' mean losses in the last step."""
    seen = group_count > 0
    mean_loss = torch.where(seen, group_loss_sum / group_count.clamp(min=1), torch.zeros_like(group_loss_sum))
    updated = group_mix * torch.exp(step_size * mean_loss)
    return updated / updated.sum()
