import math

import pytest
import torch

from hf_balanced_reward import LOSSES, bradley_terry, hinge
from hf_balanced_reward.losses import PAIR_LOSSES, TIE_LOSSES

PAIRWISE = sorted({**PAIR_LOSSES, **TIE_LOSSES})  # the losses of (chosen, rejected, margin); listwise ones: test_listwise


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_bradley_terry_hand_values():
    # -log sigmoid(1) = log(1 + e^-1); with margin 0.5: log(1 + e^-0.5); equal rewards: log 2
    loss = bradley_terry(t(1.0, 0.0, 2.0), t(0.0, 0.0, 1.0), margin=t(0.0, 0.0, 0.5))
    expected = [math.log1p(math.exp(-1)), math.log(2), math.log1p(math.exp(-0.5))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)


def test_hinge_hand_values():
    # differences 0.3, 2.0, -1.0 against margin 1.0 (+ per-pair 0.5 on the last)
    loss = hinge(t(0.3, 2.0, 0.0), t(0.0, 0.0, 1.0), margin=t(0.0, 0.0, 0.5))
    assert loss.tolist() == pytest.approx([0.7, 0.0, 2.5], abs=1e-6)
    assert hinge(t(0.3), t(0.0), hinge_margin=0.2).tolist() == pytest.approx([0.0])


@pytest.mark.parametrize("name", PAIRWISE)
def test_losses_are_shift_invariant(name):
    chosen, rejected = torch.randn(16), torch.randn(16)
    shifted = LOSSES[name](chosen + 3.7, rejected + 3.7)
    assert torch.allclose(LOSSES[name](chosen, rejected), shifted, atol=1e-5)


@pytest.mark.parametrize("name", PAIRWISE)
def test_larger_margin_never_lowers_the_loss(name):
    chosen, rejected = torch.randn(16), torch.randn(16)
    small = LOSSES[name](chosen, rejected, margin=torch.full((16,), 0.1))
    large = LOSSES[name](chosen, rejected, margin=torch.full((16,), 1.0))
    assert torch.all(large >= small)
    assert torch.any(large > small)
