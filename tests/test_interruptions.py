"""Killed, interrupted and numerically broken runs: nothing lost, resume ends where an uninterrupted run ends; a
checkpoint is written whole or not at all, never rewritten in place, and a damaged one is skipped on resume."""

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import preference_rows
from hf_balanced_reward import LOSSES, BalancedRewardConfig, BalancedRewardTrainer, ConfigError
from hf_balanced_reward.checkpoints import checkpoint_damage, is_complete_checkpoint, list_checkpoints, resolve_checkpoint
from hf_balanced_reward.checkpoints import REWARD_STATE
from hf_balanced_reward.errors import TrainingStopped

STEPS = 40


def config(output_dir, **kwargs):
    defaults = dict(output_dir=str(output_dir), report_to="none", per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, save_strategy="no", seed=0, group_column="source", loss_type="balanced",
                    loss_kwargs={"group_dro": True, "dro_step_size": 0.5})
    return BalancedRewardConfig(**{**defaults, **kwargs})


def nan_on_call(bad_call):
    """Bradley-Terry, except that training call number `bad_call` returns NaN (a fault injected mid-run)."""
    calls = []

    def loss(chosen_rewards, rejected_rewards, margin=None):
        if torch.is_grad_enabled():
            calls.append(1)
        per_pair = LOSSES["bradley_terry"](chosen_rewards, rejected_rewards, margin)
        return per_pair * float("nan") if len(calls) == bad_call else per_pair

    return loss


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_nan_stops_with_a_checkpoint_that_resumes_to_the_same_weights(tmp_path, model_dir, pairs):
    options = dict(max_steps=5, loss_type="bradley_terry", loss_kwargs={})
    broken = BalancedRewardTrainer(model=model_dir, args=config(tmp_path / "run", **options), train_dataset=pairs,
                                   loss_fn=nan_on_call(3))
    with pytest.raises(TrainingStopped, match=r"non-finite loss or reward at training step 3, micro-batch 1 of 1 "
                                              r"\(loss nan, 0 of 8 rewards NaN or inf\)\. Saved the last good state "
                                              r"to .*checkpoint-2\. .*--resume_from_checkpoint .*checkpoint-2"):
        broken.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / REWARD_STATE).is_file()

    resumed = BalancedRewardTrainer(model=model_dir, args=config(tmp_path / "run", **options), train_dataset=pairs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    straight = BalancedRewardTrainer(model=model_dir, args=config(tmp_path / "straight", **options),
                                     train_dataset=pairs)
    straight.train()
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-6, rtol=0)


def test_num_tokens_goes_on_from_the_checkpoint_after_a_resume(tmp_path, model_dir, pairs):
    """trl's num_tokens counts from the start of training: a run resumed from checkpoint-3 (one step after the log of
    step 2, so one step's tokens not yet logged) logs at step 4 what an uninterrupted run logs there."""
    options = dict(max_steps=4, loss_type="bradley_terry", loss_kwargs={}, logging_steps=2, save_strategy="steps",
                   save_steps=3)

    def logged_tokens(trainer):
        return [log["num_tokens"] for log in trainer.state.log_history if "num_tokens" in log]

    straight = BalancedRewardTrainer(model=model_dir, args=config(tmp_path / "run", **options), train_dataset=pairs)
    straight.train()
    resumed = BalancedRewardTrainer(model=model_dir, args=config(tmp_path / "run", **options), train_dataset=pairs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert len(logged_tokens(straight)) == 2 and logged_tokens(straight)[0] > 0
    assert logged_tokens(resumed)[-1] == logged_tokens(straight)[-1]


def test_nan_skip_leaves_the_batch_out_and_counts_it(tmp_path, model_dir, pairs):
    args = config(tmp_path, max_steps=4, nan_policy="skip", loss_type="bradley_terry", loss_kwargs={})
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs, loss_fn=nan_on_call(2))
    trainer.train()
    assert trainer.skipped_batches == 1
    logs = [log for log in trainer.state.log_history if "learning_rate" in log]  # one per training step
    assert [log.get("skipped_batches", 0) for log in logs] == [0, 1, 1, 1]
    # Step 2 trained nothing: it logs no loss (a 0 would read as a perfect fit); the others log their batch's.
    assert "loss" not in logs[1] and all(logs[i]["loss"] > 0 for i in (0, 2, 3))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def cli_command(model_dir, pairs_file, output_dir, *extra):
    return [
        sys.executable, "-m", "hf_balanced_reward", "train", "--model_name_or_path", model_dir,
        "--dataset_name", pairs_file, "--output_dir", str(output_dir), "--max_steps", str(STEPS),
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--loss_type", "balanced",
        "--group_column", "source", "--loss_kwargs", '{"group_dro": true, "dro_step_size": 0.5}',
        "--save_steps", "2", "--logging_steps", "1", "--report_to", "none", "--seed", "0", *extra,
    ]


def start(command):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def stop_at(runs, step, delay=0.0):
    """For each (process, output_dir, signum) of `runs`, started side by side: send `signum` once the run's
    checkpoint-`step` appears (plus `delay` s), watching all of them at once; wait for each to end."""
    waiting = list(runs)
    deadline = time.time() + 120
    while waiting:
        for run in list(waiting):
            process, output_dir, signum = run
            if os.path.isdir(os.path.join(output_dir, f"checkpoint-{step}")):
                time.sleep(delay)
                process.send_signal(signum)
                waiting.remove(run)
            else:
                assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "a run never reached its checkpoint"
        time.sleep(0.005)
    for process, _, _ in runs:
        process.wait(timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir):
    """Final weights of a run that nobody stopped (module scope: shared by the tests below)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    pairs_file = root / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in preference_rows()))
    command = cli_command(model_dir, str(pairs_file), root / "out")
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return str(pairs_file), weights(root / "out")


def test_sigkill_at_a_random_step_then_resume_gives_the_same_weights(tmp_path, model_dir, uninterrupted):
    pairs_file, expected = uninterrupted
    rng = random.Random()
    # May land while checkpoint-`step` is written; from step 4 on, an earlier complete checkpoint is always there to
    # resume from (a kill inside the very first checkpoint leaves nothing to resume, and that is said, not a defect).
    step, delay = 2 * rng.randint(2, STEPS // 2 - 2), rng.uniform(0, 0.05)
    output_dir = tmp_path / "out"
    killed = start(cli_command(model_dir, pairs_file, output_dir))
    stop_at([(killed, str(output_dir), signal.SIGKILL)], step, delay)
    assert killed.returncode == -signal.SIGKILL, f"step {step}, delay {delay:.3f}"
    assert not os.path.exists(output_dir / "model.safetensors")
    resumed = subprocess.run(cli_command(model_dir, pairs_file, output_dir, "--resume_from_checkpoint", "true"),
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(output_dir), expected)


def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(tmp_path, model_dir, uninterrupted):
    """Both signals, each in its own run, side by side (most of a run is start-up, which overlaps)."""
    pairs_file, expected = uninterrupted
    signals = (signal.SIGTERM, signal.SIGINT)
    folders = {signum: tmp_path / signal.Signals(signum).name for signum in signals}
    runs = {signum: start(cli_command(model_dir, pairs_file, folders[signum])) for signum in signals}
    stop_at([(process, str(folders[signum]), signum) for signum, process in runs.items()], step=4)
    for signum, stopped in runs.items():
        _, err = stopped.communicate()
        name = signal.Signals(signum).name
        assert stopped.returncode == 128 + signum, (name, err[-3000:])
        assert "Traceback" not in err, name
        message = [line for line in err.splitlines() if line.startswith(f"hf-balanced-reward: stopped by {name}")]
        assert message and "Run the same command with --resume_from_checkpoint true to continue." in message[0]
        step = int(message[0].split("at step ")[1].split(";")[0])
        assert (folders[signum] / f"checkpoint-{step}" / REWARD_STATE).is_file()
        assert not os.path.exists(folders[signum] / "model.safetensors")  # not passed off as finished
    resumed = {signum: start(cli_command(model_dir, pairs_file, folders[signum], "--resume_from_checkpoint", "true"))
               for signum in signals}
    for signum, process in resumed.items():
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        assert_same_weights(weights(folders[signum]), expected)


def test_resume_skips_an_unfinished_checkpoint(tmp_path, model_dir, pairs, caplog):
    args = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs).train()
    os.remove(tmp_path / "checkpoint-4" / REWARD_STATE)  # as if killed while checkpoint-4 was written
    assert resolve_checkpoint(str(tmp_path), True) == str(tmp_path / "checkpoint-2")
    assert "Ignoring" in caplog.text and "checkpoint-4: unfinished" in caplog.text
    with pytest.raises(ConfigError, match=r"checkpoint '.*checkpoint-4' is unfinished .*the last complete one is "
                                          r".*checkpoint-2"):
        resolve_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-4"))
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint=true, but .* has no complete checkpoint"):
        BalancedRewardTrainer(model=model_dir, args=config(tmp_path / "empty"), train_dataset=pairs).train(
            resume_from_checkpoint=True
        )


def test_a_kill_inside_the_first_checkpoint_leaves_nothing_to_resume_and_says_so(tmp_path):
    from hf_balanced_reward.checkpoints import resolve_checkpoint

    os.makedirs(tmp_path / "checkpoint-2")  # written up to the kill: no reward_state.json, the marker written last
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint=true, but .* has no complete checkpoint to resume"):
        resolve_checkpoint(str(tmp_path), True)


# --- checkpoints are written whole, never rewritten in place, and checked before a resume ---------------------------


def saving(output_dir, **kwargs):
    options = dict(max_steps=4, save_strategy="steps", save_steps=2, loss_type="bradley_terry", loss_kwargs={})
    return config(output_dir, **{**options, **kwargs})


def assert_intact(output_dir):
    """Every checkpoint-N is complete and undamaged, and nothing half-written is left beside them."""
    for checkpoint in list_checkpoints(str(output_dir)):
        assert is_complete_checkpoint(checkpoint) and not checkpoint_damage(checkpoint), checkpoint
    assert not [name for name in os.listdir(output_dir) if name.startswith("_checkpoint-")]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, model_dir):
    """A run's folder with checkpoint-2 and checkpoint-4 (copied by each test before it damages one)."""
    output_dir = tmp_path_factory.mktemp("two_checkpoints") / "run"
    BalancedRewardTrainer(model=model_dir, args=saving(output_dir), train_dataset=Dataset.from_list(preference_rows())
                          ).train()
    return output_dir


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data), len(data) // 2


@pytest.mark.parametrize("name", ["trainer_state.json", "model.safetensors", "optimizer.pt"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(tmp_path, model_dir, pairs,
                                                                                       two_checkpoints, caplog, name):
    output_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, output_dir)
    size, cut = cut_in_half(output_dir / "checkpoint-4" / name)
    damage = f"{name} has {cut} of its {size} bytes"
    with pytest.raises(ConfigError, match=rf"checkpoint '.*checkpoint-4' is damaged \({re.escape(damage)}\); the last "
                                          r"complete one is .*checkpoint-2; resume from an intact one "
                                          r"\(resume_from_checkpoint: true picks the newest\)\.$"):
        resolve_checkpoint(str(output_dir), str(output_dir / "checkpoint-4"))

    resumed = BalancedRewardTrainer(model=model_dir, args=saving(output_dir), train_dataset=pairs)
    with caplog.at_level(logging.WARNING, logger="hf_balanced_reward"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Ignoring {output_dir / 'checkpoint-4'}: damaged ({damage})." in caplog.text
    assert f"Resuming from {output_dir / 'checkpoint-2'}, the newest intact checkpoint." in caplog.text
    assert resumed.state.global_step == 4
    assert [log["step"] for log in resumed.state.log_history if "loss" in log] == [1, 2, 3, 4]  # 3-4 trained again
    assert_intact(output_dir)  # checkpoint-4 written again, whole, in place of the damaged one
    for key, value in weights(two_checkpoints / "checkpoint-4").items():
        torch.testing.assert_close(weights(output_dir / "checkpoint-4")[key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,damage", [
    ("trainer_state.json", "trainer_state.json does not parse"),
    ("model.safetensors", "model.safetensors is cut short (its header does not read)"),
    ("optimizer.pt", "optimizer.pt is cut short (its zip directory is gone)"),
])
def test_damage_is_found_in_checkpoints_of_earlier_versions_without_recorded_sizes(tmp_path, two_checkpoints, caplog,
                                                                                   name, damage):
    output_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, output_dir)
    marker = output_dir / "checkpoint-4" / REWARD_STATE
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k not in ("files", "run")}))
    assert not checkpoint_damage(str(output_dir / "checkpoint-4"))
    cut_in_half(output_dir / "checkpoint-4" / name)
    assert resolve_checkpoint(str(output_dir), True) == str(output_dir / "checkpoint-2")
    assert f"Ignoring {output_dir / 'checkpoint-4'}: damaged ({damage})." in caplog.text


def test_with_every_checkpoint_damaged_resume_says_which_and_why(tmp_path, two_checkpoints):
    output_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, output_dir)
    for step in (2, 4):
        os.remove(output_dir / f"checkpoint-{step}" / "optimizer.pt")
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint=true, but .*run has no complete checkpoint to "
                                          r"resume; damaged: checkpoint-4 \(optimizer\.pt is missing\), checkpoint-2 "
                                          r"\(optimizer\.pt is missing\)\.$"):
        resolve_checkpoint(str(output_dir), True)


def test_a_nan_stop_right_after_a_checkpoint_of_the_same_step_leaves_it_as_written(tmp_path, model_dir, pairs):
    """save_steps writes checkpoint-2 after step 2; step 3 goes NaN before its update, so the NaN stop's state is
    step 2's again. Rewriting the checkpoint in place gave a kill during the rewrite a checkpoint marked complete
    with a cut optimizer.pt; it is now kept exactly as written."""
    written = {}

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            written[state.global_step] = {name: (open(os.path.join(folder, name), "rb").read(),
                                                 os.stat(os.path.join(folder, name)).st_ino,
                                                 os.stat(os.path.join(folder, name)).st_mtime_ns)
                                          for name in sorted(os.listdir(folder))}

    trainer = BalancedRewardTrainer(model=model_dir, args=saving(tmp_path, max_steps=5), train_dataset=pairs,
                                    loss_fn=nan_on_call(3), callbacks=[Snapshot()])
    with pytest.raises(TrainingStopped, match=r"at training step 3, .* Saved the last good state to .*checkpoint-2\."):
        trainer.train()
    assert list(written) == [2]
    folder = tmp_path / "checkpoint-2"
    assert {name: ((folder / name).read_bytes(), os.stat(folder / name).st_ino, os.stat(folder / name).st_mtime_ns)
            for name in sorted(os.listdir(folder))} == written[2]  # the same files, untouched
    assert_intact(tmp_path)


class Killed(Exception):
    """Stands for a SIGKILL: nothing after the raise runs in the save."""


@pytest.mark.parametrize("save_total_limit", [None, 1])
def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_to_resume(tmp_path, model_dir, pairs,
                                                                                 save_total_limit):
    args = saving(tmp_path / "run", max_steps=6, save_total_limit=save_total_limit)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    save_rng_state = trainer._save_rng_state

    def killed_at_step_4(output_dir):  # by now the weights, optimizer and scheduler of checkpoint-4 are written
        if trainer.state.global_step == 4:
            raise Killed
        save_rng_state(output_dir)

    trainer._save_rng_state = killed_at_step_4
    with pytest.raises(Killed):
        trainer.train()
    output_dir = tmp_path / "run"
    staged = output_dir / "_checkpoint-4.partial" / "checkpoint-4"
    assert {"model.safetensors", "optimizer.pt"} <= set(os.listdir(staged))  # half a checkpoint, out of the way
    assert sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert is_complete_checkpoint(str(output_dir / "checkpoint-2"))
    assert not checkpoint_damage(str(output_dir / "checkpoint-2"))
    assert not os.path.exists(output_dir / "_run.lock")  # let go on the way out

    resumed = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=pairs)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    assert_intact(output_dir)  # the half-written checkpoint-4 deleted, checkpoint-4 and 6 written whole
    expected = ["checkpoint-6"] if save_total_limit == 1 else ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-")) == expected
    straight = BalancedRewardTrainer(model=model_dir, args=saving(tmp_path / "straight", max_steps=6),
                                     train_dataset=pairs)
    straight.train()
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-6, rtol=0)


def kill_inside_a_checkpoint(process, output_dir, after: int, delay: float) -> None:
    """SIGKILL `process` `delay` s after it starts writing a checkpoint past step `after` (the hidden
    _checkpoint-N.partial folder appears); if the run ends first, nothing is sent."""
    deadline = time.time() + 300
    while process.poll() is None:
        partial = [name for name in os.listdir(output_dir) if name.startswith("_checkpoint-")] \
            if os.path.isdir(output_dir) else []
        if any(int(re.search(r"\d+", name).group()) > after for name in partial):
            time.sleep(delay)
            process.kill()
            break
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(0.002)
    process.wait(timeout=120)


def test_repeated_sigkills_inside_checkpoint_writes_never_leave_a_damaged_checkpoint(tmp_path, model_dir,
                                                                                        uninterrupted):
    """Killed for real (SIGKILL) while writing a checkpoint, at a few points of the write, then resumed, three times
    over: every checkpoint-N left is complete and intact, each resume starts, and the end is the uninterrupted run."""
    pairs_file, expected = uninterrupted
    output_dir = tmp_path / "out"
    resume = []
    for after, delay in ((2, 0.0), (10, 0.01), (20, 0.03)):  # the kill lands at a different point of the write
        run = start(cli_command(model_dir, pairs_file, output_dir, *resume))
        kill_inside_a_checkpoint(run, str(output_dir), after, delay)
        assert run.returncode == -signal.SIGKILL, run.communicate()[1][-3000:]
        for checkpoint in list_checkpoints(str(output_dir)):
            assert is_complete_checkpoint(checkpoint) and not checkpoint_damage(checkpoint), checkpoint
        resume = ["--resume_from_checkpoint", "true"]
    finished = subprocess.run(cli_command(model_dir, pairs_file, output_dir, *resume), capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_intact(output_dir)
    assert_same_weights(weights(output_dir), expected)
