"""`TrainerCallback`s that watch a run: reward scale drift, stopping cleanly on SIGINT / SIGTERM, and making a
skipped non-finite batch (nan_policy: skip) change nothing, and clearing the gradients of the trainable
parameters beside the model (length head, log_tie).

NaN / inf losses are caught in `BalancedRewardTrainer.compute_loss`, not here: a callback only hears of a step after
the optimizer has applied it, too late to keep the last good weights.
"""

import functools
import logging
import signal
import threading
import types

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class StopOnSignal(TrainerCallback):
    """On SIGINT or SIGTERM: finish the current step, save a checkpoint and stop training.

    The handler only records the signal; the step ends normally, so the checkpoint is a consistent state. A second
    signal acts as it would without this callback (Ctrl-C twice stops at once). With several processes the flag is
    summed across them, so every rank saves and stops at the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: int | None = None
        self.stopped_at_step: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self.stopped_at_step = None, None
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor(float(self.received is not None), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if flag.item():
            name = signal.Signals(self.received).name if self.received else "a stop signal on another process"
            logger.warning(f"{name} received: saving a checkpoint at step {state.global_step} and stopping.")
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class RewardDriftCallback(TrainerCallback):
    """Warns when the logged training rewards drift: |reward_mean| or reward_std beyond `limit`.

    Bradley-Terry only fixes reward differences, so the scale can wander; a reward model whose scores run to the
    hundreds makes PPO / GRPO unstable. The warning names the step and the fix (center_rewards_coefficient).
    """

    def __init__(self, limit: float):
        self.limit = limit
        self.warned_at: list[int] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        mean, std = logs.get("reward_mean"), logs.get("reward_std")
        if mean is None or std is None:
            return
        if abs(mean) > self.limit or std > self.limit:
            self.warned_at.append(state.global_step)
            logger.warning(
                f"Reward scale drift at step {state.global_step}: reward_mean={mean:.3g}, reward_std={std:.3g} "
                f"(limit {self.limit:g}). Set center_rewards_coefficient (e.g. 0.01) to keep rewards near 0, or "
                "raise reward_drift_limit."
            )


class SkipEmptySteps(TrainerCallback):
    """nan_policy: skip, made to change nothing: a skipped micro-batch backpropagates zeros, and an optimizer step
    whose every micro-batch was skipped does not run at all.

    An optimizer step on zero gradients still moves the weights (Adam's momentum, weight decay) and its own state, so
    `guard` wraps the optimizer's `step` to do nothing for such a step. With gradient accumulation a step that trained
    some micro-batches runs, and the skipped one adds zeros to its gradient. The learning-rate scheduler still
    advances on a skipped step: the step is counted (global_step, the batches read), so the schedule stays a function
    of global_step, the same on a resumed run.

    It also keeps the losses of the micro-batches that trained, for `fix_logs`: Trainer would average a skipped
    micro-batch in as a loss of 0.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.step_batches, self.step_skipped = 0, 0  # micro-batches of the optimizer step under way
        self.steps_skipped = 0  # optimizer steps that did not run, in this train() call
        self.window = self._sums()  # since the last training log
        self.run = self._sums()  # since train() began: the final train_loss

    @staticmethod
    def _sums() -> dict:
        return {"loss": 0.0, "trained": 0, "skipped": 0}

    def batch(self, loss=None) -> None:
        """Count one training micro-batch: its loss (a per-batch mean), or None when it was skipped."""
        self.step_batches += 1
        for sums in (self.window, self.run):
            if loss is None:
                sums["skipped"] += 1
            else:  # a tensor sum: no device sync per micro-batch
                sums["loss"], sums["trained"] = sums["loss"] + loss.detach().float(), sums["trained"] + 1
        self.step_skipped += loss is None

    def guard(self, optimizer) -> None:
        """Make `optimizer.step` do nothing for a step whose every micro-batch was skipped. Wrapped before
        `accelerator.prepare`, which calls the wrapped step (also under fp16's GradScaler)."""
        if getattr(optimizer, "_skips_empty_steps", False):  # train() called again: wrapped once is enough
            return
        step = optimizer.step

        # A bound method with the wrapped one's attributes, as torch's LR schedulers expect of `optimizer.step`
        # (they wrap it themselves, and mark it): a user's scheduler made before or after this works unchanged.
        @functools.wraps(step)
        def guarded_step(_optimizer, *args, **kwargs):
            if self.step_batches and self.step_skipped == self.step_batches:
                self.steps_skipped += 1
                return None
            return step(*args, **kwargs)

        optimizer.step, optimizer._skips_empty_steps = types.MethodType(guarded_step, optimizer), True

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_batches, self.step_skipped, self.steps_skipped = 0, 0, 0
        self.window, self.run = self._sums(), self._sums()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_batches, self.step_skipped = 0, 0

    def fix_logs(self, logs: dict) -> None:
        """In a training log: the loss as the mean over the micro-batches that trained since the last log, or no
        loss when none did (a 0 would read as a perfect fit); the final train_loss likewise over the run. Logs
        with nothing skipped keep Trainer's own numbers. Every process calls this together (the skips agree)."""
        if "loss" in logs:
            window, self.window = self.window, self._sums()
            if window["skipped"]:
                self._replace(logs, "loss", window)
        if "train_loss" in logs and self.run["skipped"]:
            self._replace(logs, "train_loss", self.run)

    def _replace(self, logs: dict, key: str, sums: dict) -> None:
        if not sums["trained"]:
            del logs[key]
            return
        mean = sums["loss"] / sums["trained"]
        if self.accelerator.num_processes > 1:  # each process's mean over the same number of micro-batches
            mean = self.accelerator.reduce(mean, reduction="mean")
        logs[key] = mean.item()


class ClearOutsideGradients(TrainerCallback):
    """Trainer clears the model's gradients (`model.zero_grad()`) as training begins and after every optimizer step;
    the trainable parameters beside the model (length head, log_tie), in the optimizer but not in the model, are
    cleared here at the same points. Left alone, their gradients summed over the run: every step applied the sum of
    all earlier steps' gradients, and a resumed run (which starts from none) trained them differently from an
    uninterrupted one. `parameters`: a function giving them (a hyperparameter trial makes new ones)."""

    def __init__(self, parameters):
        self.parameters = parameters

    def clear(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None  # as model.zero_grad() leaves the model's

    def on_train_begin(self, args, state, control, **kwargs):
        self.clear()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.clear()
