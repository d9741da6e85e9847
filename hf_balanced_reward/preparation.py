"""From checked rows to what the trainer trains on: every row, a pair or a list, becomes K tokenised completions.

A prepared row has `completion_ids` (K full sequences, prompt included; a pair is K = 2, chosen first), `ranks` (1 is
best, equal for ties: a pair is (1, 2), or (1, 1) when tied), `scores` (lists that give them), `group`,
`response_lengths` (tokens of each completion after the shared prompt) and `length` (unique tokens: the prompt once
plus every response, for `group_by_length`), plus the row's own `margin` / `weight` columns (and a multi-attribute
run's `attribute_scores` and `completion_keys`) when it has them. One function tokenises every kind of row
(`tokenize_row`), one prepares a dataset in memory (`prepare_dataset`) and one a stream (`prepare_stream`), with
`on_bad_rows` applied to the rows they find bad and a report of what was kept, cut or dropped.
"""

import hashlib
import logging
from collections import Counter

import datasets
from datasets import Dataset, Features, IterableDataset, Sequence, Value

from . import collator, data, listwise, row_checks
from .collator import list_prefix_length
from .data import (ROW_COLUMN, DataError, check_chat_template, check_columns, column_names, render_texts,
                   rename_legacy_columns)
from .listwise import _tie_problem, canonical_row, is_listwise, is_pair_row, list_problem
from .row_checks import (IDENTICAL, IDENTICAL_ONCE_CUT, IDENTICAL_TOKENS, STOP_ON, bad_rows_error, has_empty_response,
                         row_problem, too_long)

logger = logging.getLogger(__name__)

ATTRIBUTE_COLUMN = "attribute_scores"  # a multi-attribute run's targets, K lists of A scores (`attribute_training`)
KEY_COLUMN = "completion_keys"  # and K content hashes: a response in several rows counts once in its metrics


def _code_version() -> str:
    """A hash of the code that prepares rows (this module and the ones it renders, checks and measures rows with).
    `datasets` keys its map cache on the mapped function, but hashes a module-level function by its name, not its
    body: without this, results cached by an older version of this package would be reused after an upgrade."""
    digest = hashlib.sha256()
    for module in (__file__, data.__file__, listwise.__file__, collator.__file__, row_checks.__file__):
        with open(module, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


CODE_VERSION = _code_version()

# The prepared columns' types, given to `map` so that `scores` may be null in some rows (lists with ranks only).
ROW_FEATURES = {"completion_ids": Sequence(Sequence(Value("int64"))), "ranks": Sequence(Value("int64")),
                "scores": Sequence(Value("float64")), "group": Value("string"),
                "response_lengths": Sequence(Value("int64")), "fit": Value("string"), "length": Value("int64"),
                "problem": Value("string")}
BAD_ROW = {"completion_ids": [], "ranks": [], "scores": None, "group": "", "response_lengths": [], "fit": "bad",
           "length": 0}


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


def render_completion(row: dict, completion, tokenizer, append_eos: bool) -> str:
    """prompt + completion as one text, rendered exactly as `data.render_texts` renders prompt + chosen of a pair
    (chat template with the row's tools and template arguments, one BOS, eos appended), so that a pair trained as a
    K = 2 list is tokenised as it is on the pair path."""
    texts = {"prompt": row["prompt"], "chosen": completion, "rejected": completion}
    options = {k: row[k] for k in ("tools", "chat_template_kwargs") if row.get(k) is not None}
    return render_texts({**texts, **options}, tokenizer, append_eos)[1]


def tokenize_row(example, tokenizer, max_length, append_eos, group_column, special_ids, allow_empty_response,
                 code_version=None, cut_long_responses=False):
    """One row (a pair as texts or token ids, or a list) as K tokenised completions (see the module docstring), with
    `fit` (kept, truncated, response cut, empty response) and `problem` ("" for a usable row)."""
    given_ids = "chosen_ids" in example and "rejected_ids" in example
    if given_ids:
        problem = row_problem(example, group_column, allow_empty_response) or _tie_problem(example.get("tie"), 2)
    else:
        problem = list_problem(example, group_column, allow_empty_response)
    if problem:
        return {**BAD_ROW, "problem": problem}
    scores, ranks = None, [1, 1] if example.get("tie") is True else [1, 2]
    if given_ids:
        sequences, empty = [list(example["chosen_ids"]), list(example["rejected_ids"])], False
    elif is_pair_row(example):
        _, chosen_text, rejected_text = render_texts(example, tokenizer, append_eos)
        sequences = [tokenizer(chosen_text)["input_ids"], tokenizer(rejected_text)["input_ids"]]
        empty = has_empty_response(example)
    else:
        row = canonical_row(example, group_column, allow_empty_response)
        texts = [render_completion(row, completion, tokenizer, append_eos) for completion in row["completions"]]
        sequences = [tokenizer(text)["input_ids"] for text in texts]
        ranks, scores = row["ranks"], row["scores"]
        empty = any(isinstance(c, str) and not c.strip() for c in row["completions"])
    differ = sequences[0] != sequences[1]
    sequences, status = truncate_list(sequences, max_length, special_ids, cut_long_responses)
    problem = ""  # a string column throughout: Arrow cannot type a column that starts all null
    if len(sequences) == 2 and sequences[0] == sequences[1]:  # given identical, tokenised alike, or cut alike
        problem = IDENTICAL_ONCE_CUT if differ else IDENTICAL if given_ids else IDENTICAL_TOKENS
    elif status == "dropped":
        problem = too_long(max_length)
    elif empty:
        status = "empty response"
    prompt = list_prefix_length(sequences)
    # Response tokens after the shared prompt, as the collator counts them: length cells and the length expert.
    lengths = [len(s) - prompt for s in sequences]
    return {"completion_ids": sequences, "ranks": ranks, "scores": scores,
            "group": str(example[group_column]) if group_column else "all", "response_lengths": lengths,
            "fit": status, "length": prompt + sum(lengths), "problem": problem}


def check_dataset_columns(dataset, args, name: str, lists: bool) -> None:
    """Pairs need their two columns (and the group column); lists (or pairs trained as lists) need theirs."""
    if lists:
        check_list_columns(set(column_names(dataset)), args, name)
    else:
        check_columns(dataset, args.group_column, name)


def prepare_dataset(dataset: Dataset, tokenizer, args, name: str = "train", max_length: int | None = None,
                    lists: bool | None = None) -> tuple[Dataset, dict]:
    """Validate, tokenise, truncate and label the groups of a preference dataset (pairs or lists), in one pass.

    `lists`: prepare the rows as lists (default: when the dataset holds lists or ties, `listwise.is_listwise`); a
    list loss trains pairs as lists too. Returns the prepared rows (see the module docstring) and a report: rows,
    pairs (or lists, and their completions) kept, prompts truncated, empty responses, rows dropped per reason.
    `on_bad_rows` decides which rows stop the run (naming rows, columns and problems): "auto" drops rows with no
    usable signal (too long, chosen == rejected) and stops on unreadable ones; "skip" drops every bad row; "error"
    stops on any.
    """
    dataset = rename_legacy_columns(dataset, name)
    lists = is_listwise(dataset) if lists is None else lists
    check_dataset_columns(dataset, args, name, lists)
    keep = numeric_columns(dataset, (("weight",) if lists else ("margin", "weight")) + (ROW_COLUMN,), name)
    keep += [c for c in (ATTRIBUTE_COLUMN, KEY_COLUMN) if c in dataset.column_names]  # `attribute_training`
    if len(dataset):
        check_first_text(dataset[0], tokenizer, name)
    features = Features({**{k: dataset.features[k] for k in keep}, **ROW_FEATURES})
    prepared, report = tokenize_and_collect(dataset, tokenizer, args, name, max_length, keep,
                                            unit="lists" if lists else "pairs", features=features)
    if lists:
        report["completions"] = sum(map(len, prepared["response_lengths"]))
    if all(scores is None for scores in prepared["scores"]):
        prepared = prepared.remove_columns("scores")
    return prepared, report


def tokenize_options(tokenizer, args, max_length: int | None) -> dict:
    """`tokenize_row`'s options from the run's config."""
    return {"tokenizer": tokenizer, "max_length": max_length, "append_eos": args.append_eos_token,
            "group_column": args.group_column, "special_ids": set(tokenizer.all_special_ids),
            "allow_empty_response": args.on_bad_rows != "error", "cut_long_responses": args.long_responses == "cut"}


def numeric_columns(dataset: Dataset, names, name: str) -> list[str]:
    """The columns of `names` the dataset has (kept through tokenisation), each checked to be numeric."""
    keep = [c for c in names if c in dataset.column_names]
    for column in keep:
        if not isinstance(dataset.features[column], datasets.Value) or not dataset.features[column].dtype.startswith(
            ("float", "int")
        ):
            raise DataError(f"{name} dataset column '{column}' must be numeric, got {dataset.features[column]}.")
    return keep


def check_first_text(first: dict, tokenizer, name: str) -> None:
    """Conversations need a chat template: judged on the first row's first completion (or chosen response)."""
    completions = first.get("completions")
    check_chat_template(completions[0] if completions else first.get("chosen"), tokenizer, name)


def check_list_columns(columns: set, args, name: str) -> None:
    """Columns a dataset of lists (or pairs trained as lists) must have, and the ones it must not."""
    pairs = {"chosen", "rejected"} <= columns or {"chosen_ids", "rejected_ids"} <= columns
    if "completions" not in columns and not pairs:
        raise DataError(f"{name} dataset has neither a 'completions' column (lists, with 'ranks' or 'scores') nor "
                        f"'chosen' / 'rejected' (pairs); its columns are {sorted(columns)}.")
    if "margin" in columns:
        raise DataError(f"{name} dataset has a 'margin' column, which the list losses do not read (a list's margins "
                        "come from its 'scores', with loss 'graded'); drop the column, or train the pairs with a "
                        "pairwise loss and no 'tie' or 'completions' column.")
    if args.group_column is not None and args.group_column not in columns:
        raise DataError(f"group_column='{args.group_column}' is not a column of the {name} dataset; its columns are "
                        f"{sorted(columns)}.")


def check_scored(dataset, name: str) -> None:
    """Loss `graded` reads every list's scores: say before training which set lacks them, and how many lists."""
    scores = dataset["scores"] if "scores" in dataset.column_names else [None] * len(dataset)
    missing = sum(s is None for s in scores)
    if missing:
        raise DataError(f"loss 'graded' reads every list's scores, and {missing} of {len(dataset)} {name} lists have "
                        "none (ranks only, or pairs); give 'scores' for every list, or train with plackett_luce or "
                        "pairwise, which need ranks only.")


def tokenize_and_collect(dataset: Dataset, tokenizer, args, name: str, max_length: int | None, keep,
                         unit: str, features: datasets.Features | None = None) -> tuple[Dataset, dict]:
    """Map `tokenize_row` over every row, apply `on_bad_rows` to the rows it found bad, log what was dropped, cut or kept, and return (prepared rows, report). `unit` names what a
    row became ("pairs", "lists") in messages and in the report."""
    if len(dataset) == 0:
        raise DataError(f"{name} dataset is empty: it has no rows.")
    max_length = max_length if max_length is not None else args.max_length
    tokenized = dataset.map(
        tokenize_row,
        # code_version: only part of the cache key
        fn_kwargs={**tokenize_options(tokenizer, args, max_length), "code_version": CODE_VERSION},
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
                   lists: bool | None = None) -> tuple[IterableDataset, dict]:
    """`prepare_dataset` for a stream: the same checks and tokenisation, done as the rows stream by.

    Returns the prepared stream and its report, a dict filled in as rows pass (and restarted with each pass over the
    stream): rows, pairs, truncated, empty_responses, dropped per reason. A bad row that `on_bad_rows` stops on
    raises DataError when it is reached, naming its position in the stream; the others are dropped and counted.
    The columns and the first row are checked now. Counting happens where the rows are read: with
    dataloader_num_workers > 0 the counts stay in the worker processes.
    """
    dataset = rename_legacy_columns(dataset, name)
    columns = column_names(dataset)
    if not columns:
        raise DataError(f"{name} dataset is empty: it has no rows.")
    lists = is_listwise(dataset) if lists is None else lists
    check_dataset_columns(dataset, args, name, lists)
    check_first_text(next(iter(dataset)), tokenizer, name)
    keep = [c for c in (("weight",) if lists else ("margin", "weight")) if c in columns]
    unit = "lists" if lists else "pairs"
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
        tokenize_row,
        fn_kwargs=tokenize_options(tokenizer, args, max_length if max_length is not None else args.max_length),
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
