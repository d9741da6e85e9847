"""One training run for tests/test_distributed.py: `python distributed_run.py ...` or under `torchrun`.

Trains the tiny model with the balanced group-DRO loss (with `lists` after the arguments: a file of lists, with
Davidson ties and a learnt tie parameter), evaluates, and writes what the test compares: rank 0 writes
result.json (losses, eval metrics, group weights); every rank writes rank<N>.json (what it holds of the shared
state), so the test can check that all ranks agree and that only rank 0 saved the model.
"""

import json
import os
import sys

import torch
from datasets import load_dataset

from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer

model_dir, data_file, output_dir, batch_size, report_dir = sys.argv[1:6]
lists = sys.argv[6:] == ["lists"]  # a file of lists: Davidson ties with a learnt tie parameter instead
data = load_dataset("json", data_files=data_file, split="train")
loss = dict(loss_type="davidson", loss_kwargs={"learn_tie": True}) if lists else dict(
    loss_type="balanced", loss_kwargs={"group_dro": True, "dro_step_size": 0.5})
args = BalancedRewardConfig(
    output_dir=output_dir, report_to="none", per_device_train_batch_size=int(batch_size), per_device_eval_batch_size=3,
    # SGD: a weight moves by lr x its gradient, so an all-reduce's rounding stays at rounding size; Adam divides by a
    # near-zero second moment in its first steps and can blow a 1e-7 gradient difference up to the learning rate.
    optim="sgd", learning_rate=0.1, logging_steps=1, save_strategy="no", seed=0, group_column="source", max_steps=4,
    use_cpu=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,  # torchrun sets WORLD_SIZE
    **loss,
)
trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=data, eval_dataset=data.select(range(23)))
trainer.train()
metrics = trainer.evaluate()
trainer.save_model()
rank = trainer.args.process_index
with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"world_size": trainer.args.world_size, "should_save": trainer.args.should_save,
               "group_sizes": None if lists else trainer.balance.unit_sizes.sum(dim=1).tolist(),
               "group_mix": None if lists else trainer.balance.mix.flatten().tolist(),
               "log_tie": trainer.log_tie.item() if trainer.log_tie is not None else None}, f)
if rank == 0:
    with open(os.path.join(report_dir, "result.json"), "w") as f:
        json.dump({"losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
                   "train_logs": [log for log in trainer.state.log_history if "loss" in log],
                   "eval": metrics, "files": sorted(os.listdir(output_dir))}, f)
# Leave the process group before exiting: gloo's threads still running at interpreter exit can abort a rank
# ("terminate called without an active exception") after all the work is done.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
