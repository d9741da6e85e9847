"""Per-pair preference losses.

A loss is a plain function `(chosen_rewards, rejected_rewards, margin=None, **options) -> per-pair loss [B]`.
The trainer calls it in fp32 and then does one weighted reduction, `sum(w_i * loss_i) / B`, where `w_i` multiplies
the unit weight (balanced loss only, see `balancing.py`) and the pair's own `weight` column. Add a loss by adding an
entry to `LOSSES` or by passing `loss_fn=` to the trainer; options of a loss are its keyword parameters, set with
`loss_kwargs`.
"""

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


def balanced(chosen_rewards, rejected_rewards, margin=None, weighting="cells", group_dro=False, dro_step_size=0.01,
             dro_adjustment=0.0, length_expert=0.0, length_head=0.0):
    """Bradley-Terry per pair; the trainer weights the pairs and adds the length expert (see `balancing.py`).

    - `weighting`: "cells" (default) gives the chosen-longer and chosen-shorter pairs of each group equal weight, so
      length direction carries no signal; "groups" gives every group 1/G (inverse frequency); "none" weighs all 1.
    - `group_dro`: move weight towards the units (group x length cell) with the highest loss after every step,
      q_u <- q_u * exp(dro_step_size * (loss_u + dro_adjustment / sqrt(n_u))) (Sagawa et al. 2020).
    - `length_expert`: lambda of a known-bias product of experts; training pairs get the logit
      r_c - r_r + lambda * beta_g * (log(1 + |c|) - log(1 + |r|)), beta_g fitted per group before training.
      Only the loss sees it: the saved model scores as usual.
    - `length_head`: weight of an ODIN-style second head: training pairs are scored by reward + length score, and
      `length_head` * [(1 - rho(L, length score)) + |rho(L, reward)|] (Pearson, within each group of the batch) is
      added to the loss. The length head is not saved.
    """
    return bradley_terry(chosen_rewards, rejected_rewards, margin)


LOSSES = {"bradley_terry": bradley_terry, "hinge": hinge, "balanced": balanced}
