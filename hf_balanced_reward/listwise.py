"""Listwise rows: K >= 2 completions of one prompt, ranked or scored, checked and put into one canonical form.

A listwise row has `prompt` (text or messages, may be empty text), `completions` (a list of K >= 2 texts, or of K
message lists) and either `ranks` (K integers, 1 = best, equal ranks are ties) or `scores` (K finite numbers, higher
is better). Optional: `tie` (bool; true on a K = 2 row means the two are tied), `weight` (per-list loss weight),
the group column, `tools` and `chat_template_kwargs`. (`margin` is a pair's: a row check accepts it on K = 2, and
preparation refuses the column on a set of lists, since a list's margins come from its scores.) A pairwise row (`chosen` /
`rejected`, optionally `prompt`, `tie`) is the K = 2 list [chosen, rejected] with ranks (1, 2), or (1, 1) when tied.

Canonical form (`canonical_row`): the row's other columns, plus `prompt`, `completions`, `ranks` (dense: 1, 2, ...
with no gaps, equal for ties, derived from scores when only scores are given) and `scores` (floats, or None). The
order of the completions is kept and carries no meaning. Bad rows are named as `data.py` names bad pairs:
"row 3: column 'ranks' item 1 is 0; ...". `preparation.py` turns every row, pair or list, into K tokenised
completions for the trainer.
"""

import json
import math
import random
from collections import defaultdict

from trl.data_utils import maybe_extract_prompt

from .data import DataError, column_names, drop_nulls
from .row_checks import ALL_IDENTICAL, number_problem, row_problem, template_options_problem, text_problem

LABELS = ("ranks", "scores")


def _label_problem(column: str, values, size: int) -> str | None:
    if not isinstance(values, (list, tuple)):
        return f"column '{column}' is {type(values).__name__}, not a list of {size} numbers (one per completion)"
    if len(values) != size:
        return f"column '{column}' has {len(values)} entries for {size} completions; give one per completion"
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"column '{column}' item {i} is {type(value).__name__}, not a number"
        if math.isnan(value) or math.isinf(value):
            return f"column '{column}' item {i} is {'NaN' if math.isnan(value) else 'infinite'}"
        if column == "ranks" and (value < 1 or value != int(value)):
            return f"column 'ranks' item {i} is {value}; ranks are whole numbers from 1 (best), equal for ties"
    return None


def _tie_problem(tie, size: int, labels=None, column: str = "ranks") -> str | None:
    if tie is None or tie is False:
        return None
    if tie is not True:
        return f"column 'tie' is {tie!r}, not true or false"
    if size != 2:
        return (f"column 'tie' is true on a list of {size} completions; 'tie' marks a tied pair: in a list, give "
                "tied completions equal ranks")
    if labels is not None and labels[0] != labels[1]:
        return f"column 'tie' is true but the {column} {list(labels)} differ; give equal {column} or set tie false"
    return None


def is_pair_row(example: dict) -> bool:
    """A pair: no `completions`, or a null one beside a `chosen` (a file that mixes pairs and lists gives every row
    every column)."""
    return example.get("completions") is None and (example.get("chosen") is not None or "completions" not in example)


def list_problem(example: dict, group_column: str | None = None, allow_empty_response: bool = True) -> str | None:
    """The first thing that makes a listwise (or pairwise) row unusable, as "column 'x' <problem>", or None."""
    if is_pair_row(example):
        if "chosen" in example and "rejected" in example:
            problem = row_problem(example, group_column, allow_empty_response)
            return problem or _tie_problem(example.get("tie"), 2)
        return ("has neither 'completions' (a list with 'ranks' or 'scores') nor 'chosen' / 'rejected' (a pair); "
                f"its columns are {sorted(example)}")
    if "prompt" not in example:
        return "column 'prompt' is missing: a list gives its prompt once, in 'prompt', and only the responses in " \
               "'completions'"
    problem = text_problem(example["prompt"], allow_empty=True)
    if problem:
        return f"column 'prompt' {problem}"
    completions = example["completions"]
    if not isinstance(completions, (list, tuple)):
        return f"column 'completions' is {type(completions).__name__}, not a list of K >= 2 completions"
    if len(completions) < 2:
        return f"column 'completions' has {len(completions)} completion(s); a list needs at least 2"
    for i, completion in enumerate(completions):
        problem = text_problem(completion, allow_empty=allow_empty_response)
        if problem:
            return f"column 'completions' item {i} {problem}"
    if len({isinstance(value, str) for value in [example["prompt"], *completions]}) > 1:
        return "columns prompt, completions mix plain text and message lists"
    ranks, scores, tie = example.get("ranks"), example.get("scores"), example.get("tie")
    if ranks is not None and scores is not None:
        return "has both 'ranks' and 'scores'; give one (ranks are derived from scores)"
    if ranks is None and scores is None and tie is not True:
        return "has neither 'ranks' nor 'scores'; give one of them (ranks: 1 = best, equal for ties; scores: " \
               "higher is better)"
    for column, values in (("ranks", ranks), ("scores", scores)):
        problem = values is not None and _label_problem(column, values, len(completions))
        if problem:
            return problem
    labels, column = (ranks, "ranks") if ranks is not None else (scores, "scores")
    problem = _tie_problem(tie, len(completions), labels, column)
    if problem:
        return problem
    if labels is not None:
        seen = {}
        for i, completion in enumerate(completions):
            key = json.dumps(completion, sort_keys=True)
            if key in seen and labels[seen[key]] != labels[i]:
                return (f"completions {seen[key]} and {i} are identical but their {column} differ "
                        f"({labels[seen[key]]} and {labels[i]}); remove one or give them equal {column}")
            seen.setdefault(key, i)
        if len(seen) == 1:
            return ALL_IDENTICAL
    elif completions[0] == completions[1]:
        return ALL_IDENTICAL
    if example.get("margin") is not None and len(completions) != 2:
        return (f"column 'margin' is set on a list of {len(completions)} completions; a margin belongs to a pair: "
                "a list's margins come from its 'scores' (loss 'graded')")
    for column in ("margin", "weight"):
        problem = number_problem(example, column)
        if problem:
            return problem
    problem = template_options_problem(example)
    if problem:
        return problem
    if group_column and (example.get(group_column) is None or not str(example[group_column]).strip()):
        return f"column '{group_column}' is empty: the list has no group"
    return None


def dense_ranks(values, higher_is_better: bool) -> list[int]:
    """1 for the best value, 2 for the next distinct one, ...; equal values share a rank."""
    distinct = sorted(set(values), reverse=higher_is_better)
    position = {value: rank for rank, value in enumerate(distinct, start=1)}
    return [position[value] for value in values]


def canonical_row(example: dict, group_column: str | None = None, allow_empty_response: bool = True) -> dict:
    """The canonical listwise form of a listwise or pairwise row (see the module docstring); DataError if it is bad."""
    problem = list_problem(example, group_column, allow_empty_response)
    if problem:
        raise DataError(f"bad listwise row: {problem}.")
    row = {k: v for k, v in example.items() if k not in ("chosen", "rejected", "tie", "completions", *LABELS)}
    if is_pair_row(example):
        texts = {k: example[k] if isinstance(example[k], str) else drop_nulls(example[k])
                 for k in ("prompt", "chosen", "rejected") if k in example}
        texts = maybe_extract_prompt(texts)  # a pair with an implicit prompt: split off the shared part, as data.py
        row.update(prompt=texts.get("prompt", ""), completions=[texts["chosen"], texts["rejected"]],
                   ranks=[1, 1] if example.get("tie") is True else [1, 2], scores=None)
        return row
    ranks, scores = example.get("ranks"), example.get("scores")
    if scores is not None:
        scores = [float(s) for s in scores]
        ranks = dense_ranks(scores, higher_is_better=True)
    elif ranks is not None:
        ranks = dense_ranks([int(r) for r in ranks], higher_is_better=False)
    else:  # a K = 2 row marked tie, without labels
        ranks = [1, 1]
    row.update(completions=list(example["completions"]), ranks=ranks, scores=scores)
    return row


def is_listwise(dataset) -> bool:
    """Whether a dataset holds lists (a `completions` column) or pairs marked with ties (a `tie` column): both are
    trained and evaluated as lists."""
    columns = column_names(dataset)
    return "completions" in columns or "tie" in columns




















# Scored pairs back into lists (SummEval) ---------------------------------------------------------------------------


def lists_from_scored_pairs(pairs, document_column: str = "doc_id") -> tuple[list[dict], dict]:
    """Rebuild listwise rows from pairs that carry both responses' scores (`score_chosen` / `score_rejected`).

    Pairs are grouped by prompt; each distinct response text of a prompt becomes one completion, in order of first
    appearance. A text is scored once per source: per `system_chosen` / `system_rejected` when the pairs have them
    (the same text may come from two systems, each rated separately), else per distinct score. A text with several
    such scores gets their mean (counted in the report as `rescored_texts`). `document_column` (kept on every list,
    when present) must be one value per prompt. Returns (canonical rows with `scores`, report).
    """
    texts: dict = defaultdict(dict)  # prompt -> text -> {source: score}
    documents: dict = {}
    for n, pair in enumerate(pairs):
        prompt = pair["prompt"]
        if document_column in pair:
            if documents.setdefault(prompt, pair[document_column]) != pair[document_column]:
                raise DataError(f"row {n}: one prompt has two {document_column} values ({documents[prompt]!r} and "
                                f"{pair[document_column]!r}); lists are built per prompt, so give one per prompt.")
        for side in ("chosen", "rejected"):
            score = pair.get(f"score_{side}")
            if score is None:
                raise DataError(f"row {n}: column 'score_{side}' is missing or null; rebuilding lists needs both "
                                "responses' scores.")
            source = pair.get(f"system_{side}", score)
            texts[prompt].setdefault(pair[side], {})[source] = float(score)
    lists, rescored, several_sources = [], 0, 0
    for prompt, scored in texts.items():
        several_sources += sum(len(by_source) > 1 for by_source in scored.values())
        rescored += sum(len(set(by_source.values())) > 1 for by_source in scored.values())
        row = {"prompt": prompt, "completions": list(scored),
               "scores": [sum(s.values()) / len(s) for s in scored.values()]}
        if prompt in documents:
            row[document_column] = documents[prompt]
        lists.append(canonical_row(row))
    report = {"lists": len(lists), "completions": sum(len(r["completions"]) for r in lists),
              "texts_from_several_sources": several_sources, "rescored_texts": rescored}
    return lists, report


def load_summeval_lists(path: str) -> tuple[list[dict], dict]:
    """SummEval's expert-scored summary pairs (`../shared/data/summeval/summeval.jsonl`) as one list per document:
    the document prompt, its distinct summaries as completions and their expert scores (mean of the four attributes,
    1 to 5), with `doc_id`."""
    with open(path, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    return lists_from_scored_pairs(pairs, "doc_id")


def split_by_document(lists: list[dict], eval_fraction: float = 0.2, seed: int = 0, document_column: str = "doc_id"
                      ) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded shuffle of the documents, `eval_fraction` of them (rounded) held out with all their
    lists, so that no document is on both sides."""
    documents = sorted({row.get(document_column, row["prompt"]) for row in lists}, key=str)
    held_out = round(eval_fraction * len(documents))
    if not 0 < eval_fraction < 1 or not 0 < held_out < len(documents):
        raise ValueError(f"eval_fraction={eval_fraction} holds out {held_out} of {len(documents)} documents; choose "
                         "a fraction in (0, 1) that leaves at least one document on each side.")
    random.Random(seed).shuffle(documents)
    evaluation = set(documents[:held_out])
    train = [row for row in lists if row.get(document_column, row["prompt"]) not in evaluation]
    return train, [row for row in lists if row.get(document_column, row["prompt"]) in evaluation]
