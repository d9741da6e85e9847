"""Loading preference data, its formats, columns, token options and chat templates (preparation: `preparation.py`).

Every format trl documents for preference data is accepted:
- implicit prompt: `chosen` / `rejected` hold the full texts (or full conversations);
- explicit prompt: `prompt` / `chosen` / `rejected`;
- conversational: any of the above as lists of `{"role", "content"}` messages, rendered with the chat template;
- already tokenised: `chosen_ids` / `rejected_ids`.
Optional columns: `margin` (float, for margin-aware losses), `weight` (float, per-pair loss weight) and the
`group_column` named in the config.
"""

import contextlib
import json
import logging
import os
import warnings

import datasets
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from transformers import AutoTokenizer
from trl.data_utils import get_dataset_column_names, maybe_apply_chat_template, maybe_extract_prompt

from .config import ConfigError
from .errors import DataError

logger = logging.getLogger(__name__)



FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# A dataset's own row numbers, added by `numbered` where the rows kept by preparation must be found again (evaluate's
# predictions.jsonl, the probes, cross-prompt partners): kept through preparation, never given to the model.
ROW_COLUMN = "_hf_balanced_reward_row"
# Columns the collator reads; `length` (unique tokens of a row) feeds train_sampling_strategy="group_by_length".
MODEL_COLUMNS = ["completion_ids", "ranks", "scores", "margin", "weight", "group_id", "length", "off_prompt_ids",
                 "attribute_scores", "completion_keys"]


def load_preference_dataset(name_or_path: str, split: str = "train", streaming: bool = False
                            ) -> Dataset | IterableDataset:
    """Load a hub id, a local folder (saved with `save_to_disk` or of data files), or one .jsonl/.json/.parquet/.csv.
    With `streaming`, an IterableDataset whose rows are read as training goes (its first row is read now, so that an
    unreadable file fails here)."""
    dataset = _load(name_or_path, split, streaming)
    if streaming:
        try:
            next(iter(dataset), None)
        except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
            raise DataError(f"could not read dataset '{name_or_path}' (split '{split}'): "
                            f"{str(err.__cause__ or err).rstrip('.')}.") from err
    return dataset


def _load(name_or_path: str, split: str, streaming: bool) -> Dataset | IterableDataset:
    try:
        if os.path.isfile(name_or_path):
            extension = os.path.splitext(name_or_path)[1].lower()
            if extension not in FILE_BUILDERS:
                raise DataError(
                    f"dataset file '{name_or_path}' has extension '{extension}'; "
                    f"use one of {', '.join(FILE_BUILDERS)}."
                )
            with open(name_or_path, "rb") as f:
                if not f.read(4096).strip():  # `datasets` fails on an empty file with a bare StopIteration
                    raise DataError(f"dataset file '{name_or_path}' is empty: it has no rows.")
            try:
                with quiet_datasets_log():
                    return load_dataset(FILE_BUILDERS[extension], data_files=name_or_path, split="train",
                                        streaming=streaming)
            except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
                raise DataError(f"could not read dataset file '{name_or_path}' as {extension[1:]}: "
                                f"{str(err.__cause__ or err).rstrip('.')}. Check that its content is the format its extension "
                                "says.") from err
        if os.path.isdir(name_or_path):
            saved = any(os.path.exists(os.path.join(name_or_path, f)) for f in ("dataset_dict.json", "state.json"))
            if saved:
                loaded = load_from_disk(name_or_path)
                loaded = select_split(loaded, split, name_or_path) if isinstance(loaded, DatasetDict) else loaded
                return loaded.to_iterable_dataset() if streaming else loaded
            return load_dataset(name_or_path, split=split, streaming=streaming)
        if name_or_path.startswith((".", "/", "~")) or os.path.splitext(name_or_path)[1].lower() in FILE_BUILDERS:
            raise DataError(f"dataset '{name_or_path}' does not exist: no such file or folder.")
        return load_dataset(name_or_path, split=split, streaming=streaming)
    except DataError:
        raise
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
        cause = err.__cause__ or err
        raise DataError(f"could not load dataset '{name_or_path}' (split '{split}'): {cause}") from err


@contextlib.contextmanager
def quiet_datasets_log():
    """`datasets` logs its own error line before raising; the CLI says it once, in one line."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def select_split(dataset_dict: DatasetDict, split: str, name: str) -> Dataset:
    if split not in dataset_dict:
        raise DataError(f"dataset '{name}' has no split '{split}'; it has: {', '.join(dataset_dict)}.")
    return dataset_dict[split]


# trl's older names of the tokenised columns: still accepted, with a FutureWarning, as trl does.
LEGACY_COLUMNS = {"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"}


def rename_legacy_columns(dataset, name: str):
    """`chosen_input_ids` / `rejected_input_ids` renamed to `chosen_ids` / `rejected_ids`, with a FutureWarning."""
    columns = set(column_names(dataset))
    if not set(LEGACY_COLUMNS) <= columns or columns & set(LEGACY_COLUMNS.values()):
        return dataset
    warnings.warn(f"{name} dataset: the columns 'chosen_input_ids' / 'rejected_input_ids' are deprecated (in trl too); "
                  "rename them 'chosen_ids' / 'rejected_ids'.", FutureWarning, stacklevel=3)
    return dataset.rename_columns(LEGACY_COLUMNS)


def column_names(dataset) -> list[str]:
    """A dataset's columns; a stream that does not declare them shows its first row's (trl's helper)."""
    try:
        return get_dataset_column_names(dataset)
    except StopIteration:
        return []


def is_stream(dataset) -> bool:
    return isinstance(dataset, IterableDataset)


def check_columns(dataset: Dataset, group_column: str | None, name: str) -> None:
    """Fail early, naming the column, when a dataset cannot be preference data."""
    columns = column_names(dataset)
    tokenized = {"chosen_ids", "rejected_ids"} <= set(columns) or set(LEGACY_COLUMNS) <= set(columns)
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


def require_token(tokenizer, token: str, option: str) -> None:
    if token not in tokenizer.get_vocab():
        raise ConfigError(f"{option}={token!r} is not in the tokenizer's vocabulary; name one of its tokens (e.g. its "
                          f"eos token {tokenizer.eos_token!r}), or add the token to the tokenizer first.")


def copy_chat_template(tokenizer, path: str) -> list[int]:
    """Give `tokenizer` the chat template at `path`: a .jinja / .j2 file, or a tokenizer (folder or hub id) whose
    template, added tokens and eos token are copied, as trl's `clone_chat_template` does. Returns the ids of the
    tokens added (the model's embeddings must grow to hold them)."""
    if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
        with open(path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
        return []
    try:
        source = AutoTokenizer.from_pretrained(path)
        template = source.get_chat_template()
    except (OSError, ValueError) as err:
        raise ConfigError(f"chat_template_path={path!r} is neither a .jinja / .j2 file nor a tokenizer with a chat "
                          f"template ({str(err).splitlines()[0]}); give one of those.") from err
    tokenizer.chat_template = template
    added = [t for t in source.added_tokens_decoder.values() if t.content not in tokenizer.get_vocab()]
    tokenizer.add_tokens(added)
    tokenizer.eos_token = source.eos_token
    return tokenizer.convert_tokens_to_ids([t.content for t in added])


def apply_token_options(tokenizer, args) -> list[int]:
    """The config's `eos_token`, `chat_template_path` and `pad_token`, in that order (trl's); returns the ids of
    tokens a copied chat template added."""
    if args.eos_token is not None:
        require_token(tokenizer, args.eos_token, "eos_token")
        tokenizer.eos_token = args.eos_token
    added = copy_chat_template(tokenizer, args.chat_template_path) if args.chat_template_path is not None else []
    if args.pad_token is not None:
        require_token(tokenizer, args.pad_token, "pad_token")
        tokenizer.pad_token = args.pad_token
    return added


def drop_nulls(value):
    """`value` without the null entries of its mappings, at any depth. Arrow stores mappings as structs with one set
    of keys per column, filling the keys a row, message, tool call or tool schema lacks with null (every message
    gets a 'tool_calls': null, a call's arguments get the other calls' argument names); without them, each renders
    as the mapping that was written."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def template_options(example: dict) -> dict:
    """Per-row arguments of the chat template: the `tools` column (a list of tool schemas, or one JSON string of
    them, taken as written) as `tools=`, and the `chat_template_kwargs` column's entries, nulls left out (see
    `drop_nulls`)."""
    tools = example.get("tools")
    tools = (json.loads(tools) if tools.strip() else None) if isinstance(tools, str) else drop_nulls(tools)
    return {"tools": tools or None, **drop_nulls(example.get("chat_template_kwargs") or {})}


def render_texts(example: dict, tokenizer, append_eos: bool) -> tuple[str, str, str]:
    """(prompt, prompt + chosen, prompt + rejected) as plain text; conversations go through the chat template, with
    the row's `tools` and `chat_template_kwargs`, so that prompt + chosen is exactly what
    `tokenizer.apply_chat_template(prompt_messages + chosen_messages, tools=..., **kwargs, tokenize=False)` gives."""
    pair = {key: example[key] if isinstance(example[key], str) else drop_nulls(example[key])
            for key in ("prompt", "chosen", "rejected") if key in example}
    pair = maybe_extract_prompt(pair)  # conversations with an implicit prompt: split off the shared messages
    conversational = not isinstance(pair["chosen"], str)
    pair = maybe_apply_chat_template(pair, tokenizer, **template_options(example))
    if conversational and adds_bos(tokenizer):
        # A template that renders {{ bos_token }} would get a second BOS from the tokenizer: keep one, as trl does.
        pair = {k: v[len(tokenizer.bos_token):] if v.startswith(tokenizer.bos_token) else v for k, v in pair.items()}
    prompt = pair.get("prompt", "")
    chosen, rejected = prompt + pair["chosen"], prompt + pair["rejected"]
    if append_eos and tokenizer.eos_token:
        chosen = chosen if chosen.endswith(tokenizer.eos_token) else chosen + tokenizer.eos_token
        rejected = rejected if rejected.endswith(tokenizer.eos_token) else rejected + tokenizer.eos_token
    return prompt, chosen, rejected


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a plain text by itself (Llama's do, Qwen's and GPT-2's do not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]








def numbered(dataset):
    """The dataset with its row numbers in ROW_COLUMN (replacing a column of that name)."""
    if ROW_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(ROW_COLUMN)
    return dataset.add_column(ROW_COLUMN, list(range(len(dataset))))


def pair_texts(dataset, rows: list[int], group_column: str | None) -> tuple[list, list, list, list | None] | None:
    """(prompts, chosen, rejected, groups) of the dataset's `rows` (the pairs that were scored); an implicit prompt is
    split off as training splits it. None when the rows have no texts (token ids only)."""
    if not {"chosen", "rejected"} <= set(column_names(dataset)):
        return None
    prompts, chosen, rejected, groups = [], [], [], []
    for example in dataset.select(rows):
        pair = example if "prompt" in example else maybe_extract_prompt(
            {"chosen": example["chosen"], "rejected": example["rejected"]})
        prompts.append(pair.get("prompt", ""))  # plain text without a prompt column: the whole text is the response
        chosen.append(pair["chosen"])
        rejected.append(pair["rejected"])
        groups.append(str(example[group_column]) if group_column else None)
    return prompts, chosen, rejected, groups if group_column else None


def has_pair_texts(dataset) -> bool:
    """Whether a dataset holds pairs as text (`chosen`, `rejected`, with or without `prompt`), not token ids."""
    return {"chosen", "rejected"} <= set(column_names(dataset))








def check_chat_template(first_text, tokenizer, name: str) -> None:
    if isinstance(first_text, list) and not tokenizer.chat_template:
        raise DataError(
            f"{name} dataset holds conversations (message lists) but the tokenizer has no chat template; use a "
            "tokenizer that has one (often the model's -Instruct version), set tokenizer.chat_template, or give the "
            "texts as plain strings."
        )








