"""Sums over the micro-batches of a run, reduced over processes when they are used: training metrics between two
logs, and group DRO's unit losses over one optimizer step; and the check that a batch's numbers are finite."""

import torch
import torch.nn.functional as F

from .metrics import metric_name


def pad_to(totals: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Widen per-group totals when groups were added since they were started (a new eval set mid-training)."""
    return F.pad(totals, (0, num_groups - totals.shape[-1]))


def all_finite(accelerator, *tensors) -> bool:
    bad = torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any().float()
    if accelerator.num_processes > 1:  # every rank must take the same branch after this check
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


class TrainTotals:
    """Pairs, correct pairs, margin and reward sums (and per group: pairs, correct pairs, losses) since the last log."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.totals, self.group_totals = None, None
        self.num_tokens = 0  # since the start of training, over all processes (trl's num_tokens)

    def add(self, chosen, rejected, per_pair, group_ids=None, num_groups: int = 0, text_tokens=None,
            off_prompt=None) -> None:
        """`off_prompt`: with cross-prompt negatives, the reward of another prompt's response for each pair's
        prompt; counted as won when the pair's chosen response scores higher."""
        rewards = torch.cat([chosen, rejected])
        correct = (chosen > rejected).float()
        off_pairs, off_won = ((correct.new_zeros(()), correct.new_zeros(())) if off_prompt is None else
                              (correct.new_tensor(len(chosen)), (chosen > off_prompt).float().sum()))
        # trl's min_reward / max_reward: the mean over micro-batches of each one's extreme reward.
        extremes = [rewards.min(), rewards.max()] if len(rewards) else [rewards.new_zeros(()), rewards.new_zeros(())]
        # kept on the device: reading it here would wait for the GPU at every micro-batch
        tokens = text_tokens.to(correct.device, correct.dtype) if text_tokens is not None else correct.new_zeros(())
        totals = torch.stack(
            [correct.new_tensor(len(chosen)), correct.sum(), (chosen - rejected).sum(), rewards.sum(), (rewards**2).sum(),
             correct.new_tensor(float(len(rewards) > 0)), *extremes, off_pairs, off_won, tokens]
        )
        self.totals = totals if self.totals is None else self.totals + totals
        if group_ids is None:
            return
        per_group = torch.stack(
            [
                torch.bincount(group_ids, minlength=num_groups).float(),
                torch.bincount(group_ids, weights=correct, minlength=num_groups),
                torch.bincount(group_ids, weights=per_pair.detach(), minlength=num_groups),
            ]
        )
        self.group_totals = per_group if self.group_totals is None else pad_to(self.group_totals, num_groups) + per_group

    def tokens_so_far(self) -> int:
        """num_tokens including the micro-batches not yet logged, over all processes (every process must call it):
        what a checkpoint records, so a resumed run's num_tokens goes on from there."""
        pending = self.totals[-1] if self.totals is not None else torch.zeros((), device=self.accelerator.device)
        return self.num_tokens + int(self.accelerator.reduce(pending, reduction="sum").item())

    def take(self, group_names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
        """(accuracy, margin and reward scale; accuracy per group) since the last log, summed over all processes;
        the next sums start from zero."""
        totals = self.accelerator.reduce(self.totals, reduction="sum").tolist()
        pairs, correct, margin_sum, reward_sum, reward_sq_sum, batches, min_sum, max_sum, off_pairs, off_won, tokens = \
            totals
        self.num_tokens += int(tokens)
        metrics, per_group = {}, {}
        if pairs:  # lists whose completions are all tied have no pair to count
            reward_mean = reward_sum / (2 * pairs)
            metrics = {
                "accuracy": correct / pairs,
                "margin": margin_sum / pairs,
                "reward_mean": reward_mean,
                "reward_std": max(reward_sq_sum / (2 * pairs) - reward_mean**2, 0.0) ** 0.5,
                # the names trl.RewardTrainer logs, so a dashboard built on trl reads a run of this trainer
                "min_reward": min_sum / batches,
                "mean_reward": reward_mean,
                "max_reward": max_sum / batches,
            }
        if off_pairs:  # cross-prompt negatives: how often the chosen response beats another prompt's
            metrics["off_prompt_accuracy"] = off_won / off_pairs
        if tokens:
            metrics["num_tokens"] = float(self.num_tokens)
        if self.group_totals is not None and len(group_names) > 1:  # per-group names only when there are groups
            group_counts, group_correct, _ = self.accelerator.reduce(self.group_totals, reduction="sum").tolist()
            for name, count, right in zip(group_names, group_counts, group_correct):
                if count:
                    per_group[f"accuracy_{metric_name(name)}"] = right / count
        self.totals, self.group_totals = None, None
        return metrics, per_group


class UnitLosses:
    """Pairs and loss sums per balancing unit (group x length cell) over one optimizer step: group DRO's evidence."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.sums = None

    def add(self, units, per_pair, num_units: int) -> None:
        per_unit = torch.stack([torch.bincount(units, minlength=num_units).float(),
                                torch.bincount(units, weights=per_pair.detach(), minlength=num_units)])
        self.sums = per_unit if self.sums is None else pad_to(self.sums, num_units) + per_unit

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sums, pairs) per unit [groups, 3], summed over all processes; the next sums start from zero."""
        count, loss_sum = self.accelerator.reduce(self.sums, reduction="sum")
        self.sums = None
        return loss_sum.reshape(-1, 3), count.reshape(-1, 3)


def record_train_step(trainer, pairs, pair_losses, inputs, off_prompt=None) -> None:
    """Training accuracy, loss and reward scale over the batch's decisive pairs (and with `off_prompt`, rewards
    [rows] of cross-prompt negatives, how often the chosen beats them); group DRO's unit losses, and its update at
    the last micro-batch of an optimizer step."""
    decisive = pairs.valid & ~pairs.tie
    group_ids = inputs.get("group_id")
    group_ids = None if group_ids is None else group_ids[:, None].expand_as(decisive)[decisive]
    chosen, rejected, losses = pairs.chosen[decisive], pairs.rejected[decisive], pair_losses[decisive]
    off_prompt = None if off_prompt is None else off_prompt[:, None].expand_as(decisive)[decisive]
    trainer.train_totals.add(chosen, rejected, losses, group_ids, len(trainer.group_names), inputs.get("text_tokens"),
                             off_prompt)
    balance = trainer.balance
    if group_ids is not None and balance is not None and balance.options.group_dro:
        lengths = inputs["response_lengths"]
        units = balance.unit_ids(group_ids, lengths.gather(1, pairs.better)[decisive],
                                 lengths.gather(1, pairs.worse)[decisive])
        trainer.unit_losses.add(units, losses, balance.num_units)
        if trainer.accelerator.sync_gradients:
            balance.dro_update(*trainer.unit_losses.take())


def train_metrics(trainer) -> dict[str, float]:
    """Training metrics since the last log, summed over all processes: accuracy, margin, reward scale, per group;
    the learnt tie parameter; group DRO's unit weights."""
    metrics, group_accuracy = trainer.train_totals.take(trainer.group_names)
    if trainer.log_tie is not None:
        metrics["tie_parameter"] = trainer.log_tie.exp().item()
    metrics.update(group_accuracy)
    if trainer.balance is not None and trainer.balance.options.group_dro:
        for name, unit in trainer.balance.summary()["units"].items():
            metrics[f"unit_weight_{metric_name(name)}"] = unit["weight"]
    return metrics
