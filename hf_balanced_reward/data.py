"""Loading, format detection, chat templates, tokenisation and truncation of preference pairs.

Every format trl documents for preference data is accepted:
- implicit prompt: `chosen` / `rejected` hold the full texts (or full conversations);
- explicit prompt: `prompt` / `chosen` / `rejected`;
- conversational: any of the above as lists of `{"role", "content"}` messages, rendered with the chat template;
- already tokenised: `chosen_ids` / `rejected_ids`.
Optional columns: `margin` (float, for margin-aware losses), `weight` (float, per-pair loss weight) and the
`group_column` named in the config.
"""

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections import Counter

import datasets
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from transformers import AutoTokenizer
from trl.data_utils import get_dataset_column_names, maybe_apply_chat_template, maybe_extract_prompt

from . import collator, row_checks
from .config import ConfigError
from .errors import DataError
from .collator import list_prefix_length, shared_prefix_length
from .row_checks import (IDENTICAL, IDENTICAL_ONCE_CUT, IDENTICAL_TOKENS, STOP_ON, bad_rows_error, has_empty_response,
                         row_problem, too_long)

logger = logging.getLogger(__name__)


def _code_version() -> str:
    """A hash of the code that prepares pairs and lists (this module, the collator's, the row checks', `listwise.py`).
    `datasets` keys its map cache on the mapped function, but hashes a module-level function by its name, not its
    body: without this, results cached by an older version of this package would be reused after an upgrade."""
    digest = hashlib.sha256()
    for path in (__file__, collator.__file__, row_checks.__file__,
                 os.path.join(os.path.dirname(__file__), "listwise.py")):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


CODE_VERSION = _code_version()

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Columns the collator reads (pairs, then lists); `length` (unique tokens of a row) feeds
# train_sampling_strategy="group_by_length".
# A dataset's own row numbers, added by `numbered` where the rows kept by preparation must be found again (evaluate's
# predictions.jsonl, the probes, cross-prompt partners): kept through preparation, never given to the model.
ROW_COLUMN = "_hf_balanced_reward_row"
MODEL_COLUMNS = ["chosen_ids", "rejected_ids", "margin", "weight", "group_id", "length", "completion_ids", "ranks",
                 "scores", "off_prompt_ids"]


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


def truncate_pair(chosen_ids, rejected_ids, max_length, special_ids, cut_long_responses: bool = False):
    """Fit a pair into `max_length` (see `truncate_list`). Returns (chosen_ids, rejected_ids, status)."""
    (chosen_ids, rejected_ids), status = truncate_list([chosen_ids, rejected_ids], max_length, special_ids,
                                                       cut_long_responses)
    return chosen_ids, rejected_ids, status


def truncate_list(sequences, max_length, special_ids, cut_long_responses: bool = False):
    """Fit K sequences that share a prompt into `max_length` by cutting the prompt from the left, keeping its
    leading special tokens.

    The response ends (the scored tokens) are never cut. Returns (sequences, status) with status "kept",
    "truncated" or "dropped" (a response alone, with the leading special tokens, does not fit).

    With `cut_long_responses`, every sequence is cut on its own as a client cuts one text (`scoring.tokenize_texts`:
    its leading special tokens, then its last tokens), so the pair is scored exactly as `score` or `pipeline` score
    its texts, and none is dropped; status "response cut" when a cut reaches into a response.
    """
    longest = max(len(s) for s in sequences)
    if max_length is None or longest <= max_length:
        return sequences, "kept"
    if cut_long_responses:
        return cut_each_text(sequences, max_length, special_ids)
    # The shared prefix is the prompt (plus any identical opening words of the responses); never the scored token.
    shared = list_prefix_length(sequences)
    lead = 0
    while lead < shared and sequences[0][lead] in special_ids:
        lead += 1  # BOS / CLS: the encoder pools CLS, a decoder expects BOS
    excess = longest - max_length
    if excess > shared - lead:
        return sequences, "dropped"
    return [s[:lead] + s[lead + excess :] for s in sequences], "truncated"


def cut_each_text(sequences, max_length, special_ids):
    """Each sequence longer than `max_length` cut on its own to its leading special tokens and its last tokens (the
    rule of `scoring.tokenize_texts`); status "truncated", or "response cut" when a cut passes the shared prompt."""
    shared, cut, status = list_prefix_length(sequences), [], "truncated"
    for sequence in sequences:
        lead = 0
        while lead < len(sequence) and sequence[lead] in special_ids:
            lead += 1
        excess = len(sequence) - max_length
        if excess > 0:
            if excess > shared - lead:
                status = "response cut"
            sequence = sequence[:lead] + sequence[lead + excess :]
        cut.append(sequence)
    return cut, status


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


def tokenize_example(example, tokenizer, max_length, append_eos, group_column, special_ids, allow_empty_response,
                     code_version=None, cut_long_responses=False):
    problem = row_problem(example, group_column, allow_empty_response)
    if problem:
        return {"chosen_ids": [], "rejected_ids": [], "group": "", "response_lengths": [0, 0], "fit": "bad",
                "length": 0, "problem": problem}
    problem = ""  # a string column throughout: Arrow cannot type a column that starts all null
    if "chosen_ids" in example and "rejected_ids" in example:
        chosen_ids, rejected_ids = list(example["chosen_ids"]), list(example["rejected_ids"])
    else:
        _, chosen_text, rejected_text = render_texts(example, tokenizer, append_eos)
        chosen_ids = tokenizer(chosen_text)["input_ids"]
        rejected_ids = tokenizer(rejected_text)["input_ids"]
    differ = chosen_ids != rejected_ids
    chosen_ids, rejected_ids, status = truncate_pair(chosen_ids, rejected_ids, max_length, special_ids,
                                                     cut_long_responses)
    if chosen_ids == rejected_ids:  # given as identical ids, texts the tokenizer made identical, or cut alike
        problem = IDENTICAL_ONCE_CUT if differ else IDENTICAL if "chosen_ids" in example else IDENTICAL_TOKENS
    elif status == "dropped":
        problem = too_long(max_length)
    elif has_empty_response(example):
        status = "empty response"
    group = str(example[group_column]) if group_column else "all"
    prompt = shared_prefix_length(chosen_ids, rejected_ids)
    # Response tokens after the shared prompt, as the collator counts them: length cells and the length expert.
    response_lengths = [len(chosen_ids) - prompt, len(rejected_ids) - prompt]
    return {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "group": group, "response_lengths": response_lengths,
            "fit": status, "length": sum(response_lengths) + prompt, "problem": problem}


def prepare_dataset(
    dataset: Dataset, tokenizer, args, name: str = "train", max_length: int | None = None
) -> tuple[Dataset, dict]:
    """Validate, tokenise, truncate and label the groups of a preference dataset, in one pass.

    Returns the prepared pairs (`chosen_ids`, `rejected_ids`, `group`, `response_lengths`, `length`, and `margin` /
    `weight` when present) and a report: pairs kept, prompts truncated, pairs with an empty response, and rows
    dropped per reason. `on_bad_rows` decides which rows stop the run (naming rows, columns and problems): "auto"
    drops pairs with no usable signal (too long, chosen == rejected) and stops on unreadable ones; "skip" drops
    every bad row; "error" stops on any.
    """
    dataset = rename_legacy_columns(dataset, name)
    check_columns(dataset, args.group_column, name)
    keep = numeric_columns(dataset, ("margin", "weight", ROW_COLUMN), name)
    if "chosen" in dataset.column_names:
        check_chat_template(dataset[0]["chosen"] if len(dataset) else None, tokenizer, name)
    return tokenize_and_collect(dataset, tokenize_example, tokenizer, args, name, max_length, keep, unit="pairs")


def numeric_columns(dataset: Dataset, names, name: str) -> list[str]:
    """The columns of `names` the dataset has (kept through tokenisation), each checked to be numeric."""
    keep = [c for c in names if c in dataset.column_names]
    for column in keep:
        if not isinstance(dataset.features[column], datasets.Value) or not dataset.features[column].dtype.startswith(
            ("float", "int")
        ):
            raise DataError(f"{name} dataset column '{column}' must be numeric, got {dataset.features[column]}.")
    return keep


def check_chat_template(first_text, tokenizer, name: str) -> None:
    if isinstance(first_text, list) and not tokenizer.chat_template:
        raise DataError(
            f"{name} dataset holds conversations (message lists) but the tokenizer has no chat template; use a "
            "tokenizer that has one (often the model's -Instruct version), set tokenizer.chat_template, or give the "
            "texts as plain strings."
        )


def tokenize_and_collect(dataset: Dataset, tokenize, tokenizer, args, name: str, max_length: int | None, keep,
                         unit: str, features: datasets.Features | None = None) -> tuple[Dataset, dict]:
    """Map `tokenize` (`tokenize_example`, or `listwise.tokenize_list`) over every row, apply `on_bad_rows` to the
    rows it found bad, log what was dropped, cut or kept, and return (prepared rows, report). `unit` names what a
    row became ("pairs", "lists") in messages and in the report."""
    if len(dataset) == 0:
        raise DataError(f"{name} dataset is empty: it has no rows.")
    max_length = max_length if max_length is not None else args.max_length
    tokenized = dataset.map(
        tokenize,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "append_eos": args.append_eos_token,
            "group_column": args.group_column,
            "special_ids": set(tokenizer.all_special_ids),
            "allow_empty_response": args.on_bad_rows != "error",
            "code_version": CODE_VERSION,  # only part of the cache key
            "cut_long_responses": args.long_responses == "cut",
        },
        remove_columns=[c for c in dataset.column_names if c not in keep],
        features=features,
        num_proc=args.dataset_num_proc,
        desc=f"Checking and tokenizing {name} {unit}",
    )
    problems = [(row, problem) for row, problem in enumerate(tokenized["problem"]) if problem]
    stop_on = STOP_ON[args.on_bad_rows]
    bad = [(row, problem) for row, problem in problems if stop_on(problem)]
    if bad:
        raise bad_rows_error(name, bad, len(dataset))
    dropped = dict(Counter(problem for _, problem in problems).most_common())
    fits = Counter(tokenized["fit"])
    notes = ["dropped " + ", ".join(f"{count} x {problem}" for problem, count in dropped.items())] if dropped else []
    if fits["empty response"]:
        notes.append(f"kept {fits['empty response']} with an empty response")
    if fits["truncated"]:
        notes.append(f"prompt cut from the left to fit max_length={max_length} in {fits['truncated']}")
    if fits["response cut"]:
        notes.append(f"a response alone longer than max_length={max_length}, so each text cut to its last tokens as "
                     f"`score` and `pipeline` cut one text, in {fits['response cut']} (long_responses=cut)")
    if notes:
        logger.warning(f"{name}: {len(dataset) - len(problems)} of {len(dataset)} {unit} used; " + "; ".join(notes)
                       + f" (on_bad_rows={args.on_bad_rows}).")
    if problems:
        tokenized = tokenized.filter(lambda problem: not problem, input_columns="problem")
    if len(tokenized) == 0:
        raise DataError(f"{name} dataset has no usable {unit} left: all {len(dataset)} rows were dropped.")
    if "weight" in tokenized.column_names and not any(tokenized["weight"]):
        raise DataError(f"{name} dataset: column 'weight' is 0 in all {len(tokenized)} {unit} kept, so every loss is "
                        "multiplied by 0 and training would not change the model. Give the rows that should count a "
                        "weight > 0, or drop the 'weight' column to weigh every row 1.")
    report = {"rows": len(dataset), unit: len(tokenized), "truncated": fits["truncated"],
              "empty_responses": fits["empty response"], "dropped": dropped}
    if fits["response cut"]:
        report["responses_cut"] = fits["response cut"]
    return tokenized.remove_columns(["fit", "problem"]), report


def prepare_stream(dataset: IterableDataset, tokenizer, args, name: str = "train", max_length: int | None = None,
                   tokenize=None, unit: str = "pairs", keep=("margin", "weight")) -> tuple[IterableDataset, dict]:
    """`prepare_dataset` for a stream: the same checks and tokenisation, done as the rows stream by.

    Returns the prepared stream and its report, a dict filled in as rows pass (and restarted with each pass over the
    stream): rows, pairs, truncated, empty_responses, dropped per reason. A bad row that `on_bad_rows` stops on
    raises DataError when it is reached, naming its position in the stream; the others are dropped and counted.
    The columns and the first row are checked now. Counting happens where the rows are read: with
    dataloader_num_workers > 0 the counts stay in the worker processes. `tokenize`, `unit` and `keep` are those of
    lists for `listwise.prepare_list_stream` (which has checked the columns).
    """
    dataset = rename_legacy_columns(dataset, name)
    columns = column_names(dataset)
    if not columns:
        raise DataError(f"{name} dataset is empty: it has no rows.")
    if tokenize is None:
        tokenize = tokenize_example
        check_columns(dataset, args.group_column, name)
        check_chat_template(next(iter(dataset)).get("chosen"), tokenizer, name)
    keep = [c for c in keep if c in columns]
    report = {"rows": 0, unit: 0, "truncated": 0, "empty_responses": 0, "dropped": {}, "streamed": True}
    stop_on = STOP_ON[args.on_bad_rows]

    def count(example: dict, index: int) -> bool:
        if index == 0:  # a new pass over the stream (an epoch, an evaluation): count it afresh
            report.update({"rows": 0, unit: 0, "truncated": 0, "empty_responses": 0, "dropped": {}})
        report["rows"] += 1
        problem = example["problem"]
        if problem:
            if stop_on(problem):
                raise DataError(f"{name} dataset row {index} (streamed, counting from 0): {problem}. Fix it, or set "
                                "on_bad_rows: skip to drop such rows (they are counted in data_report.json).")
            report["dropped"][problem] = report["dropped"].get(problem, 0) + 1
            return False
        report[unit] += 1
        report["truncated"] += example["fit"] == "truncated"
        if example["fit"] == "response cut":
            report["responses_cut"] = report.get("responses_cut", 0) + 1
        report["empty_responses"] += example["fit"] == "empty response"
        return True

    tokenized = dataset.map(
        tokenize,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length if max_length is not None else args.max_length,
            "append_eos": args.append_eos_token,
            "group_column": args.group_column,
            "special_ids": set(tokenizer.all_special_ids),
            "allow_empty_response": args.on_bad_rows != "error",
            "cut_long_responses": args.long_responses == "cut",
        },
        remove_columns=[c for c in columns if c not in keep],
    )
    return tokenized.filter(count, with_indices=True).remove_columns(["fit", "problem"]), report


def report_summary(name: str, report: dict, on_bad_rows: str) -> str | None:
    """One log line for a report with anything to say (drops, empty responses, truncations), else None."""
    notes = []
    if report["dropped"]:
        notes.append("dropped " + ", ".join(f"{count} x {problem}" for problem, count in report["dropped"].items()))
    if report["empty_responses"]:
        notes.append(f"kept {report['empty_responses']} with an empty response")
    if report["truncated"]:
        notes.append(f"prompt cut from the left in {report['truncated']}")
    if not notes:
        return None
    unit = "lists" if "lists" in report else "pairs"
    return f"{name}: {report[unit]} of {report['rows']} {unit} used; " + "; ".join(notes) + f" (on_bad_rows={on_bad_rows})."


def add_group_ids(dataset: Dataset, group_index: dict[str, int]) -> Dataset:
    return dataset.map(lambda group: {"group_id": group_index[group]}, input_columns="group", desc="Group ids")
