"""One training run for tests/test_fsdp.py: `python fsdp_run.py ...` (one plain process), or under `torchrun` with
`fsdp` (FSDP2 with the options of accelerate_configs/fsdp2.yaml, passed as TrainingArguments' fsdp_config).

    python fsdp_run.py MODEL DATA OUTPUT BATCH REPORT plain|fsdp [cpu|cuda]

Trains the tiny model with Bradley-Terry and SGD, saves it, scores 6 pairs with the trained model, and writes what
the test compares: rank 0 writes result.json (losses, those rewards, the saved files); every rank writes rank<N>.json
(how its model was wrapped and what share of the sharded weights it holds).
"""

import json
import os
import sys

import torch
import yaml
from datasets import load_dataset

from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/workers/ -> the repository


def fsdp2_yaml_options() -> dict:
    """The fsdp_config block of accelerate_configs/fsdp2.yaml: the test runs exactly what that file asks for.
    TrainingArguments takes the same keys (it strips their `fsdp_` prefix)."""
    with open(os.path.join(REPO, "accelerate_configs", "fsdp2.yaml")) as f:
        return dict(yaml.safe_load(f)["fsdp_config"])


def fsdp_on_cpu() -> None:
    """Accelerate (1.15, state.py AcceleratorState.__init__) turns an fsdp_plugin into FSDP only for MULTI_GPU and
    the other accelerator types; for MULTI_CPU it drops the plugin without a word and wraps the model in DDP. torch's
    own FSDP2 (fully_shard) runs on CPU with gloo, so put the plugin back where Accelerate would have put it."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what Accelerate does at the end

    AcceleratorState.__init__ = init


model_dir, data_file, output_dir, batch_size, report_dir, mode, *rest = sys.argv[1:]
device = rest[0] if rest else "cpu"
if mode == "fsdp" and device == "cpu":
    fsdp_on_cpu()
data = load_dataset("json", data_files=data_file, split="train")
distributed = "WORLD_SIZE" in os.environ  # set by torchrun
args = BalancedRewardConfig(
    output_dir=output_dir, report_to="none", per_device_train_batch_size=int(batch_size),
    # SGD: a weight moves by lr x its gradient (see test_distributed.py for why not Adam).
    optim="sgd", learning_rate=0.1, logging_steps=1, save_strategy="no", seed=0, max_steps=4,
    per_device_eval_batch_size=3, use_cpu=device == "cpu",
    ddp_backend="gloo" if distributed and device == "cpu" else None,
    fsdp=True if mode == "fsdp" else None, fsdp_config=fsdp2_yaml_options() if mode == "fsdp" else None,
)
trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=data, eval_dataset=data.select(range(6)))
trainer.train()
trainer.save_model()
# The trained (still sharded) model scores the first pairs; the test compares the saved file's rewards with these.
rewards = trainer.predict(trainer.eval_dataset).predictions[0].T  # [pairs, 2] -> chosen, rejected
rank = trainer.args.process_index
wrapped = trainer.model_wrapped
sharded = [p for p in wrapped.parameters() if type(p).__name__ == "DTensor"] if mode == "fsdp" else []
held = sum(p.to_local().numel() for p in sharded) / max(sum(p.numel() for p in sharded), 1)  # this rank's share
plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if mode == "fsdp" else None
with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"world_size": trainer.args.world_size, "should_save": trainer.args.should_save,
               "distributed_type": str(trainer.accelerator.distributed_type),
               "fsdp_version": getattr(plugin, "fsdp_version", None),
               "sharded_modules": sorted({type(m).__name__ for m in wrapped.modules()
                                          if type(m).__name__.startswith("FSDP")}),
               "local_shard_fraction": held}, f)
if rank == 0:
    with open(os.path.join(report_dir, "result.json"), "w") as f:
        json.dump({"losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
                   "rewards": [[float(c), float(r)] for c, r in zip(*rewards)],
                   "files": sorted(os.listdir(output_dir))}, f)
# Every rank has written its report. Leave without the interpreter's teardown: on CPU, a thread that FSDP2 over gloo
# leaves running was destroyed at exit in 2 of about 10 runs, aborting a rank after all its work was done
# ("terminate called without an active exception"), even after destroy_process_group.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
