"""Loading, format detection, chat templates, tokenisation and truncation of preference pairs.

Every format trl documents for preference data is accepted:
- implicit prompt: `chosen` / `rejected` hold the full texts (or full conversations);
- explicit prompt: `prompt` / `chosen` / `rejected`;
- conversational: any of the above as lists of `{"role", "content"}` messages, rendered with the chat template;
- already tokenised: `chosen_ids` / `rejected_ids`.
Optional columns: `margin` (float, for margin-aware losses), `weight` (float, per-pair loss weight) and the
`group_column` named in the config.
"""

import logging
import os

import datasets
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from trl.data_utils import common_prefix_length, maybe_apply_chat_template, maybe_extract_prompt

from .collator import shared_prefix_length

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# A pair counts as "same length" when its responses differ by at most this fraction of the longer one.
SAME_LENGTH_TOLERANCE = 0.1
LENGTH_GROUPS = ("chosen_longer", "chosen_shorter", "same_length")
# Columns the collator reads; `length` (unique tokens of a pair) feeds train_sampling_strategy="group_by_length".
MODEL_COLUMNS = ["chosen_ids", "rejected_ids", "margin", "weight", "group_id", "length"]


class DataError(ValueError):
    """A problem with the user's data. The CLI prints its message without a traceback."""


def load_preference_dataset(name_or_path: str, split: str = "train") -> Dataset:
    """Load a hub id, a local folder (saved with `save_to_disk` or of data files), or one .jsonl/.json/.parquet/.csv."""
    try:
        if os.path.isfile(name_or_path):
            extension = os.path.splitext(name_or_path)[1].lower()
            if extension not in FILE_BUILDERS:
                raise DataError(
                    f"dataset file '{name_or_path}' has extension '{extension}'; "
                    f"use one of {', '.join(FILE_BUILDERS)}."
                )
            return load_dataset(FILE_BUILDERS[extension], data_files=name_or_path, split="train")
        if os.path.isdir(name_or_path):
            saved = any(os.path.exists(os.path.join(name_or_path, f)) for f in ("dataset_dict.json", "state.json"))
            if saved:
                loaded = load_from_disk(name_or_path)
                return select_split(loaded, split, name_or_path) if isinstance(loaded, DatasetDict) else loaded
            return load_dataset(name_or_path, split=split)
        if name_or_path.startswith((".", "/", "~")) or os.path.splitext(name_or_path)[1].lower() in FILE_BUILDERS:
            raise DataError(f"dataset '{name_or_path}' does not exist: no such file or folder.")
        return load_dataset(name_or_path, split=split)
    except DataError:
        raise
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
        cause = err.__cause__ or err
        raise DataError(f"could not load dataset '{name_or_path}' (split '{split}'): {cause}") from err


def select_split(dataset_dict: DatasetDict, split: str, name: str) -> Dataset:
    if split not in dataset_dict:
        raise DataError(f"dataset '{name}' has no split '{split}'; it has: {', '.join(dataset_dict)}.")
    return dataset_dict[split]


def check_columns(dataset: Dataset, group_column: str | None, name: str) -> None:
    """Fail early, naming the column, when a dataset cannot be preference data."""
    columns = dataset.column_names
    tokenized = {"chosen_ids", "rejected_ids"} <= set(columns)
    for column in ("chosen", "rejected"):
        if column not in columns and not tokenized:
            raise DataError(
                f"{name} dataset has no '{column}' column; its columns are {columns}. Preference data needs "
                "'chosen' and 'rejected' (full texts or message lists), optionally with 'prompt'."
            )
    if group_column is not None and group_column not in columns:
        raise DataError(
            f"group_column='{group_column}' is not a column of the {name} dataset; its columns are {columns}."
        )


def render_texts(example: dict, tokenizer, append_eos: bool) -> tuple[str, str, str]:
    """(prompt, prompt + chosen, prompt + rejected) as plain text; conversations go through the chat template."""
    pair = {key: example[key] for key in ("prompt", "chosen", "rejected") if key in example}
    pair = maybe_extract_prompt(pair)  # conversations with an implicit prompt: split off the shared messages
    pair = maybe_apply_chat_template(pair, tokenizer)
    prompt = pair.get("prompt", "")
    chosen, rejected = prompt + pair["chosen"], prompt + pair["rejected"]
    if append_eos and tokenizer.eos_token:
        chosen = chosen if chosen.endswith(tokenizer.eos_token) else chosen + tokenizer.eos_token
        rejected = rejected if rejected.endswith(tokenizer.eos_token) else rejected + tokenizer.eos_token
    return prompt, chosen, rejected


def truncate_pair(chosen_ids, rejected_ids, max_length, special_ids):
    """Fit a pair into `max_length` by cutting the shared prompt from the left, keeping its leading special tokens.

    The response ends (the scored tokens) are never cut. Returns (chosen_ids, rejected_ids, status) with status
    "kept", "truncated" or "dropped" (a response alone, with the leading special tokens, does not fit).
    """
    longest = max(len(chosen_ids), len(rejected_ids))
    if max_length is None or longest <= max_length:
        return chosen_ids, rejected_ids, "kept"
    # The shared prefix is the prompt (plus any identical opening words of the responses); never the scored token.
    shared = shared_prefix_length(chosen_ids, rejected_ids)
    lead = 0
    while lead < shared and chosen_ids[lead] in special_ids:
        lead += 1  # BOS / CLS: the encoder pools CLS, a decoder expects BOS
    excess = longest - max_length
    if excess > shared - lead:
        return chosen_ids, rejected_ids, "dropped"
    cut = slice(lead, lead + excess)
    return (
        chosen_ids[: cut.start] + chosen_ids[cut.stop :],
        rejected_ids[: cut.start] + rejected_ids[cut.stop :],
        "truncated",
    )


def length_relation(chosen_length: int, rejected_length: int) -> str:
    if abs(chosen_length - rejected_length) <= SAME_LENGTH_TOLERANCE * max(chosen_length, rejected_length):
        return "same_length"
    return "chosen_longer" if chosen_length > rejected_length else "chosen_shorter"


def tokenize_example(example, tokenizer, max_length, append_eos, group_column, special_ids):
    if "chosen_ids" in example and "rejected_ids" in example:
        chosen_ids, rejected_ids = list(example["chosen_ids"]), list(example["rejected_ids"])
    else:
        _, chosen_text, rejected_text = render_texts(example, tokenizer, append_eos)
        chosen_ids = tokenizer(chosen_text)["input_ids"]
        rejected_ids = tokenizer(rejected_text)["input_ids"]
    shared = common_prefix_length(chosen_ids, rejected_ids)
    relation = length_relation(len(chosen_ids) - shared, len(rejected_ids) - shared)
    chosen_ids, rejected_ids, status = truncate_pair(chosen_ids, rejected_ids, max_length, special_ids)
    group = str(example[group_column]) if group_column else relation
    length = len(chosen_ids) + len(rejected_ids) - shared_prefix_length(chosen_ids, rejected_ids)
    return {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "group": group, "fit": status, "length": length}


def prepare_dataset(dataset: Dataset, tokenizer, args, name: str = "train", max_length: int | None = None) -> Dataset:
    """Tokenise, truncate and label the groups of a preference dataset; report what was cut or dropped.

    The result keeps `chosen_ids`, `rejected_ids`, `group` and, when present, `margin` and `weight`.
    """
    check_columns(dataset, args.group_column, name)
    keep = [c for c in ("margin", "weight") if c in dataset.column_names]
    for column in keep:
        if not isinstance(dataset.features[column], datasets.Value) or not dataset.features[column].dtype.startswith(
            ("float", "int")
        ):
            raise DataError(f"{name} dataset column '{column}' must be numeric, got {dataset.features[column]}.")
    special_ids = set(tokenizer.all_special_ids)
    tokenized = dataset.map(
        tokenize_example,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length if max_length is not None else args.max_length,
            "append_eos": args.append_eos_token,
            "group_column": args.group_column,
            "special_ids": special_ids,
        },
        remove_columns=[c for c in dataset.column_names if c not in keep],
        num_proc=args.dataset_num_proc,
        desc=f"Tokenizing {name} pairs",
    )
    fit = tokenized["fit"]
    truncated, dropped = fit.count("truncated"), fit.count("dropped")
    if truncated or dropped:
        logger.warning(
            f"{name}: {truncated} of {len(fit)} pairs had their prompt cut from the left to fit "
            f"max_length={max_length or args.max_length}; {dropped} dropped because a response alone is longer."
        )
    if dropped:
        tokenized = tokenized.filter(lambda status: status != "dropped", input_columns="fit")
    if len(tokenized) == 0:
        raise DataError(f"{name} dataset has no pairs left after truncation; raise max_length.")
    return tokenized.remove_columns("fit")


def add_group_ids(dataset: Dataset, group_index: dict[str, int]) -> Dataset:
    return dataset.map(lambda group: {"group_id": group_index[group]}, input_columns="group", desc="Group ids")
