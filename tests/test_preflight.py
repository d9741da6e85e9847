"""The checks `preflight.py` makes before training: the model's outputs, token ids against the vocabulary, a
writable output_dir, a usable Hub for push_to_hub, and the free disk."""

import pytest
from datasets import Dataset

from conftest import tiny_llama
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError, DataError
from test_trainer import config


def test_model_with_several_labels_is_refused(tmp_path, tokenizer, pairs):
    model = tiny_llama(tokenizer)
    model.config.num_labels = 2
    with pytest.raises(ConfigError, match=r"a reward model has one output, this model has num_labels=2"):
        BalancedRewardTrainer(model=model, args=config(tmp_path), train_dataset=pairs, processing_class=tokenizer)


def test_token_ids_outside_the_vocabulary_are_named_before_training(tmp_path, model_dir):
    rows = [{"chosen_ids": [1, 5, 6], "rejected_ids": [1, 5, 7]}, {"chosen_ids": [1, 5, 99999], "rejected_ids": [1, 8]}]
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(DataError, match=r"train dataset row 1: its sequence 0 \(a pair's chosen_ids are 0, rejected_ids "
                                        r"1\) holds token id 99999, outside the "
                                        r"model's vocabulary \(0 to \d+\); tokenise with the model's own tokenizer"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows))


def test_an_output_dir_that_cannot_be_written_is_refused_at_start(model_dir, pairs):
    args = BalancedRewardConfig(output_dir="/proc/hf_balanced_reward_run", report_to="none")
    with pytest.raises(ConfigError, match=r"output_dir '/proc/hf_balanced_reward_run' cannot be written \(.+\); "
                                          r"choose a folder you can write to"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)


def test_push_to_hub_with_the_hub_off_is_refused_before_training(tmp_path, model_dir, pairs, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none", push_to_hub=True, hub_model_id="me/rm")
    with pytest.raises(ConfigError, match=r"push_to_hub is set, but the Hub is switched off here \(HF_HUB_OFFLINE=1\)"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)


def test_push_to_hub_without_a_usable_hub_is_refused_before_training(tmp_path, model_dir, pairs, monkeypatch):
    def unreachable(self, token=None):
        raise OSError("Connection refused")

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.HfApi.whoami", unreachable)
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none", push_to_hub=True, hub_model_id="me/rm")
    with pytest.raises(ConfigError, match=r"push_to_hub is set, but the Hub cannot be used from here \(OSError: "
                                          r"Connection refused\); log in with `hf auth login`"):
        BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)


def test_too_little_free_disk_is_refused_before_training(tmp_path, model_dir, pairs, monkeypatch, caplog):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    args = BalancedRewardConfig(output_dir=str(tmp_path / "run"), report_to="none", max_steps=1, save_strategy="steps",
                                save_steps=1)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**12, 0, weights // 2))
    with pytest.raises(ConfigError, match=r"output_dir '.*run' has \d+ MiB free, and the trained model alone needs "
                                          r"\d+ MiB; free some space"):
        trainer.train()
    assert trainer.state.global_step == 0
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**12, 0, 2 * weights))
    with caplog.at_level("WARNING", logger="hf_balanced_reward"):
        trainer.train()
    assert "a checkpoint of this model (weights and optimizer state) needs about" in caplog.text
