"""Checkpoints that are complete or ignored: an atomic marker written last, and finding the last complete one."""

import json
import os

from transformers.trainer_utils import sort_checkpoints

# Written last into every checkpoint (group DRO weights, skipped batches): a checkpoint without it was cut short.
REWARD_STATE = "reward_state.json"


def write_json_atomically(path: str, value) -> None:
    """Readers see the old file or the whole new one, never half of it (the process may be killed mid-write)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def list_checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders of a run, oldest step first (Trainer's own ordering)."""
    return sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []


def is_complete_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, REWARD_STATE))
