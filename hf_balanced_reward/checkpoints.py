"""Checkpoints: the reward state written last into each one (so a checkpoint without it is known to be cut short),
finding the checkpoint to resume from, and checking that it fits this run."""

import json
import logging
import os

import torch
from safetensors import SafetensorError, safe_open
from transformers.trainer_utils import sort_checkpoints

from .config import ConfigError

logger = logging.getLogger(__name__)

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


def resolve_checkpoint(output_dir: str, resume) -> str | None:
    """A checkpoint folder to resume from: the last complete one in `output_dir` for True/"true"/"last", or the one
    named; None for no resume."""
    if resume is None or resume is False or str(resume).lower() in ("", "false", "none"):
        return None
    if resume is True or str(resume).lower() in ("true", "last"):
        checkpoints = list_checkpoints(output_dir)
        complete = [c for c in checkpoints if is_complete_checkpoint(c)]
        for unfinished in checkpoints[checkpoints.index(complete[-1]) + 1 :] if complete else checkpoints:
            logger.warning(f"Ignoring {unfinished}: unfinished, the run stopped while writing it.")
        if not complete:
            raise ConfigError(f"resume_from_checkpoint=true, but {output_dir} has no complete checkpoint to resume.")
        logger.info(f"Resuming from {complete[-1]}.")
        return complete[-1]
    if not os.path.isdir(resume):
        raise ConfigError(f"resume_from_checkpoint '{resume}' is not a checkpoint folder.")
    if not is_complete_checkpoint(resume):
        complete = [c for c in list_checkpoints(os.path.dirname(os.path.abspath(resume))) if is_complete_checkpoint(c)]
        suggestion = f"; the last complete one is {complete[-1]}" if complete else ""
        raise ConfigError(
            f"checkpoint '{resume}' is unfinished (no {REWARD_STATE}: the run stopped while writing it, or "
            f"another trainer wrote it){suggestion}."
        )
    return resume


# What `save_model` writes as weights: a model or LoRA adapters, safetensors or pickled, whole or sharded.
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def has_final_model(output_dir: str) -> bool:
    """Whether `output_dir` holds a saved model's weights that read back whole. A save cut short (a kill during the
    final save) leaves a safetensors file whose header promises more bytes than it holds: that counts as missing."""
    files = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(output_dir, f))]
    for index in SHARD_INDEXES:
        path = os.path.join(output_dir, index)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    files += sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError):
                return False
    return bool(files) and all(_readable(os.path.join(output_dir, f)) for f in files)


def _readable(path: str) -> bool:
    if not path.endswith(".safetensors"):
        return os.path.isfile(path)
    try:
        with safe_open(path, framework="pt"):
            return True
    except (SafetensorError, OSError):  # cut short, or a shard that is not there
        return False


def check_same_model(checkpoint: str, config) -> None:
    """A checkpoint of another model fails deep inside weight or optimizer loading; name the mismatch instead.
    `config` is the (unwrapped) model's config."""
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        return  # adapter checkpoints (PEFT) carry no config.json
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    ours = config.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    theirs = {k: saved.get(k) for k in keys if k in ours}
    mine = {k: ours[k] for k in theirs}
    if theirs != mine:
        raise ConfigError(
            f"checkpoint '{checkpoint}' holds a different model ({theirs}) from the one this run trains ({mine}); "
            "resume with the model it was trained from, or start the new model in another output_dir."
        )


def reward_state(balance, skipped_batches: int, stream_position: dict | None = None, length_head=None,
                 log_tie=None) -> dict:
    """What a checkpoint needs beyond Trainer's own state: the groups and their weights, the batches skipped, where a
    stream was read up to, and the trainable parameters that live outside the model (length head, log_tie)."""
    state = {"group_names": balance.group_names, "balance": balance.state_dict(), "skipped_batches": skipped_batches}
    if stream_position is not None:
        state["stream_position"] = stream_position
    if length_head is not None:
        state["length_head"] = {k: v.tolist() for k, v in length_head.state_dict().items()}
    if log_tie is not None:
        state["log_tie"] = log_tie.item()
    return state


def load_reward_state(checkpoint: str, balance, length_head=None, log_tie=None, streamed: bool = False) -> dict:
    """Restore the groups, balance, length head and log_tie that `reward_state` saved in `checkpoint`; returns the
    state for the rest (skipped batches, stream position)."""
    with open(os.path.join(checkpoint, REWARD_STATE), encoding="utf-8") as f:
        state = json.load(f)
    saved = state["group_names"]
    ours = balance.group_names
    if saved != ours and streamed and saved[: len(ours)] == ours:
        # A stream without a counting pass names its groups as they come, in stream order: the checkpoint's run
        # had seen more of them. The same stream gives them the same ids.
        balance.add_groups(saved[len(ours) :])
    if saved != balance.group_names:
        raise ConfigError(
            f"checkpoint '{checkpoint}' was trained with groups {state['group_names']}, this data has "
            f"{balance.group_names}; resume with the same data and group_column."
        )
    if "balance" in state:  # absent in checkpoints of versions before length cells: start from the fitted q
        balance.load_state_dict(state["balance"])
    if length_head is not None:
        length_head.load_state_dict({k: torch.tensor(v) for k, v in state["length_head"].items()})
    if log_tie is not None and "log_tie" in state:
        with torch.no_grad():
            log_tie.fill_(state["log_tie"])
    return state
