"""`TrainerCallback`s that watch a run: reward scale drift, and stopping cleanly on SIGINT / SIGTERM.

NaN / inf losses are caught in `BalancedRewardTrainer.compute_loss`, not here: a callback only hears of a step after
the optimizer has applied it, too late to keep the last good weights.
"""

import logging
import signal
import threading

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
