"""Preference losses: per pair, with ties, and over ranked lists.

A pairwise loss is a plain function `(chosen_rewards, rejected_rewards, margin=None, **options) -> per-pair loss [B]`.
The trainer calls it in fp32 and then does one weighted reduction, `sum(w_i * loss_i) / B`, where `w_i` multiplies
the unit weight (balanced loss only, see `balancing.py`) and the pair's own `weight` column. Add a loss by adding an
entry to `LOSSES` or by passing `loss_fn=` to the trainer; options of a loss are its keyword parameters, set with
`loss_kwargs` (the balanced loss's are `balancing.BalanceOptions`, which the trainer applies).

Ties (`TIE_LOSSES`) keep the pairwise contract and add one input, `tie` (bool [B]): a tied pair is scored by the
probability of a tie, which pulls its two rewards together, instead of being dropped.

A listwise loss (`LISTWISE_LOSSES`) takes whole lists: `(rewards [B, K], ranks [B, K], mask [B, K], scores=None,
**options) -> per-list loss [B]`, so the trainer's one weighted reduction runs over lists as it runs over pairs.
Lists of different K are padded to the batch's largest K; `mask` is True on real completions, and padded slots
contribute nothing (neither to the loss nor to any gradient), whatever rewards and ranks they hold. `ranks`: 1 is
best, equal ranks are ties; only their order matters. `scores` (higher is better) are the graded labels when the
data has them. A pairwise row is the K = 2 list with ranks (1, 2) (tied: (1, 1)). `list_pairs` expands lists into
their K(K-1)/2 pairs, each oriented best first, so that any pairwise loss applies to lists (`pairwise`, `graded`).
Every listwise and tie loss computes in fp32 whatever the dtype of its inputs.
"""

import inspect
from typing import NamedTuple

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


def balanced(chosen_rewards, rejected_rewards, margin=None):
    """Bradley-Terry per pair, with the balancing of `balancing.py` around it: pair weights by group and length
    direction, the length expert, the length head, group DRO, cross-prompt negatives.

    Its `loss_kwargs` are `balancing.BalanceOptions`: the trainer applies them (weights, a shift of the training
    logit, a penalty), so they are not parameters of this function, and a `loss_fn=` cannot take them.
    """
    return bradley_terry(chosen_rewards, rejected_rewards, margin)


PAIR_LOSSES = {"bradley_terry": bradley_terry, "hinge": hinge, "balanced": balanced}


# Ties in pairs ------------------------------------------------------------------------------------------------------
#
# Both models give a pair three outcomes: chosen wins, rejected wins, tie. With d = r_c - r_r (minus the margin m on
# decisive pairs; a tie has no direction, so its margin is not used), a decisive pair's loss is -log P(chosen wins)
# and a tied pair's is -log P(tie), which is largest at d = 0: its gradient pulls the two rewards together.
#
# The tie parameter is given on the log scale, `log_tie`, so that any real value is valid: a float (set), or a 0-d
# tensor that requires grad (learnt). To learn it, the trainer owns `torch.nn.Parameter(torch.tensor(init))`, adds it
# to the optimizer (no weight decay) and to its checkpoint state (not to the saved model: scoring never needs it),
# logs exp(log_tie), and passes it as `log_tie=` on every call.


def _as_float(value, like):
    """`value` (a float or tensor) as an fp32 tensor on `like`'s device, keeping its autograd graph."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(value), device=like.device)


def _tie_inputs(chosen_rewards, rejected_rewards, margin, tie):
    """(d, tie mask) in fp32: d = r_c - r_r, minus the margin on decisive pairs only."""
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    difference = chosen - rejected
    tie = torch.zeros_like(difference, dtype=torch.bool) if tie is None else torch.as_tensor(tie).to(
        device=difference.device, dtype=torch.bool)
    if tie.shape != difference.shape:
        raise ValueError(f"tie must have one entry per pair, shape {tuple(difference.shape)}; got {tuple(tie.shape)}.")
    if margin is not None:
        difference = difference - torch.where(tie, 0.0, margin.float())
    return difference, tie


def davidson(chosen_rewards, rejected_rewards, margin=None, tie=None, log_tie=0.0):
    """Davidson (1970): Bradley-Terry with a tie outcome whose weight is the geometric mean of the two strengths.

    With nu = exp(log_tie) and d = r_c - r_r (- m on decisive pairs):
        P(chosen wins) = e^(d/2) / (e^(d/2) + e^(-d/2) + nu),   P(tie) = nu / (e^(d/2) + e^(-d/2) + nu).
    Loss: -log P(chosen wins), or -log P(tie) where `tie` is True. At d = 0 a tie has probability nu / (2 + nu)
    (1/3 at the default nu = 1). As nu -> 0 it becomes Bradley-Terry, P(chosen wins) = sigmoid(d).

    Use for pairs with annotated ties when ties are common and of any size: P(tie) falls off slowly with |d|
    (as e^(-|d|/2)), so a tie is still a plausible outcome for moderately different rewards. Learnt, log_tie
    settles where the predicted number of ties, sum P(tie), equals the number of tied pairs (the derivative of the
    loss in log_tie is exactly the difference).
    """
    difference, tie = _tie_inputs(chosen_rewards, rejected_rewards, margin, tie)
    log_nu = _as_float(log_tie, difference).expand_as(difference)
    log_normaliser = torch.logsumexp(torch.stack([difference / 2, -difference / 2, log_nu]), dim=0)
    return log_normaliser - torch.where(tie, log_nu, difference / 2)


def rao_kupper(chosen_rewards, rejected_rewards, margin=None, tie=None, log_tie=0.0):
    """Rao and Kupper (1967): a difference smaller than a threshold eta = exp(log_tie) > 0 reads as a tie.

    With d = r_c - r_r (- m on decisive pairs):
        P(chosen wins) = sigmoid(d - eta),   P(rejected wins) = sigmoid(-d - eta),
        P(tie) = 1 - sigmoid(d - eta) - sigmoid(-d - eta) = (e^(2 eta) - 1) e^d / ((e^d + e^eta)(1 + e^(eta + d))).
    Loss: -log P(chosen wins), or -log P(tie) where `tie` is True. At d = 0 a tie has probability
    1 - 2 sigmoid(-eta) (0.46 at the default eta = 1). eta -> 0 is Bradley-Terry.

    Use when a tie means "too close to call": P(tie) falls off fast (as e^(-|d|)) once |d| exceeds eta, and a
    decisive pair must beat the threshold, so the model learns a reward scale on which ties sit within eta.
    """
    difference, tie = _tie_inputs(chosen_rewards, rejected_rewards, margin, tie)
    eta = _as_float(log_tie, difference).exp()
    win = -F.logsigmoid(difference - eta)
    log_expm1 = 2 * eta + torch.log(-torch.expm1(-2 * eta))  # log(e^(2 eta) - 1), stable for every eta > 0
    log_tie_probability = (log_expm1 + difference - torch.logaddexp(difference, eta.expand_as(difference))
                           - F.softplus(eta + difference))
    return torch.where(tie, -log_tie_probability, win)


TIE_LOSSES = {"davidson": davidson, "rao_kupper": rao_kupper}


# Lists -----------------------------------------------------------------------------------------------------------

LISTWISE_INPUTS = ("rewards", "ranks", "mask", "scores")  # the tensors of a listwise call; the rest are options


class ListPairs(NamedTuple):
    """Every pair (i < j) of each list, oriented best first: tensors [B, P], P = K(K-1)/2."""

    chosen: torch.Tensor  # rewards of the better-ranked completion (either one when tied), fp32
    rejected: torch.Tensor  # rewards of the other
    tie: torch.Tensor  # bool: equal ranks
    valid: torch.Tensor  # bool: both completions are real (not padding)
    score_gap: torch.Tensor | None  # score(chosen) - score(rejected) >= 0, when scores are given
    better: torch.Tensor  # index into K of the chosen completion
    worse: torch.Tensor  # index into K of the rejected completion


def _list_inputs(rewards, ranks, mask, scores=None):
    """fp32 rewards with padded slots set to 0 (so that no garbage reaches a gradient), ranks, mask, scores."""
    if rewards.dim() != 2:
        raise ValueError(f"listwise rewards must be [lists, K]; got shape {tuple(rewards.shape)}.")
    ranks = torch.as_tensor(ranks, device=rewards.device)
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else torch.as_tensor(mask).to(
        device=rewards.device, dtype=torch.bool)
    scores = None if scores is None else torch.as_tensor(scores, device=rewards.device).float()
    for name, value in (("ranks", ranks), ("mask", mask), ("scores", scores)):
        if value is not None and value.shape != rewards.shape:
            raise ValueError(f"{name} must have the shape of rewards, {tuple(rewards.shape)}; "
                             f"got {tuple(value.shape)}.")
    rewards = torch.where(mask, rewards.float(), 0.0)
    scores = None if scores is None else torch.where(mask, scores, 0.0)
    return rewards, ranks, mask, scores


def list_pairs(rewards, ranks, mask=None, scores=None) -> ListPairs:
    """Expand lists [B, K] into their K(K-1)/2 pairs, each oriented so that `chosen` is the better-ranked one.

    A K = 2 list gives exactly its one pair, so a pairwise row and a 2-completion list are the same thing. Pairs with
    a padded completion have `valid` False; tied pairs (equal ranks) have `tie` True, in index order.
    """
    rewards, ranks, mask, scores = _list_inputs(rewards, ranks, mask, scores)
    first, second = torch.triu_indices(rewards.shape[1], rewards.shape[1], offset=1, device=rewards.device)
    swap = ranks[:, second] < ranks[:, first]
    better, worse = torch.where(swap, second, first), torch.where(swap, first, second)
    gap = None if scores is None else scores.gather(1, better) - scores.gather(1, worse)
    return ListPairs(rewards.gather(1, better), rewards.gather(1, worse), ranks[:, first] == ranks[:, second],
                     mask[:, first] & mask[:, second], gap, better, worse)


def _over_pairs(rewards, ranks, mask, scores, pair_loss, margin_scale, pair_options):
    """Mean of a pairwise loss over each list's pairs; tied pairs are scored only by a loss that models ties."""
    expandable = {**PAIR_LOSSES, **TIE_LOSSES}
    loss_fn = expandable.get(pair_loss) if isinstance(pair_loss, str) else pair_loss
    if loss_fn is None:
        raise ValueError(f"pair_loss={pair_loss!r} is not a pairwise loss; choose one of {', '.join(expandable)} "
                         "(or pass a function).")
    if margin_scale < 0:
        raise ValueError(f"margin_scale must be >= 0, got {margin_scale}: the margin asks the better completion to "
                         "lead by margin_scale x its score lead; use 0 for no margin.")
    options = dict(pair_options or {})
    accepted = inspect.signature(loss_fn).parameters
    for key in options:
        if key not in accepted or key in ("chosen_rewards", "rejected_rewards", "margin", "tie"):
            valid = [k for k in accepted if k not in ("chosen_rewards", "rejected_rewards", "margin", "tie")]
            raise ValueError(f"pair_options has unknown option {key!r} for pair_loss {pair_loss!r}; its options are: "
                             f"{', '.join(valid) or 'none'}.")
    pairs = list_pairs(rewards, ranks, mask, scores)
    margin = margin_scale * pairs.score_gap if margin_scale and pairs.score_gap is not None else None
    models_ties = "tie" in accepted
    if models_ties:
        options["tie"] = pairs.tie
    per_pair = loss_fn(pairs.chosen, pairs.rejected, margin=margin, **options)
    counted = pairs.valid if models_ties else pairs.valid & ~pairs.tie
    return torch.where(counted, per_pair, 0.0).sum(-1) / counted.sum(-1).clamp(min=1)


def pairwise(rewards, ranks, mask=None, scores=None, pair_loss="bradley_terry", pair_options=None):
    """A pairwise loss averaged over all pairs of each list (InstructGPT's "all K choose 2 comparisons" per prompt).

        loss = mean over pairs (i ranked above j) of pair_loss(r_i, r_j)
    `pair_loss` names an entry of `LOSSES` or `TIE_LOSSES` (or is a function); `pair_options` are its options, e.g.
    {"log_tie": 0.5}. Tied pairs count only with a tie loss (`davidson`, `rao_kupper`), which pulls them together;
    otherwise they are left out of the mean. A list with no counted pair has loss 0. The mean, not the sum, makes
    every list weigh the same whatever its K. K = 2 with bradley_terry is exactly `bradley_terry`.

    Use for ranked lists when you want a pairwise objective (hinge, a tie model) rather than the ranking likelihood.
    """
    return _over_pairs(rewards, ranks, mask, scores, pair_loss, 0.0, pair_options)


def graded(rewards, ranks, mask=None, scores=None, margin_scale=1.0, pair_loss="bradley_terry", pair_options=None):
    """Graded margins: Bradley-Terry over all pairs of a list, asking for a reward lead in proportion to the score lead.

        loss = mean over pairs (s_i > s_j) of -log sigmoid(r_i - r_j - margin_scale * (s_i - s_j))
    (Llama 2's margin loss, with the margin read from graded scores instead of a Likert gap column). Pairs of equal
    scores count only with a tie `pair_loss`. `margin_scale` converts score units into reward (log-odds) units: a
    reward lead of margin_scale x the score lead costs what a tie costs Bradley-Terry (log 2), so rewards are pushed
    to differ by more than that, and further apart the more the scores differ. 0 is `pairwise`.

    Use when the labels are scores whose differences mean something (expert ratings, reward-model distillation):
    a near-tie then pushes less than a clear win. Needs `scores`.
    """
    if scores is None:
        raise ValueError("loss 'graded' needs the lists' scores (column 'scores'); lists in this batch have none "
                         "(ranks only, or pairs). Use 'plackett_luce' or 'pairwise' for ranked lists, or give every "
                         "list its scores.")
    return _over_pairs(rewards, ranks, mask, scores, pair_loss, margin_scale, pair_options)


PL_TIES = ("efron", "breslow")


def plackett_luce(rewards, ranks, mask=None, scores=None, ties="efron"):
    """Plackett-Luce: negative log-likelihood of the whole ranking, the best chosen first from all, the next from
    the rest, and so on; tied completions are chosen together as a group.

    With tie groups G_1 (best), G_2, ... of sizes m_g, risk sets R_g = G_g u G_(g+1) u ... and e_i = exp(r_i):
        breslow:  loss = sum_g [ -sum_(i in G_g) r_i + m_g log sum_(j in R_g) e_j ]
        efron:    loss = sum_g [ -sum_(i in G_g) r_i + sum_(l=0)^(m_g - 1) log(E_R - (l / m_g) E_G) ],
                  E_R = sum_(j in R_g) e_j, E_G = sum_(j in G_g) e_j
    Without ties both are the plain Plackett-Luce NLL sum_i [ -r_i + log sum_(rank_j >= rank_i) e_j ] (the last
    completion's term is 0); on K = 2 that is exactly `bradley_terry`. The loss sums K - 1 choices, so it grows with
    K; it is invariant to adding a constant to a list's rewards and to reordering a list together with its ranks.

    Ties: `efron` (default; Efron 1977) takes out of the denominator, draw by draw, the average share of the tied
    completions already drawn. It stays close to the exact likelihood (averaged over every order of the tied
    group) even when tie groups are large, where `breslow`, which lets every tied completion compete against all
    the others, overstates the denominator and shrinks reward differences (its known bias towards zero in Cox
    regression with many ties). Both cost one [B, K, K] pass, so nothing is gained by the cruder one; `breslow` is
    there to reproduce results that used it. A tied group, the last one included, pulls its rewards together (at
    equal rewards its share of the denominator is largest), so a list whose completions are all tied still has a
    loss (K log K with breslow at equal rewards), whose gradient only evens the rewards out.

    Use for full or partial rankings of K >= 2 completions (UltraFeedback-style ratings turned into ranks): it uses
    the whole order in one likelihood, unlike the K(K-1)/2 pairs of `pairwise`, which count each list's
    information many times.
    """
    if ties not in PL_TIES:
        raise ValueError(f"ties={ties!r} is not a tie method of plackett_luce; choose 'efron' (default) or 'breslow'.")
    rewards, ranks, mask, _ = _list_inputs(rewards, ranks, mask, scores)
    size = rewards.shape[1]
    own = torch.eye(size, dtype=torch.bool, device=rewards.device)
    real = mask.unsqueeze(1)  # [B, 1, K]: completion j is real
    row, column = ranks.unsqueeze(2), ranks.unsqueeze(1)  # rank of i, rank of j
    # i's own entry is always in: every row has a finite log-sum-exp, padded rows included (they are masked below)
    at_risk = (column >= row) & real | own
    tied = (column == row) & real | own
    others = rewards.unsqueeze(1).expand(-1, size, -1)
    log_risk = torch.logsumexp(others.masked_fill(~at_risk, float("-inf")), dim=-1)
    stage = log_risk - rewards
    if ties == "efron":
        log_tied = torch.logsumexp(others.masked_fill(~tied, float("-inf")), dim=-1)
        chosen_before = (tied & torch.ones_like(own).tril(-1)).sum(-1)  # l: tied completions of lower index
        share = chosen_before / tied.sum(-1)
        stage = stage + torch.log1p(-share * torch.exp(log_tied - log_risk))
    return torch.where(mask, stage, 0.0).sum(-1)


LISTWISE_LOSSES = {"plackett_luce": plackett_luce, "pairwise": pairwise, "graded": graded}

# Attribute losses -------------------------------------------------------------------------------------------------
#
# A multi-attribute head (`attributes.py`) outputs one reward per attribute [B, A]; its targets are the expert scores
# [B, A], NaN where a row has none for an attribute.


def _targets(targets, like, name: str) -> torch.Tensor:
    targets = torch.as_tensor(targets, device=like.device).float()
    if targets.shape != like.shape or like.dim() != 2:
        raise ValueError(f"{name} must be [rows, attributes] like the rewards, {tuple(like.shape)}; "
                         f"got {tuple(targets.shape)}.")
    return targets


def _present(targets, mask) -> torch.Tensor:
    """Where a row has a score: `mask` (default all) and a finite target, so NaN can stand for "not scored"."""
    present = torch.isfinite(targets)
    return present if mask is None else present & torch.as_tensor(mask, device=targets.device).bool()


def regression(predicted, targets, mask=None, standardize=None):
    """Squared error averaged over the attributes a row has: sum_a m_a (p_a - t_a)^2 / sum_a m_a, per row [B].

    `mask` [B, A] bool: False where the row has no score for an attribute (a non-finite target counts as absent
    too); absent entries add no loss and no gradient. A row with none gives 0. `standardize` = (mean [A], std [A]):
    the head learns (t - mean) / std instead of t, so that attributes on different scales (0-4 Likert, 0-100)
    weigh the same. Use for rows scored one response at a time (HelpSteer-style).
    """
    predicted = predicted.float()
    targets = _targets(targets, predicted, "targets")
    present = _present(targets, mask)
    if standardize is not None:
        mean, std = (torch.as_tensor(v, device=predicted.device).float() for v in standardize)
        if not (std > 0).all():
            raise ValueError(f"standardize std must be > 0 for every attribute, got {std.tolist()}.")
        targets = (targets - mean) / std
    error = torch.where(present, predicted - targets, 0.0)  # zeroed before squaring: a NaN target sends no gradient
    return error.square().sum(-1) / present.sum(-1).clamp(min=1)


def attribute_bradley_terry(chosen, rejected, chosen_targets, rejected_targets, mask=None, tie_loss="davidson",
                            log_tie=0.0):
    """Per attribute, a pairwise loss oriented by the expert scores, averaged over the attributes the pair has [B].

    Where chosen scores higher on an attribute its reward there is pushed above rejected's, where lower below, and
    where the two scores are equal the attribute is a tie, whose loss pulls the two rewards together. One model
    covers the three outcomes: `tie_loss` names a tie loss of `losses.py` ('davidson', 'rao_kupper'; both become
    Bradley-Terry as log_tie -> -inf, resp. 0) with its `log_tie`. `mask` and non-finite targets mark attributes
    the pair has no scores for; they add nothing. A pair with none gives 0.
    """
    if tie_loss not in TIE_LOSSES:
        raise ValueError(f"tie_loss={tie_loss!r} is not a tie loss; choose one of {', '.join(TIE_LOSSES)}.")
    chosen, rejected = chosen.float(), rejected.float()
    chosen_targets = _targets(chosen_targets, chosen, "chosen_targets")
    rejected_targets = _targets(rejected_targets, rejected, "rejected_targets")
    present = _present(chosen_targets, mask) & _present(rejected_targets, mask)
    chosen_better = chosen_targets >= rejected_targets
    better, worse = torch.where(chosen_better, chosen, rejected), torch.where(chosen_better, rejected, chosen)
    per_attribute = TIE_LOSSES[tie_loss](better, worse, tie=chosen_targets == rejected_targets, log_tie=log_tie)
    return torch.where(present, per_attribute, 0.0).sum(-1) / present.sum(-1).clamp(min=1)


def attribute_loss(chosen, rejected, chosen_targets, rejected_targets, mask=None, regression_weight=1.0,
                   ranking_weight=1.0, standardize=None, tie_loss="davidson", log_tie=0.0):
    """regression_weight x the mean `regression` of the two responses + ranking_weight x `attribute_bradley_terry`,
    per pair [B]: scores set each reward's level, the comparison their order (ArmoRM regresses, SteerLM too;
    the ranking term adds what pairs teach)."""
    if regression_weight < 0 or ranking_weight < 0 or regression_weight + ranking_weight == 0:
        raise ValueError(f"regression_weight and ranking_weight must be >= 0 and not both 0; got "
                         f"{regression_weight} and {ranking_weight}.")
    scores = (regression(chosen, chosen_targets, mask, standardize)
              + regression(rejected, rejected_targets, mask, standardize)) / 2
    ranking = attribute_bradley_terry(chosen, rejected, chosen_targets, rejected_targets, mask, tie_loss, log_tie)
    return regression_weight * scores + ranking_weight * ranking


# Pair losses over attribute targets: (chosen [B, A], rejected [B, A], chosen_targets, rejected_targets, mask=None,
# **options) -> [B]. `regression` scores one response per row and is called on its own.
ATTRIBUTE_LOSSES = {"attribute_bradley_terry": attribute_bradley_terry, "attribute_loss": attribute_loss}
# The losses of a multi-attribute head (`attributes` in the config): the trainer hands them per-attribute rewards and
# targets (`attribute_training.py`); their tensor inputs are not loss_kwargs.
ATTRIBUTE_LOSS_NAMES = ("regression", "attribute_bradley_terry", "attribute_loss")
ATTRIBUTE_INPUTS = ("predicted", "targets", "chosen", "rejected", "chosen_targets", "rejected_targets", "mask")


# Every loss a config can name. Pairwise losses train pairs (and lists, over their pairs); tie and listwise losses
# train every row as a list (a pair is the K = 2 list).
LOSSES = {**PAIR_LOSSES, **TIE_LOSSES, **LISTWISE_LOSSES, "regression": regression, **ATTRIBUTE_LOSSES}
LEARN_TIE = "learn_tie"  # a loss_kwargs key of the tie losses: the trainer learns log_tie (see the tie section)


def trains_lists(loss_fn) -> bool:
    """Whether a loss needs rows as lists: a listwise loss (it takes `ranks`) or a tie loss (it takes `tie`)."""
    parameters = inspect.signature(loss_fn).parameters
    return "ranks" in parameters or "tie" in parameters


def as_list_loss(loss_fn, options: dict):
    """`loss_fn` with its `options` as a per-list loss `(rewards, ranks, mask, scores, **extra) -> [B]`: a listwise
    loss as it is; a pairwise or tie loss averaged over each list's pairs (`pairwise`), so that any loss trains and
    evaluates lists, and a K = 2 list gives exactly the pair's loss (`balanced` is Bradley-Terry: its balancing needs
    a pair's length direction, which a list has no one of). `extra` reaches the loss as options (a learnt log_tie)."""
    if "ranks" in inspect.signature(loss_fn).parameters:
        return lambda rewards, ranks, mask, scores, **extra: loss_fn(rewards, ranks, mask, scores=scores,
                                                                    **options, **extra)
    return lambda rewards, ranks, mask, scores, **extra: pairwise(rewards, ranks, mask, scores, pair_loss=loss_fn,
                                                                 pair_options={**options, **extra})


def learns_from_ties(loss_fn, options: dict) -> bool:
    """Whether a loss pulls tied completions together (a tie loss, plackett_luce, or a list loss expanded into a tie
    loss); the others leave tied pairs out. A user's list loss is assumed to use them."""
    parameters = inspect.signature(loss_fn).parameters
    if "tie" in parameters or "ranks" in parameters and "pair_loss" not in parameters:
        return True
    if "pair_loss" in parameters:
        pair_loss = options.get("pair_loss", parameters["pair_loss"].default)
        if callable(pair_loss):
            return "tie" in inspect.signature(pair_loss).parameters
        return pair_loss in TIE_LOSSES
    return False
