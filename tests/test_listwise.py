"""Listwise losses, tie losses, ranking metrics and listwise rows (the pure foundation of issue 14): pure tensors."""

import math
import os

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from hf_balanced_reward.data import DataError
from hf_balanced_reward.preparation import prepare_dataset
from hf_balanced_reward.listwise import (canonical_row, list_problem, load_summeval_lists,
                                         split_by_document)
from hf_balanced_reward.losses import (LISTWISE_LOSSES, LOSSES, TIE_LOSSES, bradley_terry, davidson, graded,
                                       list_pairs, pairwise, plackett_luce, rao_kupper)
from hf_balanced_reward.ranking import ranking_metrics
from hf_balanced_reward.row_checks import ALL_IDENTICAL, IDENTICAL

E = math.e
SUMMEVAL = os.path.join(SHARED_DATA, "summeval", "summeval.jsonl")


def t(*rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def random_lists(seed, lists=6, size=5, ties=True):
    """Rewards, ranks (with ties when asked), scores consistent with the ranks, and a mask with 2..size items."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(lists, size, generator=g)
    scores = torch.randint(0, 3 if ties else 1000, (lists, size), generator=g).float()
    ranks = torch.stack([torch.tensor([sorted(set(row.tolist()), reverse=True).index(v) + 1 for v in row.tolist()])
                         for row in scores])
    lengths = torch.randint(2, size + 1, (lists,), generator=g)
    mask = torch.arange(size).unsqueeze(0) < lengths.unsqueeze(1)
    return rewards, ranks, scores, mask


def call(name, rewards, ranks, mask, scores):
    return LISTWISE_LOSSES[name](rewards, ranks, mask, scores=scores)


# Plackett-Luce -------------------------------------------------------------------------------------------------------


def test_plackett_luce_hand_values_without_ties():
    # rewards (2, 1, 0) ranked 1, 2, 3: [-2 + log(e^2 + e + 1)] + [-1 + log(e + 1)] + [-0 + log 1] = 0.72087
    expected = -2 + math.log(E**2 + E + 1) - 1 + math.log(E + 1)
    assert plackett_luce(t([2.0, 1.0, 0.0]), t([1, 2, 3])).item() == pytest.approx(expected, abs=1e-6)
    # the same list written in another order, with its ranks: same ranking, same loss
    assert plackett_luce(t([0.0, 2.0, 1.0]), t([3, 1, 2])).item() == pytest.approx(expected, abs=1e-6)
    # a wrong ranking costs more: rewards (2, 1, 0) ranked 3, 2, 1: [-0 + log(e^2+e+1)] + [-1 + log(e^2 + e)] = 3.4076
    worse = math.log(E**2 + E + 1) - 1 + math.log(E**2 + E)
    assert plackett_luce(t([2.0, 1.0, 0.0]), t([3, 2, 1])).item() == pytest.approx(worse, abs=1e-5)


def test_plackett_luce_tie_hand_values():
    rewards, ranks = t([1.0, 0.0, 0.0]), t([1, 1, 2])
    # Breslow: group {a, b} against all three, twice: -(1 + 0) + 2 log(e + 1 + 1); then c alone: 0.   = 2.10289
    breslow = -1 + 2 * math.log(E + 2)
    # Efron: the second tied draw takes out half the group's share (e + 1) / 2: -1 + log(e + 2) + log(e + 2 - (e + 1)/2)
    efron = -1 + math.log(E + 2) + math.log(E + 2 - (E + 1) / 2)  # = 1.60197
    assert plackett_luce(rewards, ranks, ties="breslow").item() == pytest.approx(breslow, abs=1e-5)
    assert plackett_luce(rewards, ranks, ties="efron").item() == pytest.approx(efron, abs=1e-5)
    assert plackett_luce(rewards, ranks).item() == pytest.approx(efron, abs=1e-5)  # efron is the default
    # A tie at the bottom, equal rewards: a from 3 (log 3), then {b, c} from 2:
    # Breslow 2 log 2 (log 12 in all); Efron log 2 + log(2 - 1) (log 6 in all)
    bottom = t([0.0, 0.0, 0.0]), t([1, 2, 2])
    assert plackett_luce(*bottom, ties="breslow").item() == pytest.approx(math.log(12), abs=1e-5)
    assert plackett_luce(*bottom, ties="efron").item() == pytest.approx(math.log(6), abs=1e-5)


def test_plackett_luce_on_pairs_is_bradley_terry():
    rewards = torch.randn(32, 2, generator=torch.Generator().manual_seed(0)) * 3
    ranks = torch.tensor([[1, 2], [2, 1]] * 16)
    first_better = ranks[:, 0] == 1
    chosen = torch.where(first_better, rewards[:, 0], rewards[:, 1])
    rejected = torch.where(first_better, rewards[:, 1], rewards[:, 0])
    expected = bradley_terry(chosen, rejected)
    for ties in ("efron", "breslow"):
        assert torch.allclose(plackett_luce(rewards, ranks, ties=ties), expected, atol=1e-6)
    assert torch.allclose(pairwise(rewards, ranks), expected, atol=1e-6)


def test_efron_equals_breslow_without_ties():
    rewards, ranks, _, mask = random_lists(1, lists=8, size=6, ties=False)
    assert torch.unique(ranks[0]).numel() == 6  # really no ties
    assert torch.allclose(plackett_luce(rewards, ranks, mask, ties="efron"),
                          plackett_luce(rewards, ranks, mask, ties="breslow"), atol=1e-6)
    # and they differ once there are ties
    rewards, ranks, _, mask = random_lists(2, lists=8, size=6, ties=True)
    assert not torch.allclose(plackett_luce(rewards, ranks, mask, ties="efron"),
                              plackett_luce(rewards, ranks, mask, ties="breslow"), atol=1e-3)


# Properties of every listwise loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LISTWISE_LOSSES))
def test_listwise_losses_are_shift_invariant(name):
    rewards, ranks, scores, mask = random_lists(3)
    shifts = torch.tensor([[-4.0], [0.5], [3.0], [10.0], [-0.1], [7.0]])
    assert torch.allclose(call(name, rewards, ranks, mask, scores), call(name, rewards + shifts, ranks, mask, scores),
                          atol=1e-5)


@pytest.mark.parametrize("name", sorted(LISTWISE_LOSSES))
def test_listwise_losses_ignore_the_order_of_a_list(name):
    rewards, ranks, scores, mask = random_lists(4)
    order = torch.tensor([3, 0, 4, 2, 1])
    permuted = call(name, rewards[:, order], ranks[:, order], mask[:, order], scores[:, order])
    assert torch.allclose(call(name, rewards, ranks, mask, scores), permuted, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LISTWISE_LOSSES))
def test_mask_ignores_padded_slots(name):
    # a K = 3 list padded to K = 5 with garbage rewards (NaN, inf), ranks (0, -7 would be "best") and scores
    rewards = torch.tensor([[0.3, -1.2, 2.0]], requires_grad=True)
    ranks, scores = torch.tensor([[2, 3, 1]]), torch.tensor([[2.0, 1.0, 4.0]])
    alone = call(name, rewards, ranks, None, scores)
    (grad_alone,) = torch.autograd.grad(alone.sum(), rewards)
    padded = torch.cat([rewards.detach(), torch.tensor([[float("nan"), float("inf")]])], 1).requires_grad_()
    loss = call(name, padded, torch.tensor([[2, 3, 1, 0, -7]]), torch.tensor([[True, True, True, False, False]]),
                torch.tensor([[2.0, 1.0, 4.0, 99.0, float("nan")]]))
    (grad,) = torch.autograd.grad(loss.sum(), padded)
    assert loss.item() == pytest.approx(alone.item(), abs=1e-6) and alone.item() > 0
    assert torch.allclose(grad[:, :3], grad_alone, atol=1e-6)
    assert grad[:, 3:].tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("name", sorted(LISTWISE_LOSSES))
def test_a_batch_of_lists_of_different_k(name):
    rewards, ranks, scores, mask = random_lists(5, lists=6, size=5)
    batch = call(name, rewards, ranks, mask, scores)
    assert batch.shape == (6,)
    for n in range(6):
        k = int(mask[n].sum())
        single = call(name, rewards[n:n + 1, :k], ranks[n:n + 1, :k], None, scores[n:n + 1, :k])
        assert batch[n].item() == pytest.approx(single.item(), abs=1e-6)


@pytest.mark.parametrize("name", sorted(LISTWISE_LOSSES))
def test_listwise_losses_compute_in_fp32(name):
    rewards, ranks, scores, mask = random_lists(6)
    low = call(name, rewards.bfloat16(), ranks, mask, scores.bfloat16())
    assert low.dtype == torch.float32
    assert torch.allclose(low, call(name, rewards.bfloat16().float(), ranks, mask, scores), atol=1e-5)


def test_ties_pull_rewards_together():
    # a and b are tied, a's reward is higher: the gradient must lower a and raise b (d loss/d a > d loss/d b).
    for loss in (lambda r: plackett_luce(r, t([1, 1, 2]), ties="efron"),
                 lambda r: plackett_luce(r, t([1, 1, 2]), ties="breslow"),
                 lambda r: plackett_luce(r, t([2, 1, 1]), ties="efron"),  # a tied group at the bottom, too
                 lambda r: pairwise(r, t([1, 1, 2]), pair_loss="davidson"),
                 lambda r: pairwise(r, t([1, 1, 2]), pair_loss="rao_kupper")):
        rewards = torch.tensor([[1.5, 0.5, -1.0]], requires_grad=True)
        (grad,) = torch.autograd.grad(loss(rewards).sum(), rewards)
        assert grad[0, 0] > grad[0, 1]
    for tie_loss in (davidson, rao_kupper):
        chosen, rejected = torch.tensor([1.0, -2.0], requires_grad=True), torch.tensor([0.0, 0.0], requires_grad=True)
        tie_loss(chosen, rejected, tie=torch.tensor([True, True])).sum().backward()
        assert chosen.grad[0] > 0 > chosen.grad[1]  # descent moves chosen towards rejected, from either side
        assert torch.allclose(rejected.grad, -chosen.grad)


# Ties in pairs -------------------------------------------------------------------------------------------------------


def test_davidson_hand_values():
    # d = ln 4: e^(d/2) = 2, e^(-d/2) = 1/2. nu = 1: denominator 3.5, win -log(2/3.5), tie -log(1/3.5)
    chosen, rejected, tie = t(math.log(4), math.log(4)), t(0.0, 0.0), torch.tensor([False, True])
    assert davidson(chosen, rejected, tie=tie).tolist() == pytest.approx([math.log(1.75), math.log(3.5)], abs=1e-6)
    # nu = 2: denominator 4.5, win -log(2/4.5), tie -log(2/4.5)
    assert davidson(chosen, rejected, tie=tie, log_tie=math.log(2)).tolist() == pytest.approx([math.log(2.25)] * 2,
                                                                                             abs=1e-6)
    # equal rewards, nu = 1: every outcome 1/3
    assert davidson(t(0.0, 0.0), t(0.0, 0.0), tie=tie).tolist() == pytest.approx([math.log(3)] * 2, abs=1e-6)


def test_rao_kupper_hand_values():
    # eta = 1. d = 0: win -log sigmoid(-1) = log(1 + e); tie -log(1 - 2 sigmoid(-1)) = 0.77194
    # d = 1: win -log sigmoid(0) = log 2; tie -log(1 - sigmoid(0) - sigmoid(-2)) = 0.96549
    loss = rao_kupper(t(0.0, 0.0, 1.0, 1.0), t(0.0, 0.0, 0.0, 0.0), tie=torch.tensor([False, True, False, True]))
    expected = [math.log(1 + E), -math.log(1 - 2 * sigmoid(-1)), math.log(2), -math.log(1 - 0.5 - sigmoid(-2))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    # eta = 2 (log_tie = ln 2), d = 3: win -log sigmoid(1); tie -log(1 - sigmoid(1) - sigmoid(-5))
    loss = rao_kupper(t(3.0, 3.0), t(0.0, 0.0), tie=torch.tensor([False, True]), log_tie=math.log(2))
    assert loss.tolist() == pytest.approx([-math.log(sigmoid(1)), -math.log(1 - sigmoid(1) - sigmoid(-5))], abs=1e-6)


@pytest.mark.parametrize("name", sorted(TIE_LOSSES))
def test_tie_losses_as_pairwise_losses(name):
    loss_fn = TIE_LOSSES[name]
    g = torch.Generator().manual_seed(7)
    chosen, rejected, tie = torch.randn(16, generator=g), torch.randn(16, generator=g), torch.arange(16) % 3 == 0
    base = loss_fn(chosen, rejected, tie=tie)
    assert torch.allclose(base, loss_fn(chosen + 2.5, rejected + 2.5, tie=tie), atol=1e-5)  # shift invariant
    small = loss_fn(chosen, rejected, margin=torch.full((16,), 0.1), tie=tie)
    large = loss_fn(chosen, rejected, margin=torch.full((16,), 1.0), tie=tie)
    assert torch.all(large[~tie] > small[~tie])  # a larger margin costs decisive pairs more
    assert torch.equal(large[tie], base[tie])  # and a tie has no direction, so no margin
    # a vanishing tie parameter is Bradley-Terry
    assert torch.allclose(loss_fn(chosen, rejected, log_tie=-30.0), bradley_terry(chosen, rejected), atol=1e-6)
    # without `tie`, every pair is decisive
    assert torch.equal(loss_fn(chosen, rejected), loss_fn(chosen, rejected, tie=torch.zeros(16, dtype=torch.bool)))


@pytest.mark.parametrize("name", sorted(TIE_LOSSES))
def test_learnt_tie_parameter(name):
    # The trainer owns log_tie as a parameter: gradient descent raises it on tied data and lowers it on decisive data.
    chosen, rejected = t(0.2, -0.1, 0.0, 0.3), t(0.0, 0.0, 0.1, 0.1)
    for tie, sign in ((torch.ones(4, dtype=torch.bool), -1), (torch.zeros(4, dtype=torch.bool), 1)):
        log_tie = torch.tensor(0.0, requires_grad=True)
        TIE_LOSSES[name](chosen, rejected, tie=tie, log_tie=log_tie).sum().backward()
        assert torch.sign(log_tie.grad).item() == sign
    # Davidson: d loss / d log_tie is exactly (expected ties) - (observed ties)
    log_tie, tie = torch.tensor(0.3, requires_grad=True), torch.tensor([True, False, False, True])
    davidson(chosen, rejected, tie=tie, log_tie=log_tie).sum().backward()
    expected_ties = torch.exp(-davidson(chosen, rejected, tie=torch.ones(4, dtype=torch.bool), log_tie=0.3)).sum()
    assert log_tie.grad.item() == pytest.approx(expected_ties.item() - 2, abs=1e-5)


def test_every_loss_a_config_can_name_is_in_losses():
    assert set(LOSSES) == ({"bradley_terry", "hinge", "balanced"} | set(TIE_LOSSES) | set(LISTWISE_LOSSES)
                           | {"regression", "attribute_bradley_terry", "attribute_loss"})


# Pairs of a list: graded and pairwise --------------------------------------------------------------------------------


def test_list_pairs_orientation():
    pairs = list_pairs(t([0.0, 1.0, 2.0]), t([3, 1, 1]), scores=t([0.0, 5.0, 5.0]))
    # pairs (0, 1), (0, 2), (1, 2): the better-ranked completion first; 1 and 2 are tied (kept in index order)
    assert pairs.better.tolist() == [[1, 2, 1]] and pairs.worse.tolist() == [[0, 0, 2]]
    assert pairs.chosen.tolist() == [[1.0, 2.0, 1.0]] and pairs.rejected.tolist() == [[0.0, 0.0, 2.0]]
    assert pairs.tie.tolist() == [[False, False, True]] and pairs.valid.all()
    assert pairs.score_gap.tolist() == [[5.0, 5.0, 0.0]]


def test_graded_hand_values():
    rewards, ranks, scores = t([1.0, 0.0, 0.0]), t([1, 2, 3]), t([3.0, 2.0, 1.0])
    # pairs (0,1): d = 1, margin 1 -> -log sigmoid(0) = log 2; (0,2): d = 1, margin 2 -> log(1 + e);
    # (1,2): d = 0, margin 1 -> log(1 + e); mean of the three
    expected = (math.log(2) + 2 * math.log(1 + E)) / 3
    assert graded(rewards, ranks, scores=scores).item() == pytest.approx(expected, abs=1e-6)
    # margin_scale 0.5: -log sigmoid(0.5), -log sigmoid(0), -log sigmoid(-0.5)
    expected = (-math.log(sigmoid(0.5)) + math.log(2) - math.log(sigmoid(-0.5))) / 3
    assert graded(rewards, ranks, scores=scores, margin_scale=0.5).item() == pytest.approx(expected, abs=1e-6)
    # margin_scale 0 is the pairwise loss
    assert torch.allclose(graded(rewards, ranks, scores=scores, margin_scale=0.0), pairwise(rewards, ranks))
    # equal scores (a tie) count only with a tie loss: here (0,1) is tied, d = 1
    tied = t([3.0, 3.0, 1.0]), t([1, 1, 2])
    # Bradley-Terry: (0,2) d = 1, margin 2: log(1 + e); (1,2) d = 0, margin 2: -log sigmoid(-2); the tie left out
    bt = (math.log(1 + E) - math.log(sigmoid(-2))) / 2
    assert graded(rewards, tied[1], scores=tied[0]).item() == pytest.approx(bt, abs=1e-6)
    # Davidson (nu = 1) adds the tie d = 1: -log(1 / (e^0.5 + e^-0.5 + 1)), and its decisive pairs have d - 2 = -1, -2
    davidson_win = [math.log(math.exp(x / 2) + math.exp(-x / 2) + 1) - x / 2 for x in (-1.0, -2.0)]
    expected = (math.log(math.exp(0.5) + math.exp(-0.5) + 1) + sum(davidson_win)) / 3
    assert graded(rewards, tied[1], scores=tied[0], pair_loss="davidson").item() == pytest.approx(expected, abs=1e-5)


def test_pairwise_hand_values():
    rewards, ranks = t([1.0, 0.0, 0.0]), t([1, 1, 2])
    # Bradley-Terry over the two decisive pairs (0,2): -log sigmoid(1), (1,2): log 2; the tie (0,1) left out
    expected = (-math.log(sigmoid(1)) + math.log(2)) / 2
    assert pairwise(rewards, ranks).item() == pytest.approx(expected, abs=1e-6)
    # hinge with margin 1: (0,2) max(0, 1 - 1) = 0, (1,2) max(0, 1 - 0) = 1
    hinge = pairwise(rewards, ranks, pair_loss="hinge", pair_options={"hinge_margin": 1.0})
    assert hinge.item() == pytest.approx(0.5, abs=1e-6)
    # a list with nothing to count (all tied, Bradley-Terry) has loss 0
    assert pairwise(t([1.0, 0.0]), t([1, 1])).item() == 0.0


def test_listwise_loss_errors():
    rewards, ranks = t([1.0, 0.0]), t([1, 2])
    with pytest.raises(ValueError, match=r"ties='exact' is not a tie method of plackett_luce; choose 'efron'"):
        plackett_luce(rewards, ranks, ties="exact")
    with pytest.raises(ValueError, match=r"loss 'graded' needs the lists' scores \(column 'scores'\)"):
        graded(rewards, ranks)
    with pytest.raises(ValueError, match=r"pair_loss='bradly_terry' is not a pairwise loss; choose one of"):
        pairwise(rewards, ranks, pair_loss="bradly_terry")
    with pytest.raises(ValueError, match=r"unknown option 'margin' for pair_loss 'hinge'; its options are: hinge_marg"):
        pairwise(rewards, ranks, pair_loss="hinge", pair_options={"margin": 1.0})
    with pytest.raises(ValueError, match=r"margin_scale must be >= 0, got -1"):
        graded(rewards, ranks, scores=t([2.0, 1.0]), margin_scale=-1)
    with pytest.raises(ValueError, match=r"ranks must have the shape of rewards, \(1, 2\); got \(1, 3\)"):
        plackett_luce(rewards, t([1, 2, 3]))
    with pytest.raises(ValueError, match=r"listwise rewards must be \[lists, K\]; got shape \(2,\)"):
        plackett_luce(torch.zeros(2), torch.ones(2))


# Ranking metrics -----------------------------------------------------------------------------------------------------

# A: perfect. B: ranks 1, 1, 2, 3 (0 and 1 tied, rewards 1.0 apart), rewards mostly backwards. C: a tied pair, rewards
# 0.2 apart. D: the top reward shared by the best and the second.
LISTS_REWARDS = [[3.0, 2.0, 1.0], [0.0, 1.0, 0.2, 5.0], [0.1, 0.3], [2.0, 2.0, 1.0]]
LISTS_RANKS = [[1, 2, 3], [1, 1, 2, 3], [1, 1], [1, 2, 3]]


def test_ranking_metrics_hand_values():
    m = ranking_metrics(LISTS_REWARDS, LISTS_RANKS)
    # decisive pairs: A 3 (all right); B 5: (0,2) 0 < 0.2 wrong, (0,3) wrong, (1,2) right, (1,3) wrong, (2,3) wrong;
    # C none; D 3: (0,1) equal rewards is wrong, (0,2) and (1,2) right. 6 of 11.
    assert (m["lists"], m["pairs"], m["pairs_correct"]) == (4, 11, 6)
    assert m["pairwise_accuracy"] == pytest.approx(6 / 11)
    # labelled ties: B (0,1) 1.0 apart (outside 0.5), C 0.2 apart (inside)
    assert (m["tied_pairs"], m["ties_within_tolerance"], m["tie_accuracy"]) == (2, 1, 0.5)
    assert m["tie_reward_gap"] == pytest.approx(0.6)
    assert m["decisive_reward_gap"] == pytest.approx((1 + 2 + 1 + 0.2 + 5 + 0.8 + 4 + 4.8 + 0 + 1 + 1) / 11)
    # Kendall tau-b (C left out, all labels tied): A 1; B: 1 concordant, 4 discordant, 1 tie in the labels:
    # -3 / sqrt(6 * 5); D: 2 concordant, one tie in the rewards: 2 / sqrt(2 * 3)
    assert m["kendall_lists"] == 3
    assert m["kendall_tau"] == pytest.approx((1 - 3 / math.sqrt(30) + 2 / math.sqrt(6)) / 3, abs=1e-9)
    # Spearman: B: reward ranks (1, 3, 2, 4) against label ranks (3.5, 3.5, 2, 1): -3 / sqrt(5 * 4.5);
    # D: (2.5, 2.5, 1) against (3, 2, 1): 1.5 / sqrt(1.5 * 2)
    assert m["spearman_rho"] == pytest.approx((1 - 3 / math.sqrt(22.5) + 1.5 / math.sqrt(3)) / 3, abs=1e-9)
    # top-1: A right; B wrong (5.0 is ranked 3); C has no top-1 question (all best); D wrong (a second-ranked
    # completion shares the top reward)
    assert (m["top1_lists"], m["top1_correct"], m["top1_accuracy"]) == (3, 1, 1 / 3)


def test_ranking_metrics_padded_equals_ragged():
    rewards, ranks, mask = np.zeros((4, 4)), np.full((4, 4), 9), np.zeros((4, 4), bool)
    for n, (reward, rank) in enumerate(zip(LISTS_REWARDS, LISTS_RANKS)):
        rewards[n, : len(reward)], ranks[n, : len(rank)], mask[n, : len(reward)] = reward, rank, True
    rewards[~mask] = 100.0  # padding that would change every metric if it were read
    assert ranking_metrics(rewards, ranks, mask) == ranking_metrics(LISTS_REWARDS, LISTS_RANKS)


def test_ranking_metrics_leave_out_what_is_undefined():
    m = ranking_metrics([[0.0, 0.0]], [[1, 2]])
    assert m["pairwise_accuracy"] == 0.0 and "kendall_tau" not in m and "tie_accuracy" not in m
    assert m["kendall_lists"] == 0 and m["tied_pairs"] == 0
    with pytest.raises(ValueError, match="list 0 has 2 rewards and 3 ranks; give one rank per reward"):
        ranking_metrics([[0.0, 1.0]], [[1, 2, 3]])


# Listwise rows -------------------------------------------------------------------------------------------------------


def test_canonical_rows():
    row = canonical_row({"prompt": "Q", "completions": ["a", "b", "c"], "ranks": [1, 3, 3], "weight": 2.0})
    assert row == {"prompt": "Q", "completions": ["a", "b", "c"], "ranks": [1, 2, 2], "scores": None, "weight": 2.0}
    row = canonical_row({"prompt": "Q", "completions": ["a", "b", "c", "d"], "scores": [0.5, 2, 2, -1]})
    assert row["ranks"] == [2, 1, 1, 3] and row["scores"] == [0.5, 2.0, 2.0, -1.0]
    # a pair is the K = 2 list; tie: true makes it a tied one; Arrow's nulls for absent columns are fine
    pair = canonical_row({"prompt": "Q", "chosen": "a", "rejected": "b", "ranks": None, "scores": None})
    assert pair == {"prompt": "Q", "completions": ["a", "b"], "ranks": [1, 2], "scores": None}
    assert canonical_row({"prompt": "Q", "chosen": "a", "rejected": "b", "tie": True})["ranks"] == [1, 1]
    assert canonical_row({"prompt": "Q", "completions": ["a", "b"], "tie": True})["ranks"] == [1, 1]
    # a conversational pair with an implicit prompt: the shared messages become the prompt, as for pairs
    user = {"role": "user", "content": "Q"}
    chosen, rejected = {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}
    pair = canonical_row({"chosen": [user, chosen], "rejected": [user, rejected], "margin": 1.0})
    assert pair == {"prompt": [user], "completions": [[chosen], [rejected]], "ranks": [1, 2], "scores": None,
                    "margin": 1.0}


GOOD = {"prompt": "Q", "completions": ["a", "b", "c"], "ranks": [1, 2, 3]}
DROP = object()  # a column the bad row does not have
BAD_ROWS = [
    ({"prompt": DROP}, r"column 'prompt' is missing: a list gives its prompt once"),
    ({"prompt": ["Q"]}, r"column 'prompt' message 0 is not a \{'role': ..., 'content': ...\} mapping"),
    ({"completions": "a"}, r"column 'completions' is str, not a list of K >= 2 completions"),
    ({"completions": ["a"], "ranks": [1]}, r"column 'completions' has 1 completion\(s\); a list needs at least 2"),
    ({"completions": ["a", None, "c"]}, r"column 'completions' item 1 is null"),
    ({"completions": ["a", [{"role": "bot", "content": "x"}], "c"]},
     r"column 'completions' item 1 message 0 has role 'bot'; roles are system, user, assistant, tool"),
    ({"completions": ["a", [{"role": "assistant", "content": "x"}], "c"]},
     r"columns prompt, completions mix plain text and message lists"),
    ({"ranks": None}, r"has neither 'ranks' nor 'scores'; give one of them \(ranks: 1 = best"),
    ({"scores": [1.0, 2.0, 3.0]}, r"has both 'ranks' and 'scores'; give one"),
    ({"ranks": [1, 2]}, r"column 'ranks' has 2 entries for 3 completions; give one per completion"),
    ({"ranks": [1, 0, 2]}, r"column 'ranks' item 1 is 0; ranks are whole numbers from 1 \(best\), equal for ties"),
    ({"ranks": [1, 1.5, 2]}, r"column 'ranks' item 1 is 1.5; ranks are whole numbers"),
    ({"ranks": [1, "2", 3]}, r"column 'ranks' item 1 is str, not a number"),
    ({"ranks": None, "scores": [1.0, float("nan"), 0.0]}, r"column 'scores' item 1 is NaN"),
    ({"ranks": "1,2,3"}, r"column 'ranks' is str, not a list of 3 numbers \(one per completion\)"),
    ({"tie": True}, r"column 'tie' is true on a list of 3 completions; 'tie' marks a tied pair: in a list, give "
                    r"tied completions equal ranks"),
    ({"completions": ["a", "b"], "ranks": [1, 2], "tie": True}, r"column 'tie' is true but the ranks \[1, 2\] differ"),
    ({"completions": ["a", "b"], "ranks": [1, 2], "tie": "yes"}, r"column 'tie' is 'yes', not true or false"),
    ({"completions": ["a", "b", "a"]}, r"completions 0 and 2 are identical but their ranks differ \(1 and 3\); remove "
                                       r"one or give them equal ranks"),
    ({"completions": ["a", "a"], "ranks": [1, 1]}, r"all completions are identical \(no preference to learn\)"),
    ({"margin": 1.0}, r"column 'margin' is set on a list of 3 completions; a margin belongs to a pair"),
    ({"weight": -1.0}, r"column 'weight' is negative \(-1.0\)"),
    ({"weight": "heavy"}, r"column 'weight' is str, not a number"),
    ({"tools": "{not json"}, r"column 'tools' is not valid JSON"),
]


@pytest.mark.parametrize("change,message", BAD_ROWS)
def test_bad_listwise_rows_are_named(change, message):
    row = {k: v for k, v in {**GOOD, **change}.items() if v is not DROP}
    with pytest.raises(DataError, match="^bad listwise row: " + message):
        canonical_row(row)


def test_bad_pair_rows_are_named_as_data_py_names_them():
    assert list_problem({"prompt": "Q", "chosen": "a", "rejected": "a"}) == IDENTICAL
    assert list_problem({"prompt": "Q", "chosen": None, "rejected": "a"}) == "column 'chosen' is null"
    assert list_problem({"prompt": "Q", "chosen": "a", "rejected": "b", "tie": 1}) == \
        "column 'tie' is 1, not true or false"
    assert list_problem({"text": "a"}).startswith("has neither 'completions' (a list with 'ranks' or 'scores') nor")


def test_prepare_lists_names_bad_rows_and_counts_dropped_ones(tokenizer, tmp_path):
    from datasets import Dataset

    from hf_balanced_reward import BalancedRewardConfig

    rows = [GOOD, {**GOOD, "completions": ["a", "a", "a"], "ranks": [1, 1, 1]}, {**GOOD, "ranks": [0, 1, 2]},
            {"prompt": "Q", "completions": None, "ranks": None, "chosen": "a", "rejected": "b", "tie": True}]
    rows = [{"chosen": None, "rejected": None, "tie": None, **row} for row in rows]  # every row every column

    def prepare(rows, **options):
        args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none", **options)
        return prepare_dataset(Dataset.from_list(rows), tokenizer, args, lists=True)

    with pytest.raises(DataError, match=r"^train dataset has 1 bad row\(s\) of 4: row 2: column 'ranks' item 0 is 0; "
                                        r"ranks are whole numbers from 1 \(best\), equal for ties\. Fix them, or set "
                                        r"on_bad_rows: skip"):
        prepare(rows)
    with pytest.raises(DataError, match=r"train dataset has 2 bad row\(s\) of 4: row 1: all completions are identical"):
        prepare(rows, on_bad_rows="error")
    kept, report = prepare(rows, on_bad_rows="skip")
    assert kept["ranks"] == [[1, 2, 3], [1, 1]]
    assert report == {"rows": 4, "lists": 2, "completions": 5, "truncated": 0, "empty_responses": 0, "dropped": {
        ALL_IDENTICAL: 1, "column 'ranks' item 0 is 0; ranks are whole numbers from 1 (best), equal for ties": 1}}
    kept, report = prepare([rows[0], rows[1], rows[3]])  # auto drops the list with nothing to learn
    assert report["lists"] == 2 and report["dropped"] == {ALL_IDENTICAL: 1}


@pytest.mark.skipif(not os.path.exists(SUMMEVAL), reason="../shared/data is not beside the repository")
def test_summeval_lists_from_the_real_file():
    lists, report = load_summeval_lists(SUMMEVAL)
    # 2,943 pairs of 100 documents; 1,560 (document, system) summaries, of which 49 repeat another system's text
    # (41 texts); 39 of those texts were scored differently per system and get the mean: 1,511 distinct summaries
    assert report == {"lists": 100, "completions": 1511, "texts_from_several_sources": 41, "rescored_texts": 39}
    assert len({row["doc_id"] for row in lists}) == 100  # one list per document
    sizes = sorted(len(row["completions"]) for row in lists)
    assert (sizes[0], sizes[-1]) == (6, 16)
    assert all(1.0 <= s <= 5.0 for row in lists for s in row["scores"])
    first = lists[0]
    assert first["ranks"][first["scores"].index(max(first["scores"]))] == 1
    train, evaluation = split_by_document(lists, eval_fraction=0.2, seed=0)
    assert (len(train), len(evaluation)) == (80, 20)
    assert not {r["doc_id"] for r in train} & {r["doc_id"] for r in evaluation}
    assert sum(len(r["completions"]) for r in train + evaluation) == 1511
    assert split_by_document(lists, seed=0) == (train, evaluation)  # seeded: the same split every time
    assert split_by_document(lists, seed=1)[1] != evaluation
    with pytest.raises(ValueError, match=r"eval_fraction=1.0 holds out 100 of 100 documents; choose a fraction"):
        split_by_document(lists, eval_fraction=1.0)
