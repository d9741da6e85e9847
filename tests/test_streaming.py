"""Streamed datasets (datasets.IterableDataset): trained and evaluated as they stream, with the checks, counts,
balanced-loss statistics, evaluation and resume of a dataset in memory."""

import json
import os

import pytest
import torch
from datasets import Dataset, IterableDatasetDict

from conftest import preference_rows
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError, DataError


def config(tmp_path, name="out", **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / name), report_to="none", per_device_train_batch_size=4, per_device_eval_batch_size=5,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0, group_column="source", max_steps=5,
        train_sampling_strategy="sequential",  # in memory, the stream's order: the two runs see the same batches
    )
    return BalancedRewardConfig(**{**defaults, **kwargs})


def rows_with_bad_ones() -> list[dict]:
    rows = preference_rows(24)
    rows[3] = {**rows[3], "rejected": rows[3]["chosen"]}  # identical: dropped under on_bad_rows auto or skip
    rows[10] = {**rows[10], "chosen": "   "}  # an empty response (kept under auto, dropped under skip)
    return rows


def losses(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


LOSS_SETTINGS = [("bradley_terry", {}), ("balanced", {}), ("balanced", {"group_dro": True, "dro_step_size": 0.5,
                                                                          "length_expert": 1.0})]


@pytest.mark.parametrize("loss_type,loss_kwargs", LOSS_SETTINGS, ids=["bt", "balanced", "dro+expert"])
def test_streamed_run_gives_the_losses_of_the_same_data_in_memory(tmp_path, model_dir, loss_type, loss_kwargs):
    data = Dataset.from_list(rows_with_bad_ones())
    runs = {}
    for name, train in (("memory", data), ("stream", data.to_iterable_dataset())):
        args = config(tmp_path, name, loss_type=loss_type, loss_kwargs=loss_kwargs, on_bad_rows="skip")
        trainer = BalancedRewardTrainer(model_dir, args, train_dataset=train)
        trainer.train()
        runs[name] = trainer
    assert len(losses(runs["stream"])) == 5
    # Same batches, same computation: the losses agree to float32 rounding of the same operations.
    assert losses(runs["stream"]) == pytest.approx(losses(runs["memory"]), rel=1e-6, abs=1e-7)
    if loss_type == "balanced":  # the counting pass gives the statistics of the whole set, as in memory
        assert runs["stream"].balance.summary() == runs["memory"].balance.summary()
        assert runs["stream"].group_names == runs["memory"].group_names == ["big", "small"]
    for a, b in zip(runs["memory"].model.parameters(), runs["stream"].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with open(os.path.join(runs["stream"].args.output_dir, "data_report.json"), encoding="utf-8") as f:
        report = json.load(f)["train"]
    # 5 steps of 4 pairs (and the batch the loader reads ahead) reach the end of the 24 rows: the whole pass counted.
    memory_report = runs["memory"].data_report["train"]
    assert {k: report[k] for k in memory_report} == memory_report
    assert memory_report["dropped"] == {"chosen is identical to rejected (no preference to learn)": 1}
    assert memory_report["empty_responses"] == 1  # kept: with an explicit prompt an empty response is an answer


def test_bad_rows_are_counted_as_they_stream_and_stop_the_run_where_on_bad_rows_says(tmp_path, model_dir):
    rows = rows_with_bad_ones()
    stream = Dataset.from_list(rows).to_iterable_dataset()
    # Bradley-Terry needs no counting pass: rows are checked as training reads them.
    trainer = BalancedRewardTrainer(model_dir, config(tmp_path, max_steps=2), train_dataset=stream)
    trainer.train()
    report = trainer.data_report["train"]
    # 2 steps of 4 pairs (and a batch read ahead) read part of the stream, row 3 among it; the rest is not read.
    assert report["dropped"] == {"chosen is identical to rejected (no preference to learn)": 1}
    assert 9 <= report["rows"] < len(rows) and report["pairs"] == report["rows"] - 1

    rows[5] = {**rows[5], "margin": float("nan")}
    trainer = BalancedRewardTrainer(model_dir, config(tmp_path, max_steps=3), train_dataset=Dataset.from_list(rows)
                                    .to_iterable_dataset())
    with pytest.raises(DataError, match=r"train dataset row 5 \(streamed, counting from 0\): column 'margin' is NaN\. "
                       r"Fix it, or set on_bad_rows: skip"):
        trainer.train()
    # With a counting pass (balanced loss), the same row stops the run before the model is loaded.
    with pytest.raises(DataError, match=r"train dataset row 5 \(streamed"):
        BalancedRewardTrainer(model_dir, config(tmp_path, loss_type="balanced"),
                              train_dataset=Dataset.from_list(rows).to_iterable_dataset())
    with pytest.raises(DataError, match=r"train dataset row 6 \(streamed.*: column 'chosen' is empty"):
        BalancedRewardTrainer(model_dir, config(tmp_path, loss_type="balanced", on_bad_rows="error"),
                              train_dataset=Dataset.from_list(rows_with_bad_ones()[4:]).to_iterable_dataset())


def test_streamed_evaluation_is_exact(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model_dir, config(tmp_path), eval_dataset=pairs)
    in_memory = trainer.evaluate()
    streamed = trainer.evaluate(pairs.to_iterable_dataset())
    several = trainer.evaluate(IterableDatasetDict({"a": pairs.to_iterable_dataset(), "b": pairs.to_iterable_dataset()}))
    assert streamed["eval_pairs"] == len(pairs)
    for key, value in in_memory.items():
        if not key.endswith(("runtime", "per_second")):
            assert streamed[key] == pytest.approx(value, rel=1e-6), key
            assert several[key.replace("eval_", "eval_b_", 1)] == pytest.approx(value, rel=1e-6), key


def test_streamed_eval_sets_given_to_the_trainer(tmp_path, model_dir, pairs):
    evals = {"held_out": pairs.to_iterable_dataset(), "same": pairs}
    trainer = BalancedRewardTrainer(model_dir, config(tmp_path, max_steps=2), train_dataset=pairs.to_iterable_dataset(),
                                    eval_dataset=evals)
    trainer.train()  # eval_strategy "no" with a streamed train set: evaluated at the last step
    logged = [log for log in trainer.state.log_history if "eval_held_out_accuracy" in log]
    assert len(logged) == 1 and logged[0]["step"] == 2
    final = trainer.evaluate()
    assert final["eval_held_out_accuracy"] == final["eval_same_accuracy"]
    assert final["eval_held_out_pairs"] == len(pairs)


def test_streamed_training_needs_max_steps(tmp_path, model_dir, pairs):
    with pytest.raises(ConfigError, match=r"the train dataset is streamed .* so max_steps must be set: got max_steps=-1"):
        BalancedRewardTrainer(model_dir, config(tmp_path, max_steps=-1), train_dataset=pairs.to_iterable_dataset())


def test_streamed_run_resumes_at_its_position_in_the_stream(tmp_path, model_dir):
    data = Dataset.from_list(preference_rows(24))

    def run(name, resume=None):
        args = config(tmp_path, name, loss_type="balanced", loss_kwargs={"group_dro": True, "dro_step_size": 0.5},
                      save_strategy="steps", save_steps=2)
        trainer = BalancedRewardTrainer(model_dir, args, train_dataset=data.to_iterable_dataset())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run("whole")
    # A second run picks up at step 2 of the first: it must read the stream from pair 8 on, with the DRO weights
    # of step 2. Restarting the stream at its first row would give other batches and other losses.
    resumed = run("resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert len(losses(resumed)) == 5  # steps 1-2 come from the checkpoint's log history, 3-5 were trained here
    assert losses(resumed) == pytest.approx(losses(whole), rel=1e-5)
    assert resumed.balance.summary() == whole.balance.summary()
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
