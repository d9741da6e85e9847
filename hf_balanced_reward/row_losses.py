"""The loss of each row of a batch (a pair, or a list of K completions): what `compute_loss` averages.

A pairwise loss (`bradley_terry`, `hinge`, `balanced`, a user's `loss_fn`) is taken over each row's decisive pairs (a
pair row has one), flattened so that the loss function sees one pair per element, as a trl-style loss expects; a
pair's `margin`, the balanced loss's terms (`balancing.Balancer.terms`) and cross-prompt negatives apply per pair,
and a row's loss is the mean over its pairs. A list or tie loss (`losses.as_list_loss`) takes whole rows.
"""

import torch

from .losses import ListPairs, list_pairs


def score_and_row_losses(trainer, model, inputs: dict) -> tuple:
    """One forward pass over a batch and its losses: (rewards [rows, K], their pairs, loss per row, loss per pair,
    a batch penalty or None, off-prompt rewards or None). `attribute_training.score_and_losses` is the same for
    attribute heads."""
    mask = inputs["list_mask"]
    rewards, off_prompt, features = trainer.score(model, inputs, model.training and trainer.length_head is not None)
    pairs = list_pairs(rewards, inputs["ranks"], mask)
    coefficient = trainer.args.center_rewards_coefficient  # c * (r_c + r_r)^2 on a pair, c * (2 * mean)^2 on a list
    center = coefficient * (2 * (rewards * mask).sum(-1) / mask.sum(-1)) ** 2 if coefficient else None
    if trainer.pairwise:
        per_row, pair_losses, penalty = pairwise_row_losses(trainer.loss_fn, trainer.loss_options, pairs, inputs,
                                                            off_prompt, features, center, trainer.balance,
                                                            trainer.length_head, model.training)
    else:
        per_row, pair_losses, penalty = list_row_losses(trainer.list_loss, rewards, inputs, pairs, center,
                                                        trainer.log_tie)
    return rewards, pairs, per_row, pair_losses, penalty, off_prompt


def pairwise_row_losses(loss_fn, options: dict, pairs: ListPairs, inputs: dict, off_prompt=None, features=None,
                        center=None, balance=None, length_head=None, training: bool = False) -> tuple:
    """(loss per row [rows], each pair's loss [rows, pairs] before the unit weights, the balanced loss's penalty or
    None). `off_prompt`: rewards [rows] of another prompt's response (cross-prompt negatives, training only);
    `features` [rows, K, hidden]: what the reward head read, for the length head; `center` [rows]: the
    center_rewards term, added to each pair's loss before the unit weights, as to a pair's."""
    shape = pairs.chosen.shape
    chosen, rejected = pairs.chosen.reshape(-1), pairs.rejected.reshape(-1)

    def per_pair(values):  # a value per row, repeated for each of its pairs
        return values[:, None].expand(shape).reshape(-1)

    margin = inputs.get("margin")  # a pair's own column: on rows of one pair only
    margin = None if margin is None else per_pair(margin)
    terms = None
    if balance is not None:
        lengths = inputs["response_lengths"]
        rows = torch.arange(shape[0], device=chosen.device)[:, None]
        pair_features = None if features is None else (features[rows, pairs.better].flatten(0, 1),
                                                        features[rows, pairs.worse].flatten(0, 1))
        terms = balance.terms(per_pair(inputs["group_id"]), lengths.gather(1, pairs.better).reshape(-1),
                              lengths.gather(1, pairs.worse).reshape(-1), chosen, rejected, training, pair_features,
                              length_head)
        if terms.shift is not None:  # inside the training logit only: r_c - r_r + shift
            margin = -terms.shift if margin is None else margin - terms.shift
    losses = loss_fn(chosen, rejected, margin=margin, **options)
    if losses.shape != chosen.shape:
        raise ValueError(f"the loss function must return one loss per pair, shape {tuple(chosen.shape)}; "
                         f"it returned shape {tuple(losses.shape)}.")
    if training and off_prompt is not None and balance is not None:  # the chosen beats another prompt's response
        losses = losses + balance.options.cross_prompt * loss_fn(chosen, per_pair(off_prompt), **options)
    if center is not None:
        losses = losses + per_pair(center)
    weighted = (losses if terms is None else terms.weights * losses).view(shape)
    decisive = pairs.valid & ~pairs.tie
    per_row = torch.where(decisive, weighted, 0.0).sum(-1) / decisive.sum(-1).clamp(min=1)
    return per_row, losses.view(shape), None if terms is None else terms.penalty


def list_row_losses(list_loss, rewards, inputs: dict, pairs: ListPairs, center=None, log_tie=None) -> tuple:
    """(loss per row [rows], the row's loss repeated for each of its pairs [rows, pairs], None) of a list or tie loss,
    plus `center` [rows]; `log_tie`: the learnt tie parameter, when the run learns it."""
    extra = {"log_tie": log_tie} if log_tie is not None else {}
    per_row = list_loss(rewards, inputs["ranks"], inputs["list_mask"], inputs.get("scores"), **extra)
    if per_row.shape != rewards.shape[:1]:
        raise ValueError(f"the loss function must return one loss per list, shape {tuple(rewards.shape[:1])}; "
                         f"it returned shape {tuple(per_row.shape)}.")
    per_row = per_row if center is None else per_row + center
    return per_row, per_row[:, None].expand_as(pairs.chosen), None
