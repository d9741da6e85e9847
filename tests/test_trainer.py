import numpy as np
import pytest
import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from conftest import tiny_bert, tiny_llama
from hf_balanced_reward import LOSSES, BalancedRewardConfig, BalancedRewardTrainer, ConfigError
from hf_balanced_reward.forward import score_batch


def config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
        per_device_eval_batch_size=5, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0,
        group_column="source",
    )
    return BalancedRewardConfig(**{**defaults, **kwargs})


LOSS_SETTINGS = [
    ("bradley_terry", {}),
    ("hinge", {"hinge_margin": 0.5}),
    ("balanced", {}),
    ("balanced", {"group_dro": True, "dro_step_size": 0.5}),
    ("balanced", {"length_expert": 1.0, "weighting": "groups"}),
    ("balanced", {"length_head": 1.0}),
    ("balanced", {"cross_prompt": 1.0, "cross_prompt_partners": "random"}),
]


@pytest.mark.parametrize("loss_type,loss_kwargs", LOSS_SETTINGS,
                         ids=["bt", "hinge", "balanced", "group_dro", "length_expert", "length_head", "cross_prompt"])
def test_every_loss_trains_logs_and_evaluates(tmp_path, model_dir, pairs, loss_type, loss_kwargs):
    args = config(tmp_path, loss_type=loss_type, loss_kwargs=loss_kwargs, max_steps=3)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs, eval_dataset=pairs)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"margin", "group_id", "segment_ids"} <= set(batch)  # Trainer must not drop our columns
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert "score.weight" in changed and any("layers" in n for n in changed)
    logged = trainer.state.log_history[0]
    for key in ("loss", "accuracy", "margin", "reward_mean", "reward_std", "accuracy_big"):
        assert np.isfinite(logged[key]), key
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_accuracy_big", "eval_accuracy_small",
                "eval_balanced_accuracy", "eval_worst_group_accuracy"):
        assert np.isfinite(metrics[key]), key
    assert metrics["eval_balanced_accuracy"] == pytest.approx(
        (metrics["eval_accuracy_big"] + metrics["eval_accuracy_small"]) / 2
    )
    assert metrics["eval_worst_group_accuracy"] == min(metrics["eval_accuracy_big"], metrics["eval_accuracy_small"])
    if loss_kwargs.get("group_dro"):
        units = trainer.balance.summary()["units"]
        weights = {k: v for k, v in logged.items() if k.startswith("unit_weight_")}
        assert len(weights) == len(units) >= 2
        mix = trainer.balance.mix
        assert float(mix.sum()) == pytest.approx(1.0) and not torch.allclose(mix, balance_start(trainer))


def balance_start(trainer):
    from hf_balanced_reward.balancing import unit_mixture
    return unit_mixture(trainer.balance.unit_sizes, trainer.balance.options.weighting)


def test_encoder_model_trains(tmp_path, tokenizer, pairs):
    model = tiny_bert(tokenizer)
    trainer = BalancedRewardTrainer(model=model, args=config(tmp_path, max_steps=2), train_dataset=pairs,
                                    processing_class=tokenizer)
    before = model.classifier.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.classifier.weight)


@pytest.mark.parametrize("loss_type", ["bradley_terry", "balanced"])
def test_gradient_accumulation_matches_the_large_batch(tmp_path, model_dir, pairs, loss_type):
    def one_step(batch_size, accumulation):
        args = config(tmp_path, loss_type=loss_type, max_steps=1, optim="sgd", learning_rate=1.0,
                      per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                      train_sampling_strategy="sequential")
        trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer.state.log_history[0]

    large, large_log = one_step(8, 1)
    small, small_log = one_step(2, 4)
    for name in large:
        torch.testing.assert_close(small[name], large[name], atol=1e-6, rtol=1e-5)
    assert small_log["loss"] == pytest.approx(large_log["loss"], rel=1e-5)


@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_equals_trl_reward_trainer(tmp_path, tokenizer, center):
    model = tiny_llama(tokenizer, seed=3)
    data = Dataset.from_list([
        {"chosen_ids": tokenizer("Hello world, how are")["input_ids"], "rejected_ids": tokenizer("No")["input_ids"],
         "margin": 0.5},
        {"chosen_ids": tokenizer("Sure")["input_ids"], "rejected_ids": tokenizer("quick brown fox")["input_ids"],
         "margin": 0.0},
    ])
    trl_args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False,
                            gradient_checkpointing=False, center_rewards_coefficient=center)
    trl_trainer = RewardTrainer(model=model, args=trl_args, train_dataset=data, processing_class=tokenizer)
    trl_batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(list(data))
    model.eval()
    with torch.no_grad():
        trl_loss, trl_outputs = trl_trainer.compute_loss(model, dict(trl_batch), return_outputs=True)
    for shared_prompt in (False, True):  # the plain layout is trl's batch exactly; the packed one gives the same
        args = config(tmp_path, group_column=None, center_rewards_coefficient=center, shared_prompt=shared_prompt)
        ours = BalancedRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        batch = ours.data_collator([ours.train_dataset[i] for i in range(2)])
        if not shared_prompt:
            assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
        with torch.no_grad():
            loss, rewards = ours.compute_loss(model, batch, return_outputs=True)
        torch.testing.assert_close(rewards["rewards"].T.reshape(-1), trl_outputs.logits.squeeze(-1))
        torch.testing.assert_close(loss, trl_loss)


def test_eval_accuracy_counts_pairs_exactly_across_uneven_batches(tmp_path, model_dir, pairs):
    received = {}

    def user_metrics(prediction):
        chosen, rejected = prediction.predictions
        received["shapes"] = (chosen.shape, rejected.shape)
        return {"top_chosen": float(chosen.max())}

    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, per_device_eval_batch_size=5),
                                    eval_dataset=pairs, compute_metrics=user_metrics)
    metrics = trainer.evaluate()
    trainer.model.eval()
    correct = []
    with torch.no_grad():
        for example in trainer.eval_dataset:  # one pair at a time: no batching at all
            chosen, rejected = score_batch(trainer.model, trainer.data_collator([example]))[0].unbind(1)
            correct.append(bool(chosen > rejected))
    assert metrics["eval_accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert received["shapes"] == ((len(pairs),), (len(pairs),))
    assert "eval_top_chosen" in metrics


def test_custom_loss_fn(tmp_path, model_dir, pairs):
    def squared(chosen_rewards, rejected_rewards, margin=None):
        return (1 - (chosen_rewards - rejected_rewards)) ** 2

    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, max_steps=1), train_dataset=pairs,
                                    loss_fn=squared)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss, rewards = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    chosen, rejected = rewards["rewards"].unbind(1)
    assert loss.item() == pytest.approx(((1 - (chosen - rejected)) ** 2).mean().item())

    trainer.loss_fn = lambda chosen_rewards, rejected_rewards, margin=None: chosen_rewards.sum()
    with pytest.raises(ValueError, match=r"must return one loss per pair, shape \(4,\); it returned shape \(\)"):
        trainer.compute_loss(trainer.model, batch)


def test_loss_kwargs_are_checked_against_a_custom_loss(tmp_path, model_dir, pairs):
    def scaled(chosen_rewards, rejected_rewards, margin=None, scale=1.0):
        return scale * LOSSES["bradley_terry"](chosen_rewards, rejected_rewards, margin)

    with pytest.raises(ConfigError, match=r"unknown option 'hinge_margin' for loss 'scaled'"):
        args = config(tmp_path, loss_type="hinge", loss_kwargs={"hinge_margin": 1.0})
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs, loss_fn=scaled)


def test_trl_reward_config_is_accepted(tmp_path, model_dir, pairs):
    trl_args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, max_steps=1,
                            gradient_checkpointing=False, center_rewards_coefficient=0.01, max_length=64)
    trainer = BalancedRewardTrainer(model=model_dir, args=trl_args, train_dataset=pairs)
    assert isinstance(trainer.args, BalancedRewardConfig)
    assert trainer.args.center_rewards_coefficient == 0.01 and trainer.args.max_length == 64
    trainer.train()


PROBE_KEYS = ("probe_accuracy", "probe_accuracy_without_prompt", "probe_prompt_use", "probe_on_topic_random",
              "probe_on_topic_nearest", "probe_padding_rise_rate", "probe_padding_mean_rise")


def test_exploit_probes_are_evaluated_when_asked(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, exploit_probes=True),
                                    eval_dataset={"a": pairs, "b": pairs.select(range(12))})
    metrics = trainer.evaluate()
    for name in ("a", "b"):
        assert all(0 <= metrics[f"eval_{name}_{key}"] <= 1 for key in PROBE_KEYS[:-2])
    # The probe's plain accuracy scores the texts as a client does: the evaluation's own accuracy on the same pairs.
    assert metrics["eval_a_probe_accuracy"] == pytest.approx(metrics["eval_a_accuracy"])
    logged = [log for log in trainer.state.log_history if "eval_a_probe_on_topic_random" in log]
    assert len(logged) == 1
    assert set(PROBE_KEYS) <= {k[len("eval_"):] for k in trainer.evaluate(pairs)}  # a set given to evaluate()
    plain = BalancedRewardTrainer(model=model_dir, args=config(tmp_path), eval_dataset=pairs)
    assert not any("probe" in key for key in plain.evaluate())


def test_trl_metric_names_are_logged(tmp_path, model_dir, pairs):
    """A dashboard built on trl.RewardTrainer's logs reads a run of this trainer: num_tokens (both texts of every
    pair, prompt counted in each, since the start), min/mean/max_reward; per-group names only when there are groups."""
    args = config(tmp_path, group_column=None, max_steps=-1, num_train_epochs=1, logging_steps=6,
                  eval_strategy="epoch")
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs, eval_dataset=pairs)
    trainer.train()
    train_logs = [log for log in trainer.state.log_history if "num_tokens" in log]
    expected_tokens = sum(len(s) for e in trainer.train_dataset for s in e["completion_ids"])
    assert [log["num_tokens"] for log in train_logs] == [expected_tokens]  # 6 steps x 4 pairs: the whole set
    log = train_logs[0]
    assert log["min_reward"] <= log["mean_reward"] <= log["max_reward"]
    assert log["mean_reward"] == log["reward_mean"]
    evaluation = [log for log in trainer.state.log_history if "eval_accuracy" in log][-1]
    assert evaluation["eval_min_reward"] <= evaluation["eval_mean_reward"] <= evaluation["eval_max_reward"]
    logged_keys = {key for entry in trainer.state.log_history for key in entry}
    assert not logged_keys & {"accuracy_all", "eval_accuracy_all"}  # no group column: no per-group accuracy


def test_exploit_probes_use_the_pairs_that_were_scored(tmp_path, model_dir, pairs):
    """A row that preparation drops (no chosen text) is left out of the probes too, instead of breaking them."""
    rows = pairs.to_list()
    rows[3] = {**rows[3], "chosen": None}
    args = config(tmp_path, exploit_probes=True, on_bad_rows="skip")
    metrics = BalancedRewardTrainer(model=model_dir, args=args, eval_dataset=Dataset.from_list(rows)).evaluate()
    assert metrics["eval_pairs"] == 23
    assert metrics["eval_probe_accuracy"] == pytest.approx(metrics["eval_accuracy"])


def test_every_private_trainer_method_overridden_is_checked_at_import():
    """The import-time check (a transformers that renamed a private Trainer method would silently skip the
    override) covers every private Trainer method the class overrides, and each exists in the installed Trainer."""
    from transformers import Trainer

    from hf_balanced_reward.trainer import PRIVATE_OVERRIDES

    overridden = {name for name in vars(BalancedRewardTrainer) if name.startswith("_") and not name.startswith("__")
                  and callable(getattr(Trainer, name, None))}
    assert overridden == set(PRIVATE_OVERRIDES)
