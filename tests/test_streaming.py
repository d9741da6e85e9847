"""Streamed datasets (datasets.IterableDataset): trained and evaluated as they stream, with the checks, counts,
balanced-loss statistics, evaluation and resume of a dataset in memory."""

import glob
import json
import os
import re
import shutil
import sys

import pytest
import torch
import yaml
from datasets import Dataset, IterableDatasetDict

from conftest import SHARED_DATA, preference_rows
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
    args = config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = BalancedRewardTrainer(model_dir, args, train_dataset=pairs.to_iterable_dataset(), eval_dataset=evals)
    trainer.train()
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


REAL_TRAIN = os.path.join(SHARED_DATA, "preference", "train_chat.jsonl")
REAL_VALID = os.path.join(SHARED_DATA, "preference", "valid_chat.jsonl")


@pytest.mark.slow  # about 40 s: a counting pass over the 3,820 rows and a streamed evaluation of the valid set
@pytest.mark.skipif(not os.path.exists(REAL_TRAIN), reason="needs ../shared/data/preference")
def test_cli_streams_train_chat_trains_evaluates_checkpoints_and_resumes(tmp_path, model_dir, capsys):
    from safetensors.torch import load_file

    from hf_balanced_reward.cli import main

    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_name_or_path": model_dir, "dataset_name": REAL_TRAIN, "eval_dataset_name": REAL_VALID,
        "streaming": True, "group_column": "source", "loss_type": "balanced", "max_length": 256, "max_steps": 4,
        "per_device_train_batch_size": 2, "per_device_eval_batch_size": 16, "save_strategy": "steps", "save_steps": 2,
        "learning_rate": 0.01, "report_to": "none", "output_dir": str(run), "logging_steps": 1,
    }))
    assert main(["train", "--config", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "Model saved to" in out
    results = json.loads((run / "eval_results.json").read_text())
    report = json.loads((run / "data_report.json").read_text())
    # The eval set was read whole: every row is a pair scored or a row dropped (too long for 256 tokens, ...).
    assert results["eval_pairs"] == report["eval"]["pairs"] > 0
    assert report["eval"]["rows"] == sum(1 for _ in open(REAL_VALID, encoding="utf-8"))
    assert report["eval"]["pairs"] + sum(report["eval"]["dropped"].values()) == report["eval"]["rows"]
    assert report["train"]["pairs"] > 0 and sorted(glob.glob(str(run / "checkpoint-*"))) == [
        str(run / "checkpoint-2"), str(run / "checkpoint-4")]
    final = load_file(str(run / "model.safetensors"))

    # Lose the last checkpoint and the model, then resume: from step 2, reading the stream on from there.
    shutil.rmtree(run / "checkpoint-4")
    os.remove(run / "model.safetensors")
    assert main(["train", "--config", str(recipe), "--resume_from_checkpoint", "true"]) == 0
    assert json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    resumed = load_file(str(run / "model.safetensors"))
    for name, tensor in final.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_cli_refuses_to_split_a_stream(tmp_path, model_dir, pairs_file, capsys):
    from hf_balanced_reward.cli import main

    code = main(["train", "--model_name_or_path", model_dir, "--dataset_name", pairs_file, "--streaming", "true",
                 "--eval_split_ratio", "0.2", "--max_steps", "1", "--output_dir", str(tmp_path / "o"),
                 "--report_to", "none"])
    assert code == 2
    assert "eval_split_ratio=0.2 cannot split a streamed dataset" in capsys.readouterr().err
    code = main(["train", "--model_name_or_path", model_dir, "--dataset_name", pairs_file, "--streaming", "true",
                 "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    assert code == 2 and "so max_steps must be set" in capsys.readouterr().err


# --- train_sampling_strategy: group_by_length on a stream ---------------------------------------------------------


def varied_rows(n: int = 48) -> list[dict]:
    """Pairs whose lengths vary widely and not in stream order; every pair is unique (its prompt names it)."""
    return [{"prompt": f"Q{i}:" + " please" * ((7 * i) % 11), "chosen": " Sure." + " yes" * ((5 * i) % 9),
             "rejected": " No." + " no" * (i % 4), "source": "big" if i % 4 else "small"} for i in range(n)]


def pair_key(example) -> tuple:
    return tuple(map(tuple, example["completion_ids"]))


def test_length_grouped_stream_cuts_sorted_batches_from_each_buffer_in_a_seeded_order():
    from hf_balanced_reward.streaming import LengthGroupedStream

    source = [{"id": i, "length": (13 * i) % 17} for i in range(39)]
    stream = LengthGroupedStream(source, batch_size=2, seed=0, buffer_batches=4)  # buffers of 8 pairs, the last 7
    out = [e["id"] for e in stream]
    assert sorted(out) == list(range(39))  # every pair once
    for start in range(0, 39, 8):  # each buffer's pairs, and only them, cut into batches of neighbouring lengths
        buffer = out[start : start + 8]
        assert sorted(buffer) == list(range(start, min(start + 8, 39)))
        ranked = sorted(buffer, key=lambda i: source[i]["length"])  # ties keep stream order (a stable sort)
        batches = sorted(buffer[i : i + 2] for i in range(0, len(buffer), 2))
        assert batches == sorted(ranked[i : i + 2] for i in range(0, len(buffer), 2))
    # 39 = 19 x 2 + 1: the last buffer's partial batch (its longest pair) comes last, so batches stay aligned.
    assert out[-1] == max(range(32, 39), key=lambda i: (source[i]["length"], i))
    assert out != sorted(out, key=lambda i: (i // 8, source[i]["length"], i))  # batches shuffled, not in sorted order
    assert [e["id"] for e in LengthGroupedStream(source, 2, seed=0, buffer_batches=4)] == out  # same seed, same order
    assert [e["id"] for e in LengthGroupedStream(source, 2, seed=1, buffer_batches=4)] != out
    stream.set_epoch(1)
    assert [e["id"] for e in stream] != out  # another epoch, another order


def padding_of(dataloader) -> tuple[int, int]:
    """(padded cells, batches) over one pass, counting only the padding that batching adds: cells of the plain
    layout's rows that hold no token, less what each pair needs alone (its shorter response padded to the longer)."""
    padded = batches = 0
    for batch in dataloader:
        chosen, rejected = batch["attention_mask"].sum(dim=1).chunk(2)
        padded += int((batch["attention_mask"] == 0).sum()) - int((chosen - rejected).abs().sum())
        batches += 1
    return padded, batches


def test_group_by_length_batches_a_stream_by_length(tmp_path, model_dir):
    stream = Dataset.from_list(varied_rows()).to_iterable_dataset()
    args = dict(max_steps=4, shared_prompt=False, per_device_train_batch_size=4)  # plain layout: padding is visible
    grouped = BalancedRewardTrainer(model_dir, config(tmp_path, train_sampling_strategy="group_by_length", **args),
                                    train_dataset=stream)
    plain = BalancedRewardTrainer(model_dir, config(tmp_path, **args), train_dataset=stream)
    grouped_padding, batches = padding_of(grouped.get_train_dataloader())
    stream_padding, stream_batches = padding_of(plain.get_train_dataloader())
    assert batches == stream_batches == 12
    # The 48 pairs (one buffer) sorted by length and cut into 12 batches: measured 428 cells against 2,564 (the
    # order is fixed by the seed, so these are the same on every run; the sort key is the pair's unique tokens, not
    # the plain layout's width, hence not 0).
    assert grouped_padding < 0.25 * stream_padding

    pairs_seen = [pair_key(e) for e in grouped.get_train_dataloader().dataset]
    assert len(pairs_seen) == 48 and set(pairs_seen) == {pair_key(e) for e in plain.train_dataset}


def test_group_by_length_on_a_stream_trains_as_the_same_order_in_memory_and_resumes(tmp_path, model_dir):
    """The streamed batches are exactly the in-memory run's when memory holds the pairs in the stream's grouped
    order (sequential sampling): same losses and weights. The shared-prompt layout packs them (a decoder here)."""
    rows = varied_rows()

    def streamed(name, resume=None):
        args = config(tmp_path, name, train_sampling_strategy="group_by_length", max_steps=5, save_strategy="steps",
                      save_steps=2, data_seed=3)
        trainer = BalancedRewardTrainer(model_dir, args, train_dataset=Dataset.from_list(rows).to_iterable_dataset())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    stream = streamed("stream")
    assert stream.shared_prompt and "segment_ids" in next(iter(stream.get_train_dataloader()))
    memory_ids = BalancedRewardTrainer(model_dir, config(tmp_path, "ids"), train_dataset=Dataset.from_list(rows))
    index = {pair_key(e): i for i, e in enumerate(memory_ids.train_dataset)}
    order = [index[pair_key(e)] for e in stream.get_train_dataloader().dataset]
    assert order != list(range(len(rows)))  # not the stream's own order
    memory = BalancedRewardTrainer(model_dir, config(tmp_path, "memory", max_steps=5),
                                   train_dataset=Dataset.from_list([rows[i] for i in order]))
    memory.train()
    assert len(losses(stream)) == 5
    assert losses(stream) == pytest.approx(losses(memory), rel=1e-6, abs=1e-7)
    for a, b in zip(memory.model.parameters(), stream.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # Resumed at step 2, the run skips the 2 batches trained and reads on from the same seeded order.
    resumed = streamed("resumed", resume=str(tmp_path / "stream" / "checkpoint-2"))
    assert losses(resumed) == pytest.approx(losses(stream), rel=1e-5)
    for a, b in zip(stream.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["sequential", "group_by_length"])
def test_a_streamed_run_resumed_past_its_first_pass_trains_the_batches_of_the_whole_run(tmp_path, model_dir, strategy):
    """8 pairs in batches of 4 are 2 batches a pass; 5 steps are 2.5 passes. Trainer sees a stream as one epoch of
    max_steps batches, so without the stream position in the checkpoint a run resumed at step 3 skipped 3 batches of
    the first pass (which has 2) and trained steps 4-5 on the second pass from its start. Resumed at step 3 (1 batch
    into the second pass) and at step 4 (the end of the second pass: pass 1 counting from 0, as Trainer's epochs), the
    run must train exactly the whole run's batches."""
    rows = varied_rows(8)

    def run(name, resume=None):
        args = config(tmp_path, name, train_sampling_strategy=strategy, max_steps=5, save_strategy="steps",
                      save_steps=1, optim="sgd", learning_rate=0.1, data_seed=3)
        trainer = BalancedRewardTrainer(model_dir, args, train_dataset=Dataset.from_list(rows).to_iterable_dataset())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run("whole")
    assert whole.state.global_step == 5 and len(losses(whole)) == 5
    for step in (3, 4):
        state = json.loads((tmp_path / "whole" / f"checkpoint-{step}" / "reward_state.json").read_text())
        assert state["stream_position"] == {"pass": 1, "batches": step - 2}
        resumed = run(f"resumed-{step}", resume=str(tmp_path / "whole" / f"checkpoint-{step}"))
        # The same batches give the same float operations on the same weights (read back exactly from safetensors;
        # plain SGD keeps no optimizer state): measured bitwise equal, the tolerance allows only float32 reordering.
        # Resumed at the wrong batch (Trainer's skip alone), steps 4-5 logged losses 0.12-0.14 away from these.
        assert losses(resumed) == pytest.approx(losses(whole), rel=1e-5)
        for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_nan_stop_records_the_stream_position_of_the_last_good_step(tmp_path, model_dir):
    """nan_policy stop saves the last good step mid-step, after the failing step's batch was read: the checkpoint
    records the position before that batch, so the resumed run trains on it again (as it does for data in memory)."""
    from hf_balanced_reward import LOSSES
    from hf_balanced_reward.errors import TrainingStopped

    calls = []

    def nan_on_third_step(chosen_rewards, rejected_rewards, margin=None):
        if torch.is_grad_enabled():
            calls.append(1)
        per_pair = LOSSES["bradley_terry"](chosen_rewards, rejected_rewards, margin)
        return per_pair * float("nan") if len(calls) == 3 else per_pair

    stream = Dataset.from_list(varied_rows(8)).to_iterable_dataset()
    trainer = BalancedRewardTrainer(model_dir, config(tmp_path, loss_type="bradley_terry", loss_kwargs={}),
                                    train_dataset=stream, loss_fn=nan_on_third_step)
    with pytest.raises(TrainingStopped, match="at training step 3"):
        trainer.train()  # 2 batches a pass: step 3 reads the second pass's first batch
    assert trainer.stream_position == {"pass": 1, "batches": 1}
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "reward_state.json").read_text())
    assert state["stream_position"] == {"pass": 0, "batches": 2}


# --- a stream that breaks partway, and a bad row that stops a streamed run mid-training ----------------------------


def test_bad_row_mid_training_saves_a_checkpoint_and_the_resumed_run_loses_nothing(tmp_path, model_dir):
    rows = preference_rows(24)
    rows[13] = {**rows[13], "margin": float("nan")}  # on_bad_rows auto stops on it; skip drops it
    args = dict(max_steps=5, save_strategy="no", group_column="source")

    def run(name, on_bad_rows, resume=None):
        trainer = BalancedRewardTrainer(model_dir, config(tmp_path, name, on_bad_rows=on_bad_rows, **args),
                                        train_dataset=Dataset.from_list(rows).to_iterable_dataset())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    # Batches of 4: row 13 is in the 4th batch, read (with the batch the loader reads ahead) before step 3 trains.
    checkpoint = tmp_path / "stopped" / "checkpoint-2"
    with pytest.raises(DataError) as stop:
        run("stopped", "auto")
    message = str(stop.value)
    assert message.startswith("train dataset row 13 (streamed, counting from 0): column 'margin' is NaN. Fix it, or set "
                              "on_bad_rows: skip")
    assert (f"Training stopped after step 2 of 5; saved it to {checkpoint}. Resume with --resume_from_checkpoint "
            f"{checkpoint}") in message and "\n" not in message
    assert sorted(os.listdir(tmp_path / "stopped")) == ["checkpoint-2", "data_report.json"]  # save_strategy "no"
    report = json.loads((tmp_path / "stopped" / "data_report.json").read_text())["train"]
    assert report["rows"] == 14 and report["pairs"] == 13  # counted up to the bad row

    whole = run("whole", "skip")
    resumed = run("stopped", "skip", resume=str(checkpoint))  # the row dropped now: the run goes on from step 2
    assert len(losses(resumed)) == 5 and losses(resumed) == pytest.approx(losses(whole), rel=1e-5)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_malformed_line_far_into_a_streamed_file_is_a_one_line_data_error(tmp_path, model_dir, capsys):
    """`datasets` reads a .jsonl file 10 MB at a time, so a malformed line past the first 10 MB is only met
    mid-training, where `datasets` raises a bare ArrowInvalid/ValueError from deep inside the DataLoader."""
    from hf_balanced_reward.cli import main

    filler = "x" * (1 << 20)  # an extra column of 1 MB per row: 12 rows take the reader past its first 10 MB
    lines = [json.dumps({**row, "notes": filler}) for row in preference_rows(16)]
    lines.insert(12, '{"prompt": "Question 12", "chosen": ')  # line 13 of the file is cut short
    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    command = ["train", "--model_name_or_path", model_dir, "--dataset_name", str(data), "--streaming", "true",
               "--max_steps", "6", "--per_device_train_batch_size", "2", "--output_dir", str(run), "--report_to",
               "none", "--group_column", "source"]
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"hf-balanced-reward: error: could not read dataset file '{re.escape(str(data))}' as it streamed: line 13 is "
        r"not valid JSON \(Expecting value: line 1 column \d+ \(char \d+\)\); the rows before it were read\. Fix or "
        r"remove that line\. Training stopped after step (\d) of 6; saved it to (\S+)\. Resume with "
        r"--resume_from_checkpoint \S+ \(resume_from_checkpoint= in Python\): the run reads on from that step's "
        r"position in the stream\.", err)
    # The reader's first 10 MB hold rows 0-9: 5 batches of 2, and the loader reads one batch ahead of step 5.
    stopped_at = int(re.search(r"after step (\d)", err).group(1))
    assert stopped_at == 4 and (run / "checkpoint-4" / "reward_state.json").is_file()
    # The same file as a streamed eval set: evaluate() names it the same way.
    from hf_balanced_reward.data import load_preference_dataset

    trainer = BalancedRewardTrainer(model_dir, config(tmp_path, "eval"))
    with pytest.raises(DataError, match=r"could not read dataset file .*big\.jsonl' as it streamed: line 13 is not "
                                        r"valid JSON \(.*\); the rows before it were read\. Fix or remove that line\.$"):
        trainer.evaluate(load_preference_dataset(str(data), streaming=True))


def test_only_errors_of_a_dataset_reader_are_named_read_errors():
    from hf_balanced_reward.streaming import stream_read_error

    try:
        int("not a number")  # a ValueError, as a reader raises, but from elsewhere: a bug, to be shown as it is
    except ValueError as err:
        assert stream_read_error(err) is None
    assert stream_read_error(DataError("row 3: ...")) is None


TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this python")
def test_streamed_evaluation_on_two_processes_equals_one_process(tmp_path, model_dir):
    """23 pairs in global batches of 2 x 3: the last holds 5, so one process's share is short. Every pair is scored
    once (accelerate would complete the batch with pairs from the start of the stream, and count them again)."""
    from conftest import run_workers_together

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(23)))
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "streaming_run.py")
    one, two = run_workers_together([
        ([sys.executable, worker, model_dir, str(data), str(tmp_path / "r1")], tmp_path / "r1"),
        ([TORCHRUN, "--nproc_per_node", "2", "--master_port", "29521", worker, model_dir, str(data),
          str(tmp_path / "r2")], tmp_path / "r2"),
    ], CUDA_VISIBLE_DEVICES="")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["streamed"]["eval_pairs"] == two["streamed"]["eval_pairs"] == two["memory"]["eval_pairs"] == 23
    for metrics in (two["streamed"], two["memory"], one["memory"]):
        assert metrics.keys() == one["streamed"].keys()
        for key, value in one["streamed"].items():
            # Counts and accuracies are exact; a mean over the same 23 rewards summed in another order (and pairs
            # packed into other rows) differs by float32 rounding only.
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
