"""Metrics in TensorBoard, eval_strategy, the model card, and what push_to_hub would upload (the reward drift
callback: test_callbacks.py)."""

import glob
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer
from hf_balanced_reward.cli import main


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                    per_device_eval_batch_size=8, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0,
                    group_column="source", max_steps=4)
    return BalancedRewardConfig(**{**defaults, **kwargs})


def test_reward_metrics_reach_tensorboard(tmp_path, model_dir, pairs, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = config(tmp_path, report_to=["tensorboard"], eval_strategy="steps", eval_steps=2)
    BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs, eval_dataset=pairs).train()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/accuracy", "train/accuracy_big", "train/reward_mean", "train/reward_std", "train/margin",
                "eval/accuracy", "eval/accuracy_ci_low", "eval/worst_group_accuracy", "eval/balanced_accuracy",
                "eval/length_baseline_accuracy", "eval/calibration_error"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("eval/accuracy")] == [2, 4]


@pytest.mark.parametrize("strategy,epochs", [("no", []), ("epoch", [1.0, 2.0])])
def test_eval_strategy_is_honoured_as_trainer_honours_it(tmp_path, model_dir, pairs, strategy, epochs):
    args = config(tmp_path, max_steps=-1, num_train_epochs=2, eval_strategy=strategy)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs, eval_dataset=pairs)
    trainer.train()
    assert [log["epoch"] for log in trainer.state.log_history if "eval_accuracy" in log] == epochs


@pytest.fixture
def trained(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, loss_type="balanced", eval_strategy="epoch"),
                                    train_dataset=pairs, eval_dataset=pairs)
    trainer.train()
    return trainer


def test_model_card_states_the_measured_numbers(trained, pairs_file, model_dir):
    out = trained.args.output_dir
    main(["evaluate", "--model", model_dir, "--dataset", pairs_file, "--output_dir", out, "--group_column", "source"])
    trained.save_model()
    text = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert text.startswith("---\n")
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-classification"
    assert {"reward-model", "hf_balanced_reward", "balanced"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # a local path is not a Hub id; the Hub would reject it
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.pipeline_tag == "text-classification"
    with open(os.path.join(out, "eval_report.json")) as f:
        report = json.load(f)
    assert f"| accuracy | {report['accuracy']:.4f} |" in text
    assert f"| always prefer the longer response | {report['length_baseline_accuracy']:.4f} |" in text
    assert "| loss | balanced |" in text and "| training pairs | 24 |" in text
    slopes = trained.balance.summary()["length_slopes"]
    assert f"big {slopes['big']:+.3f}, small {slopes['small']:+.3f}" in text  # the fitted length slopes
    assert "| length-balanced accuracy (mean over group x length cells) | " in text
    for path in report["plots"].values():
        assert f"]({path})" in text
    assert 'pipeline("text-classification"' in text and "reward_funcs=" in text
    assert f"\n# Reward model: {os.path.basename(model_dir)} trained with the balanced loss\n" in text  # not "out"
    assert f"| base model | {os.path.basename(model_dir)} (a local folder) |" in text
    assert "| epochs | 3" not in text  # 4 steps ran, not num_train_epochs' 3 epochs


def test_model_card_without_an_evaluate_report_uses_the_last_eval(trained):
    trained.save_model()
    text = open(os.path.join(trained.args.output_dir, "README.md"), encoding="utf-8").read()
    last_eval = [log for log in trained.state.log_history if "eval_accuracy" in log][-1]
    assert f"| accuracy | {last_eval['eval_accuracy']:.4f} |" in text
    assert "![" not in text  # no plots were made


def test_push_to_hub_uploads_exactly_the_loadable_files(trained, tmp_path, monkeypatch, tokenizer):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return SimpleNamespace(repo_id=f"me/{repo_id}")

    def upload_folder(self, **kwargs):
        calls["upload"] = kwargs

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    trained.push_to_hub()
    upload = calls["upload"]
    assert upload["repo_id"] == "me/out" and upload["folder_path"] == trained.args.output_dir
    pushed = upload["allow_patterns"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(pushed)
    assert not any(name.endswith((".bin", ".pt", ".pth")) or "checkpoint" in name or "results" in name
                   for name in pushed)
    assert "me/out" in open(os.path.join(trained.args.output_dir, "README.md")).read()

    hub_copy = tmp_path / "hub_copy"  # what a user downloading the repo gets
    for name in pushed:
        os.makedirs(os.path.dirname(hub_copy / name), exist_ok=True)
        shutil.copy(os.path.join(trained.args.output_dir, name), hub_copy / name)
    model = AutoModelForSequenceClassification.from_pretrained(hub_copy).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(hub_copy)
    ids = loaded_tokenizer("Question 1: please help me write an email? Sure.", return_tensors="pt")
    trained.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, trained.model(**ids).logits)
    assert not glob.glob(str(hub_copy / "*.bin"))
