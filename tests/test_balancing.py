"""Options, units, weights, fitted slopes, the length expert and head and group DRO of the balanced loss, on
hand-worked inputs."""

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, TrainerCallback

from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError, PairCollator
from hf_balanced_reward.balancing import (
    LONGER, SAME, SHORTER, Balancer, BalanceOptions, fit_length_slope, length_cells, length_head_penalty, unit_mixture,
)
from hf_balanced_reward.forward import score_batch


def test_length_cells():
    assert length_cells([20, 10, 20, 10, 3], [10, 20, 19, 9, 3]).tolist() == [LONGER, SHORTER, SAME, SAME, SAME]


def pair_weights_of(unit_sizes, weighting):
    """Weight of one pair of each unit: q_u * N / n_u."""
    sizes = torch.tensor(unit_sizes)
    return unit_mixture(sizes, weighting) * sizes.sum() / sizes.clamp(min=1)


def test_cell_weighting_splits_each_groups_share_equally_between_directions():
    # group 0: 3 longer, 1 shorter; group 1: 2 longer, 2 shorter, 4 same-length. N = 12.
    weights = pair_weights_of([[3, 1, 0], [2, 2, 4]], "cells")
    # group 0 keeps 4/12 of the mass, 2/12 per direction: 2/12 * 12 / 3 and 2/12 * 12 / 1.
    assert weights[0, :2].tolist() == pytest.approx([2 / 3, 2.0])
    assert weights[1].tolist() == pytest.approx([1.0, 1.0, 1.0])  # already balanced; same-length keeps weight 1
    # the total weight is still N, so the loss keeps its scale
    assert float((weights * torch.tensor([[3, 1, 0], [2, 2, 4]])).sum()) == pytest.approx(12)


def test_cell_weighting_leaves_a_group_with_one_direction_alone():
    assert pair_weights_of([[5, 0, 1]], "cells")[0, [LONGER, SAME]].tolist() == pytest.approx([1.0, 1.0])


def test_group_and_no_weighting():
    groups = pair_weights_of([[3, 1, 0], [2, 2, 4]], "groups")
    assert groups[0, :2].tolist() == pytest.approx([1.5, 1.5])  # (1/2) * 12 / 4
    assert groups[1].tolist() == pytest.approx([0.75, 0.75, 0.75])  # (1/2) * 12 / 8
    assert pair_weights_of([[3, 1, 0], [2, 2, 4]], "none")[1].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_fitted_slope_hand_values():
    # maximise 2 log s(b) + log s(-b): 2 (1 - s(b)) = s(b), s(b) = 2/3, b = log 2
    assert fit_length_slope([1.0, 1.0, -1.0], ridge=0.0) == pytest.approx(math.log(2), abs=1e-9)
    assert fit_length_slope([2.0, -2.0], ridge=0.0) == pytest.approx(0.0, abs=1e-12)
    assert fit_length_slope([-1.0, -1.0, 1.0], ridge=0.0) == pytest.approx(-math.log(2), abs=1e-9)
    one_sided = fit_length_slope([1.0, 2.0, 0.5])  # no pair against the direction: the ridge keeps beta finite
    assert 3 < one_sided < 50


CHOSEN, REJECTED = torch.tensor([3, 3, 0, 9, 1]), torch.tensor([0, 0, 3, 9, 7])
# log1p differences: log 4, log 4, -log 4, 0, log(2/8) = -log 4; cells: longer, longer, shorter, same, shorter
GROUP_IDS = torch.tensor([0, 0, 0, 1, 1])


def fitted(**options) -> Balancer:
    return Balancer(BalanceOptions(**options), ["a", "b"]).fit(GROUP_IDS, torch.stack([CHOSEN, REJECTED], dim=1))


def test_balancer_fit_and_state():
    balance = fitted(weighting="cells")
    assert balance.unit_sizes.tolist() == [[2, 1, 0], [0, 1, 1]]
    log4 = math.log(4)
    assert balance.slopes[0].item() == pytest.approx(fit_length_slope([log4, log4, -log4]))
    assert balance.slopes[0].item() == pytest.approx(math.log(2) / log4, abs=2e-3)  # the ridge moves it a little
    assert balance.slopes[1].item() == pytest.approx(fit_length_slope([0.0, -log4]))
    restored = Balancer(BalanceOptions())
    restored.load_state_dict(balance.state_dict())
    assert torch.equal(restored.mix, balance.mix) and torch.equal(restored.slopes, balance.slopes)
    assert balance.state_dict()["group_names"] == ["a", "b"]  # the keys every checkpoint has had


def test_balancer_terms_hand_values():
    balance = fitted(weighting="cells", length_expert=0.5, length_head=2.0)
    balance.slopes = torch.tensor([2.0, -1.0])
    # Rewards: 3 L + 1 on group a's six responses (rho(L, reward) = 1), and on group b's four, whose L are
    # (log 10, log 2 | log 10, log 8), rewards (1, 0 | -1, 0): centred products d, 0, -d, 0, so rho = 0 exactly.
    log_chosen, log_rejected = CHOSEN.float().log1p(), REJECTED.float().log1p()
    chosen = torch.cat([3 * log_chosen[:3] + 1, torch.tensor([1.0, 0.0])])
    rejected = torch.cat([3 * log_rejected[:3] + 1, torch.tensor([-1.0, 0.0])])
    head = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(head.weight)  # length score = the feature, and the features are L: rho(L, length score) = 1
    features = (log_chosen[:, None], log_rejected[:, None])
    terms = balance.terms(GROUP_IDS, CHOSEN, REJECTED, chosen, rejected, True, features, head)
    # group a holds 3/5 of the mass, 1.5/5 per direction: w = q * N / n = 0.75 (longer, 2 pairs), 1.5 (shorter);
    # group b has no chosen-longer pair, so its cells keep weight 1
    assert terms.weights.tolist() == pytest.approx([0.75, 0.75, 1.5, 1.0, 1.0])
    # shift = expert 0.5 * beta_g * dlog (beta 2, -1) + length head's score difference dlog
    log4 = math.log(4)
    expected = torch.tensor([2 * log4, 2 * log4, -2 * log4, 0.0, math.log(2) - log4])
    # float32 sums of a few terms of size <= 3: rounding is a few 1e-7 (torch's float32 defaults cover it)
    torch.testing.assert_close(terms.shift, expected)
    # 2.0 * mean over groups of (1 - rho(L, length score)) + |rho(L, reward)|: a (1 - 1 + 1), b (1 - 1 + 0)
    torch.testing.assert_close(terms.penalty, torch.tensor(1.0))
    evaluation = balance.terms(GROUP_IDS, CHOSEN, REJECTED, chosen, rejected, False)  # only training sees the shift and the penalty
    assert torch.equal(evaluation.weights, terms.weights) and evaluation.shift is None and evaluation.penalty is None
    # a pair of a group seen only at evaluation weighs 1 and gets no expert vote
    balance.add_groups(["new"])
    new = balance.terms(torch.tensor([2]), torch.tensor([5]), torch.tensor([1]), torch.zeros(1), torch.zeros(1), True)
    assert new.weights.tolist() == [1.0] and new.shift.tolist() == [0.0] and new.penalty is None


def test_balancer_restart_keeps_the_data_and_refuses_new_negatives():
    balance = fitted(weighting="cells", group_dro=True)
    balance.mix = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])  # as DRO might have left it
    balance.restart(BalanceOptions(weighting="groups"))
    assert balance.unit_sizes.tolist() == [[2, 1, 0], [0, 1, 1]]
    torch.testing.assert_close(balance.mix, unit_mixture(balance.unit_sizes, "groups"))
    with pytest.raises(ConfigError, match="cross_prompt and cross_prompt_partners cannot change between trials"):
        balance.restart(BalanceOptions(cross_prompt=1.0))


def test_dro_update_hand_values():
    balance = Balancer(BalanceOptions(group_dro=True, dro_step_size=1.0, dro_adjustment=2.0), ["g"])
    balance.unit_sizes = torch.tensor([[4, 1, 0]])
    balance.mix = torch.tensor([[0.5, 0.5, 0.0]])
    # mean losses 0.5 and 1.0; adjustments 2 / sqrt(4) = 1 and 2 / sqrt(1) = 2
    balance.dro_update(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[4.0, 1.0, 0.0]]))
    expected = torch.tensor([math.exp(1.5), math.exp(3.0)])
    torch.testing.assert_close(balance.mix[0, :2], expected / expected.sum())
    assert balance.mix[0, 2].item() == 0.0
    balance.options = replace(balance.options, dro_adjustment=0.0)
    before = balance.mix.clone()
    balance.dro_update(torch.tensor([[0.0, 3.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]))  # unit 0 unseen: factor 1
    ratio = (balance.mix[0, 1] / balance.mix[0, 0]) / (before[0, 1] / before[0, 0])
    assert ratio.item() == pytest.approx(math.exp(3.0), rel=1e-5)


def test_balanced_options_with_a_loss_fn_are_refused(tmp_path, model_dir, pairs):
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none", loss_type="balanced",
                                loss_kwargs={"weighting": "cells"})
    with pytest.raises(ConfigError, match=r"loss_fn= cannot be combined with loss_type='balanced' \(loss_kwargs "
                                          r"\{'weighting': 'cells'\}\): the balanced loss's options .* are applied by "
                                          r"the trainer around its built-in Bradley-Terry loss, so with a loss_fn of "
                                          r"your own they would be ignored\. Drop loss_fn"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs, loss_fn=lambda c, r, margin=None: c - r)


def test_other_losses_keep_group_names_without_a_balancer(tmp_path, model_dir, pairs):
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none", group_column="source", max_steps=1,
                                save_strategy="steps", save_steps=1)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    assert trainer.balance is None and trainer.group_names == ["big", "small"]
    trainer.train()
    state = json.loads((tmp_path / "checkpoint-1" / "reward_state.json").read_text())
    assert state["group_names"] == ["big", "small"] and "balance" not in state


def test_length_expert_is_in_the_training_loss_and_absent_from_the_saved_model(tmp_path, model_dir, pairs):
    args = BalancedRewardConfig(
        output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=8, max_steps=2,
        learning_rate=1e-2, save_strategy="no", seed=0, group_column="source", loss_type="balanced",
        loss_kwargs={"weighting": "none", "length_expert": 2.0},
    )
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    assert trainer.balance.slopes.abs().min() > 0.1  # chosen is the longer response in these pairs
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        chosen, rejected = score_batch(trainer.model, batch)[0].unbind(1)
    lengths = batch["response_lengths"].float()
    expert = 2.0 * trainer.balance.slopes[batch["group_id"]] * (lengths[:, 0].log1p() - lengths[:, 1].log1p())
    by_hand = -F.logsigmoid(chosen - rejected - batch["margin"] + expert).mean()
    torch.testing.assert_close(loss, by_hand)
    assert (loss - (-F.logsigmoid(chosen - rejected - batch["margin"]).mean())).abs() > 1e-3

    trainer.train()
    trainer.save_model()
    saved = AutoModelForSequenceClassification.from_pretrained(args.output_dir).eval()
    trainer.model.eval()
    eval_batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    with torch.no_grad():
        chosen, rejected = score_batch(trainer.model, eval_batch)[0].unbind(1)
        plain = PairCollator(trainer.processing_class.pad_token_id)([trainer.train_dataset[i] for i in range(4)])
        logits = saved(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits[:, 0]
    # the saved model's own output is the reward: no length term, no extra weights
    torch.testing.assert_close(logits, torch.cat([chosen, rejected]), atol=1e-5, rtol=1e-5)
    assert set(saved.state_dict()) == set(trainer.model.state_dict())


def test_length_head_penalty_hand_values():
    log_lengths = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 6.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1])  # group 1 has 2 responses: too few for a correlation, left out
    rewards = torch.tensor([3.0, 2.0, 1.0, 0.0, 9.0, 1.0])  # rho(L, reward) = -1 in group 0
    length_scores = 2 * log_lengths + 1  # rho(L, length score) = 1
    penalty = length_head_penalty(rewards, length_scores, log_lengths, group_ids)
    assert penalty.item() == pytest.approx((1 - 1) + 1)
    uncorrelated = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0])  # rho(L, reward) = 0 on 0, 1, 2, 3
    assert length_head_penalty(uncorrelated, length_scores, log_lengths, group_ids).item() == pytest.approx(0, abs=1e-6)


def test_length_head_trains_with_the_model_and_is_not_saved(tmp_path, model_dir, pairs):
    args = BalancedRewardConfig(
        output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=8, max_steps=3,
        learning_rate=1e-2, save_strategy="steps", save_steps=3, seed=0, group_column="source", loss_type="balanced",
        loss_kwargs={"length_head": 1.0},
    )
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    before = trainer.length_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.length_head.weight)
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    trainer.save_model()
    saved = AutoModelForSequenceClassification.from_pretrained(args.output_dir)
    assert set(saved.state_dict()) == set(trainer.model.state_dict())  # the length head stays behind
    with open(tmp_path / "out" / "checkpoint-3" / "reward_state.json") as f:
        state = json.load(f)
    torch.testing.assert_close(torch.tensor(state["length_head"]["weight"]), trainer.length_head.weight.detach())


class StopAfter(TrainerCallback):
    """Stops a run after `step` optimizer steps, as a stop signal would (the checkpoint of that step is saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_resumed_length_head_run_ends_with_the_uninterrupted_runs_weights(tmp_path, model_dir, pairs):
    """The length head lives beside the model (in the optimizer, not in the model): its gradients are cleared after
    every step as the model's are, so a run resumed from checkpoint-4 takes the same steps as the straight run (they
    used to sum over the run, which a resumed run, starting from none, did not)."""
    def args(output_dir):
        return BalancedRewardConfig(
            output_dir=str(output_dir), report_to="none", per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
            save_strategy="steps", save_steps=2, seed=0, group_column="source", loss_type="balanced",
            loss_kwargs={"length_head": 1.0},
        )

    stopped = BalancedRewardTrainer(model=model_dir, args=args(tmp_path / "run"), train_dataset=pairs,
                                    callbacks=[StopAfter(4)])
    stopped.train()
    assert stopped.state.global_step == 4
    resumed = BalancedRewardTrainer(model=model_dir, args=args(tmp_path / "run"), train_dataset=pairs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed.state.global_step == 6
    straight = BalancedRewardTrainer(model=model_dir, args=args(tmp_path / "straight"), train_dataset=pairs)
    straight.train()
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-6, rtol=0)
    for name, value in straight.length_head.state_dict().items():
        torch.testing.assert_close(resumed.length_head.state_dict()[name], value, atol=1e-6, rtol=0)
    assert not torch.equal(stopped.length_head.weight, straight.length_head.weight)  # steps 5 and 6 moved it


def test_train_called_twice_keeps_one_copy_of_the_length_head_in_the_optimizer(tmp_path, model_dir, pairs):
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4, max_steps=1,
                                save_strategy="no", group_column="source", loss_type="balanced",
                                loss_kwargs={"length_head": 1.0}, overwrite_output_dir=True)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    trainer.train()
    trainer.train()  # Trainer keeps its optimizer; adding the head's group again would be refused by torch
    held = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    head = list(trainer.length_head.parameters())
    assert sum(any(p is h for p in held) for h in head) == len(head) and len(held) == len({id(p) for p in held})
