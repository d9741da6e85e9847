"""The callbacks of `callbacks.py`: the reward drift warning, and SkipEmptySteps, which makes a skipped non-finite
batch (nan_policy: skip) leave the weights and the optimizer as a run that never saw it."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from conftest import preference_rows
from hf_balanced_reward import BalancedRewardTrainer
from hf_balanced_reward.callbacks import RewardDriftCallback
from test_interruptions import nan_on_call  # the NaN fault the interruption tests inject too
from test_monitoring import config
from test_safe_runs import config as safe_runs_config


def test_reward_drift_is_flagged(tmp_path, model_dir, pairs, caplog):
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, reward_drift_limit=1e-6),
                                    train_dataset=pairs)
    trainer.train()
    drift = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RewardDriftCallback))
    assert drift.warned_at == [1, 2, 3, 4]
    assert "Reward scale drift at step 1: reward_mean=" in caplog.text and "center_rewards_coefficient" in caplog.text
    quiet = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, reward_drift_limit=None), train_dataset=pairs)
    assert not any(isinstance(cb, RewardDriftCallback) for cb in quiet.callback_handler.callbacks)


def adam_config(output_dir, **kwargs):
    """Adam with weight decay (both move weights on a zero gradient), constant rate, batches in dataset order (so
    that two runs on different rows meet the same batches)."""
    return safe_runs_config(output_dir, loss_type="bradley_terry", loss_kwargs={}, group_column=None, optim="adamw_torch",
                  learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="constant",
                  train_sampling_strategy="sequential", **kwargs)


def assert_same_training_state(a, b):
    """Weights and optimizer state equal exactly: both runs apply the same operations to the same batches (one CPU
    process, the same shapes), so there is no rounding to allow for."""
    for name, value in b.model.state_dict().items():
        assert torch.equal(a.model.state_dict()[name], value), name
    state_a, state_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for index in state_b:
        for key, value in state_b[index].items():  # Adam: step, exp_avg, exp_avg_sq; SGD: momentum_buffer
            assert torch.equal(state_a[index][key], value), (index, key)


def training_logs(trainer):
    return [log for log in trainer.state.log_history if "learning_rate" in log]


def sgd_trainer(model_dir, args, rows, **kwargs):
    """A trainer given the user's own optimizer (SGD with momentum and weight decay) and scheduler."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return BalancedRewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 optimizers=(optimizer, scheduler), **kwargs)


def adam_trainer(model_dir, args, rows, **kwargs):
    return BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows), **kwargs)


@pytest.mark.parametrize("make_trainer", [adam_trainer, sgd_trainer], ids=["adamw", "own-sgd-momentum"])
def test_a_skipped_step_leaves_weights_and_optimizer_as_a_run_without_its_batch(tmp_path, model_dir, make_trainer,
                                                                                recwarn):
    rows = preference_rows(16)
    # Step 2 (rows 4-7) goes NaN and is skipped; the other run never sees rows 4-7.
    skipped = make_trainer(model_dir, adam_config(tmp_path / "skip", max_steps=4, nan_policy="skip"), rows,
                           loss_fn=nan_on_call(2))
    skipped.train()
    without = make_trainer(model_dir, adam_config(tmp_path / "without", max_steps=3), rows[:4] + rows[8:])
    without.train()
    assert_same_training_state(skipped, without)
    assert skipped.lr_scheduler.last_epoch == 4  # the schedule still counts the skipped step
    assert not [w for w in recwarn if "optimizer.step()" in str(w.message)]  # torch's schedulers see a normal step
    logs, reference = training_logs(skipped), training_logs(without)
    assert [log.get("skipped_batches", 0) for log in logs] == [0, 1, 1, 1]
    assert "loss" not in logs[1]  # nothing trained at step 2: no loss to log, not a 0
    assert [logs[i]["loss"] for i in (0, 2, 3)] == [log["loss"] for log in reference]
    final = skipped.state.log_history[-1]  # train_loss over the micro-batches that trained
    assert final["train_loss"] == pytest.approx(sum(logs[i]["loss"] for i in (0, 2, 3)) / 3, rel=1e-6)
    assert skipped.skip_steps.steps_skipped == 1


def test_with_accumulation_a_skipped_micro_batch_adds_nothing_and_the_rest_still_counts(tmp_path, model_dir):
    rows = [{**row, "weight": 1.0} for row in preference_rows(12)]
    options = dict(max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    # Step 2's first micro-batch (rows 4-5) goes NaN and is skipped; its second (rows 6-7) trains.
    skipped = BalancedRewardTrainer(model=model_dir, args=adam_config(tmp_path / "skip", nan_policy="skip", **options),
                                    train_dataset=Dataset.from_list(rows), loss_fn=nan_on_call(3))
    skipped.train()
    # The same step with rows 4-5 weighted 0: their gradient is exactly 0, as the skipped micro-batch's is.
    zero_weighted = [{**row, "weight": 0.0} if i in (4, 5) else row for i, row in enumerate(rows)]
    weighted = BalancedRewardTrainer(model=model_dir, args=adam_config(tmp_path / "weighted", **options),
                                     train_dataset=Dataset.from_list(zero_weighted))
    weighted.train()
    assert_same_training_state(skipped, weighted)
    assert skipped.skip_steps.steps_skipped == 0  # the step ran, on the micro-batch that trained
    logs, reference = training_logs(skipped), training_logs(weighted)
    assert [log.get("skipped_batches", 0) for log in logs] == [0, 1, 1]
    # Trainer averages the zero-weighted micro-batch in as a loss of 0; the skipped one is left out of the mean.
    assert logs[1]["loss"] == pytest.approx(2 * reference[1]["loss"], rel=1e-6)
    assert logs[0]["loss"] == reference[0]["loss"] and logs[2]["loss"] == reference[2]["loss"]
