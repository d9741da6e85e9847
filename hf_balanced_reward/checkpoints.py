"""Checkpoints: written beside their place and renamed into it whole, the reward state written last into each one
(so a checkpoint without it is known to be cut short) with the sizes of its files and the run's fingerprint;
finding the checkpoint to resume from, and checking that it is intact and of this run."""

import hashlib
import json
import logging
import os
import shutil
import zipfile

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from safetensors import SafetensorError, safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from .config import ConfigError

logger = logging.getLogger(__name__)

# Written last into every checkpoint (group DRO weights, skipped batches): a checkpoint without it was cut short.
REWARD_STATE = "reward_state.json"
# Its keys for what defines the run (checked on resume) and the size of every other file (checked for damage).
FINGERPRINT, FILES = "run", "files"
# Hidden folders beside checkpoint-N: the one being written, and the one a newer checkpoint of that step replaces.
PARTIAL, REPLACED = ".partial", ".replaced"


def json_name(value) -> str:
    """How a value JSON cannot hold is written: a function (a loss_kwargs `pair_loss`) by its module and name, the
    same in every process; anything else as str()."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return str(value)


def write_json_atomically(path: str, value) -> None:
    """Readers see the old file or the whole new one, never half of it (the process may be killed mid-write)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=json_name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def list_checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders of a run, oldest step first (Trainer's own ordering)."""
    return sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []


def is_complete_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, REWARD_STATE))


def wants_resume(resume) -> bool:
    return not (resume is None or resume is False or str(resume).lower() in ("", "false", "none"))


def resolve_checkpoint(output_dir: str, resume) -> str | None:
    """A checkpoint folder to resume from: the newest complete and intact one in `output_dir` for True/"true"/"last",
    or the one named; None for no resume."""
    if not wants_resume(resume):
        return None
    if resume is True or str(resume).lower() in ("true", "last"):
        checkpoints = list_checkpoints(output_dir)
        complete = [c for c in checkpoints if is_complete_checkpoint(c)]
        for unfinished in checkpoints[checkpoints.index(complete[-1]) + 1 :] if complete else checkpoints:
            logger.warning(f"Ignoring {unfinished}: unfinished, the run stopped while writing it.")
        damaged = []
        for checkpoint in reversed(complete):
            if problems := checkpoint_damage(checkpoint):
                logger.warning(f"Ignoring {checkpoint}: damaged ({'; '.join(problems)}).")
                damaged.append(f"{os.path.basename(checkpoint)} ({'; '.join(problems)})")
                continue
            if damaged:
                logger.warning(f"Resuming from {checkpoint}, the newest intact checkpoint.")
            logger.info(f"Resuming from {checkpoint}.")
            return checkpoint
        detail = f"; damaged: {', '.join(damaged)}" if damaged else ""
        raise ConfigError(f"resume_from_checkpoint=true, but {output_dir} has no complete checkpoint to resume{detail}.")
    if not os.path.isdir(resume):
        raise ConfigError(f"resume_from_checkpoint '{resume}' is not a checkpoint folder.")
    if not is_complete_checkpoint(resume):
        raise ConfigError(
            f"checkpoint '{resume}' is unfinished (no {REWARD_STATE}: the run stopped while writing it, or "
            f"another trainer wrote it){_last_intact(resume)}."
        )
    if problems := checkpoint_damage(resume):
        raise ConfigError(f"checkpoint '{resume}' is damaged ({'; '.join(problems)}){_last_intact(resume)}; resume "
                          "from an intact one (resume_from_checkpoint: true picks the newest).")
    return resume


def _last_intact(checkpoint: str) -> str:
    intact = [c for c in list_checkpoints(os.path.dirname(os.path.abspath(checkpoint)))
              if is_complete_checkpoint(c) and not checkpoint_damage(c)]
    return f"; the last complete one is {intact[-1]}" if intact else ""


def checkpoint_damage(path: str) -> list[str]:
    """What is damaged in a checkpoint marked complete, found cheaply: a file missing or of another size than the
    marker recorded, JSON that does not parse, a safetensors header that does not read, a torch file (a zip archive)
    whose end is gone. Disks, copies and syncs cut files short; Trainer would fail deep in loading, or not at all."""
    try:
        with open(os.path.join(path, REWARD_STATE), encoding="utf-8") as f:
            recorded = json.load(f).get(FILES, {})
    except (OSError, ValueError):
        return [f"{REWARD_STATE} does not parse"]
    problems = {}
    for name, size in recorded.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            problems[name] = f"{name} is missing"
        elif os.path.getsize(full) != size:
            problems[name] = f"{name} has {os.path.getsize(full)} of its {size} bytes"
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        problems["trainer_state.json"] = "trainer_state.json is missing"
    for root, _, names in os.walk(path):
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(root, name), path)
            if relative not in problems and (problem := _unreadable(os.path.join(root, name))):
                problems[relative] = f"{relative} {problem}"
    return list(problems.values())


def _unreadable(path: str) -> str | None:
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError):
            return "does not parse"
    elif path.endswith(".safetensors") and not _readable(path):
        return "is cut short (its header does not read)"
    elif path.endswith((".pt", ".pth", ".bin")):
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format since torch 1.6; older files are not checked
        if zipped and not zipfile.is_zipfile(path):
            return "is cut short (its zip directory is gone)"
    return None


def staging_dir(folder: str) -> str:
    """Where checkpoint `folder` (run_dir/checkpoint-N) is written before `publish_checkpoint`: Trainer names the
    checkpoint folder inside the run folder it is given, so that is run_dir/_checkpoint-N.partial/checkpoint-N ("_"
    first: Trainer's uploads to the Hub leave out names matching "_*")."""
    parent, name = os.path.split(folder)
    return os.path.join(parent, f"_{name}{PARTIAL}", name)


def publish_checkpoint(staged: str, folder: str, state: dict) -> None:
    """Make the checkpoint written in `staged` appear at `folder` whole: its files synced to disk and their sizes
    recorded in the marker, the marker written last, then one rename. A checkpoint already at `folder` (another
    run's, or a damaged one) is replaced by two renames: a kill between them leaves the newest earlier checkpoint."""
    files = {}
    for root, _, names in os.walk(staged):
        for name in sorted(names):
            path = os.path.join(root, name)
            _fsync(path)
            files[os.path.relpath(path, staged)] = os.path.getsize(path)
        _fsync(root)
    write_json_atomically(os.path.join(staged, REWARD_STATE), {**state, FILES: files})
    _fsync(staged)
    parent = os.path.dirname(folder)
    old = None
    if os.path.exists(folder):
        old = os.path.join(parent, f"_{os.path.basename(folder)}{REPLACED}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(staged, folder)
    _fsync(parent)
    os.rmdir(os.path.dirname(staged))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def remove_unpublished(run_dir: str) -> None:
    """Delete what a killed save left: checkpoints being written, and checkpoints being replaced."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith(f".{PREFIX_CHECKPOINT_DIR}-") and name.endswith((PARTIAL, REPLACED)):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a folder; its files are synced
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


# --- what defines a run -------------------------------------------------------------------------------------------


def data_identity(dataset):
    """What tells one train set from another across processes, runs and machines: a prepared Dataset's row count and
    a hash of its contents' shape (each pair's token count and group), never its path or file times (a data file
    copied to a job's scratch disk, or touched, is the same data); a stream is not read ahead to tell."""
    if dataset is None:
        return None
    if isinstance(dataset, Dataset):
        columns = [c for c in ("length", "group_id") if c in dataset.column_names]
        digest = hashlib.sha256()
        for column in columns:
            digest.update(np.asarray(dataset[column], dtype=np.int64).tobytes())
        return {"rows": len(dataset), "content": digest.hexdigest()[:16] if columns else dataset._fingerprint}
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return "stream"
    return {"rows": len(dataset)}  # a torch Dataset or a list


def check_fingerprint(checkpoint: str, ours: dict) -> None:
    """Refuse to resume a checkpoint of another run (another model, loss, data, max_length, groups or seed): it
    would go on training from a state that this run's options did not make. Names each field that differs."""
    with open(os.path.join(checkpoint, REWARD_STATE), encoding="utf-8") as f:
        saved = json.load(f).get(FINGERPRINT)
    if saved is None:
        logger.warning(f"checkpoint '{checkpoint}' records no run fingerprint (an earlier version wrote it): resuming "
                       "without checking that its model, loss and data are this run's.")
        return
    ours = json.loads(json.dumps(ours, default=json_name))  # as read back from JSON: tuples as lists
    streamed = "stream" in (saved.get("train_data"), ours.get("train_data"))  # a stream names its groups as read
    differ = [f"{key} {saved[key]!r} -> {ours[key]!r}" for key in ours
              if key in saved and saved[key] != ours[key] and not (key == "group_names" and streamed)]
    if differ:
        raise ConfigError(
            f"checkpoint '{checkpoint}' is of another run: {'; '.join(differ)}. Resume it with the options it was "
            "trained with; for a new run with these options, give another output_dir (or unset "
            "resume_from_checkpoint and set overwrite_output_dir: true)."
        )


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


def reward_state(group_names: list[str], balance, skipped_batches: int, stream_position: dict | None = None,
                 length_head=None, log_tie=None, num_tokens: int = 0) -> dict:
    """What a checkpoint needs beyond Trainer's own state: the groups, the balanced loss's weights (`balance`, None
    for other losses), the batches skipped, the tokens trained on (trl's num_tokens), where a stream was read up to,
    and the trainable parameters that live outside the model (length head, log_tie)."""
    state = {"group_names": group_names, "skipped_batches": skipped_batches, "num_tokens": num_tokens}
    if balance is not None:
        state["balance"] = balance.state_dict()
    if stream_position is not None:
        state["stream_position"] = stream_position
    if length_head is not None:
        state["length_head"] = {k: v.tolist() for k, v in length_head.state_dict().items()}
    if log_tie is not None:
        state["log_tie"] = log_tie.item()
    return state


def read_reward_state(checkpoint: str, group_names: list[str], streamed: bool = False) -> dict:
    """The state `reward_state` saved in `checkpoint`, once its groups are found to be this run's. A stream without
    a counting pass names its groups as they come, in stream order: the checkpoint's run may have seen more of them
    (the same stream gives them the same ids), which the caller adds after its own."""
    with open(os.path.join(checkpoint, REWARD_STATE), encoding="utf-8") as f:
        state = json.load(f)
    saved = state["group_names"]
    if saved != group_names and not (streamed and saved[: len(group_names)] == group_names):
        raise ConfigError(
            f"checkpoint '{checkpoint}' was trained with groups {saved}, this data has {group_names}; resume with "
            "the same data and group_column."
        )
    return state


def restore_reward_state(state: dict, balance=None, length_head=None, log_tie=None) -> None:
    """Load the balanced loss's weights, the length head and log_tie from `read_reward_state`'s state."""
    if balance is not None and "balance" in state:  # absent before length cells: start from the fitted q
        balance.load_state_dict(state["balance"])
    if length_head is not None:
        length_head.load_state_dict({k: torch.tensor(v) for k, v in state["length_head"].items()})
    if log_tie is not None and "log_tie" in state:
        with torch.no_grad():
            log_tie.fill_(state["log_tie"])
