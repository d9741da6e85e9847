"""The balanced loss: its options (`BalanceOptions`) and its state (`Balancer`): units (group x length cell), their
weights, the length expert, the length head's penalty and group DRO. The per-pair loss is Bradley-Terry
(`losses.balanced`); the trainer asks its balancer for what goes around it (`Balancer.terms`).


A *unit* is one cell of a group: the pairs of group g (`group_column`, or one group "all") whose chosen response is
longer, shorter, or of nearly the same length as the rejected one. The shortcut this package balances is length,
whose direction can differ by group, so the units are where a length-biased model is right (the majority direction
of its group) or wrong (the minority direction).

Every weighting is a mixture q over units: a pair of unit u weighs w_i = q_u * N / n_u (N pairs, n_u in unit u), so
a uniformly drawn batch estimates sum_u q_u * mean_u(loss). The weightings differ only in q:
- "cells": each group keeps its share n_g / N; inside it, the chosen-longer and chosen-shorter cells split their
  combined share equally (same-length pairs keep their own), so length direction carries no signal in training;
- "groups": every group 1/G, split over its cells in proportion to their size (inverse group frequency);
- "none": q_u = n_u / N, every pair weight 1.
Group DRO starts from that q and moves it towards the units with the highest loss after every optimizer step.

The length expert (a known-bias product of experts) adds `length_expert * beta_g * dlog_len` to each training pair's
logit, with beta_g fitted per group before training; the model then gains nothing from learning length itself. The
term exists only in the loss: the saved model's rewards are its own.

The length head (ODIN-style) is a second linear head on the features the reward head reads. Training pairs are
scored by reward + length score; `length_head_penalty` pushes the length score to follow response length and the
reward not to, within each group. Only the reward head is saved.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .errors import ConfigError, did_you_mean

LENGTH_CELLS = ("chosen_longer", "chosen_shorter", "same_length")
LONGER, SHORTER, SAME = 0, 1, 2
# A pair counts as "same length" when its responses differ by at most this fraction of the longer one.
SAME_LENGTH_TOLERANCE = 0.1
WEIGHTINGS = ("cells", "groups", "none")
PARTNER_CHOICES = ("nearest", "random")  # how cross-prompt negatives pick another prompt (see `cross_prompt.py`)


def length_cells(chosen_lengths, rejected_lengths):
    """Cell index per pair (LONGER, SHORTER or SAME) from the two responses' lengths in tokens. Tensors stay on
    their device (the training step calls this per batch); anything else gives a numpy array."""
    xp = torch if isinstance(chosen_lengths, torch.Tensor) else np
    chosen, rejected = xp.asarray(chosen_lengths) * 1.0, xp.asarray(rejected_lengths) * 1.0
    cells = xp.where(chosen > rejected, LONGER, SHORTER)
    return xp.where(xp.abs(chosen - rejected) <= SAME_LENGTH_TOLERANCE * xp.maximum(chosen, rejected), SAME, cells)


def log_length_difference(chosen_lengths, rejected_lengths):
    """log(1 + |chosen|) - log(1 + |rejected|), the length feature of the expert (tensors or arrays)."""
    if isinstance(chosen_lengths, torch.Tensor):
        return torch.log1p(chosen_lengths.float()) - torch.log1p(rejected_lengths.float())
    return np.log1p(np.asarray(chosen_lengths, np.float64)) - np.log1p(np.asarray(rejected_lengths, np.float64))


def unit_mixture(unit_sizes: torch.Tensor, weighting: str) -> torch.Tensor:
    """The mixture q over units [G, 3] (sums to 1) that a static weighting gives."""
    sizes = unit_sizes.double()
    total = sizes.sum()
    if weighting == "none":
        return (sizes / total).float()
    group_sizes = sizes.sum(dim=1, keepdim=True)
    if weighting == "groups":
        present = (group_sizes > 0).sum()
        return (sizes / group_sizes.clamp(min=1) / present).float()
    mix = sizes / total
    directed = mix[:, LONGER] + mix[:, SHORTER]
    both = (sizes[:, LONGER] > 0) & (sizes[:, SHORTER] > 0)
    mix[:, LONGER] = torch.where(both, directed / 2, mix[:, LONGER])
    mix[:, SHORTER] = torch.where(both, directed / 2, mix[:, SHORTER])
    return mix.float()


def fit_length_slope(differences, ridge: float = 1e-3, steps: int = 50) -> float:
    """beta maximising sum_i log sigmoid(beta * d_i) - ridge / 2 * beta^2, by Newton's method.

    The one-feature logistic regression of "chosen wins" on d_i = dlog_len (no intercept: swapping the two responses
    flips both the label and the sign of d). The small ridge keeps beta finite when every d_i has the same sign.
    """
    d = torch.as_tensor(differences, dtype=torch.float64)
    beta = torch.zeros((), dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(beta * d)
        gradient = ((1 - p) * d).sum() - ridge * beta
        curvature = (p * (1 - p) * d * d).sum() + ridge
        step = gradient / curvature
        beta = beta + step
        if step.abs() < 1e-10:
            break
    return float(beta)


@dataclass(frozen=True)
class BalanceOptions:
    """The balanced loss's `loss_kwargs`, declared once: the config checks them here, the trainer applies them.

    The defaults (length expert 0.5, no reweighting) are what 3 seeds of `benchmarks/compare_losses.py` chose
    (benchmarks/README.md, "Does balancing help?").
    """

    weighting: str = field(default="none", metadata={"help": "'none' weighs all pairs 1; 'cells' gives the "
                           "chosen-longer and chosen-shorter pairs of each group equal weight, so length direction "
                           "carries no signal; 'groups' gives every group 1/G."})
    group_dro: bool = field(default=False, metadata={"help": "Move weight towards the units (group x length cell) "
                            "with the highest loss after every step, q_u <- q_u * exp(dro_step_size * (loss_u + "
                            "dro_adjustment / sqrt(n_u))) (Sagawa et al. 2020)."})
    dro_step_size: float = field(default=0.01, metadata={"help": "Group DRO's step size."})
    dro_adjustment: float = field(default=0.0, metadata={"help": "Group DRO's C, which favours small units."})
    length_expert: float = field(default=0.5, metadata={"help": "lambda of a known-bias product of experts: training "
                                 "pairs get the logit r_c - r_r + lambda * beta_g * (log(1 + |c|) - log(1 + |r|)), "
                                 "beta_g fitted per group before training. The saved model scores as usual."})
    length_head: float = field(default=0.0, metadata={"help": "Weight of an ODIN-style second head: training pairs "
                               "are scored by reward + length score, and length_head * [(1 - rho(L, length score)) + "
                               "|rho(L, reward)|] (Pearson, within each group of the batch) is added to the loss. The "
                               "length head is not saved."})
    cross_prompt: float = field(default=0.0, metadata={"help": "gamma of cross-prompt negatives (RRM): each training "
                                "pair also adds gamma * -log sigmoid(r(x_i, y_i^chosen) - r(x_i, y_j)) for the chosen "
                                "response y_j of another prompt (see `cross_prompt.py`)."})
    cross_prompt_partners: str = field(default="nearest", metadata={"help": "How cross-prompt negatives pick the "
                                       "other prompt: 'nearest' (most similar prompt of the group by TF-IDF) or "
                                       "'random'."})

    def __post_init__(self):
        weighting = self.weighting
        if weighting not in WEIGHTINGS:
            raise ConfigError(
                f"loss_kwargs weighting='{weighting}' is not a weighting{did_you_mean(weighting, WEIGHTINGS)}. "
                f"Choose one of: {', '.join(WEIGHTINGS)}."
            )
        if not isinstance(self.group_dro, bool):
            raise ConfigError(f"loss_kwargs group_dro must be true or false, got {self.group_dro!r}.")
        for name, meaning in (("dro_step_size", "0 keeps the unit weights fixed"),
                              ("dro_adjustment", "0 turns the small-unit adjustment off"),
                              ("length_expert", "0 turns the length expert off"),
                              ("length_head", "0 turns the length head off"),
                              ("cross_prompt", "0 turns cross-prompt negatives off")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"loss_kwargs {name} must be a number >= 0, got {value!r}; {meaning}.")
        partners = self.cross_prompt_partners
        if partners not in PARTNER_CHOICES:
            raise ConfigError(
                f"loss_kwargs cross_prompt_partners={partners!r} is not a choice"
                f"{did_you_mean(str(partners), PARTNER_CHOICES)}. Choose one of: {', '.join(PARTNER_CHOICES)}."
            )


class BalanceTerms(NamedTuple):
    """What the trainer applies to a batch of pairs around the per-pair loss."""

    weights: torch.Tensor  # unit weight per pair, multiplies the pair's loss
    shift: torch.Tensor | None  # added to the training logit r_c - r_r (length expert, length head)
    penalty: torch.Tensor | None  # added to the batch's loss (length head)


def balancer_for(loss_type: str, loss_kwargs: dict, loss_fn=None) -> "Balancer | None":
    """The run's balancer: one for the built-in balanced loss, None for any other loss."""
    if loss_type != "balanced":
        return None
    if loss_fn is not None:
        raise ConfigError(
            f"loss_fn= cannot be combined with loss_type='balanced' (loss_kwargs {loss_kwargs}): the balanced loss's "
            "options (weighting, group_dro, length_expert, 0.5 unless set, length_head, cross_prompt) are applied by "
            "the trainer around its built-in Bradley-Terry loss, so with a loss_fn of your own they would be ignored. "
            "Drop loss_fn to train the balanced loss, or set loss_type: bradley_terry without the balanced loss's "
            "loss_kwargs to train loss_fn alone (per-pair weights of your own go in the data's 'weight' column)."
        )
    return Balancer(BalanceOptions(**loss_kwargs))


class Balancer:
    """The balanced loss's state: options, per-unit sizes, the mixture q and fitted length slopes (the last two
    saved with every checkpoint), and the one call that gives a batch's weights, logit shift and penalty."""

    def __init__(self, options: BalanceOptions, group_names=()):
        self.options = options
        self.group_names: list[str] = []  # the units' groups, in the trainer's order (it adds them)
        self.unit_sizes = torch.zeros(0, 3, dtype=torch.long)
        self.mix = torch.zeros(0, 3)
        self.slopes = torch.zeros(0)
        self.add_groups(group_names)

    def add_groups(self, names) -> None:
        """Groups without training pairs (first seen in an eval set, say): weight 1, slope 0."""
        self.group_names = self.group_names + list(names)
        grow = len(self.group_names) - len(self.unit_sizes)
        self.unit_sizes = torch.cat([self.unit_sizes, torch.zeros(grow, 3, dtype=torch.long)])
        self.mix = torch.cat([self.mix, torch.zeros(grow, 3)])
        self.slopes = torch.cat([self.slopes, torch.zeros(grow)])

    def fit(self, group_ids, response_lengths) -> "Balancer":
        """Unit sizes, the starting mixture and one length slope per group, from the training pairs' group ids [N]
        and response lengths [N, 2] (chosen, rejected)."""
        group_ids, lengths = torch.as_tensor(group_ids, dtype=torch.long), torch.as_tensor(response_lengths)
        cells = torch.as_tensor(length_cells(lengths[:, 0], lengths[:, 1]), dtype=torch.long)
        units = torch.bincount(group_ids * 3 + cells, minlength=3 * len(self.group_names))
        self.unit_sizes = units.reshape(-1, 3)
        self.mix = unit_mixture(self.unit_sizes, self.options.weighting)
        differences = torch.as_tensor(log_length_difference(lengths[:, 0], lengths[:, 1]))
        self.slopes = torch.tensor(
            [fit_length_slope(differences[group_ids == g]) if (group_ids == g).any() else 0.0
             for g in range(len(self.group_names))]
        )
        return self

    def restart(self, options: BalanceOptions) -> None:
        """A new run on the same pairs (a hyperparameter trial): its options, the fitted sizes and slopes, and the
        mixture its weighting starts from."""
        if (options.cross_prompt, options.cross_prompt_partners) != (self.options.cross_prompt,
                                                                     self.options.cross_prompt_partners):
            raise ConfigError("loss_kwargs cross_prompt and cross_prompt_partners cannot change between trials: the "
                              "train set's cross-prompt negatives were chosen before the first; set them in args.")
        self.options = options
        self.mix = unit_mixture(self.unit_sizes, options.weighting)

    def terms(self, group_ids, chosen_lengths, rejected_lengths, chosen, rejected, training: bool, features=None,
              length_head=None) -> BalanceTerms:
        """Unit weights of pairs (tensors of any one shape: a pair per element); in training also the logit shift and
        penalty that only the loss sees. `features`: what the reward head read for chosen and rejected, for
        `length_head`."""
        weights = self.pair_weights(group_ids, length_cells(chosen_lengths, rejected_lengths))
        shift, penalty = None, None
        if training and self.options.length_expert:
            shift = self.expert_logit(group_ids, chosen_lengths, rejected_lengths)
        if training and features is not None:
            length_scores = length_head(torch.cat(features).float()).squeeze(-1)
            chosen_score, rejected_score = length_scores.chunk(2)
            shift = chosen_score - rejected_score if shift is None else shift + chosen_score - rejected_score
            log_lengths = torch.cat([chosen_lengths, rejected_lengths]).float().log1p()
            penalty = self.options.length_head * length_head_penalty(
                torch.cat([chosen, rejected]), length_scores, log_lengths, torch.cat([group_ids, group_ids]))
        return BalanceTerms(weights, shift, penalty)

    def pair_weights(self, group_ids: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """w_i = q_u * N / n_u; pairs of a unit without training pairs weigh 1."""
        sizes = self.unit_sizes.to(group_ids.device)
        unit_size = sizes[group_ids, cells].float()
        weights = self.mix.to(group_ids.device)[group_ids, cells] * sizes.sum().float() / unit_size.clamp(min=1)
        return torch.where(unit_size > 0, weights, torch.ones_like(weights))

    def expert_logit(self, group_ids: torch.Tensor, chosen_lengths, rejected_lengths) -> torch.Tensor:
        """length_expert * beta_g * dlog_len per pair: the length expert's vote for the chosen response."""
        difference = log_length_difference(chosen_lengths, rejected_lengths)
        return self.options.length_expert * self.slopes.to(difference.device)[group_ids] * difference

    @property
    def num_units(self) -> int:
        return 3 * len(self.group_names)

    def unit_ids(self, group_ids: torch.Tensor, chosen_lengths, rejected_lengths) -> torch.Tensor:
        """Unit of each pair, group * 3 + length cell: where group DRO's evidence is counted."""
        return group_ids * 3 + length_cells(chosen_lengths, rejected_lengths)

    def dro_update(self, unit_loss_sum: torch.Tensor, unit_count: torch.Tensor) -> None:
        """q_u <- q_u * exp(step * (mean loss_u + C / sqrt(n_u))) for the units seen in the step; renormalise.

        Sagawa et al. 2020: C (`dro_adjustment`) favours small units, whose mean loss underestimates their risk.
        """
        seen = unit_count > 0
        adjustment = self.options.dro_adjustment / self.unit_sizes.to(unit_count.device).float().clamp(min=1).sqrt()
        mean_loss = unit_loss_sum / unit_count.clamp(min=1)
        exponent = torch.where(seen, self.options.dro_step_size * (mean_loss + adjustment), torch.zeros_like(mean_loss))
        updated = self.mix.to(exponent.device) * torch.exp(exponent)
        self.mix = (updated / updated.sum()).cpu()

    def unit_names(self) -> list[str]:
        return [f"{group}/{cell}" for group in self.group_names for cell in LENGTH_CELLS]

    def summary(self) -> dict:
        """What the card and the log show: slopes per group, and weight per unit with training pairs."""
        weights = self.mix * self.unit_sizes.sum() / self.unit_sizes.clamp(min=1)
        units = {
            name: {"pairs": int(n), "weight": round(float(w), 4)}
            for name, n, w in zip(self.unit_names(), self.unit_sizes.flatten(), weights.flatten()) if n > 0
        }
        slopes = {name: round(float(s), 4) for name, s in zip(self.group_names, self.slopes)}
        return {"length_slopes": slopes, "units": units}

    def state_dict(self) -> dict:
        return {"group_names": self.group_names, "unit_mix": self.mix.tolist(), "slopes": self.slopes.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.mix = torch.tensor(state["unit_mix"])
        self.slopes = torch.tensor(state["slopes"])


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-8)


def length_head_penalty(rewards: torch.Tensor, length_scores: torch.Tensor, log_lengths: torch.Tensor,
                        group_ids: torch.Tensor) -> torch.Tensor:
    """ODIN's decorrelation terms, per group: mean over groups of (1 - rho(L, length score)) + |rho(L, reward)|.

    All arguments are per response (chosen and rejected together); rho is Pearson's correlation over a group's
    responses in the batch, and L = log(1 + length). Within-group, because the direction of the length bias can
    differ by group: a pooled correlation can be near 0 while every group's is large. Groups with fewer than 4
    responses or a single length are left out (their correlation is undefined or noise).
    """
    terms = []
    for group in group_ids.unique():
        members = group_ids == group
        if members.sum() < 4 or log_lengths[members].std() == 0:
            continue
        lengths = log_lengths[members]
        terms.append(1 - pearson(lengths, length_scores[members]) + pearson(lengths, rewards[members]).abs())
    return torch.stack(terms).mean() if terms else rewards.new_zeros(())
