"""One evaluation for tests/test_streaming.py: `python streaming_run.py ...` or under `torchrun`.

Evaluates the tiny model on a .jsonl file read as a stream and read into memory; rank 0 writes result.json with both
sets of metrics (timings left out).
"""

import json
import os
import sys

import torch

from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer
from hf_balanced_reward.data import load_preference_dataset

model_dir, data_file, report_dir = sys.argv[1:4]
args = BalancedRewardConfig(
    output_dir=os.path.join(report_dir, "out"), report_to="none", per_device_eval_batch_size=3, seed=0,
    group_column="source", use_cpu=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
)
trainer = BalancedRewardTrainer(model=model_dir, args=args)
results = {}
for name, streaming in (("streamed", True), ("memory", False)):
    metrics = trainer.evaluate(load_preference_dataset(data_file, streaming=streaming))
    results[name] = {k: v for k, v in metrics.items() if not k.endswith(("runtime", "per_second", "preparation_time"))}
results["world_size"] = trainer.args.world_size
if trainer.args.process_index == 0:
    with open(os.path.join(report_dir, "result.json"), "w") as f:
        json.dump(results, f)
# Leave the process group before exiting: gloo's threads still running at interpreter exit can abort a rank
# ("terminate called without an active exception") after all the work is done.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
