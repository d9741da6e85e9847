"""Evaluation metrics (hand-worked), the `evaluate` command, and its agreement with trainer.evaluate()."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer
from hf_balanced_reward.cli import main
from hf_balanced_reward.metrics import calibration, pair_metrics, wilson_interval


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_calibration_compares_confidence_with_accuracy():
    margins = np.full(10, math.log(7))  # sigmoid = 0.875: the model is 87.5% sure of every pair
    correct = np.array([True] * 5 + [False] * 5)  # and right on half of them
    ece, table = calibration(margins, correct)
    assert ece == pytest.approx(0.375)
    assert table == [{"low": pytest.approx(0.85), "high": pytest.approx(0.9), "pairs": 10,
                      "confidence": pytest.approx(0.875), "accuracy": 0.5}]
    # a negative margin is confidence in the rejected response: the same confidence, judged the same way
    assert calibration(-margins, correct)[0] == pytest.approx(0.375)


def test_pair_metrics_length_baseline_ties_and_correlation():
    chosen, rejected = np.array([2.0, 1.0, 0.5, 3.0]), np.array([1.0, 1.0, 1.5, 0.0])
    metrics = pair_metrics(chosen, rejected, [0, 0, 1, 1], ["a", "b"], chosen_lengths=[5, 1, 3, 9],
                           rejected_lengths=[1, 5, 3, 2])
    assert metrics["pairs"] == 4 and metrics["ties"] == 1
    assert metrics["accuracy"] == 0.5  # the tie counts as wrong
    assert metrics["length_baseline_accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # equal lengths: half
    rewards, lengths = np.r_[chosen, rejected], np.r_[[5, 1, 3, 9], [1, 5, 3, 2]]
    assert metrics["reward_length_correlation"] == pytest.approx(np.corrcoef(rewards, lengths)[0, 1])
    assert metrics["accuracy_a"] == 0.5 and metrics["accuracy_b"] == 0.5
    assert metrics["chosen_reward_std"] == pytest.approx(chosen.std())


def test_evaluate_command_writes_report_and_plots_and_agrees_with_the_trainer(tmp_path, model_dir, pairs_file,
                                                                                pairs, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--model", model_dir, "--dataset", pairs_file, "--group_column", "source",
                 "--output_dir", str(out), "--batch_size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "24 pairs: accuracy" in printed and "always prefer the longer response" in printed
    with open(out / "eval_report.json") as f:
        report = json.load(f)
    for key in ("pairs", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "ties", "margin", "chosen_reward_mean",
                "chosen_reward_std", "rejected_reward_mean", "rejected_reward_std", "balanced_accuracy",
                "worst_group_accuracy", "length_baseline_accuracy", "reward_length_correlation", "calibration_error",
                "groups", "calibration", "plots", "length_cells", "accuracy_big_chosen_longer",
                "within_group_length_correlation", "calibrated_accuracy"):
        assert key in report, key
    assert "length-calibrated accuracy" in printed
    assert set(report["length_cells"]) <= {f"{g} / {c}" for g in ("big", "small")
                                           for c in ("chosen_longer", "chosen_shorter", "same_length")}
    assert sum(cell["pairs"] for cell in report["length_cells"].values()) == 24
    assert len(report["plots"]) == 4
    assert report["pairs"] == 24 and set(report["groups"]) == {"big", "small"}
    for name in report["plots"].values():
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 500

    args = BalancedRewardConfig(output_dir=str(tmp_path / "t"), report_to="none", group_column="source",
                                per_device_eval_batch_size=7)
    metrics = BalancedRewardTrainer(model=model_dir, args=args, eval_dataset=pairs).evaluate()
    for key, value in report.items():
        if isinstance(value, (int, float)) and f"eval_{key}" in metrics:
            assert metrics[f"eval_{key}"] == pytest.approx(value, abs=1e-6), key
    assert {"eval_accuracy", "eval_length_baseline_accuracy", "eval_calibration_error", "eval_accuracy_big_chosen_longer",
            "eval_within_group_length_correlation"} <= set(metrics)


def test_evaluate_uses_the_max_length_the_model_was_trained_with(tmp_path, model_dir, pairs_file, capsys):
    import shutil

    saved = tmp_path / "model"
    shutil.copytree(model_dir, saved)
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "reward_max_length": 32}))
    for flags, expected in (([], 32), (["--max_length", "64"], 64)):
        out = tmp_path / f"report{expected}"
        assert main(["evaluate", "--model", str(saved), "--dataset", pairs_file, "--output_dir", str(out), *flags]) == 0
        report = json.loads((out / "eval_report.json").read_text())
        assert report["max_length"] == expected
    assert report["data"]["truncated"] == 0 and json.loads((tmp_path / "report32" / "eval_report.json").read_text())[
        "data"]["truncated"] > 0


def test_evaluate_command_usage_errors(tmp_path, capsys, model_dir):
    assert main(["evaluate", "--model", model_dir, "--dataset", str(tmp_path / "none.jsonl")]) == 2
    assert "dataset" in capsys.readouterr().err
    assert main(["evaluate", "--model", model_dir, "--datset", "x.jsonl"]) == 2
    assert "unknown option '--datset' (did you mean 'dataset'?)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "eval_report")


def test_evaluate_scores_every_pair_as_a_client_does_and_writes_predictions(tmp_path, model_dir, capsys):
    """max_length 24: some pairs only need their prompt cut, and in some a response alone is longer. By default each
    text is cut as `score` / `reward_function` cut it, so every pair is scored with the rewards a client gets;
    --long_responses drop leaves the long ones out, as training does."""
    from hf_balanced_reward.scoring import reward_function

    rows = [{"prompt": "Question: what is the capital of France?" * (1 + i % 3), "chosen": " Paris." * (1 + 5 * (i % 2)),
             "rejected": " The quick brown fox.", "source": "a" if i % 2 else "b"} for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cut"
    assert main(["evaluate", "--model", model_dir, "--dataset", str(path), "--max_length", "24", "--output_dir",
                 str(out), "--group_column", "source", "--probes", "false"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval_report.json").read_text())
    assert report["pairs"] == 8 and report["data"]["dropped"] == {}
    assert report["data"]["responses_cut"] == 4 and "4 pairs have a response longer than max_length=24" in printed
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["row"] for p in predictions] == list(range(8))
    client = reward_function(model_dir, max_length=24)
    prompts = [r["prompt"] for r in rows]
    expected_chosen = client(prompts, [r["chosen"] for r in rows])
    expected_rejected = client(prompts, [r["rejected"] for r in rows])
    assert np.allclose([p["chosen_reward"] for p in predictions], expected_chosen, atol=1e-5)
    assert np.allclose([p["rejected_reward"] for p in predictions], expected_rejected, atol=1e-5)
    assert all(p["correct"] == (p["chosen_reward"] > p["rejected_reward"]) for p in predictions)
    assert all(p["group"] == rows[p["row"]]["source"] for p in predictions)

    dropped = tmp_path / "drop"
    assert main(["evaluate", "--model", model_dir, "--dataset", str(path), "--max_length", "24", "--output_dir",
                 str(dropped), "--long_responses", "drop", "--probes", "false"]) == 0
    report = json.loads((dropped / "eval_report.json").read_text())
    assert report["pairs"] == 4 and sum(report["data"]["dropped"].values()) == 4
    assert [json.loads(line)["row"] for line in (dropped / "predictions.jsonl").read_text().splitlines()] == [0, 2, 4, 6]


def test_evaluate_into_the_models_folder_refreshes_its_card(tmp_path, model_dir, pairs, pairs_file, capsys):
    out = str(tmp_path / "rm")
    trainer = BalancedRewardTrainer(model=model_dir, args=BalancedRewardConfig(output_dir=out, report_to="none",
                                                                                max_steps=1, save_strategy="no"),
                                    train_dataset=pairs)
    trainer.train()
    trainer.save_model()
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "pairs.jsonl" not in card
    assert main(["evaluate", "--model", out, "--dataset", pairs_file, "--output_dir", out, "--probes", "false"]) == 0
    report = json.loads(open(os.path.join(out, "eval_report.json")).read())
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert f"| accuracy | {report['accuracy']:.4f} |" in card and "pairs.jsonl" in card
