"""What the trainer's checkpoint and resume hooks do, as functions of the trainer: a checkpoint written whole with
the reward state and the run's fingerprint, a resume that checks and restores them, a streamed run's resume position,
the save after a data stop or a non-finite loss (nan_policy), and the final model of a resume with nothing left to
train; `run_training`, which puts them around Trainer's train.

The file operations themselves (staging, publishing, reading back) are `checkpoints.py`'s."""

import logging
import os
import shutil

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpoints import (FINGERPRINT, check_fingerprint, check_same_model, has_final_model, is_complete_checkpoint,
                          publish_checkpoint, read_reward_state, resolve_checkpoint, restore_reward_state, reward_state,
                          staging_dir, write_json_atomically)
from .data import DataError, is_stream
from .errors import TrainingStopped
from .preparation import report_summary
from .run_lock import delete_set_aside
from .streaming import reading_streams

logger = logging.getLogger(__name__)


def run_fingerprint(trainer) -> dict:
    """What defines the run: written into every checkpoint, compared on resume (`checkpoints.check_fingerprint`)."""
    model = trainer.base_model_name
    if isinstance(model, str) and os.path.isdir(model):
        model = os.path.realpath(model)
    args = trainer.args
    return {"model": model, "loss_type": args.loss_type, "loss_kwargs": args.loss_kwargs,
            "train_data": trainer.train_data_id, "max_length": args.max_length,
            "group_names": list(trainer.group_names), "seed": args.seed}


def load_reward_state(trainer, checkpoint: str) -> None:
    """Check that `checkpoint` is of this model and run, then restore what Trainer's own resume does not: the groups,
    the balanced loss's state, the length head and log_tie, skipped batches, tokens and the stream position."""
    check_same_model(checkpoint, trainer.accelerator.unwrap_model(trainer.model).config)
    check_fingerprint(checkpoint, run_fingerprint(trainer))
    state = read_reward_state(checkpoint, trainer.group_names, is_stream(trainer.train_dataset))
    trainer.run_data.register_groups(state["group_names"][len(trainer.group_names):])
    restore_reward_state(state, trainer.balance, trainer.length_head, trainer.log_tie)
    trainer.skipped_batches = state["skipped_batches"]
    trainer.train_totals.num_tokens = state.get("num_tokens", 0)  # absent before versions that recorded it
    trainer.stream_state.resumed = state.get("stream_position")  # absent before versions that recorded it


def resume_position(trainer, epoch: int, batches: int, resume_from_checkpoint, max_steps: int,
                    num_train_epochs: int) -> tuple[int, int]:
    """(epoch, batches into it) to resume at, from Trainer's own answer. Trainer sees a stream as one epoch of
    max_steps x gradient_accumulation_steps batches and skips global_step x gradient_accumulation_steps batches from
    its start: past the stream's first pass, that skip runs off the end of the pass and the run goes on from the next
    pass's first batch. A streamed run resumes instead at the pass and batch its checkpoint recorded
    (`stream_position`), with that pass's epoch (group_by_length's seeded order)."""
    if is_stream(trainer.train_dataset) and not trainer.args.ignore_data_skip and resume_from_checkpoint is not None:
        if (position := trainer.stream_state.resumed) is not None:
            epoch, batches = position["pass"], position["batches"]
        else:
            logger.warning(f"checkpoint '{resume_from_checkpoint}' does not record its position in the stream (an "
                           f"earlier version wrote it): skipping {batches} batches from the stream's start, which "
                           "is the right position only if the run was still in its first pass over the stream.")
    trainer.stream_state.start(epoch, batches, trainer.state.global_step)
    if resume_from_checkpoint is not None and trainer.state.global_step >= max_steps:
        # Trainer checks for the end only after a step, so it would train one step past the end (checkpoint-5 of
        # 4). Starting after the last epoch trains none; `train` then saves the final model if it is missing.
        trainer.finished_checkpoint = resume_from_checkpoint
        return num_train_epochs, 0
    return epoch, batches


def save_checkpoint(trainer, model, trial, write) -> None:
    """Trainer's checkpoint (`write`, Trainer's own `_save_checkpoint`), written beside its place and published whole
    (`checkpoints.publish_checkpoint`), so a kill mid-write never leaves a checkpoint-N that looks complete. A step
    this run has saved (or resumed from) is not written again: it holds the same state (a NaN stop right after a
    save_steps checkpoint)."""
    args, state = trainer.args, trainer.state
    run_dir = trainer._get_output_dir(trial=trial)
    folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    if os.path.realpath(folder) in trainer.saved_here:
        logger.info(f"{folder} already holds step {state.global_step}: kept as it was written.")
        return
    staged = staging_dir(folder)
    if args.should_save:
        shutil.rmtree(os.path.dirname(staged), ignore_errors=True)  # left by a save that failed
    trainer.accelerator.wait_for_everyone()
    # Old checkpoints are rotated away (save_total_limit) and pushed only once the new one is in place.
    limit, push = args.save_total_limit, args.push_to_hub
    args.save_total_limit, args.push_to_hub, trainer.writing_to = None, False, os.path.dirname(staged)
    try:
        write(model, trial)
    finally:
        args.save_total_limit, args.push_to_hub, trainer.writing_to = limit, push, None
    best = state.best_model_checkpoint
    if best and os.path.dirname(best) == os.path.dirname(staged):  # Trainer named it where it was written
        state.best_model_checkpoint = folder
        if args.should_save:
            state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
    trainer.accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are written
    num_tokens = trainer.train_totals.tokens_so_far()  # a collective: before the main process goes on alone
    if args.should_save:
        position = trainer.stream_state.of_finished_steps(state.global_step) if is_stream(trainer.train_dataset) \
            else None
        saved = reward_state(trainer.group_names, trainer.balance, trainer.skipped_batches, position,
                             trainer.length_head, trainer.log_tie, num_tokens)
        publish_checkpoint(staged, folder, {**saved, FINGERPRINT: run_fingerprint(trainer)})
        rotate_checkpoints(output_dir=run_dir, save_total_limit=limit, best_model_checkpoint=state.best_model_checkpoint,
                           use_mtime=True)
        delete_set_aside(run_dir)
    trainer.accelerator.wait_for_everyone()  # in place before any process reads it
    trainer.saved_here.add(os.path.realpath(folder))
    if push:
        trainer._push_from_checkpoint(folder)


def run_training(trainer, train, resume_from_checkpoint, trial, **kwargs):
    """Trainer's `train` (given as `train`) with the run's state around it: the checkpoint to resume found and its
    reward state restored; data_report.json written before and (for streams, whose counts grow) after; a data stop
    saved and explained; rewards normalised when asked; the final model of a resume with nothing left to train."""
    args = trainer.args
    checkpoint = resolve_checkpoint(args.output_dir, resume_from_checkpoint)
    trainer.stream_state.resumed, trainer.finished_checkpoint = None, None
    trainer.saved_here = {os.path.realpath(checkpoint)} if checkpoint else set()
    if checkpoint:
        load_reward_state(trainer, checkpoint)
    run_dir = trainer._get_output_dir(trial)  # a trial's own folder under hyperparameter_search
    write_data_report(trainer, run_dir)
    try:
        with reading_streams():
            result = train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)
    except DataError as err:  # a bad row or unreadable line reached as the stream was read
        trainer.signal_stop.on_train_end(args, trainer.state, trainer.control)  # give back the signal handlers
        raise DataError(save_stopped_on_data(trainer, err)) from err
    finally:
        trainer.stream_state.iterator = None  # an unfinished pass's iterator holds its loader workers
    streamed = {name: report for name, report in trainer.data_report.items() if report.get("streamed")}
    if streamed and args.should_save:  # their counts grew as the rows streamed by
        for name, report in streamed.items():
            if summary := report_summary(name, report, args.on_bad_rows):
                logger.warning(summary + " (rows read in the last pass over the stream)")
        write_data_report(trainer, run_dir)
    if args.normalize_rewards:
        trainer.normalize_rewards()
    if trainer.finished_checkpoint:
        finish_without_steps(trainer, trainer.finished_checkpoint)
    if "train_loss" in result.metrics:  # `SkipEmptySteps.fix_logs` left skipped batches out of it
        result = result._replace(training_loss=result.metrics["train_loss"])
    if trainer.is_world_process_zero():  # overwrite_output_dir: the earlier run's checkpoints, now replaced
        delete_set_aside(run_dir)
    return result


def write_data_report(trainer, run_dir: str) -> None:
    """data_report.json in `run_dir` (process zero): the rows kept, cut and dropped per dataset, so far."""
    if trainer.args.should_save and trainer.data_report:
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomically(os.path.join(run_dir, "data_report.json"), trainer.data_report)


def save_stopped_on_data(trainer, err: DataError) -> str:
    """The message for a run that data stopped mid-training, after saving what it had trained.

    Data stops a step before its forward pass (Trainer reads every micro-batch of a step first) or in an evaluation
    after one: either way the weights, optimizer and scheduler are those of the last finished step, a consistent
    state to save, as a SIGTERM or NaN stop saves it. The bad row was never in a trained batch, so fixing it (or
    dropping it with on_bad_rows: skip) does not change the batches the resumed run skips."""
    step = trainer.state.global_step
    write_data_report(trainer, trainer.args.output_dir)  # the counts of the rows read up to the stop
    if step == 0:
        return f"{err} Nothing was trained yet."
    checkpoint = os.path.join(trainer._get_output_dir(trial=None), f"{PREFIX_CHECKPOINT_DIR}-{step}")
    if not is_complete_checkpoint(checkpoint):
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
    return (f"{err} Training stopped after step {step} of {trainer.state.max_steps}; saved it to {checkpoint}. "
            f"Resume with --resume_from_checkpoint {checkpoint} (resume_from_checkpoint= in Python): the run reads "
            "on from that step's position in the stream.")


def non_finite_batch(trainer, model, loss, rewards):
    """Apply nan_policy to a batch whose loss or rewards are NaN or inf (the optimizer has not stepped on it): with
    skip, the zero loss that compute_loss returns instead; with error, save the last good state and say how to go
    on from it."""
    accumulation = trainer.args.gradient_accumulation_steps
    where = (f"training step {trainer.state.global_step + 1}, micro-batch "
             f"{(trainer.micro_batches - 1) % accumulation + 1} of {accumulation} (loss {loss.item()}, "
             f"{int((~torch.isfinite(rewards.detach())).sum())} of {len(rewards)} rewards NaN or inf")
    if trainer.args.nan_policy == "skip":
        trainer.skipped_batches += 1
        trainer.skip_steps.batch(None)
        logger.warning(f"Skipped a non-finite batch at {where}) (nan_policy=skip).")
        # Zero gradients for every trainable weight: the batch counts for nothing, accumulation stays in step (and a
        # step of skipped batches only does not run: `SkipEmptySteps`).
        return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)
    trial = getattr(trainer, "_trial", None)  # a trial of hyperparameter_search saves into its own folder
    trainer._save_checkpoint(trainer.model_wrapped, trial=trial)
    checkpoint = os.path.join(trainer._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
    raise TrainingStopped(
        f"non-finite loss or reward at {where}). Saved the last good state to {checkpoint}. Lower the learning "
        f"rate, check the data or use bf16 instead of fp16, then resume with --resume_from_checkpoint "
        f"{checkpoint}; or set nan_policy: skip to leave such batches out."
    )


def finish_without_steps(trainer, checkpoint: str) -> None:
    """After a resume from a checkpoint at or past the run's last step, which trained nothing: save the final model
    if `output_dir` has none that reads back whole (a kill during the final save leaves such a run)."""
    args = trainer.args
    missing = torch.tensor(float(not has_final_model(args.output_dir)), device=args.device)
    if trainer.accelerator.num_processes > 1:  # every process saves, or none (FSDP gathers the weights to save)
        missing = trainer.accelerator.reduce(missing, reduction="sum")
    save = bool(missing.item())
    if save:
        trainer.save_model()
    logger.warning(f"{os.path.basename(os.path.normpath(checkpoint))} is at step {trainer.state.global_step} of "
                   f"{trainer.state.max_steps}: nothing left to train; {'saved' if save else 'kept'} the final model "
                   f"in {args.output_dir}.")
