"""Runs that finish or fault change nothing they should not: a resume past the end trains no step, a skipped
non-finite batch leaves the weights and the optimizer exactly as a run that never saw it, and a run owns its
output_dir (one run at a time, no silent start over another run's checkpoints, no resume of another run's)."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from conftest import preference_rows
from test_interruptions import nan_on_call  # the NaN fault both files inject
from transformers import AutoModelForSequenceClassification, TrainerCallback

from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError
from hf_balanced_reward.checkpoints import REWARD_STATE, resolve_checkpoint
from hf_balanced_reward.run_lock import LOCK_FILE


def config(output_dir, **kwargs):
    defaults = dict(output_dir=str(output_dir), report_to="none", per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, save_strategy="no", seed=0, group_column="source", loss_type="balanced",
                    loss_kwargs={"group_dro": True, "dro_step_size": 0.5})
    return BalancedRewardConfig(**{**defaults, **kwargs})


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


# --- resume at or past the end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,last,final_model", [
    ({"max_steps": 4, "save_steps": 2}, 4, "deleted"),
    ({"num_train_epochs": 1, "save_steps": 3}, 6, "cut short"),  # 24 pairs in batches of 4: 6 steps
])
def test_resume_at_the_last_step_trains_nothing_and_saves_the_final_model(tmp_path, model_dir, pairs, caplog,
                                                                           schedule, last, final_model):
    args = config(tmp_path, save_strategy="steps", **schedule)
    first = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    first.train()
    first.save_model()
    # As if killed during the final save: checkpoint-<last> is complete, the final model gone or half written.
    if final_model == "deleted":
        for name in ("model.safetensors", "config.json"):
            os.remove(tmp_path / name)
    else:
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])

    resumed = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    with caplog.at_level(logging.WARNING, logger="hf_balanced_reward"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == last
    assert not os.path.exists(tmp_path / f"checkpoint-{last + 1}")  # Trainer alone trains one step past the end
    assert not [log for log in resumed.state.log_history if log.get("step", 0) > last]
    saved, checkpoint = weights(tmp_path), weights(tmp_path / f"checkpoint-{last}")
    assert saved.keys() == checkpoint.keys()
    assert all(torch.equal(saved[name], checkpoint[name]) for name in saved)  # the same tensors, saved again
    assert (f"checkpoint-{last} is at step {last} of {last}: nothing left to train; saved the final model in "
            f"{tmp_path}.") in caplog.text

    # Resumed once more, with the final model in place: still no step, and the model is kept as it is.
    caplog.clear()
    again = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    with caplog.at_level(logging.WARNING, logger="hf_balanced_reward"):
        again.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{last}"))
    assert not os.path.exists(tmp_path / f"checkpoint-{last + 1}")
    assert f"nothing left to train; kept the final model in {tmp_path}." in caplog.text


def test_resume_past_a_shorter_runs_end_trains_nothing(tmp_path, model_dir, pairs, caplog):
    """The same output_dir rerun with a smaller max_steps: the checkpoint is past this run's end."""
    BalancedRewardTrainer(model=model_dir, args=config(tmp_path, max_steps=4, save_strategy="steps", save_steps=4),
                          train_dataset=pairs).train()
    shorter = BalancedRewardTrainer(model=model_dir, args=config(tmp_path, max_steps=2), train_dataset=pairs)
    with caplog.at_level(logging.WARNING, logger="hf_balanced_reward"):
        shorter.train(resume_from_checkpoint=True)
    assert shorter.state.global_step == 4
    assert "checkpoint-4 is at step 4 of 2: nothing left to train; saved the final model" in caplog.text
    assert os.path.isfile(tmp_path / "model.safetensors")


# --- nan_policy: skip --------------------------------------------------------------------------------------------


def adam_config(output_dir, **kwargs):
    """Adam with weight decay (both move weights on a zero gradient), constant rate, batches in dataset order (so
    that two runs on different rows meet the same batches)."""
    return config(output_dir, loss_type="bradley_terry", loss_kwargs={}, group_column=None, optim="adamw_torch",
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


# --- a run owns its output_dir -------------------------------------------------------------------------------------


def small_run(output_dir, **kwargs):
    """2 steps, Bradley-Terry, checkpoint-2 saved."""
    options = dict(max_steps=2, save_strategy="steps", save_steps=2, loss_type="bradley_terry", loss_kwargs={})
    return config(output_dir, **{**options, **kwargs})


class HoldAtFirstStep(TrainerCallback):
    """Keeps a run (in a thread) at its first step until the test lets it go."""

    def __init__(self):
        self.training, self.release = threading.Event(), threading.Event()

    def on_step_end(self, args, state, control, **kwargs):
        self.training.set()
        assert self.release.wait(timeout=300)


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path, model_dir, pairs):
    hold = HoldAtFirstStep()
    first = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=pairs, callbacks=[hold])
    second = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=pairs)
    errors = []
    thread = threading.Thread(target=lambda: errors.extend(run_catching(first.train)))
    thread.start()
    try:
        assert hold.training.wait(timeout=300)
        with pytest.raises(ConfigError, match=rf"output_dir '{re.escape(str(tmp_path))}' is in use by another run "
                                              rf"\(pid {os.getpid()} on {re.escape(socket.gethostname())}, started "
                                              r"[-\d]+ [:\d]+\): two runs in one folder overwrite each other's "
                                              r"checkpoints\. Wait for that run to end \(or stop it\), or give this "
                                              r"run another output_dir\."):
            second.train()
    finally:
        hold.release.set()
        thread.join()
    assert not errors and first.state.global_step == 2
    assert not os.path.exists(tmp_path / LOCK_FILE)  # let go at the end of the run
    second.train(resume_from_checkpoint=True)  # the folder is free again
    assert second.state.global_step == 2


def test_holding_output_dir_keeps_it_locked_through_what_follows_train(tmp_path, model_dir, pairs):
    """The CLI's final save, metrics and model card come after train(); holding_output_dir covers them too."""
    trainer = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=pairs)
    with trainer.holding_output_dir():
        trainer.train()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()  # still held
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid "):
            BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=pairs).train(
                resume_from_checkpoint=True)
        trainer.save_model()
    assert not os.path.exists(tmp_path / LOCK_FILE)


def run_catching(function):
    try:
        function()
    except Exception as err:  # noqa: BLE001 - reported to the test's thread
        return [err]
    return []


def test_a_lock_held_by_another_process_refuses_and_one_left_by_a_killed_process_does_not(tmp_path, model_dir, pairs,
                                                                                          caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hf_balanced_reward.run_lock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        trainer = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=pairs)
        with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {holder.pid} on "):
            trainer.train()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind: the kernel dropped the lock
    with caplog.at_level(logging.INFO, logger="hf_balanced_reward"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert f"was left by pid {holder.pid} on {socket.gethostname()}, which has ended; taking it over." in caplog.text


def test_a_new_run_over_an_earlier_runs_checkpoints_is_refused_unless_told_what_to_do(tmp_path, model_dir, pairs,
                                                                                      caplog):
    BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path, max_steps=4), train_dataset=pairs).train()
    again = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=pairs)
    with pytest.raises(ConfigError, match=rf"output_dir '{re.escape(str(tmp_path))}' holds checkpoints of an earlier "
                                          r"run \(checkpoint-2, checkpoint-4\); a new run there would mix its "
                                          r"checkpoints with them\. Continue that run with resume_from_checkpoint: "
                                          r"true, start over in this folder with overwrite_output_dir: true \(its "
                                          r"checkpoints are deleted once this run has saved a checkpoint or "
                                          r"finished\), or give this run another output_dir\."):
        again.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4", "data_report.json"]  # untouched

    # overwrite_output_dir: the earlier checkpoints are set aside (resume never picks them) until this run has its own.
    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["at start"] = sorted(name for name in os.listdir(tmp_path) if "checkpoint" in name)

    hinge = small_run(tmp_path, overwrite_output_dir=True, loss_type="hinge")
    over = BalancedRewardTrainer(model=model_dir, args=hinge, train_dataset=pairs, callbacks=[Look()])
    with caplog.at_level(logging.WARNING, logger="hf_balanced_reward"):
        over.train()
    assert seen["at start"] == ["_replaced-checkpoint-2", "_replaced-checkpoint-4"]
    assert (f"overwrite_output_dir: renamed the earlier run's checkpoints in {tmp_path} (checkpoint-2, checkpoint-4) "
            "to _replaced-checkpoint-N; they are deleted once this run has saved a checkpoint or finished (move them "
            "elsewhere now to keep them).") in caplog.text
    assert sorted(name for name in os.listdir(tmp_path) if "checkpoint" in name) == ["checkpoint-2"]
    state = json.loads((tmp_path / "checkpoint-2" / REWARD_STATE).read_text())
    assert state["run"]["loss_type"] == "hinge"  # this run's, not the earlier run's checkpoint-2
    # Resuming the folder finds this run's checkpoint, not the earlier run's later checkpoint-4.
    assert resolve_checkpoint(str(tmp_path), True) == str(tmp_path / "checkpoint-2")


def test_resuming_a_checkpoint_of_another_loss_or_data_is_refused_naming_what_differs(tmp_path, model_dir, pairs,
                                                                                     caplog):
    BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=pairs).train()
    checkpoint = tmp_path / "checkpoint-2"
    fix = (r"\. Resume it with the options it was trained with; for a new run with these options, give another "
           r"output_dir \(or unset resume_from_checkpoint and set overwrite_output_dir: true\)\.$")

    as_hinge = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path, loss_type="hinge"), train_dataset=pairs)
    with pytest.raises(ConfigError, match=rf"checkpoint '{re.escape(str(checkpoint))}' is of another run: loss_type "
                                          rf"'bradley_terry' -> 'hinge'{fix}"):
        as_hinge.train(resume_from_checkpoint=True)

    fewer = Dataset.from_list(preference_rows(20))
    other_data = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=fewer)
    with pytest.raises(ConfigError, match=rf"is of another run: train_data \{{'rows': 24, 'content': '[0-9a-f]{{16}}'\}} "
                                          rf"-> \{{'rows': 20, 'content': '[0-9a-f]{{16}}'\}}{fix}"):
        other_data.train(resume_from_checkpoint=str(checkpoint))

    # The same data read from a copy of its file elsewhere (a job's scratch disk), or touched: the same run.
    copy_dir = tmp_path.parent / f"{tmp_path.name}_copy"
    copy_dir.mkdir()
    for index, name in enumerate(("a.jsonl", "b.jsonl")):
        (copy_dir / name).write_text("".join(json.dumps(r) + "\n" for r in preference_rows()))
        os.utime(copy_dir / name, (index, index))
    from datasets import load_dataset

    first, second = (load_dataset("json", data_files=str(copy_dir / name), split="train") for name in ("a.jsonl", "b.jsonl"))
    assert first._fingerprint != second._fingerprint  # what datasets calls different
    ids = [BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path), train_dataset=data).train_data_id
           for data in (first, second)]
    assert ids[0] == ids[1]

    options = small_run(tmp_path, max_length=64, seed=1, loss_kwargs={"hinge_margin": 0.5}, loss_type="hinge")
    several = BalancedRewardTrainer(model=model_dir, args=options, train_dataset=pairs)
    with pytest.raises(ConfigError, match=r"is of another run: loss_type 'bradley_terry' -> 'hinge'; loss_kwargs \{\} "
                                          r"-> \{'hinge_margin': 0\.5\}; max_length 1024 -> 64; seed 0 -> 1\. "):
        several.train(resume_from_checkpoint=True)

    # A checkpoint of an earlier version has no fingerprint: it resumes, with a warning.
    state = json.loads((checkpoint / REWARD_STATE).read_text())
    del state["run"]
    (checkpoint / REWARD_STATE).write_text(json.dumps(state))
    same = BalancedRewardTrainer(model=model_dir, args=small_run(tmp_path, max_steps=3), train_dataset=pairs)
    with caplog.at_level(logging.WARNING, logger="hf_balanced_reward"):
        same.train(resume_from_checkpoint=True)
    assert same.state.global_step == 3
    assert (f"checkpoint '{checkpoint}' records no run fingerprint (an earlier version wrote it): resuming without "
            "checking that its model, loss and data are this run's.") in caplog.text


def test_a_function_in_loss_kwargs_is_written_by_name(tmp_path):
    """loss_kwargs may hold a function (`pair_loss`): the checkpoint's fingerprint names it the same in every process
    instead of failing to write JSON."""
    from hf_balanced_reward.checkpoints import json_name, write_json_atomically
    from hf_balanced_reward.losses import hinge

    write_json_atomically(str(tmp_path / "state.json"), {"loss_kwargs": {"pair_loss": hinge}})
    assert json.loads((tmp_path / "state.json").read_text()) == {"loss_kwargs": {"pair_loss": "hf_balanced_reward.losses.hinge"}}
    assert json_name(hinge) == "hf_balanced_reward.losses.hinge"
