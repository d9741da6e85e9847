"""Runs that finish or fault change nothing they should not: a resume past the end trains no step, and a run owns its
output_dir (one run at a time, no silent start over another run's checkpoints). A skipped non-finite batch:
test_callbacks.py; no resume of another run's checkpoint: test_checkpoints.py."""

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
from safetensors.torch import load_file
from transformers import TrainerCallback

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
